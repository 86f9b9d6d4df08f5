"""Perception tools: thresholds a persona declares on the perception state ("the user has looked
frustrated for more than 5 s"). A tool fires once when its signal has held long enough, and re-arms
when the signal has stopped for REARM_S: a frame or two that reads otherwise (a blink, a head turn)
neither re-fires the tool nor restarts its timer."""

from __future__ import annotations

from dataclasses import dataclass

from models.perception.fusion import PerceptionState

ALIASES = {"frustrated": "anger"}
REARM_S = 1.0


def signal_holds(signal: str, state: PerceptionState, min_confidence: float) -> bool:
    """Whether `signal` (serve_app.schemas.PerceptionSignal) is true of `state`."""
    if signal == "absent":
        return not state.visible
    if signal == "looking_away":
        return state.visible and state.attention < 0.3
    if signal == "eyes_closed":
        return state.visible and state.eyes_closed
    if signal == "incongruent":
        return state.incongruent
    emotion = ALIASES.get(signal, signal)
    return state.visible and state.emotion == emotion and state.confidence >= min_confidence


@dataclass
class ToolWatch:
    """One declared tool's timer."""

    name: str
    signal: str
    for_s: float = 5.0
    min_confidence: float = 0.5
    description: str = ""
    llm_tool_call: bool = False
    since: float | None = None
    fired: bool = False
    gone_since: float | None = None  # when the signal last stopped holding (None: it holds)

    def update(self, state: PerceptionState) -> dict | None:
        """Feed the latest state; returns the tool call's arguments when the tool fires."""
        if not signal_holds(self.signal, state, self.min_confidence):
            if self.gone_since is None:
                self.gone_since = state.t
            if state.t - self.gone_since >= REARM_S:
                self.since, self.fired = None, False
            return None
        self.gone_since = None
        if self.since is None:
            self.since = state.t
        held = state.t - self.since
        if self.fired or held < self.for_s:
            return None
        self.fired = True
        return {"signal": self.signal, "held_s": round(held, 2), "emotion": state.emotion,
                "confidence": round(state.confidence, 3), "attention": round(state.attention, 3),
                "description": state.description}


def watches(tools: list[dict]) -> list[ToolWatch]:
    """Timers for a persona's `layers.perception.perception_tools` (already validated by the API)."""
    keys = ("name", "signal", "for_s", "min_confidence", "description", "llm_tool_call")
    return [ToolWatch(**{k: t[k] for k in keys if k in t}) for t in tools]
