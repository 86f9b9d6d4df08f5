"""What a conversation leaves in the database, written by whoever holds it: the SessionHost keeps
its session's utterances, webhooks and final status itself, so a dead or restarted ingress loses
nothing; the ingress's reconciliation ends conversations no host holds any more.

All functions block (SQLAlchemy); async callers run them with asyncio.to_thread."""

from __future__ import annotations

import logging
import time

from serve_app.db import Store
from serve_app.events import Event, ShutdownReason, event, goes_to_callback
from serve_app.webhooks import queue_webhook

log = logging.getLogger("presence.ledger")
STALE_S = 30.0  # a joined conversation whose host has not beaten for this long is held by nobody
HEARTBEAT_S = 2.0  # how often a SessionHost says which sessions it holds (and learns which were ended)


def keep_event(store: Store, callback_url: str | None, ev: dict) -> None:
    """One event of a live session: its utterance into the transcript, its webhook into the queue."""
    if ev["event_type"] == Event.UTTERANCE:
        props = ev["properties"]
        store.add_utterance(ev["conversation_id"], props["role"], props["speech"])
    if callback_url and goes_to_callback(ev):
        queue_webhook(store, callback_url, ev)


def finish(store: Store, cid: str, reason: str, callback_url: str | None, shutdown_sent: bool) -> None:
    """The conversation has ended: its status and reason, the shutdown webhook if it was not sent
    with the events, and `application.transcription_ready` with the whole transcript."""
    store.set_status(cid, "ended", reason)
    if callback_url:
        if not shutdown_sent:
            queue_webhook(store, callback_url, event(cid, Event.SHUTDOWN, shutdown_reason=reason))
        queue_webhook(store, callback_url, event(cid, Event.TRANSCRIPTION_READY, transcript=store.transcript(cid)))


def end_lost(store: Store, now: float | None = None, stale_s: float = STALE_S) -> list[str]:
    """Reconciliation: end every active conversation nobody holds (its host died or was lost with
    the ingress that knew of it; or nobody joined in time), with a reason and its webhooks."""
    now = time.time() if now is None else now
    ended = []
    for row in store.lost_conversations(now, stale_s):
        reason = ShutdownReason.SESSION_LOST if row.joined_at is not None else ShutdownReason.PARTICIPANT_ABSENT
        finish(store, row.conversation_id, str(reason), row.callback_url, shutdown_sent=False)
        ended.append(row.conversation_id)
    if ended:
        log.warning("reconciliation ended %d conversation(s) no session host holds", len(ended))
    return ended
