"""The one policy for HTTP the server sends to addresses a user chose: a persona's LLM endpoint,
webhooks (and later tool and document URLs). The CPU profile's own llama.cpp is internal and never
goes through here.

- Only http(s) URLs with a host, no credentials in the URL; an LLM base URL has no query or fragment.
- The host is resolved, and loopback, link-local (cloud metadata), private, shared, reserved and
  multicast addresses are refused unless the operator's `allow` list (CIDRs) names them. The check runs
  again at connect time on the address actually dialled, so DNS rebinding cannot slip past it.
- No redirects, no proxies from the environment, a total deadline and a byte cap on every response.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from models.http_body import capped_chunks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(httpcore.ConnectError):
    """The policy refused a destination (httpx raises it as httpx.ConnectError with this text)."""


@dataclass(frozen=True)
class OutboundPolicy:
    allow: tuple[str, ...] = ()  # CIDRs an operator allows although they are internal (e.g. an in-cluster vLLM)
    deadline_s: float = 30.0  # a whole request, first byte to last
    max_bytes: int = 2 << 20  # of one response body
    connect_timeout_s: float = 5.0
    _nets: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nets", tuple(ipaddress.ip_network(c, strict=False) for c in self.allow))

    @classmethod
    def from_config(cls, cfg: dict | None) -> OutboundPolicy:
        cfg = dict(cfg or {})
        return cls(allow=tuple(cfg.pop("allow", ()) or ()), **cfg)

    def why_refused(self, ip: IPAddress) -> str | None:
        """None if `ip` may be dialled, else why not."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._nets):
            return None
        for what in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
            if getattr(ip, f"is_{what}"):
                return f"{ip} is a {what.replace('_', '-')} address"
        if not ip.is_global:
            return f"{ip} is not a public address"
        return None


def check_url(url: str, *, base_url: bool = False) -> str:
    """The URL's host, or ValueError saying what is wrong with it (before anything is resolved)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (put an LLM key in api_key)")
    if base_url and (parts.query or parts.fragment or "?" in url):
        raise ValueError("a base URL has no query or fragment (the API path is appended to it)")
    return parts.hostname


async def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


async def check_destination(url: str, policy: OutboundPolicy, *, base_url: bool = False) -> None:
    """Create-time check: ValueError with a clear reason if the policy would refuse `url`."""
    host = check_url(url, base_url=base_url)
    port = urlsplit(url).port or (443 if url.startswith("https") else 80)
    try:
        ips = await asyncio.wait_for(resolve(host, port), policy.connect_timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"host {host!r} does not resolve") from exc
    for ip in ips:
        why = policy.why_refused(ip)
        if why:
            raise ValueError(f"refused by the outbound policy: {why} (an operator can allow it in outbound.allow)")


class _PolicyBackend(httpcore.AsyncNetworkBackend):
    """Dials only addresses the policy allows, and dials the address it checked."""

    def __init__(self, policy: OutboundPolicy, inner: httpcore.AsyncNetworkBackend) -> None:
        self.policy, self.inner = policy, inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        try:
            ips = await resolve(host, port)
        except OSError as exc:
            raise Refused(f"host {host!r} does not resolve") from exc
        reasons = []
        for ip in ips:
            why = self.policy.why_refused(ip)
            if why is None:
                return await self.inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                    socket_options=socket_options)
            reasons.append(why)
        raise Refused(f"refused by the outbound policy: {'; '.join(reasons) or 'no address'}")

    async def connect_unix_socket(self, *args, **kwargs):
        raise Refused("unix sockets are not reachable through the outbound policy")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def client(policy: OutboundPolicy, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """An httpx client bound to the policy: no redirects, no environment proxies, dials checked addresses."""
    transport = httpx.AsyncHTTPTransport(retries=0)
    # httpx builds its connection pool with the default network backend and offers no argument for
    # another; the pool's backend is the one place every connection is dialled.
    pool = transport._pool
    pool._network_backend = _PolicyBackend(policy, pool._network_backend)
    return httpx.AsyncClient(transport=transport, headers=headers, follow_redirects=False, trust_env=False,
                             timeout=httpx.Timeout(policy.deadline_s, connect=policy.connect_timeout_s))


async def post(http: httpx.AsyncClient, url: str, policy: OutboundPolicy, **kwargs: Any) -> tuple[int, bytes]:
    """POST under the policy: (status, body). 3xx is returned, never followed. The deadline covers
    connecting and the headers too; the body stops at it and at the byte cap (TimeoutError, ValueError)."""
    deadline = time.monotonic() + policy.deadline_s
    async with asyncio.timeout(policy.deadline_s):
        async with http.stream("POST", url, **kwargs) as resp:
            body = b"".join([c async for c in capped_chunks(resp, deadline, policy.max_bytes)])
            return resp.status_code, body
