"""Keeps the LLM's prompt cache one step ahead of the conversation.

On a CPU, processing the prompt is most of the time to first token (~10 ms a token for SmolLM2 on one
thread, ~25 ms for a 0.5B model): a reply that had to read the whole persona, the facts and the history
would wait seconds. So whenever the conversation's prefix changes (the session starts, a reply ends,
the client changes the context), the session asks the LLM to process that prefix now, while the user
is still listening or speaking; the reply then reads only the user's new message. What the camera
shows (`seen`, the user's look when the reply ended or when they began to speak) opens that message,
so it is prefilled too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from models.llm import seen_lead
from serve_app.session.context import LLMContext
from serve_app.session.tasks import Tasks

log = logging.getLogger("presence.session")


class PromptPrefill:
    """`llm` is the LLM deployment handle (`prefill.remote(messages, endpoint, tools)`)."""

    def __init__(self, llm: Any, context: LLMContext, endpoint: dict | None, tasks: Tasks,
                 tools: list[dict] | None = None, conversation: str | None = None) -> None:
        self.llm = llm
        self.conversation = conversation  # whose cache to warm (the backend may keep one per conversation)
        self.tools = tools  # the persona's tool definitions: part of the prompt prefix
        self.context = context
        self.endpoint = endpoint
        self.tasks = tasks
        self.tokens: list[int] = []  # tokens processed per prefill (what the replies did not have to)
        self._task: asyncio.Task | None = None
        self._again = False
        self.lead = ""  # how the next user message starts (its knowledge block), cached with the prefix
        self.seen = ""  # what the camera shows, before the lead: the next reply's note (see `see`)
        self.cached_lead: str | None = None  # the lead of the last prefill that completed (None: one is running)
        self.warms: bool | None = None  # the backend keeps a cache this warms (None: no prefill answered yet)

    def request(self, lead: str | None = None) -> None:
        """The prefix changed: process it (once the prefill in flight, if any, is done). `lead`: a new
        start of the next user message ("" after a reply: the next turn's block is not known yet)."""
        if lead is not None:
            self.lead = lead
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self.tasks.spawn(self._run())

    def see(self, seen: str | None) -> bool:
        """What the user looks like now: the next user message opens with it. It stays until the next
        call, so every prefill and the reply of one utterance read the same note. True when it changed
        (the caller requests a prefill)."""
        changed = (seen or "") != self.seen
        self.seen = seen or ""
        return changed

    def stop(self) -> None:
        """A reply starts and reads the rest of its prompt itself: the prefill in flight ends after the
        step the LLM is processing (the LLM deployment prefills a step at a time)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def warm(self, lead: str) -> bool:
        """Prefill with `lead` and wait for it: True when the cache then holds the prefix and `lead`
        (False: the LLM failed, or a newer request replaced the lead meanwhile)."""
        self.request(lead=lead)
        task = self._task
        if task is not None:
            await asyncio.shield(task)
        return self.cached_lead == lead

    async def _run(self) -> None:
        while True:
            self._again = False
            # Read when the call is made, not when asked: a reply that just ended records what was
            # heard right after telling the session it finished.
            messages, lead = self.context.prefix(), self.lead
            self.cached_lead = None
            call = None
            try:
                call = self.llm.prefill.remote(messages, self.endpoint, self.tools, seen_lead(self.seen) + lead,
                                               self.conversation)
                n = await call
            except asyncio.CancelledError:
                if call is not None:
                    call.cancel()  # a Serve request goes on unless its response is cancelled too
                raise
            except Exception as exc:  # a dead or restarting LLM: the next reply reads its prompt itself
                log.info("prompt prefill skipped: %s: %s", type(exc).__name__, exc)
                return
            self.cached_lead, self.warms = lead, n is not None
            if n is not None:
                self.tokens.append(n)
            if not self._again:
                return
