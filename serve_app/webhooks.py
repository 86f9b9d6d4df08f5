"""Webhook delivery, Standard Webhooks style, from a queue persisted in the database.

Every delivery is a row (`db.WebhookRow`) written when the event happens, so it survives an ingress
restart and never waits on the session's event path. A `WebhookQueue` per ingress replica drains due
rows: at most `per_endpoint` in flight per endpoint (scheme://host:port), so a slow or dead endpoint
delays only its own deliveries; retries back off exponentially up to `max_attempts`. With one in
flight (the default) an endpoint gets its events in the order they happened, unless one fails and is
retried later (receivers deduplicate on webhook-id and must not rely on order).

Each POST carries `webhook-id` (stable over retries), `webhook-timestamp` (Unix seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the key is the
base64 part of the deployment's `whsec_...` secret. `verify()` is the recipe a receiver follows.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from urllib.parse import urlsplit

from deployments import outbound
from serve_app.db import Store, WebhookRow

log = logging.getLogger("presence.webhooks")
TOLERANCE_S = 300  # receivers refuse timestamps further than this from their clock (replay protection)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, webhook_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(_key(secret), f"{webhook_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: str, now: float | None = None) -> bool:
    """What a receiver does: recompute the signature over id.timestamp.body, compare in constant time
    with each `v1,` signature in the header, and refuse stale timestamps."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        ts = int(h["webhook-timestamp"])
        expected = sign(secret, h["webhook-id"], ts, body).encode()
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - ts) > TOLERANCE_S:
        return False
    return any(hmac.compare_digest(expected, s.encode()) for s in h.get("webhook-signature", "").split())


def endpoint_of(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}:{p.port or (443 if p.scheme == 'https' else 80)}"


def backoff_s(attempts: int) -> float:
    """Seconds before retry number `attempts` (1, 2, 4 ... up to 10 minutes)."""
    return min(600.0, 2.0 ** max(0, attempts - 1))


def queue_webhook(store: Store, url: str, payload: dict) -> str:
    """Persist one delivery (blocking: a database write); any process with the database may queue.
    Returns its webhook-id."""
    webhook_id = "msg_" + uuid.uuid4().hex
    store.queue_webhook(webhook_id, url, endpoint_of(url), json.dumps(payload, separators=(",", ":")))
    return webhook_id


class WebhookQueue:
    def __init__(self, store: Store, secret: str, policy: outbound.OutboundPolicy, per_endpoint: int = 1,
                 max_attempts: int = 8, poll_s: float = 1.0) -> None:
        self.store, self.secret, self.policy = store, secret, policy
        self.per_endpoint, self.max_attempts, self.poll_s = per_endpoint, max_attempts, poll_s
        self.http = outbound.client(policy)
        self._in_flight: dict[str, int] = {}
        self._sending: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()

    def enqueue(self, url: str, payload: dict) -> str:
        """queue_webhook on this queue's database."""
        return queue_webhook(self.store, url, payload)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Drain due deliveries until cancelled (one loop per ingress replica)."""
        while True:
            try:
                await self._drain_once()
            except Exception as exc:  # a database hiccup must not end delivery for good
                log.warning("webhook queue: %s", type(exc).__name__)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass

    async def _drain_once(self) -> None:
        now = time.time()
        for row in await asyncio.to_thread(self.store.due_webhooks, now, 200):
            if row.id in self._sending or self._in_flight.get(row.endpoint, 0) >= self.per_endpoint:
                continue
            lease = now + self.policy.deadline_s + 30  # another replica retries it if this one dies mid-send
            if not await asyncio.to_thread(self.store.claim_webhook, row.id, row.next_at, lease):
                continue  # another ingress replica took it
            self._sending.add(row.id)
            self._in_flight[row.endpoint] = self._in_flight.get(row.endpoint, 0) + 1
            task = asyncio.ensure_future(self._deliver(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, row: WebhookRow) -> None:
        attempts = row.attempts + 1
        error = None
        try:
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": row.webhook_id,
                       "webhook-timestamp": str(ts), "webhook-signature": sign(self.secret, row.webhook_id, ts, row.body)}
            status, _ = await outbound.post(self.http, row.url, self.policy, content=row.body.encode(), headers=headers)
            if 200 <= status < 300:
                await asyncio.to_thread(self.store.webhook_done, row.id, "delivered", attempts, time.time())
                return
            error = f"HTTP {status}"
        except Exception as exc:  # refused by the policy, unreachable, too slow, too large
            error = (str(exc) or type(exc).__name__)[:300]
        finally:
            self._sending.discard(row.id)
            self._in_flight[row.endpoint] -= 1
            self.wake()
        final = attempts >= self.max_attempts
        # The endpoint (scheme, host, port) only: a full callback URL may carry a secret token.
        log.warning("webhook %s to %s failed (attempt %d%s): %s", row.webhook_id, row.endpoint, attempts,
                    ", giving up" if final else "", error)
        await asyncio.to_thread(self.store.webhook_done, row.id, "failed" if final else "pending", attempts,
                                time.time() + backoff_s(attempts), error)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.http.aclose()
