"""Client messages on the data channel (the interactions protocol): echo, respond, interrupt, and
changes to the LLM's context. Malformed or unknown messages get a `system.error`, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from serve_app.events import ClientEvent, Event
from serve_app.session.context import LLMContext

MAX_TEXT = 5000
MAX_APPEND = 20000
MAX_CONTEXT = 50000


class Speaker(Protocol):
    def say(self, text: str) -> None: ...
    def respond(self, text: str) -> None: ...
    def interrupt(self) -> None: ...


class Control:
    def __init__(self, speaker: Speaker, context: LLMContext, emit,
                 on_context_change: Callable[[], None] = lambda: None) -> None:
        self.speaker = speaker
        self.context = context
        self.emit = emit
        self.on_context_change = on_context_change

    def on_message(self, message: Any) -> None:
        try:
            msg = json.loads(message)
            kind = msg["event_type"]
            props = msg.get("properties") or {}
            if not isinstance(props, dict):
                raise ValueError("properties must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            self.emit(Event.ERROR, message=f"bad client message: {exc}")
            return
        if kind == ClientEvent.ECHO:
            text = str(props.get("text", "")).strip()[:MAX_TEXT]
            if text:
                self.speaker.say(text)
        elif kind == ClientEvent.RESPOND:
            text = str(props.get("text", "")).strip()[:MAX_TEXT]
            if text:
                self.speaker.respond(text)
        elif kind == ClientEvent.INTERRUPT:
            self.speaker.interrupt()
        elif kind == ClientEvent.APPEND_CONTEXT:
            self.context.append(str(props.get("context", ""))[:MAX_APPEND])
            self.on_context_change()
        elif kind == ClientEvent.OVERWRITE_CONTEXT:
            self.context.overwrite(str(props.get("context", ""))[:MAX_CONTEXT])
            self.on_context_change()
        else:
            self.emit(Event.ERROR, message=f"unknown event_type {kind!r}")
