"""Perception deployment: the user's camera frames (a few per second per session) -> face analysis,
batched across sessions. Stateless: each session's `VisualTrack` (smoothing, resting face, attention)
lives in its SessionHost, so any replica can take any frame.

On the wire a frame is the decoded camera picture downscaled to at most `MAX_PIXELS` in I420
(yuv420p, as the WebRTC decoder hands it over): no codec on either side, and at ≤ 96 KB it stays under
Ray's 100 KB limit for arguments passed inline (a 320×240 RGB array, 230 KB, went through the object
store at ~4 ms more CPU per call; JPEG cost ~1.5 ms to encode and decode). JPEG/PNG bytes and RGB
arrays are accepted too. Frames are analysed in memory only; nothing is written anywhere, and the
landmarks (biometric) never leave this process: callers get `FaceObservation.summary()`.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.perception.face import FaceAnalyzer
from models.perception.frames import decode_frame
from models.priority import BACKGROUND_NICE, lower_priority


# No batch wait: a batch is whatever queued while the previous one ran, so one session pays no
# added latency and many sessions still share a batch. (The config files turn its access log off:
# it would be a line per frame.)
@serve.deployment
class Perception:
    def __init__(self, min_score: float = 0.5, nice: int = BACKGROUND_NICE) -> None:
        """`nice`: how far below a session host this replica runs. The face state a reply reads is the
        latest one (never waited for), so on a busy CPU perception is what should lag, not the reply."""
        limit_threads()
        lower_priority(nice)
        self.gpu_metrics = start_gpu_metrics("Perception")
        self.analyzer = FaceAnalyzer(min_score=min_score)
        self.times = ServiceTimes()
        self.analyzer.analyse([np.zeros((96, 128, 3), np.uint8)])  # allocate the interpreters now

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _analyse(self, items: list[tuple[np.ndarray, tuple | None]]) -> list[dict]:
        frames, hints = [f for f, _ in items], [h for _, h in items]
        obs = await asyncio.to_thread(self.analyzer.analyse, frames, hints)
        return [o.summary() for o in obs]

    async def analyse(self, frame: bytes | np.ndarray, hint: tuple | list | None = None) -> dict:
        """One camera frame -> the face observation summary (FaceObservation.summary()).

        `frame`: an I420 array [H·3/2, W] (see `wire_size`), an RGB uint8 array [H, W, 3] or JPEG/PNG
        bytes; sides 16..640. `hint`: the session's previous observation's `roi`, to track the face without
        detecting it. A frame that is not such an image raises ValueError."""
        with self.times.measure():
            return await self._analyse((decode_frame(frame), _valid_hint(hint)))

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()


def _valid_hint(hint) -> tuple[float, float, float, float] | None:
    """A usable crop hint (cx, cy, size, angle), or None: a malformed hint only costs a detection."""
    try:
        roi = tuple(float(v) for v in hint)
    except (TypeError, ValueError):
        return None
    return roi if len(roi) == 4 and all(np.isfinite(roi)) and roi[2] > 8 else None
