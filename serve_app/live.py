"""The ingress's live media sessions: admission (a slot is held from when a conversation is created
until its join window passes, and while a host holds it: counted in the database, so every ingress
replica, and one just restarted, sees the same number), starting a session on a SessionHost,
reading its event stream (metrics, the perception snapshot) and ending it with a reason.

The host itself stores the transcript, queues the webhooks and records the end (serve_app.ledger);
the ingress does so only when the host died and could not."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response
from ray.serve.exceptions import BackPressureError

from serve_app import ledger, metrics
from serve_app.db import Store
from serve_app.events import Event, ShutdownReason, event
from serve_app.session import SessionSpec
from serve_app.webhooks import WebhookQueue, queue_webhook

log = logging.getLogger("presence.api")


@dataclass
class LiveSession:
    gen: Any  # the SessionHost's streaming response
    replica: str | None
    node: str | None = None  # the Ray node of that SessionHost replica
    started: float = field(default_factory=time.time)
    task: asyncio.Task | None = None  # consumes the stream
    reason: str | None = None  # the end we asked for (POST /end, DELETE)
    perception: dict | None = None  # the latest perception snapshot, for the end-of-call webhook
    perception_sent: bool = False
    host_reason: str | None = None  # the reason the host's system.shutdown gave


class LiveSessions:
    def __init__(self, host: Any, store: Store, max_sessions: int, join_window_s: float, answer_timeout_s: float,
                 webhooks: WebhookQueue) -> None:
        self.host = host
        self.store = store
        self.max_sessions = max_sessions
        self.join_window_s = join_window_s
        self.answer_timeout_s = answer_timeout_s
        self.webhooks = webhooks
        self.live: dict[str, LiveSession] = {}  # sessions this replica started (and reads the streams of)

    # --- admission ---------------------------------------------------------------------------------
    async def slots_in_use(self) -> int:
        return await asyncio.to_thread(self.store.slots_in_use, time.time(), ledger.STALE_S, self.join_window_s)

    async def live_count(self) -> int:
        return await asyncio.to_thread(self.store.live_count, time.time(), ledger.STALE_S)

    async def full(self) -> bool:
        return await self.slots_in_use() >= self.max_sessions

    def capacity_response(self, why: str | None = None) -> JSONResponse:
        metrics.REJECTED.inc()
        why = why or (f"every session slot is taken ({self.max_sessions}: all SessionHost replicas are full at "
                      "max_replicas); nothing was created, try again later")
        return JSONResponse({"detail": why, "reason": "capacity", "live_sessions": len(self.live),
                             "max_sessions": self.max_sessions}, status_code=503, headers={"Retry-After": "10"})

    # --- a session's life ------------------------------------------------------------------------
    async def start(self, spec: SessionSpec) -> Response | dict:
        """Start `spec` (already claimed in the database: it counts as one slot) on a SessionHost.
        Returns the host's first item ({"type": "answer", "sdp"} or {"type": "error", ...}), or a 503
        response when no slot or host can take it."""
        cid = spec.conversation_id
        if await self.slots_in_use() > self.max_sessions:
            return self.capacity_response()
        try:
            first, gen = await asyncio.wait_for(self._first_item(spec), timeout=self.answer_timeout_s)
        except Exception as exc:  # no host took it: a clean 503, never a 500
            if isinstance(exc, (TimeoutError, StopAsyncIteration)):
                why = "no session host answered in time"
            else:
                log.warning("session host failed to start %s: %s", cid, type(exc).__name__)
                why = "the session host could not start the session"
            return self.capacity_response(why)
        if first["type"] == "answer":
            metrics.SESSIONS_TOTAL.inc()
            entry = self.live[cid] = LiveSession(gen, first.get("replica"), first.get("node"))
            metrics.LIVE_SESSIONS.set(len(self.live))
            entry.task = asyncio.ensure_future(self._consume(cid, entry, spec.callback_url))
        return first

    async def _first_item(self, spec: SessionSpec) -> tuple[dict, Any]:
        """Start the host call and wait for its first item. The ingress has admitted the session (a
        slot is free), so a full handle queue means replicas are still starting during a ramp: wait
        for room instead of refusing a user the autoscaler is about to serve (answer_timeout_s bounds it)."""
        delay = 0.25
        while True:
            gen = self.host.options(stream=True).run.remote(spec)
            try:
                return await gen.__anext__(), gen
            except BaseException as exc:
                gen.cancel()
                if not _backpressure(exc):
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _consume(self, cid: str, entry: LiveSession, callback_url: str | None) -> None:
        host_died = False
        try:
            async for item in entry.gen:
                ev = item["event"]
                etype, props = ev["event_type"], ev["properties"]
                if etype == Event.PERCEPTION_SNAPSHOT:
                    entry.perception = props  # memory only
                elif etype == Event.PERCEPTION_ANALYSIS:
                    entry.perception_sent = True
                elif etype == Event.TURN_TIMINGS:
                    metrics.observe_turn(props["ms_from_speech_end"])
                elif etype == Event.SHUTDOWN:
                    entry.host_reason = props.get("shutdown_reason")
        except asyncio.CancelledError:
            pass  # we ended it (POST /end, DELETE): the host records the end itself
        except Exception as exc:
            if entry.reason is None:  # not our cancel (which raises RequestCancelledError): the host died
                log.warning("session %s stream failed: %s", cid, type(exc).__name__)
                host_died = True
                entry.gen.cancel()
        finally:
            await asyncio.shield(self._finalize(cid, entry, host_died, callback_url))

    async def _finalize(self, cid: str, entry: LiveSession, host_died: bool, callback_url: str | None) -> None:
        self.live.pop(cid, None)
        metrics.LIVE_SESSIONS.set(len(self.live))
        reason = str(entry.reason or entry.host_reason or (ShutdownReason.ERROR if host_died else ""))
        if reason:
            metrics.SHUTDOWNS.labels(reason=reason).inc()
        if not host_died:
            return
        try:
            if callback_url and entry.perception and not entry.perception_sent:
                await asyncio.to_thread(queue_webhook, self.store, callback_url,
                                        event(cid, Event.PERCEPTION_ANALYSIS, **entry.perception))
            await asyncio.to_thread(ledger.finish, self.store, cid, reason, callback_url, False)
            self.webhooks.wake()
        except Exception as exc:
            log.warning("session %s: could not record its end: %s", cid, type(exc).__name__)

    async def end(self, cid: str, reason: ShutdownReason) -> None:
        """End a conversation. A session this replica started is cancelled now; one held elsewhere
        (another ingress replica, or from before a restart) sees its row ended at its host's next
        heartbeat and shuts down within a few seconds."""
        entry = self.live.get(cid)
        await asyncio.to_thread(self.store.set_status, cid, "ended", str(reason))
        if entry is None:
            return
        entry.reason = reason
        entry.gen.cancel()
        entry.task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(entry.task), timeout=10)
        except (TimeoutError, asyncio.CancelledError):
            pass


def _backpressure(exc: BaseException) -> bool:
    return isinstance(exc, BackPressureError) or "backpressure" in str(exc).lower()
