"""What the shared model deployments return to a session: small frozen dataclasses (pickled by Ray),
so callers read named fields, never ad-hoc dict keys."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TranscriptResult:
    """ASR of one utterance."""

    text: str
    audio_s: float
    ms: float = 0.0


@dataclass(frozen=True)
class SpeechResult:
    """TTS of one clause: 16-bit mono PCM and its phoneme and word timings (seconds from its start)."""

    text: str
    pcm16: bytes
    sample_rate: int
    phonemes: list[tuple[str, float, float]]
    words: list[tuple[str, float, float]]
    ms: float = 0.0


@dataclass(frozen=True)
class TurnScore:
    """The turn model's P(the user has finished) from the audio, and the threshold the deployment is
    configured with. The session fuses it with the final transcript once (models.turn.fuse)."""

    audio_probability: float
    threshold: float
    ms: float = 0.0
