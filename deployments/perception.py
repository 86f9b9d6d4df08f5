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
import io
import math

import cv2
import numpy as np
from PIL import Image
from ray import serve

from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.perception.face import FaceAnalyzer

MAX_SIDE = 640  # frames are downscaled by the host; anything bigger is refused
MAX_PIXELS = 65_536  # 294×220 for a 4:3 camera; a face of a third of the frame's width is ~100 px
MAX_ENCODED_BYTES = 1 << 20


# No batch wait: a batch is whatever queued while the previous one ran, so one session pays no
# added latency and many sessions still share a batch. No access log: it would be a line per frame.
@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class Perception:
    def __init__(self, min_score: float = 0.5) -> None:
        limit_threads()
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


def wire_size(width: int, height: int) -> tuple[int, int]:
    """The size a camera frame is downscaled to for perception: even sides, at most MAX_PIXELS, aspect
    kept, never enlarged."""
    scale = min(1.0, math.sqrt(MAX_PIXELS / max(width * height, 1)), MAX_SIDE / max(width, height, 1))
    return max(16, int(width * scale) // 2 * 2), max(16, int(height * scale) // 2 * 2)


def decode_frame(frame: bytes | np.ndarray) -> np.ndarray:
    """An RGB uint8 frame from an I420 array, an RGB array or JPEG/PNG bytes, checked; ValueError otherwise."""
    bad = ValueError(f"expected an I420 [H*3/2, W] or RGB [H, W, 3] uint8 array, or JPEG/PNG bytes; sides 16..{MAX_SIDE} px")
    if isinstance(frame, (bytes, bytearray, memoryview)):
        if len(frame) > MAX_ENCODED_BYTES:
            raise bad
        try:
            img = Image.open(io.BytesIO(frame))
            if img.format not in ("JPEG", "PNG") or not (16 <= min(img.size) and max(img.size) <= MAX_SIDE):
                raise bad  # checked before decoding the pixels: no decompression bombs
            frame = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise bad from exc
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise bad
    if frame.ndim == 2:  # I420: the Y plane, then U and V at half resolution, stacked as rows
        rows, w = frame.shape
        h = rows * 2 // 3
        if rows % 3 or h % 2 or w % 2 or not (16 <= min(h, w) and max(h, w) <= MAX_SIDE):
            raise bad
        return cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_I420)
    if not (frame.ndim == 3 and frame.shape[2] == 3 and 16 <= min(frame.shape[:2]) and max(frame.shape[:2]) <= MAX_SIDE):
        raise bad
    return frame


def _valid_hint(hint) -> tuple[float, float, float, float] | None:
    """A usable crop hint (cx, cy, size, angle), or None: a malformed hint only costs a detection."""
    try:
        roi = tuple(float(v) for v in hint)
    except (TypeError, ValueError):
        return None
    return roi if len(roi) == 4 and all(np.isfinite(roi)) and roi[2] > 8 else None
