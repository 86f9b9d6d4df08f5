"""ASR deployment: faster-whisper (tiny.en int8 embedded on CPU; a large model on CUDA)."""

from __future__ import annotations

from ray import serve

from deployments.common import PriorityLock, ServiceTimes, limit_threads, warmup_audio
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
        # One transcription at a time (a second would only halve each one's CPU); a waiting final
        # transcript, which a reply waits for, goes before a waiting interim one, which nothing waits for.
        self._turns = PriorityLock()
        self.model.transcribe(warmup_audio())  # first call allocates; keep it out of the first turn

    async def transcribe(self, pcm16: bytes, prompt: str | None = None, interim: bool = False) -> TranscriptResult:
        """Transcribe a whole utterance; `interim`: the words so far of one still being spoken, served
        after any waiting final transcript (sessions share this replica)."""
        with self.times.measure() as timing:
            result = await self._turns.run_in_thread(1 if interim else 0, self.model.transcribe,
                                                     pcm16_to_float(pcm16), prompt)
        return TranscriptResult(result.text, result.audio_s, timing["ms"])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
