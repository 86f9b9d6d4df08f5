"""End-of-turn prediction: smart-turn v3.2 on the audio, fused with the partial transcript."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from models.assets import onnx_session, smart_turn_onnx
from models.audio import SAMPLE_RATE, whisper_log_mel

# A turn that ends on one of these words is very likely unfinished ("I want to go to the ...").
_TRAILING_INCOMPLETE = {
    "a", "an", "the", "and", "or", "but", "so", "because", "to", "of", "in", "on", "at", "for",
    "with", "from", "my", "your", "is", "are", "was", "i", "we", "you", "if", "that", "which",
    "um", "uh", "uhm", "erm", "hmm", "like", "about", "than", "then", "when", "while", "into",
}
_FILLER_ONLY = re.compile(r"^(um+|uh+|erm+|hmm+|mm+|so|well|and)$")
# An utterance that is only an opener announces what comes next ("Wait, ...", "Sorry, one more thing, ..."):
# with a comma-length pause after it, the user is very likely to go on.
_OPENERS = {
    "hi", "hello", "hey", "hi there", "hello there", "good morning", "good afternoon", "wait", "sorry", "great",
    "so", "well", "also", "actually", "oh", "listen", "excuse me", "by the way", "one more thing",
    "another thing", "one more question", "quick question", "i have a question", "sorry one more thing",
    "oh wait", "hold on", "one second", "let me see", "let me think",
}
BACKCHANNELS = {
    "mhm", "mm-hmm", "mmhmm", "uh-huh", "uh huh", "yeah", "yes", "yep", "ok", "okay", "right",
    "sure", "i see", "got it", "hmm", "mm", "ah", "oh", "aha", "cool", "nice", "true",
}


@dataclass
class TurnDecision:
    complete: bool
    probability: float  # fused probability that the user has finished
    audio_probability: float
    reason: str


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def is_backchannel(text: str) -> bool:
    """True for short acknowledgements ("mhm", "yeah, okay") that should not take the floor."""
    norm = " ".join(_words(text))
    if not norm:
        return True
    if norm in BACKCHANNELS:
        return True
    words = norm.split()
    return len(words) <= 3 and all(w in BACKCHANNELS or w in {"yeah", "ok", "okay", "right"} for w in words)


def transcript_gate(text: str) -> float | None:
    """Text evidence about completeness: a multiplier on P(complete), or None if the text says nothing."""
    words = _words(text)
    if not words:
        return None
    stripped = text.strip()
    if " ".join(words) in _OPENERS:
        return 0.3
    if stripped.endswith(("?", "!")):
        return 1.3
    if words[-1] in _TRAILING_INCOMPLETE or _FILLER_ONLY.match(words[-1]):
        return 0.25
    if stripped.endswith((",", "-", "...")):
        return 0.5
    return None


class SmartTurn:
    """smart-turn v3.2 (int8 ONNX, Whisper-tiny encoder): P(turn complete) from the last 8 s of audio."""

    def __init__(self, session=None) -> None:
        self._session = session or onnx_session(smart_turn_onnx())

    def probability(self, audio16k: np.ndarray) -> float:
        return float(self.probability_batch([audio16k])[0])

    def probability_batch(self, clips: list[np.ndarray]) -> np.ndarray:
        n = 8 * SAMPLE_RATE
        feats = []
        for clip in clips:
            clip = np.asarray(clip, dtype=np.float32)[-n:]
            front = np.zeros(n - clip.size, dtype=np.float32)  # pad at the front: the end is what matters
            feats.append(whisper_log_mel(np.concatenate([front, clip])))
        out = self._session.run(None, {"input_features": np.stack(feats)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(clips), -1)[:, 0]


def fuse(audio_p: float, transcript: str, threshold: float = 0.5) -> TurnDecision:
    """Fuse smart-turn's audio probability with the transcript gate."""
    gate = transcript_gate(transcript)
    p = audio_p if gate is None else float(np.clip(audio_p * gate, 0.0, 1.0))
    reason = "audio" if gate is None else ("text_complete" if gate > 1 else "text_incomplete")
    return TurnDecision(complete=p >= threshold, probability=p, audio_probability=audio_p, reason=reason)
