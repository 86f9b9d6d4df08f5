"""Stand-ins for the shared model deployments, for unit tests of the session's parts (plain asyncio,
no Ray, no network). They answer through the same `.method.remote()` calls as Serve handles."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable

import numpy as np

from models.llm import StreamEnd
from models.vad import CHUNK
from models.wire import SpeechResult, TranscriptResult, TurnScore
from serve_app.session.recovery import StageHealth

SPEECH = 0.3  # amplitude of a "voiced" test chunk


class Died(Exception):
    """A call whose replica was killed (Ray's ActorDiedError, in unit tests)."""


class Outage:
    """A stage killed at its next call: that call fails; calls made while it restarts wait for the new
    replica, as Serve's router does."""

    def __init__(self, restart_s: float = 2.0) -> None:
        self.restart_s = restart_s
        self.armed = False
        self.until = 0.0

    def kill(self) -> None:
        self.armed = True

    def down(self) -> bool:
        return time.monotonic() < self.until

    async def enter(self) -> None:
        if self.armed:
            self.armed = False
            self.until = time.monotonic() + self.restart_s
            await asyncio.sleep(0.05)
            raise Died("the replica died")
        while self.down():
            await asyncio.sleep(0.02)


class FakeMethod:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def remote(self, *args, **kwargs):
        self.calls.append(args)
        out = self.fn(*args, **kwargs)
        return asyncio.ensure_future(out) if inspect.isawaitable(out) else out


class FakeHandle:
    def __init__(self, **methods) -> None:
        for name, fn in methods.items():
            setattr(self, name, FakeMethod(fn))

    def options(self, **_: object) -> FakeHandle:
        return self


class FakeStream:
    """What `llm.options(stream=True).stream.remote()` returns: async-iterable and cancellable."""

    def __init__(self, pieces: list[str], delay_s: float, last_delay_s: float = 0.0,
                 finish_reason: str = "stop", outage: Outage | None = None) -> None:
        self.outage = outage or Outage()
        self.pieces = pieces
        self.delay_s = delay_s
        self.last_delay_s = last_delay_s
        self.finish_reason = finish_reason
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        await self.outage.enter()
        for i, piece in enumerate(self.pieces):
            await asyncio.sleep(self.last_delay_s if i == len(self.pieces) - 1 else self.delay_s)
            if self.cancelled:
                return
            yield piece
        yield StreamEnd(self.finish_reason)

    def cancel(self) -> None:
        self.cancelled = True


class Models:
    """ASR, turn model, LLM and TTS fakes with settable answers; every call is recorded."""

    def __init__(self, transcript: str = "What time do you open?", audio_p: float = 0.9, threshold: float = 0.5,
                 reply: str = "We open at nine. See you then.", clause_s: float = 0.6, last_piece_s: float = 0.0,
                 finish_reason: str = "stop", tts_delays_s: list[float] | None = None) -> None:
        self.transcript = transcript
        self.tts_delays_s = list(tts_delays_s or [])  # per synthesize call, in order (then 10 ms)
        self.audio_p = audio_p
        self.threshold = threshold
        self.reply = reply
        self.clause_s = clause_s
        self.last_piece_s = last_piece_s
        self.finish_reason = finish_reason
        self.streams: list[FakeStream] = []
        self.prompts: list[list[dict]] = []
        self.asr = FakeHandle(transcribe=self._transcribe)
        self.turn = FakeHandle(predict=self._predict)
        self.llm = FakeHandle(stream=self._stream, prefill=self._prefill)
        self.prefills: list[list[dict]] = []
        self.prefill_leads: list[str] = []  # how each prefill had the next user message start
        self.asr_prompts: list[str | None] = []
        self.asr_interim: list[bool] = []  # per ASR call: an interim transcript (the words so far)?
        self.interim_asr_s = 0.02  # how long an interim transcript takes
        self.asr_cancelled = 0  # ASR calls their caller gave up on
        self.searches: list[str] = []  # what the knowledge base was searched for
        self.passages: list[str] = []  # what it finds
        self.finds: Callable[[str], list[str]] | None = None  # what it finds for these words (else `passages`)
        self.prefill_s = 0.0  # how long a prefill with a lead takes (the CPU reads ~7 ms a token)
        self.prefill_cancelled = 0  # prefills their caller gave up on
        self.prefill_caches = True  # False: a backend with no cache to warm (prefill returns None)
        self.knowledge = FakeHandle(search=self._search, prepare=self._prepare_knowledge)
        self.tts = FakeHandle(synthesize=self._synthesize)
        self.outages = {"asr": Outage(), "llm": Outage(), "tts": Outage()}
        self.health = StageHealth(lost=(Died,), is_down=self._is_down)

    async def _is_down(self, handle) -> bool:
        names = {id(self.asr): "asr", id(self.llm): "llm", id(self.tts): "tts"}
        return id(handle) in names and self.outages[names[id(handle)]].down()

    async def _transcribe(self, pcm16: bytes, prompt=None, interim: bool = False) -> TranscriptResult:
        self.asr_prompts.append(prompt)
        self.asr_interim.append(interim)
        await self.outages["asr"].enter()
        try:
            await asyncio.sleep(self.interim_asr_s if interim else 0.02)
        except asyncio.CancelledError:
            self.asr_cancelled += 1
            raise
        return TranscriptResult(self.transcript, len(pcm16) / 32000)

    async def _predict(self, pcm16: bytes) -> TurnScore:
        await asyncio.sleep(0.01)
        return TurnScore(self.audio_p, self.threshold)

    def _stream(self, messages, params=None, endpoint=None, tools=None) -> FakeStream:
        self.prompts.append(json.loads(json.dumps(messages)))
        stream = FakeStream([w + " " for w in self.reply.split()], 0.01, self.last_piece_s, self.finish_reason,
                            self.outages["llm"])
        self.streams.append(stream)
        return stream

    async def _search(self, text: str, document_ids, k=3, min_score=0.25) -> list:
        from models.vector_index import Passage

        await asyncio.sleep(0.02)
        self.searches.append(text)
        found = self.finds(text) if self.finds is not None else self.passages
        return [Passage(document_ids[0], p, 0.8) for p in found[:k]]

    async def _prepare_knowledge(self, document_ids) -> None:
        await asyncio.sleep(0.01)

    async def _prefill(self, messages, endpoint=None, tools=None, lead="", conversation=None) -> int | None:
        self.prefill_leads.append(lead)
        await self.outages["llm"].enter()
        if lead:
            try:
                await asyncio.sleep(self.prefill_s)
            except asyncio.CancelledError:
                self.prefill_cancelled += 1
                raise
        self.prefills.append(json.loads(json.dumps(messages)))
        return len(messages) if self.prefill_caches else None

    async def _synthesize(self, text: str, speed: float = 1.0, first: bool = False) -> SpeechResult:
        await self.outages["tts"].enter()
        await asyncio.sleep(self.tts_delays_s.pop(0) if self.tts_delays_s else 0.01)
        rate = 16000
        n = int(self.clause_s * rate)
        pcm = (np.random.default_rng(0).standard_normal(n) * 3000).astype(np.int16).tobytes()
        words = text.split()
        step = self.clause_s / max(1, len(words))
        timed = [(w, i * step, (i + 1) * step) for i, w in enumerate(words)]
        return SpeechResult(text, pcm, rate, [], timed)


def fake_vad(chunk: np.ndarray) -> float:
    return 0.95 if np.abs(chunk).max() > SPEECH / 2 else 0.02


def voiced() -> np.ndarray:
    return (np.full(CHUNK, SPEECH * 32767)).astype(np.int16)


def silent() -> np.ndarray:
    return np.zeros(CHUNK, np.int16)


async def speak(feed, seconds: float, real_time: bool = True) -> None:
    """Feed `seconds` of voiced chunks (then yield to the loop), paced like a microphone."""
    for _ in range(int(seconds * 16000 / CHUNK)):
        feed(voiced())
        await asyncio.sleep(CHUNK / 16000 if real_time else 0)


async def pause(feed, seconds: float) -> None:
    for _ in range(int(seconds * 16000 / CHUNK)):
        feed(silent())
        await asyncio.sleep(CHUNK / 16000)
