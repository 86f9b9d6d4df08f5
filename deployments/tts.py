"""TTS deployment: one clause in, its audio and phoneme/word timings out."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.audio import float_to_pcm16
from models.tts import PiperTTS


@serve.deployment(max_ongoing_requests=8, ray_actor_options={"num_cpus": 0})
class TTS:
    def __init__(self, use_cuda: bool = False) -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("TTS")
        self.model = PiperTTS(use_cuda=use_cuda)
        self.times = ServiceTimes()
        self._lock = asyncio.Lock()
        self.model.synthesize("Hello there.")

    async def synthesize(self, text: str, speed: float = 1.0) -> dict:
        with self.times.measure() as timing:
            async with self._lock:
                speech = await asyncio.to_thread(self.model.synthesize, text, speed)
        return {
            "text": text, "pcm16": float_to_pcm16(speech.audio).tobytes(), "sample_rate": speech.sample_rate,
            "phonemes": [(p, float(a), float(b)) for p, a, b in speech.phonemes],
            "words": [(w, float(a), float(b)) for w, a, b in speech.words], "ms": timing["ms"],
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
