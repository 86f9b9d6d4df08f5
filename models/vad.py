"""Silero VAD (ONNX) on 32 ms chunks, with per-stream state, plus a speech/pause segmenter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.assets import onnx_session, silero_vad_onnx

CHUNK = 512  # samples at 16 kHz = 32 ms
_CONTEXT = 64


class SileroVAD:
    """Speech probability per 32 ms chunk of 16 kHz audio. One instance per audio stream."""

    def __init__(self, session=None) -> None:
        self._session = session or onnx_session(silero_vad_onnx())
        self._sr = np.array(16000, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._input = np.zeros((1, _CONTEXT + CHUNK), dtype=np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        if chunk.shape != (CHUNK,):
            raise ValueError(f"VAD takes {CHUNK} samples at 16 kHz, got {chunk.shape}")
        # The model sees the last 64 samples of the previous chunk as context.
        self._input[0, :_CONTEXT] = self._input[0, -_CONTEXT:]
        self._input[0, _CONTEXT:] = chunk
        out, self._state = self._session.run(None, {"input": self._input, "state": self._state, "sr": self._sr})
        return float(out[0, 0])


@dataclass
class VADEvent:
    kind: str  # "speech_start" | "pause" | "speech_resume"
    t: float  # stream time (s) of the chunk that triggered it


@dataclass
class SpeechSegmenter:
    """Hysteresis over VAD probabilities: when does speech start, when is there a pause.

    `start_chunks` consecutive chunks above `on` start speech (64 ms by default, so a click is not a
    turn); `pause_chunks` below `off` mark a pause (the design budget is <= 64 ms after speech ends).
    """

    on: float = 0.5
    off: float = 0.35
    start_chunks: int = 2
    pause_chunks: int = 2
    speaking: bool = False
    _above: int = 0
    _below: int = 0
    speech_start_t: float = 0.0
    last_voice_t: float = 0.0

    def update(self, prob: float, t: float) -> VADEvent | None:
        if prob >= self.on:
            self._above += 1
            self._below = 0
            self.last_voice_t = t
        elif prob < self.off:
            self._below += 1
            self._above = 0
        if not self.speaking and self._above >= self.start_chunks:
            self.speaking = True
            self.speech_start_t = t - (self.start_chunks - 1) * CHUNK / 16000
            return VADEvent("speech_start", t)
        if self.speaking and self._below >= self.pause_chunks:
            self.speaking = False
            return VADEvent("pause", t)
        return None
