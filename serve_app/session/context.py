"""What the LLM is told: the persona, the conversation's context and the history, as chat messages."""

from __future__ import annotations

from models.llm import Message, build_messages, context_start


class LLMContext:
    """The conversation as the LLM sees it. Replies add only what the user actually heard."""

    def __init__(self, system_prompt: str, persona_context: str, conversational_context: str = "") -> None:
        self.system_prompt = system_prompt
        self.persona_context = persona_context
        self.context = conversational_context or ""
        self.history: list[Message] = []
        self._start = 0  # first history message in the LLM's window (see context_start)

    def append(self, text: str) -> None:
        """conversation.append_llm_context."""
        self.context = (self.context + "\n" + text).strip()

    def overwrite(self, text: str) -> None:
        """conversation.overwrite_llm_context."""
        self.context = text

    def add_user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def add_assistant(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": text})

    def messages(self, user_text: str, perception: str | None = None) -> list[Message]:
        """The chat for a reply to `user_text` (not yet in the history: it enters once the turn is
        confirmed)."""
        self._start = context_start(self.history, self._start)
        history = self.history[self._start:] + [{"role": "user", "content": user_text}]
        context = "\n".join(x for x in (self.persona_context, self.context) if x)
        return build_messages(self.system_prompt, context, history, perception=perception)
