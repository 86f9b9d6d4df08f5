"""The knowledge base in a turn: the passages for the user's words, at the start of their message.

Reading passages is prompt processing, ~7 ms a token for the CPU default LLM (a 40-word passage:
~0.35 s), so they must be in the prompt cache before the reply starts or they are its latency. They
are looked up from the words so far, a second into the utterance (`Listener` interim transcript;
again at two seconds if the first words found nothing), and prefilled one passage at a time, best
first, while the user is still speaking; the reply reads the ones that made it. When the user goes on
after a pause, the words before it (the pause's transcript, which a speculative reply took) are
looked up again: they say more than the interim words. A reply with none prefilled (an utterance too short for the interim
lookup) looks them up from the final words and reads `late_passages` of them itself, each cut to its
`late_words` most relevant words (`models.documents.excerpt`). A backend whose
cache the session does not warm (a remote endpoint: prefill returns None) gets every passage for the
final words, which find them best.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.documents import excerpt
from models.llm import knowledge_block
from serve_app.schemas import KnowledgeLayer
from serve_app.session.prefill import PromptPrefill
from serve_app.session.tasks import Tasks

log = logging.getLogger("presence.session")
LOOKUP_WAIT_S = 0.5  # a reply waits at most this for its passages (then it answers without them)


@dataclass
class TurnPassages:
    """What one reply's user message starts with."""

    block: str = ""  # models.llm.knowledge_block of the passages ("" for none)
    count: int = 0
    prefilled: bool = False  # they were in the prompt cache before the reply started


class TurnKnowledge:
    """`knowledge`: the Knowledge deployment handle (`search.remote(text, document_ids, k, min_score)`);
    `speaking`: whether the user is speaking now (no passage starts its prefill after they stopped)."""

    def __init__(self, knowledge: Any, document_ids: list[str], layer: KnowledgeLayer, prefill: PromptPrefill,
                 tasks: Tasks, speaking: Callable[[], bool]) -> None:
        self.knowledge = knowledge
        self.document_ids = document_ids
        self.layer = layer
        self.prefill = prefill
        self.tasks = tasks
        self.speaking = speaking
        self.cached: list[str] = []  # the current utterance's passages whose prefill completed, best first
        self._found: list[str] = []  # the current utterance's passages, as looked up from its interim words
        self._utterance = 0
        self._used = True  # a reply took this utterance's passages (the next utterance needs its own)
        self._searched = False  # the current utterance's words so far were looked up
        self._words = ""  # the current utterance's words at its last pause (a speculative reply's)
        self._lookups = 0  # bumped when the passages being prefilled are replaced by a newer lookup's
        self._warming: asyncio.Task | None = None

    def prepare(self) -> None:
        """At the session's start: the documents' index is loaded before the first turn needs it."""
        self.tasks.spawn(self._prepare())

    async def _prepare(self) -> None:
        try:
            await self.knowledge.prepare.remote(self.document_ids)
        except Exception as exc:  # a dead Knowledge replica: the first lookup will say so again
            log.info("knowledge prepare skipped: %s", type(exc).__name__)

    def new_utterance(self) -> None:
        self._utterance += 1
        self.cached, self._found, self._used = [], [], False
        self._searched, self._words = False, ""

    def wants_words(self) -> bool:
        """The words so far found no passage: a later transcript of more of them may."""
        return self._searched and not self._found and not self._used

    def pending_lead(self) -> str:
        """How the next user message starts, if known: the prefilled passages of an utterance not yet replied to."""
        return "" if self._used else knowledge_block(self.cached, closed=False)

    def on_partial(self, text: str) -> None:
        if self.prefill.warms is not False:
            self.tasks.spawn(self._prefetch(text, self._utterance))

    def resume(self) -> None:
        """The user goes on after a pause: a speculative reply that took the passages was dropped, and
        the passages not yet prefilled may still make it."""
        self._used = False
        if self._words and self.prefill.warms is not False:
            self.tasks.spawn(self._prefetch(self._words, self._utterance))
        elif self._found and len(self.cached) < len(self._found) and (self._warming is None or self._warming.done()):
            self.tasks.spawn(self._warm_each(self._found, self._utterance, self._lookups))

    async def _prefetch(self, text: str, utterance: int) -> None:
        passages = await self._lookup(text)
        if utterance != self._utterance:
            return
        self._searched = True
        if not passages and self._found:
            return  # more words found nothing: what the earlier ones found stays
        if passages != self._found:
            self._lookups += 1
            self._found = passages
            if self.cached != passages[:len(self.cached)]:
                self.cached = []  # (the cache is about to hold the new passages instead)
        elif self._warming is not None and not self._warming.done():
            return  # the same passages are being prefilled already
        lookup = self._lookups
        if self._warming is not None and not self._warming.done():
            await asyncio.shield(self._warming)  # one prefill at a time; the older loop stops after it
        await self._warm_each(passages, utterance, lookup)

    async def _warm_each(self, passages: list[str], utterance: int, lookup: int) -> None:
        for i in range(len(self.cached) + 1, len(passages) + 1):
            if self._used or utterance != self._utterance or lookup != self._lookups or not self.speaking():
                return
            self._warming = self.tasks.spawn(self.prefill.warm(knowledge_block(passages[:i], closed=False)))
            if not await self._warming:
                return
            if utterance == self._utterance and lookup == self._lookups:  # (a reply waiting for it reads it)
                self.cached = passages[:i]

    async def for_turn(self, user_text: str) -> TurnPassages:
        """The passages the reply's user message starts with: the prefilled ones (the first passage's
        prefill, if running, is waited for: the LLM serves it first anyway; a further one's is stopped),
        else a late lookup."""
        self._used = True
        self._words = user_text
        if self._warming is not None and not self._warming.done():
            if self.cached:
                # Passages are cached already: the next one's prefill would be this reply's wait (up to a
                # passage of prompt processing), for a passage less relevant than those.
                self.prefill.stop()
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(self._warming), LOOKUP_WAIT_S)
                except TimeoutError:
                    pass
        if self.cached:
            return TurnPassages(knowledge_block(self.cached), len(self.cached), prefilled=True)
        try:
            passages = await asyncio.wait_for(self._lookup(user_text), LOOKUP_WAIT_S)
        except TimeoutError:
            return TurnPassages()
        if self.prefill.warms is not False:
            passages = [excerpt(p, user_text, self.layer.late_words) for p in passages[: self.layer.late_passages]]
        return TurnPassages(knowledge_block(passages), len(passages))

    async def _lookup(self, text: str) -> list[str]:
        """The top passages for `text`, best first, within the layer's character budget."""
        try:
            found = await self.knowledge.search.remote(text, self.document_ids, self.layer.top_k,
                                                       self.layer.min_score)
        except Exception as exc:  # a dead Knowledge replica: the reply goes on without passages
            log.info("knowledge lookup skipped: %s", type(exc).__name__)
            return []
        kept, size = [], 0
        for p in found:
            if size + len(p.text) > self.layer.max_chars and kept:
                break
            kept.append(p.text[: self.layer.max_chars])
            size += len(p.text)
        return kept
