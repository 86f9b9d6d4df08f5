"""ICE policy for aiortc (aioice), applied in every process that holds peer connections.

- Loopback candidates: aioice never offers 127.0.0.1. A single-box deployment (the CPU profile, tests,
  benchmarks) wants exactly that: media on loopback only. Production sets PRESENCE_ICE_LOOPBACK=0 and
  uses STUN/TURN.
- Consent freshness (RFC 7675) as the RFC has it: consent expires when no check has been answered for
  30 s. aioice 0.13 gives each check a single 0.5 s try and ends the connection after six misses in a
  row, so a peer whose event loop answers late on a busy box (three sessions' worth of work on two
  cores, replicas starting) is cut off after ~30 s while its media still flows (tests/test_ice.py).
  Expiry is logged with what the connection saw of the checks in both directions (`ConsentStats`:
  ours sent, timed out, refused; the peer's received, refused, when the last one came), and so is which
  signal ended a participant (serve_app.session.transport).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aioice.ice
from aioice import stun

log = logging.getLogger("presence.ice")
CONSENT_EXPIRY_S = 30.0  # RFC 7675 section 5.1
CONSENT_RETRANSMISSIONS = 3  # each check is answered within 0.5 + 1 + 2 + 4 s, with STUN's own backoff


def loopback_only_enabled() -> bool:
    return os.environ.get("PRESENCE_ICE_LOOPBACK", "0") == "1"


def use_loopback_candidates() -> None:
    """Gather host candidates on 127.0.0.1 only (idempotent)."""
    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


@dataclass
class ConsentStats:
    """One connection's STUN checks after it connected, both directions: where consent checks get lost."""

    sent: int = 0  # our consent checks (each retransmitted up to CONSENT_RETRANSMISSIONS times)
    timed_out: int = 0
    refused: Counter = field(default_factory=Counter)  # error code of the peer's refusals of our checks
    received: int = 0  # the peer's binding requests (its connectivity and consent checks)
    last_received: float | None = None  # monotonic time of the last one
    we_refused: Counter = field(default_factory=Counter)  # error codes we answered the peer's requests with

    def summary(self, now: float) -> str:
        ago = "never" if self.last_received is None else f"{now - self.last_received:.0f} s ago"
        return (f"our checks: {self.sent} sent, {self.timed_out} timed out, refused {dict(self.refused) or 0}; "
                f"the peer's requests: {self.received} received (last {ago}), refused {dict(self.we_refused) or 0}")


def consent_stats(conn: aioice.ice.Connection) -> ConsentStats:
    stats = conn.__dict__.get("_presence_consent")
    if stats is None:
        stats = conn.__dict__["_presence_consent"] = ConsentStats()
    return stats


async def _query_consent(self: aioice.ice.Connection) -> None:
    """A consent check every ~5 s on each nominated pair, retransmitted like any STUN request; the
    connection closes when none has been answered for CONSENT_EXPIRY_S. Checks run side by side (one
    retransmits for up to 7.5 s), so expiry is judged on time, not after the slowest check."""
    answered = time.monotonic()
    stats = consent_stats(self)
    in_flight: set[asyncio.Task] = set()

    async def check(pair: aioice.ice.CandidatePair) -> None:
        nonlocal answered
        stats.sent += 1
        try:
            await pair.protocol.request(self.build_request(pair, nominate=False), pair.remote_addr,
                                        integrity_key=self.remote_password.encode("utf8"),
                                        retransmissions=CONSENT_RETRANSMISSIONS)
            answered = time.monotonic()
        except stun.TransactionFailed as exc:
            stats.refused[exc.response.attributes.get("ERROR-CODE", (0, ""))[0]] += 1
        except stun.TransactionError:
            stats.timed_out += 1

    try:
        while True:
            await asyncio.sleep(aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * random.random()))
            for pair in list(self._nominated.values()):
                task = asyncio.ensure_future(check(pair))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if time.monotonic() - answered >= CONSENT_EXPIRY_S:
                log.warning("ICE consent expired: no check answered for %.0f s (%s; pairs %s)",
                            time.monotonic() - answered, stats.summary(time.monotonic()),
                            [(p.local_addr, p.remote_addr) for p in self._nominated.values()])
                self._query_consent_task = None
                await self.close()
                return
    finally:
        for task in list(in_flight):
            task.cancel()


def _count_requests(original):
    def request_received(self, message, addr, protocol, *rest):
        stats = consent_stats(self)
        stats.received += 1
        stats.last_received = time.monotonic()
        return original(self, message, addr, protocol, *rest)

    request_received.counted = True
    return request_received


def _count_refusals(original):
    def respond_error(self, request, addr, protocol, error_code, *rest):
        consent_stats(self).we_refused[error_code[0]] += 1
        return original(self, request, addr, protocol, error_code, *rest)

    respond_error.counted = True
    return respond_error


def use_rfc_consent() -> None:
    """Consent freshness that tolerates a slow answer, with its checks counted (idempotent)."""
    conn = aioice.ice.Connection
    conn.query_consent = _query_consent
    if not getattr(conn.request_received, "counted", False):
        conn.request_received = _count_requests(conn.request_received)
    if not getattr(conn.respond_error, "counted", False):
        conn.respond_error = _count_refusals(conn.respond_error)


def apply_policy() -> None:
    use_rfc_consent()
    if loopback_only_enabled():
        use_loopback_candidates()
