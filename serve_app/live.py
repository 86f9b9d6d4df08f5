"""The ingress's live media sessions: admission (a slot is reserved when a conversation is created),
starting a session on a SessionHost, consuming its event stream (transcript rows, metrics, webhooks)
and ending it with a reason."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, Response
from ray.serve.exceptions import BackPressureError

from serve_app import metrics
from serve_app.db import Store
from serve_app.events import Event, ShutdownReason, event, goes_to_callback
from serve_app.session import SessionSpec
from serve_app.webhooks import WebhookSender

log = logging.getLogger("presence.api")


@dataclass
class LiveSession:
    gen: Any  # the SessionHost's streaming response
    replica: str | None
    started: float = field(default_factory=time.time)
    task: asyncio.Task | None = None  # consumes the stream
    reason: str | None = None  # the end we asked for (POST /end, DELETE)
    perception: dict | None = None  # the latest perception snapshot, for the end-of-call webhook
    perception_sent: bool = False


class LiveSessions:
    def __init__(self, host: Any, store: Store, max_sessions: int, join_window_s: float, answer_timeout_s: float) -> None:
        self.host = host
        self.store = store
        self.max_sessions = max_sessions
        self.join_window_s = join_window_s
        self.answer_timeout_s = answer_timeout_s
        self.webhooks = WebhookSender()
        self.live: dict[str, LiveSession] = {}
        self._starting = 0
        self._reserved: dict[str, float] = {}  # conversation id -> until when its slot is held

    # --- admission -------------------------------------------------------------------------------
    def slots_in_use(self) -> int:
        now = time.time()
        for cid in [c for c, until in self._reserved.items() if until < now or c in self.live]:
            self._reserved.pop(cid, None)
        return len(self.live) + self._starting + len(self._reserved)

    def full(self) -> bool:
        return self.slots_in_use() >= self.max_sessions

    def reserve(self, cid: str) -> None:
        """A created conversation holds a slot until it joins or its join window passes."""
        self._reserved[cid] = time.time() + self.join_window_s

    def capacity_response(self, why: str | None = None) -> JSONResponse:
        metrics.REJECTED.inc()
        why = why or (f"every session slot is taken ({self.max_sessions}: all SessionHost replicas are full at "
                      "max_replicas); nothing was created, try again later")
        return JSONResponse({"detail": why, "reason": "capacity", "live_sessions": len(self.live),
                             "max_sessions": self.max_sessions}, status_code=503, headers={"Retry-After": "10"})

    # --- a session's life ------------------------------------------------------------------------
    async def start(self, spec: SessionSpec, callback_url: str | None) -> Response | dict:
        """Start `spec` on a SessionHost. Returns the host's first item ({"type": "answer", "sdp"} or
        {"type": "error", ...}), or a 503 response when no slot or host can take it."""
        cid = spec.conversation_id
        reserved = self._reserved.pop(cid, None)
        if self.full():
            if reserved is not None:
                self._reserved[cid] = reserved
            return self.capacity_response()
        self._starting += 1
        try:
            first, gen = await asyncio.wait_for(self._first_item(spec), timeout=self.answer_timeout_s)
        except Exception as exc:  # no host took it: a clean 503, never a 500
            if isinstance(exc, (TimeoutError, StopAsyncIteration)):
                why = "no session host answered in time"
            else:
                log.warning("session host failed to start %s: %r", cid, exc)
                why = "the session host could not start the session"
            return self.capacity_response(why)
        finally:
            self._starting -= 1
        if first["type"] == "answer":
            metrics.SESSIONS_TOTAL.inc()
            entry = self.live[cid] = LiveSession(gen, first.get("replica"))
            metrics.LIVE_SESSIONS.set(len(self.live))
            entry.task = asyncio.ensure_future(self._consume(cid, entry, callback_url))
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
        reason = None
        try:
            async for item in entry.gen:
                ev = item["event"]
                etype, props = ev["event_type"], ev["properties"]
                if etype == Event.PERCEPTION_SNAPSHOT:
                    entry.perception = props  # memory only
                    continue
                if etype == Event.PERCEPTION_ANALYSIS:
                    entry.perception_sent = True
                if etype == Event.UTTERANCE:
                    self.store.add_utterance(cid, props["role"], props["speech"])
                elif etype == Event.TURN_TIMINGS:
                    metrics.observe_turn(props["ms_from_speech_end"])
                elif etype == Event.SHUTDOWN:
                    reason = props.get("shutdown_reason")
                await self._deliver(callback_url, ev)
        except asyncio.CancelledError:
            reason = entry.reason or ShutdownReason.ENDPOINT_HIT
        except Exception as exc:  # the host died (or we cancelled it): the transcript so far is stored
            log.warning("session %s stream failed: %s", cid, exc)
            reason = ShutdownReason.ERROR
        finally:
            await asyncio.shield(self._finalize(cid, reason, callback_url))

    async def _finalize(self, cid: str, reason: str | None, callback_url: str | None) -> None:
        entry = self.live.pop(cid, None)
        metrics.LIVE_SESSIONS.set(len(self.live))
        # An end we asked for wins over whatever the cancelled stream raised.
        reason = str((entry.reason if entry else None) or reason or ShutdownReason.ERROR)
        metrics.SHUTDOWNS.labels(reason=reason).inc()
        exists = self.store.get_conversation(cid) is not None
        self.store.set_status(cid, "ended", reason)
        if exists and entry and entry.reason:
            # The host could not say it (we cancelled its stream): the callback still hears it.
            await self._deliver(callback_url, event(cid, Event.SHUTDOWN, shutdown_reason=reason))
        if entry and entry.perception and not entry.perception_sent:
            await self._deliver(callback_url, event(cid, Event.PERCEPTION_ANALYSIS, **entry.perception))
        await self._deliver(callback_url, event(cid, Event.TRANSCRIPTION_READY, transcript=self.store.transcript(cid)))

    async def _deliver(self, callback_url: str | None, ev: dict) -> None:
        if callback_url and goes_to_callback(ev):
            await self.webhooks.send(callback_url, ev)

    async def end(self, cid: str, reason: ShutdownReason) -> None:
        self._reserved.pop(cid, None)
        entry = self.live.get(cid)
        if entry is None:
            self.store.set_status(cid, "ended", str(reason))
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
