"""The knowledge base in a turn: the passages for the user's words, at the start of their message.

They are looked up from the words so far, once, a second into the utterance (`Listener` interim
transcript), and the prompt prefill then caches them with the conversation prefix while the user is
still speaking; the reply reads only the rest of the words. If no interim words came (a short
utterance), the reply looks them up from the final words itself (one embedding, ~15-20 ms on a CPU).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from models.llm import knowledge_block
from serve_app.schemas import KnowledgeLayer
from serve_app.session.prefill import PromptPrefill
from serve_app.session.tasks import Tasks

log = logging.getLogger("presence.session")
LOOKUP_WAIT_S = 0.5  # a reply waits at most this for its passages (then it answers without them)


class TurnKnowledge:
    """`knowledge`: the Knowledge deployment handle (`search.remote(text, document_ids, k, min_score)`)."""

    def __init__(self, knowledge: Any, document_ids: list[str], layer: KnowledgeLayer, prefill: PromptPrefill,
                 tasks: Tasks) -> None:
        self.knowledge = knowledge
        self.document_ids = document_ids
        self.layer = layer
        self.prefill = prefill
        self.tasks = tasks
        self.block = ""  # the current utterance's passages, as the user message starts with them
        self._used = True  # the block was read by a reply (the next utterance needs its own)

    def new_utterance(self) -> None:
        self.block, self._used = "", False

    def pending_lead(self) -> str:
        """What the next user message starts with, if known: the block of an utterance not yet replied to."""
        return "" if self._used else self.block

    def on_partial(self, text: str) -> None:
        self.tasks.spawn(self._prefetch(text))

    async def _prefetch(self, text: str) -> None:
        block = await self._lookup(text)
        if block and not self._used:
            self.block = block
            self.prefill.request(lead=block)

    async def for_turn(self, user_text: str) -> str:
        """The block the reply's user message starts with (the prefetched one, which is in the cache)."""
        self._used = True
        if self.block:
            return self.block
        try:
            return await asyncio.wait_for(self._lookup(user_text), LOOKUP_WAIT_S)
        except TimeoutError:
            return ""

    async def _lookup(self, text: str) -> str:
        try:
            passages = await self.knowledge.search.remote(text, self.document_ids, self.layer.top_k,
                                                          self.layer.min_score)
        except Exception as exc:  # a dead Knowledge replica: the reply goes on without passages
            log.info("knowledge lookup skipped: %s", type(exc).__name__)
            return ""
        kept, size = [], 0
        for p in passages:
            if size + len(p.text) > self.layer.max_chars and kept:
                break
            kept.append(p.text[: self.layer.max_chars])
            size += len(p.text)
        return knowledge_block(kept)
