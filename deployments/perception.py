"""Perception deployment: the user's camera frames (a few per second per session) -> face analysis,
batched across sessions. Stateless: each session's `VisualTrack` (smoothing, resting face, attention)
lives in its SessionHost, so any replica can take any frame.

Frames arrive as small RGB arrays and are analysed in memory only; nothing is written anywhere, and
the landmarks (biometric) never leave this process: callers get `FaceObservation.summary()`.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.perception.face import FaceAnalyzer

MAX_SIDE = 640  # frames are downscaled by the host; anything bigger is refused


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0})
class Perception:
    def __init__(self, min_score: float = 0.5) -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("Perception")
        self.analyzer = FaceAnalyzer(min_score=min_score)
        self.times = ServiceTimes()
        self.analyzer.analyse([np.zeros((96, 128, 3), np.uint8)])  # allocate the interpreters now

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _analyse(self, items: list[tuple[np.ndarray, tuple | None]]) -> list[dict]:
        frames, hints = [f for f, _ in items], [h for _, h in items]
        obs = await asyncio.to_thread(self.analyzer.analyse, frames, hints)
        return [o.summary() for o in obs]

    async def analyse(self, frame: np.ndarray, hint: tuple | list | None = None) -> dict:
        """One RGB uint8 frame [H, W, 3] -> the face observation summary (FaceObservation.summary()).

        `hint`: the session's previous observation's `roi`, to track the face without detecting it."""
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
                and 16 <= min(frame.shape[:2]) and max(frame.shape[:2]) <= MAX_SIDE):
            raise ValueError(f"expected an RGB uint8 frame with sides 16..{MAX_SIDE}")
        with self.times.measure():
            return await self._analyse((frame, _valid_hint(hint)))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()


def _valid_hint(hint) -> tuple[float, float, float, float] | None:
    """A usable crop hint (cx, cy, size, angle), or None: a malformed hint only costs a detection."""
    try:
        roi = tuple(float(v) for v in hint)
    except (TypeError, ValueError):
        return None
    return roi if len(roi) == 4 and all(np.isfinite(roi)) and roi[2] > 8 else None
