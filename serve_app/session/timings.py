"""When each stage of one turn happened, relative to the end of the user's speech."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TurnTimings:
    speech_end: float = 0.0  # monotonic time of the last voiced chunk
    marks: dict[str, float] = field(default_factory=dict)
    # How far the listener was behind the microphone when the pause was heard (its audio queued
    # unprocessed on a starved CPU): the user's speech ended this much before `speech_end`.
    listener_behind_ms: float | None = None
    # How the turn was decided (models.turn.TurnDecision: probability, audio_probability, reason): a
    # turn not judged complete waits for the persona's patience, the largest step a turn can take.
    decision: dict[str, float | str] | None = None

    def mark(self, name: str) -> None:
        """Record `name` now, once (the first call wins)."""
        self.marks.setdefault(name, time.monotonic())

    def as_ms(self) -> dict[str, float]:
        return {k: round((v - self.speech_end) * 1000, 1) for k, v in self.marks.items()}
