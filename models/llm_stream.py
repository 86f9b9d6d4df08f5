"""What an LLM backend's stream carries besides text pieces and tool calls."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamEnd:
    """The last item of every backend's stream: why generation stopped ("stop", "length", ...). A
    "length" end means the token budget cut the text: its unfinished sentence must not be spoken."""

    finish_reason: str | None = None


@dataclass(frozen=True)
class PromptStats:
    """How the backend read the prompt, before the first token (only when `GenerationParams.report_prompt`
    asks and the backend says): tokens reused from its prompt cache, tokens it had to process, and how
    long processing them took. A conversation whose cache holds processes only the new turn."""

    cached: int
    processed: int
    ms: float | None = None

    def as_dict(self) -> dict:
        return {"cached": self.cached, "processed": self.processed,
                "ms": None if self.ms is None else round(self.ms, 1)}
