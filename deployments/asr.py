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
        # Two CTranslate2 workers: a final transcript (which a turn waits for) never queues behind a
        # speculative mid-speech one that is already running.
        self.model = WhisperASR(model, device=device, compute_type=compute_type, num_workers=2)
        self.times = ServiceTimes()
        self._final_lock = asyncio.Lock()
        self._partial_lock = asyncio.Lock()
        self.model.transcribe(warmup_audio())  # first call allocates; keep it out of the first turn

    async def transcribe(self, pcm16: bytes, prompt: str | None = None, partial: bool = False) -> TranscriptResult:
        """Transcribe a whole utterance. A `partial` (speculative, mid-speech) request is skipped when
        any transcription is running, so it never competes with the final transcript a turn waits for."""
        lock = self._partial_lock if partial else self._final_lock
        if partial and (self._partial_lock.locked() or self._final_lock.locked()):
            return TranscriptResult(None, len(pcm16) / 32000)
        with self.times.measure() as timing:
            async with lock:
                result = await asyncio.to_thread(self.model.transcribe, pcm16_to_float(pcm16), prompt)
        return TranscriptResult(result.text, result.audio_s, timing["ms"])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
