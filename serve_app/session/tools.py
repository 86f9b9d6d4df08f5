"""The LLM's tool calls in a session: each call is told to the client as `conversation.tool_call`; a
client tool waits for the client's `conversation.tool_result`, a tool with `delivery` is POSTed to its
URL by the server (under the outbound-HTTP policy). A result that never comes is None, and the reply
apologises (serve_app/session/reply.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from models.tools import ToolCall, arguments_error
from serve_app.events import Event
from serve_app.schemas import LLMTool

log = logging.getLogger("presence.session")

MAX_RESULT = 4000  # characters of one tool result the LLM reads
MAX_PENDING = 16  # client tool calls waiting for an answer at once


class ToolRunner:
    """`post_json(url, body) -> (status, body)`: the host's POST under the outbound-HTTP policy (None: tools
    with a delivery URL fail, and the reply apologises)."""

    def __init__(self, conversation_id: str, tools: list[LLMTool], client_timeout_s: float,
                 emit: Callable[..., None],
                 post_json: Callable[[str, dict], Awaitable[tuple[int, bytes]]] | None = None) -> None:
        self.cid = conversation_id
        self.tools = {t.function.name: t for t in tools}
        self.definitions = [t.openai() for t in tools]
        self.client_timeout_s = client_timeout_s
        self.emit = emit
        self.post_json = post_json
        self._pending: dict[str, asyncio.Future[str]] = {}

    async def run(self, call: ToolCall, inference_id: str) -> str | None:
        """The call's result as the LLM reads it, or None (unknown tool, bad arguments, no answer in time)."""
        tool = self.tools.get(call.name)
        if tool is None:
            log.info("session %s: the LLM called an unknown tool", self.cid)
            return None
        why = arguments_error(call.arguments, tool.function.parameters)
        if why is not None:
            log.info("session %s: the LLM called %s with bad arguments: %s", self.cid, call.name, why)
            return None
        self.emit(Event.TOOL_CALL, tool_call_id=call.id, inference_id=inference_id, name=call.name,
                  arguments=call.arguments)
        if tool.delivery is not None:
            return await self._deliver(call, inference_id, tool)
        if len(self._pending) >= MAX_PENDING:
            return None
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[call.id] = waiter
        try:
            return await asyncio.wait_for(waiter, self.client_timeout_s)
        except TimeoutError:
            return None
        finally:
            self._pending.pop(call.id, None)  # an answer after this (timeout, interrupted reply) is refused

    def answer(self, tool_call_id: str, result: Any) -> bool:
        """conversation.tool_result: False when no call with that id is waiting."""
        waiter = self._pending.get(tool_call_id)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(_as_text(result))
        return True

    async def _deliver(self, call: ToolCall, inference_id: str, tool: LLMTool) -> str | None:
        if self.post_json is None:
            return None
        body = {"conversation_id": self.cid, "tool_call_id": call.id, "inference_id": inference_id,
                "name": call.name, "arguments": json.loads(call.arguments or "{}")}
        try:
            status, content = await asyncio.wait_for(
                self.post_json(str(tool.delivery.url), body), tool.delivery.timeout_s)
        except Exception as exc:  # refused, unreachable, too slow, too large: the reply apologises
            log.info("session %s: tool %s delivery failed: %s", self.cid, call.name, type(exc).__name__)
            return None
        if not 200 <= status < 300:
            log.info("session %s: tool %s delivery answered HTTP %d", self.cid, call.name, status)
            return None
        text = content.decode("utf-8", "replace")
        try:
            value = json.loads(text)
            if isinstance(value, dict) and "result" in value:
                return _as_text(value["result"])
        except ValueError:
            pass
        return _as_text(text)

    def close(self) -> None:
        for waiter in self._pending.values():
            waiter.cancel()


def _as_text(result: Any) -> str:
    text = result if isinstance(result, str) else json.dumps(result)
    return text[:MAX_RESULT]
