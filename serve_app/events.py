"""The one catalogue of conversation events (the industry's interactions-protocol shape): what the
server emits, what a client may send, and why a session ends. Every emitter and the ingress use
these names; an event on the wire is the plain JSON dict `event()` builds."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any


class Event(StrEnum):
    """Events the server sends (data channel, the host's stream, webhooks)."""

    REPLICA_JOINED = "system.replica_joined"
    SHUTDOWN = "system.shutdown"
    ERROR = "system.error"
    UTTERANCE = "conversation.utterance"
    USER_STARTED = "conversation.user.started_speaking"
    USER_STOPPED = "conversation.user.stopped_speaking"
    REPLICA_STARTED = "conversation.replica.started_speaking"
    REPLICA_STOPPED = "conversation.replica.stopped_speaking"
    TURN_TIMINGS = "conversation.turn_timings"
    AVATAR = "conversation.replica.avatar"  # how the client shows the avatar (video mode, head file)
    PERCEPTION = "conversation.perception"
    PERCEPTION_TOOL_CALL = "conversation.perception_tool_call"
    TOOL_CALL = "conversation.tool_call"
    PERCEPTION_ANALYSIS = "application.perception_analysis"
    TRANSCRIPTION_READY = "application.transcription_ready"
    # Host -> ingress only (never to the client or a webhook): the perception summary so far, kept for
    # the end-of-call analysis in case the stream is cut before the host can send its own.
    PERCEPTION_SNAPSHOT = "internal.perception_snapshot"


class ClientEvent(StrEnum):
    """Messages a client may send on the data channel."""

    ECHO = "conversation.echo"
    RESPOND = "conversation.respond"
    INTERRUPT = "conversation.interrupt"
    APPEND_CONTEXT = "conversation.append_llm_context"
    OVERWRITE_CONTEXT = "conversation.overwrite_llm_context"
    TOOL_RESULT = "conversation.tool_result"  # the answer to a conversation.tool_call


class ShutdownReason(StrEnum):
    MAX_CALL_DURATION = "max_call_duration"
    PARTICIPANT_LEFT = "participant_left_timeout"
    PARTICIPANT_ABSENT = "participant_absent_timeout"
    ENDPOINT_HIT = "end_conversation_endpoint_hit"
    ERROR = "error"
    SESSION_LOST = "session_lost"  # reconciliation: no session host held it any more


CALLBACK_PREFIXES = ("system.", "application.")


def event(conversation_id: str, event_type: Event, **properties: Any) -> dict:
    """An event as it travels: JSON-ready (the enum members are str)."""
    return {
        "message_type": str(event_type).split(".", 1)[0],
        "event_type": str(event_type),
        "conversation_id": conversation_id,
        "timestamp": time.time(),
        "properties": properties,
    }


def goes_to_callback(ev: dict) -> bool:
    return ev.get("event_type", "").startswith(CALLBACK_PREFIXES)
