"""Speech recognition with faster-whisper: tiny.en int8 embedded on CPU, a large model on CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.assets import whisper_tiny_en


@dataclass
class Transcript:
    text: str
    words: list[tuple[str, float, float]]
    audio_s: float


class WhisperASR:
    """Transcribes whole 16 kHz utterances. `model` is a path or a faster-whisper model name."""

    def __init__(self, model: str | None = None, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 1, language: str | None = "en", num_workers: int = 1) -> None:
        from faster_whisper import WhisperModel  # imported lazily: heavy, and CUDA-aware

        self.language = language
        self._model = WhisperModel(
            str(model or whisper_tiny_en()), device=device, compute_type=compute_type,
            cpu_threads=cpu_threads, num_workers=num_workers,
        )

    def transcribe(self, audio16k: np.ndarray, prompt: str | None = None) -> Transcript:
        audio = np.asarray(audio16k, dtype=np.float32)
        if audio.size < 1600:  # < 0.1 s: nothing to say
            return Transcript("", [], audio.size / 16000)
        segments, _ = self._model.transcribe(
            audio, language=self.language, beam_size=1, best_of=1, temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
            initial_prompt=prompt, no_speech_threshold=0.6,
        )
        texts = [s.text for s in segments if s.no_speech_prob < 0.8 or s.avg_logprob > -0.7]
        return Transcript(" ".join(t.strip() for t in texts).strip(), [], audio.size / 16000)
