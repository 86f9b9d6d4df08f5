"""A model stage that dies inside a turn (kill -9, OOM, a lost node) must not leave the user in silence
or lose the turn.

Serve restarts a dead replica in seconds. A call in flight to it fails (`StageHealth.lost`); a call
routed after the death waits for the new replica. `StageGuard` retries the first kind and watches the
second: a call slower than `stall_s` asks whether the stage is down, and while it is the session is told
(`on_outage`) so the avatar says a short holding phrase; the turn goes on once the stage is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from models.wire import SpeechResult

HOLDING_PHRASE = "One moment, please."
RESTARTED = object()  # StageGuard.stream: the stage died; what follows (if you go on) is a new call


async def _never_down(handle: Any) -> bool:
    return False


@dataclass(frozen=True)
class StageHealth:
    """How a session tells a dead model replica from a slow one (Serve's answers, or fakes in tests)."""

    lost: tuple[type[BaseException], ...] = ()  # a call failed because its replica died
    is_down: Callable[[Any], Awaitable[bool]] = _never_down  # the handle's stage has no live replica now


class StageUnavailable(RuntimeError):
    """A stage stayed down longer than a turn can wait."""


class StageGuard:
    def __init__(self, health: StageHealth, on_outage: Callable[[], None], stall_s: float = 0.5,
                 poll_s: float = 0.25, give_up_s: float = 60.0) -> None:
        self.health = health
        self.poll_s = poll_s
        self.on_outage = on_outage
        self.stall_s = stall_s
        self.give_up_s = give_up_s

    async def call(self, handle: Any, start: Callable[[], Any]) -> Any:
        """`start()` sends the request (a Serve response); retried while its replica keeps dying."""
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                return await self.wait(handle, start())
            except self.health.lost as exc:
                await self._backoff(deadline, exc)

    async def wait(self, handle: Any, response: Any) -> Any:
        """Await one response; past `stall_s`, watch whether its stage is down (and say so) meanwhile."""
        fut = asyncio.ensure_future(_awaited(response))
        watch: asyncio.Task | None = None
        try:
            done, _ = await asyncio.wait({fut}, timeout=self.stall_s)
            if not done:
                watch = asyncio.ensure_future(self._watch(handle))
            return await fut
        except asyncio.CancelledError:
            fut.cancel()
            # The cancelled call ends in Serve's RequestCancelledError, which nobody awaits any more.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            if hasattr(response, "cancel"):
                response.cancel()
            raise
        finally:
            if watch is not None:
                watch.cancel()

    async def _watch(self, handle: Any) -> None:
        while not await self.health.is_down(handle):
            await asyncio.sleep(self.poll_s)
        self.on_outage()

    async def stream(self, handle: Any, start: Callable[[], Any]) -> AsyncIterator:
        """Items of a streaming call made by `start()`. When its replica dies, `RESTARTED` is yielded: a
        caller that goes on gets the items of the call made again (from the first), one that stops
        (`break`) has what it got."""
        deadline = time.monotonic() + self.give_up_s
        while True:
            stream = start()
            items = aiter(stream)
            try:
                try:
                    first = await self.wait(handle, anext(items))
                except StopAsyncIteration:
                    return
                yield first
                async for item in items:
                    yield item
                return
            except self.health.lost as exc:
                died = exc
            finally:
                if hasattr(stream, "cancel"):
                    stream.cancel()
            yield RESTARTED
            await self._backoff(deadline, died)

    async def _backoff(self, deadline: float, exc: BaseException) -> None:
        if time.monotonic() > deadline:
            raise StageUnavailable(f"a model stage stayed down: {exc}") from exc
        self.on_outage()
        await asyncio.sleep(0.2)


async def _awaited(response: Any) -> Any:
    return await response


class HoldingPhrases:
    """The holding phrase's audio, synthesised while TTS is up and kept for the host process's lifetime:
    when TTS is the stage that died, it is still there to play."""

    _cache: dict[float, SpeechResult] = {}

    def __init__(self, tts: Any, speed: float) -> None:
        self.tts = tts
        self.speed = speed

    def get(self) -> SpeechResult | None:
        return self._cache.get(self.speed)

    async def prepare(self) -> None:
        """Synthesise it once per host and speed; best effort (a session without it stays silent in an
        outage, as before)."""
        if self.speed in self._cache:
            return
        try:
            self._cache[self.speed] = await self.tts.synthesize.remote(HOLDING_PHRASE, self.speed)
        except Exception:  # noqa: BLE001 - TTS down at the start: nothing to cache, nothing else to do
            return
