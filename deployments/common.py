"""What every model deployment shares: thread limits and a p95 window for autoscaling stats."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import numpy as np

from autoscaling import stats as stat_keys

T = TypeVar("T")

ONE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
    "CT2_INTER_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
}


def limit_threads() -> None:
    """Give ONNX Runtime, torch, numba and BLAS one thread each (2-core boxes thrash otherwise)."""
    for k, v in ONE_THREAD_ENV.items():
        os.environ.setdefault(k, v)
    torch = sys.modules.get("torch")  # only if something loaded it: importing torch costs ~300 MB per process
    if torch is not None:
        torch.set_num_threads(1)


def warmup_audio(seconds: float = 1.0) -> np.ndarray:
    """Low noise to run a model once at start-up (first calls allocate and are slow)."""
    return (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.01).astype(np.float32)


class ServiceTimes:
    """Rolling service times (ms) over a look-back window; feeds record_autoscaling_stats()."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=4096)
        self.in_flight = 0

    def add(self, ms: float) -> None:
        self._samples.append((time.monotonic(), ms))

    def p95(self) -> float:
        cutoff = time.monotonic() - self.window_s
        values = [ms for t, ms in self._samples if t >= cutoff]
        return float(np.percentile(values, 95)) if values else 0.0

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        """Count one call as in flight while it runs and record its service time, which the
        yielded dict holds as "ms" once the block has ended."""
        self.in_flight += 1
        t0 = time.perf_counter()
        timing = {"ms": 0.0}
        try:
            yield timing
        finally:
            self.in_flight -= 1
            timing["ms"] = (time.perf_counter() - t0) * 1000
            self.add(timing["ms"])

    def stats(self) -> dict[str, float]:
        return {stat_keys.P95_SERVICE_MS: self.p95(), stat_keys.IN_FLIGHT: float(self.in_flight)}


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): where a replica landed, for placement checks."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def database_engine(url: str):
    """A SQLAlchemy engine for the platform's database (SQLite: usable from worker threads, waits on locks)."""
    from sqlalchemy import create_engine

    kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}} if url.startswith("sqlite") else {}
    return create_engine(url, **kwargs)


def default_database_url() -> str:
    """DATABASE_URL, else the SQLite file data/presence.db (PRESENCE_DB) beside the code."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PRESENCE_DB", os.path.join(root, "data", "presence.db"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


class PriorityLock:
    """An asyncio lock handed to the waiter with the lowest `priority` first (in arrival order among
    equals): one model that serves several sessions in turn lets the work a user waits for (a reply's
    first clause) pass the work they do not (the rest of a reply, a cache warm-up)."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    def ticket(self) -> int:
        """A place in the arrival order, for a job of several turns that keeps its place (`hold(order=)`)."""
        return next(self._order)

    async def acquire(self, priority: int, order: int | None = None) -> None:
        if not self._held and not self.waiting:
            self._held = True
            return
        fut = asyncio.get_running_loop().create_future()
        ticket = self.ticket()
        heapq.heappush(self._waiters, (priority, ticket if order is None else order, ticket, fut))
        try:
            await fut  # release() hands the lock over: it stays held
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed over just as the waiter was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self._waiters:
            *_, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._held = False

    async def run_in_thread(self, priority: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in a worker thread, holding the lock until that thread has ended: a caller that is
        cancelled stops waiting, but the model is still busy, so the next waiter must not start beside it."""
        await self.acquire(priority)
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        job.add_done_callback(lambda _: self.release())
        return await asyncio.shield(job)

    @asynccontextmanager
    async def hold(self, priority: int, order: int | None = None) -> AsyncIterator[None]:
        await self.acquire(priority, order)
        try:
            yield
        finally:
            self.release()
