"""ASR deployment: faster-whisper (tiny.en int8 embedded on CPU; a large model on CUDA)."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.common import ServiceTimes, limit_threads, warmup_audio
from deployments.gpu_metrics import start_gpu_metrics
from models.asr import WhisperASR
from models.audio import pcm16_to_float
from models.wire import TranscriptResult


@serve.deployment
class ASR:
    def __init__(self, model: str | None = None, device: str = "cpu", compute_type: str = "int8") -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("ASR")
        self.model = WhisperASR(model, device=device, compute_type=compute_type)
        self.times = ServiceTimes()
        self._lock = asyncio.Lock()  # one transcription at a time: a second would only halve each one's CPU
        self.model.transcribe(warmup_audio())  # first call allocates; keep it out of the first turn

    async def transcribe(self, pcm16: bytes, prompt: str | None = None) -> TranscriptResult:
        """Transcribe a whole utterance."""
        with self.times.measure() as timing:
            async with self._lock:
                result = await asyncio.to_thread(self.model.transcribe, pcm16_to_float(pcm16), prompt)
        return TranscriptResult(result.text, result.audio_s, timing["ms"])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
