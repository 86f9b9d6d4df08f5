"""TurnTaking deployment: smart-turn v3.2 end-of-turn probability, batched across sessions.

It scores the audio only and reports its configured threshold; the session fuses the score with the
final transcript once (models.turn.fuse), since the transcript is not known when the score is asked
for (both run in parallel after a pause)."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.common import ServiceTimes, limit_threads, warmup_audio
from deployments.gpu_metrics import start_gpu_metrics
from models.audio import pcm16_to_float
from models.turn import SmartTurn
from models.wire import TurnScore


@serve.deployment
class TurnTaking:
    def __init__(self, threshold: float = 0.5) -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("TurnTaking")
        self.model = SmartTurn()
        self.threshold = threshold
        self.times = ServiceTimes()
        self.model.probability(warmup_audio())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.003)
    async def _probabilities(self, clips: list[np.ndarray]) -> list[float]:
        return list(await asyncio.to_thread(self.model.probability_batch, clips))

    async def predict(self, pcm16: bytes) -> TurnScore:
        """P(turn complete) for 16 kHz int16 audio (the end of the user's speech)."""
        with self.times.measure() as timing:
            p = await self._probabilities(pcm16_to_float(pcm16))
        return TurnScore(float(p), self.threshold, timing["ms"])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
