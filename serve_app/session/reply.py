"""One avatar utterance, start to end:

    start()  LLM stream -> whole clauses -> TTS per clause -> (gate) -> playout + lip sync
    confirm(turn_index)  the gate opens: the user's turn is decided, the reply may be heard
    cancel()             a speculative reply nobody heard (the user went on)
    finish(interrupted)  it ended: played out, or cut (barge-in, interrupt, a newer reply)

A speculative reply starts before the turn is decided and is held at the gate. When a reply ends,
the LLM context and the transcript keep exactly what the user heard: whole clauses that played,
and of a cut clause the words whose audio had finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.avatar.animate import Animator, SpeechTrack
from models.llm import ReplyShaper, StreamEnd
from models.wire import SpeechResult
from serve_app.events import Event
from serve_app.media import Segment, SpeechPlayout, spoken_text
from serve_app.session.config import LLMSettings
from serve_app.session.context import LLMContext
from serve_app.session.tasks import Tasks
from serve_app.session.timings import TurnTimings


@dataclass
class ReplyParts:
    """What every reply of a session uses."""

    llm: Any  # LLM deployment handle
    tts: Any  # TTS deployment handle
    llm_settings: LLMSettings
    tts_speed: float
    playout: SpeechPlayout
    animator: Animator
    context: LLMContext
    emit: Callable[..., None]
    tasks: Tasks
    perception_text: Callable[[], str | None]  # what the LLM is told about the user now, if anything
    on_finished: Callable[[Reply], None]


class Reply:
    def __init__(self, reply_id: int, parts: ReplyParts, user_text: str | None = None, echo_text: str | None = None,
                 timings: TurnTimings | None = None, gated: bool = False, turn_index: int = 0) -> None:
        self.id = reply_id
        self.parts = parts
        self.user_text = user_text  # None: echo or greeting (exact text, no LLM)
        self.echo_text = echo_text
        self.timings = timings
        self.turn_index = turn_index
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.segments: list[Segment] = []
        self.started = False  # its first audio has played
        self.done_generating = False
        self.finished = asyncio.Event()
        self.llm_perception: str | None = None
        self.task: asyncio.Task | None = None
        self._user_logged = False

    def start(self) -> Reply:
        self.task = self.parts.tasks.spawn(self._run())
        return self

    def confirm(self, turn_index: int) -> None:
        self.turn_index = turn_index
        self.gate.set()

    @property
    def confirmed(self) -> bool:
        return self.gate.is_set()

    def cancel(self) -> None:
        """Drop a speculative reply: nothing of it was heard, nothing is recorded."""
        if self.task is not None:
            self.task.cancel()

    def mark(self, stage: str) -> None:
        if self.timings is not None:
            self.timings.mark(stage)

    # --- generation ------------------------------------------------------------------------------
    async def _run(self) -> None:
        clauses: asyncio.Queue[str | None] = asyncio.Queue()
        producer = None
        if self.echo_text is not None:
            shaper = ReplyShaper(max_sentences=50, max_chars=5000)
            for clause in shaper.feed(self.echo_text) + shaper.flush():
                clauses.put_nowait(clause.text)
            clauses.put_nowait(None)
        else:
            producer = self.parts.tasks.spawn(self._clauses_from_llm(clauses))
        try:
            while (text := await clauses.get()) is not None:
                self.mark("first_clause")
                speech: SpeechResult = await self.parts.tts.synthesize.remote(text, self.parts.tts_speed)
                self.mark("tts_first_audio")
                await self.gate.wait()
                self._log_user()
                self._play(speech)
        except asyncio.CancelledError:
            if producer is not None:
                producer.cancel()
            raise
        self.done_generating = True
        await self.gate.wait()
        self._log_user()
        if not any(seg.reply_id == self.id for seg in self.parts.playout.segments):
            # Nothing left to play: it was all heard before generation ended (a slow last clause, or
            # an unfinished one dropped), so no playout-idle callback is coming.
            self.finish(interrupted=False)
            return
        await self.finished.wait()

    async def _clauses_from_llm(self, out: asyncio.Queue) -> None:
        self.llm_perception = self.parts.perception_text()
        messages = self.parts.context.messages(self.user_text, self.llm_perception)
        settings = self.parts.llm_settings
        shaper = ReplyShaper(max_sentences=settings.max_sentences)
        stream = self.parts.llm.options(stream=True).stream.remote(messages, settings.params, settings.endpoint)
        cut = False
        try:
            async for piece in stream:
                if isinstance(piece, StreamEnd):
                    cut = piece.finish_reason == "length"
                    break
                self.mark("llm_first_token")
                for clause in shaper.feed(piece):
                    await out.put(clause.text)
                if shaper.done:
                    break
            for clause in shaper.flush(cut=cut):
                await out.put(clause.text)
            if shaper.emotion:
                self.parts.animator.emotion = shaper.emotion
        finally:
            stream.cancel()
            await out.put(None)

    def _log_user(self) -> None:
        # The user's words enter the LLM context once the turn is confirmed, before the reply's.
        if self.user_text is not None and not self._user_logged:
            self._user_logged = True
            self.parts.context.add_user(self.user_text)

    def _play(self, speech: SpeechResult) -> None:
        pcm = np.frombuffer(speech.pcm16, dtype=np.int16)
        seg = self.parts.playout.enqueue(pcm, speech.sample_rate, speech.text, speech.words, speech.phonemes, self.id)
        self.segments.append(seg)
        self.parts.animator.speak(SpeechTrack(seg.t0, [(p, float(a), float(b)) for p, a, b in speech.phonemes],
                                              duration=seg.pcm.size / 48000))

    # --- playout ---------------------------------------------------------------------------------
    def segment_started(self) -> bool:
        """The playout reached one of this reply's segments; True for the reply's first audio."""
        if self.started:
            return False
        self.started = True
        self.parts.emit(Event.REPLICA_STARTED)
        self.mark("first_audio_sent")
        return True

    def playout_idle(self) -> None:
        if self.done_generating:
            self.finish(interrupted=False)

    def finish(self, interrupted: bool) -> None:
        """End the reply; record what was heard (context, transcript) and the turn's timings."""
        if self.finished.is_set():
            return
        playout = self.parts.playout
        now, cut = playout.flush() if interrupted else (playout.clock.now(), [])
        if interrupted:
            self.parts.animator.stop_speaking()
        heard = self.heard_text(now, cut)
        self.finished.set()
        if interrupted and self.task is not None and not self.task.done() and asyncio.current_task() is not self.task:
            self.task.cancel()
        self.parts.on_finished(self)
        if self.started:
            self.parts.emit(Event.REPLICA_STOPPED, interrupted=interrupted)
        if heard:
            self.parts.context.add_assistant(heard)
            extra = {"llm_perception": self.llm_perception} if self.llm_perception else {}
            self.parts.emit(Event.UTTERANCE, role="replica", speech=heard, interrupted=interrupted, **extra)
        if self.timings is not None and self.started:
            self.parts.emit(Event.TURN_TIMINGS, turn_index=self.turn_index, ms_from_speech_end=self.timings.as_ms())

    def heard_text(self, now: float, cut: list[Segment]) -> str:
        """Whole segments that played; of a cut one, the words whose audio finished before `now`."""
        spoken = []
        for seg in self.segments:
            if seg in cut:
                if seg.started or seg.t0 < now:
                    spoken.append(spoken_text(seg, now))
            else:
                spoken.append(seg.text)
        return " ".join(s for s in spoken if s).strip()
