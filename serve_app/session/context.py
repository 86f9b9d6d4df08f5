"""What the LLM is told: the persona, the conversation's context and the history, as chat messages."""

from __future__ import annotations

from models.grounding import FactCoverage, Unmentioned
from models.llm import Message, build_messages, context_start


class LLMContext:
    """The conversation as the LLM sees it. Replies add only what the user actually heard."""

    def __init__(self, system_prompt: str, persona_context: str, conversational_context: str = "",
                 grounded: bool = True) -> None:
        self.system_prompt = system_prompt
        self.grounded = grounded  # the context is the facts the replies keep to (persona layers.llm.grounding)
        self.persona_context = persona_context
        self.context = conversational_context or ""
        self.history: list[Message] = []
        self._start = 0  # first history message in the LLM's window (see context_start)
        self._coverage: tuple[str, FactCoverage] | None = None  # (the context it was built from, its stems)

    def append(self, text: str) -> None:
        """conversation.append_llm_context."""
        self.context = (self.context + "\n" + text).strip()

    def overwrite(self, text: str) -> None:
        """conversation.overwrite_llm_context."""
        self.context = text

    def extra_chars(self) -> int:
        """Characters of conversational context (what appends add to), for the session's budget."""
        return len(self.context)

    def add_user(self, text: str) -> None:
        """The user's words. Not the camera note the LLM read with them: small models that see past
        notes in the history talk about the notes ("The patient looks nervous...") instead of answering.
        So the cached prompt differs from the history at that message, and the prefill after the
        reply processes it again (~50 tokens), while the user is listening or speaking."""
        self.history.append({"role": "user", "content": text})

    def add_assistant(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": text})

    def messages(self, user_text: str, seen: str | None = None, heard: str | None = None,
                 knowledge: str = "") -> list[Message]:
        """The chat for a reply to `user_text` (not yet in the history: it enters once the turn is
        confirmed, as this chat's last message). `seen`: what the camera showed (the prefilled note);
        `knowledge`: the turn's retrieved passages (models.llm.knowledge_block); both open that message.
        `heard`: how the user spoke, after the words."""
        return build_messages(self.system_prompt, self._context(), self._window() + [{"role": "user", "content": user_text}],
                              seen=seen, heard=heard, grounded=self.grounded, knowledge=knowledge)

    def unmentioned(self, user_text: str, knowledge: str = "") -> Unmentioned:
        """What of a question the facts (persona, context, the turn's passages) do not mention
        (models.grounding: what a reply must not answer); nothing unless the context is grounded facts."""
        context = self._context()
        if not self.grounded or not context.strip():
            return Unmentioned()
        if self._coverage is None or self._coverage[0] != context:
            self._coverage = (context, FactCoverage.of(f"{self.system_prompt}\n{context}"))
        coverage = self._coverage[1]
        if knowledge:
            coverage = FactCoverage(coverage.stems | FactCoverage.of(knowledge).stems)
        return coverage.unmentioned(user_text)

    def said(self) -> list[str]:
        """What the avatar has said in the conversation (replies do not end on a sentence said before)."""
        return [m["content"] for m in self.history if m["role"] == "assistant"]

    def prefix(self) -> list[Message]:
        """The chat every next reply starts with (persona, context, the history window): what the LLM
        can process into its prompt cache before the user has finished speaking."""
        return build_messages(self.system_prompt, self._context(), self._window(), grounded=self.grounded)

    def _window(self) -> list[Message]:
        self._start = context_start(self.history, self._start)
        return self.history[self._start:]

    def _context(self) -> str:
        return "\n".join(x for x in (self.persona_context, self.context) if x)
