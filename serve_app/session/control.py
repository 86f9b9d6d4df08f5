"""Client messages on the data channel (the interactions protocol): echo, respond, interrupt, tool
results, and changes to the LLM's context, with participant vs operator grants and size, rate and budget limits.

A refused or malformed message gets a `system.error` back to the sender only (never the webhook, and
never with the sender's text in it); the session goes on."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from serve_app.events import ClientEvent, Event
from serve_app.session.context import LLMContext

MAX_MESSAGE = 64 * 1024  # bytes of one data-channel message, before it is parsed
MAX_TEXT = 5000  # characters of an echo or respond
MAX_APPEND = 20000  # characters of one context append
MAX_CONTEXT = 50000  # characters of conversational context in total (appends included)
RATE_PER_S = 10.0  # messages per second, sustained
BURST = 20  # messages at once
ERRORS_PER_S = 1.0  # error replies per second at most: a flood must not become a flood back

# Which grant each message needs (SessionSpec.grants).
NEEDS = {ClientEvent.ECHO: "echo", ClientEvent.RESPOND: "respond", ClientEvent.INTERRUPT: "interrupt",
         ClientEvent.APPEND_CONTEXT: "context", ClientEvent.OVERWRITE_CONTEXT: "context",
         ClientEvent.TOOL_RESULT: "respond"}


class Speaker(Protocol):
    def say(self, text: str) -> None: ...
    def respond(self, text: str) -> None: ...
    def interrupt(self) -> None: ...
    def tool_result(self, tool_call_id: str, result: Any) -> bool: ...


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.now = rate, burst, now
        self.tokens, self.at = burst, now()

    def take(self) -> bool:
        t = self.now()
        self.tokens = min(self.burst, self.tokens + (t - self.at) * self.rate)
        self.at = t
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Control:
    """`reply(event_type, **props)` answers the sender alone (the data channel)."""

    def __init__(self, speaker: Speaker, context: LLMContext, reply, grants: frozenset[str],
                 on_context_change: Callable[[], None] = lambda: None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.speaker = speaker
        self.context = context
        self.reply = reply
        self.grants = grants
        self.on_context_change = on_context_change
        self.rate = TokenBucket(RATE_PER_S, BURST, now)
        self.error_rate = TokenBucket(ERRORS_PER_S, 3, now)
        self.dropped = 0  # messages refused by the rate limit (reported in the next error reply)

    def refuse(self, code: str, message: str) -> None:
        if self.error_rate.take():
            self.reply(Event.ERROR, code=code, message=message, dropped=self.dropped)

    def on_message(self, message: Any) -> None:
        if not self.rate.take():
            self.dropped += 1
            self.refuse("rate_limited", f"more than {RATE_PER_S:.0f} messages per second: messages dropped")
            return
        size = len(message.encode() if isinstance(message, str) else message)
        if size > MAX_MESSAGE:
            self.refuse("too_large", f"message of {size} bytes; the limit is {MAX_MESSAGE}")
            return
        try:
            msg = json.loads(message)
            kind = msg["event_type"]
            props = msg.get("properties") or {}
            if not isinstance(props, dict) or not isinstance(kind, str):
                raise ValueError("event_type must be a string and properties an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.refuse("bad_message", "a client message is JSON {event_type, properties}")
            return
        if kind not in NEEDS:
            self.refuse("unknown_event", f"unknown event_type; expected one of {sorted(map(str, NEEDS))}")
            return
        if NEEDS[kind] not in self.grants:
            self.refuse("forbidden", f"{kind} needs the {NEEDS[kind]!r} grant, which this join token does not have")
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
        elif kind == ClientEvent.TOOL_RESULT:
            call_id = props.get("tool_call_id")
            if not isinstance(call_id, str) or "result" not in props:
                self.refuse("bad_message", "conversation.tool_result needs tool_call_id (string) and result")
            elif not self.speaker.tool_result(call_id[:100], props["result"]):
                self.refuse("unknown_tool_call", "no tool call with that tool_call_id is waiting for a result")
        else:
            self._change_context(kind, str(props.get("context", "")))

    def _change_context(self, kind: str, text: str) -> None:
        if kind == ClientEvent.APPEND_CONTEXT:
            text = text[:MAX_APPEND]
            if self.context.extra_chars() + len(text) > MAX_CONTEXT:
                self.refuse("context_budget", f"the conversational context would pass {MAX_CONTEXT} characters; "
                                              "overwrite it instead")
                return
            self.context.append(text)
        else:
            self.context.overwrite(text[:MAX_CONTEXT])
        self.on_context_change()
