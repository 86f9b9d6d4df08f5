"""Batches avatar frames from several sessions into one render call.

Each session renders from its own thread (`asyncio.to_thread` in the video track) and calls
`BatchedRenderer.render(pose)`, which blocks until its frame is ready. One worker thread collects
the requests that arrive within `max_wait_s` (up to `max_batch`) and renders them together, so a
GPU renders B heads in one gsplat call instead of B calls. The batch function is pluggable: the
gsplat renderer on CUDA, a loop over CPU renderers in tests and on CPU.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from models.avatar.render import Pose

RenderBatch = Callable[[Sequence[tuple[str, Pose]]], list[np.ndarray]]


@dataclass
class _Request:
    head: str
    pose: Pose
    done: Future


class FrameBatcher:
    """Collects (head, pose) requests from many threads; renders them in batches on one thread."""

    def __init__(self, render_batch: RenderBatch, max_batch: int = 16, max_wait_s: float = 0.004) -> None:
        self.render_batch = render_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # recent batch sizes (for metrics and tests)
        self._q: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="frame-batcher", daemon=True)
        self._thread.start()

    def submit(self, head: str, pose: Pose) -> Future:
        fut: Future = Future()
        self._q.put(_Request(head, pose, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    req = self._q.get(timeout=max(0.0, left)) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if req is None:
                    self._q.put(None)  # finish this batch, then stop
                    break
                batch.append(req)
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-256:]
            try:
                frames = self.render_batch([(r.head, r.pose) for r in batch])
                for r, frame in zip(batch, frames, strict=True):
                    r.done.set_result(frame)
            except Exception as exc:  # every waiter hears the failure instead of hanging
                for r in batch:
                    if not r.done.done():
                        r.done.set_exception(exc)


class BatchedRenderer:
    """One session's renderer on a shared FrameBatcher (same `render(pose)` as CPUAvatarRenderer)."""

    def __init__(self, batcher: FrameBatcher, head: str = "stock", timeout_s: float = 2.0) -> None:
        self.batcher = batcher
        self.head = head
        self.timeout_s = timeout_s

    def render(self, pose: Pose) -> np.ndarray:
        return self.batcher.submit(self.head, pose).result(timeout=self.timeout_s)
