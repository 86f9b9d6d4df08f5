"""Conversation events in the industry's interactions-protocol shape."""

from __future__ import annotations

import time
from typing import Any

SYSTEM_EVENTS = ("system.replica_joined", "system.shutdown")
CALLBACK_PREFIXES = ("system.", "application.")
CLIENT_EVENTS = ("conversation.echo", "conversation.respond", "conversation.interrupt",
                 "conversation.append_llm_context", "conversation.overwrite_llm_context")
SHUTDOWN_REASONS = ("max_call_duration", "participant_left_timeout", "participant_absent_timeout",
                    "end_conversation_endpoint_hit", "error")


def event(conversation_id: str, event_type: str, **properties: Any) -> dict:
    return {
        "message_type": event_type.split(".", 1)[0],
        "event_type": event_type,
        "conversation_id": conversation_id,
        "timestamp": time.time(),
        "properties": properties,
    }


def goes_to_callback(ev: dict) -> bool:
    return ev.get("event_type", "").startswith(CALLBACK_PREFIXES)
