"""One avatar utterance, start to end:

    start()  LLM stream -> whole clauses -> TTS per clause -> (gate) -> playout + lip sync
    confirm(turn_index)  the gate opens: the user's turn is decided, the reply may be heard
    cancel()             a speculative reply nobody heard (the user went on)
    finish(interrupted)  it ended: played out, or cut (barge-in, interrupt, a newer reply)

A speculative reply starts before the turn is decided and is held at the gate. When a reply ends,
the LLM context and the transcript keep exactly what the user heard: whole clauses that played,
and of a cut clause the words whose audio had finished.

When the LLM calls tools (`ToolRunner`), the reply waits for their results once the turn is decided
(a speculative reply has no side effects), says the holding phrase if the wait passes `TOOL_HOLD_S`,
and the LLM goes on with the results; a result that never comes is met with `TOOL_APOLOGY`.

If the LLM or TTS replica dies mid-reply (`StageGuard`), the avatar says a holding phrase once the turn is
decided (unless the reply's audio is still playing) and the call is made again on the restarted replica.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.avatar.animate import Animator, SpeechTrack
from models.grounding import Unmentioned
from models.llm import ReplyShaper
from models.llm_stream import PromptStats, StreamEnd
from models.tools import MAX_TOOL_ROUNDS, ToolCall
from models.wire import SpeechResult
from serve_app.events import Event
from serve_app.media import Segment, SpeechPlayout, spoken_text
from serve_app.session.config import LLMSettings
from serve_app.session.context import LLMContext
from serve_app.session.knowledge import TurnPassages
from serve_app.session.recovery import RESTARTED, StageGuard, StageHealth
from serve_app.session.tasks import Tasks
from serve_app.session.timings import TurnTimings
from serve_app.session.tools import ToolRunner

TOOL_HOLD_S = 1.0  # a tool wait longer than this gets the holding phrase
TOOL_APOLOGY = "I'm sorry, I couldn't get that information right now."


def play_speech(playout: SpeechPlayout, animator: Animator, speech: SpeechResult, reply_id: int) -> Segment:
    """Queue synthesised speech on the playout and the matching mouth shapes on the face."""
    pcm = np.frombuffer(speech.pcm16, dtype=np.int16)
    seg = playout.enqueue(pcm, speech.sample_rate, speech.text, speech.words, speech.phonemes, reply_id)
    animator.speak(SpeechTrack(seg.t0, [(p, float(a), float(b)) for p, a, b in speech.phonemes],
                               duration=seg.pcm.size / 48000))
    return seg


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
    seen_text: Callable[[], str | None]  # what the LLM is told the user looks like (the prefilled note), if anything
    heard_text: Callable[[], str | None]  # what it is told about how they just spoke, if anything
    on_finished: Callable[[Reply], None]
    health: StageHealth  # tells a dead stage from a slow one
    holding: Callable[[], SpeechResult | None]  # the holding phrase's audio, if synthesised yet
    tools: ToolRunner | None = None  # the persona's LLM tools, if any
    retrieve: Callable[[str], Awaitable[TurnPassages]] | None = None  # the turn's passages (TurnKnowledge.for_turn)


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
        self.started = False  # its first audio (maybe a holding phrase) has played
        self.first_audio = False  # its first reply audio has played
        self.done_generating = False
        self.finished = asyncio.Event()
        self.llm_perception: str | None = None
        self.passages: TurnPassages | None = None  # what the knowledge base gave this reply (None: none asked)
        self.prompt: PromptStats | None = None  # how the LLM read the reply's first prompt, where it says
        self.declined = False  # its answer was replaced by the decline sentence (ReplyShaper's grounding check)
        self.task: asyncio.Task | None = None
        self._user_logged = False
        self.guard = StageGuard(parts.health, self._on_outage)
        self._holding: list[Segment] = []
        self._holding_task: asyncio.Task | None = None

    def start(self) -> Reply:
        self.task = self.parts.tasks.spawn(self._run())
        return self

    def confirm(self, turn_index: int) -> None:
        self.turn_index = turn_index
        self.gate.set()
        self.parts.tasks.spawn(self._check_stages())

    async def _check_stages(self) -> None:
        """As the turn is taken: a stage that is down now (killed while the user spoke) is said at once,
        not when the reply first waits on it."""
        down = await asyncio.gather(*(self.parts.health.is_down(h) for h in (self.parts.llm, self.parts.tts)))
        if any(down) and not self.finished.is_set():
            self._on_outage()

    @property
    def confirmed(self) -> bool:
        return self.gate.is_set()

    def cancel(self) -> None:
        """Drop a speculative reply: nothing of it was heard, nothing is recorded."""
        for task in (self.task, self._holding_task):
            if task is not None:
                task.cancel()

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
        tts = self.parts.tts
        try:
            first = True
            while (text := await clauses.get()) is not None:
                self.mark("first_clause")
                speech: SpeechResult = await self.guard.call(
                    tts, lambda t=text, f=first: tts.synthesize.remote(t, self.parts.tts_speed, f))
                first = False
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
        seen, heard = self.parts.seen_text(), self.parts.heard_text()
        self.llm_perception = " ".join(x for x in (seen, heard) if x) or None
        if self.parts.retrieve is not None:
            self.passages = await self.parts.retrieve(self.user_text)
            self.mark("retrieval")
        knowledge = self.passages.block if self.passages else ""
        messages = self.parts.context.messages(self.user_text, seen, heard, knowledge)
        # What the grounded facts do not mention: a reply may not answer it (after a tool's result it may).
        unmentioned = self.parts.context.unmentioned(self.user_text, knowledge)
        tools = self.parts.tools
        try:
            for round_ in range(MAX_TOOL_ROUNDS + 1):
                calls, said = await self._generate(messages, out, tools.definitions if tools else None,
                                                   unmentioned if round_ == 0 else Unmentioned())
                if tools is not None and not calls and not said and round_ == 0:
                    # A small model wrote something like a call that is none (no known tool, a made-up
                    # result): it is not spoken, and the LLM answers again without tools.
                    await self._generate(messages, out, None, unmentioned)
                    return
                if not calls or tools is None:
                    return
                results = await self._run_tools(tools, calls) if round_ < MAX_TOOL_ROUNDS else None
                if results is None:
                    await out.put(TOOL_APOLOGY)
                    return
                messages = [*messages, {"role": "assistant", "content": "", "tool_calls": [c.openai() for c in calls]},
                            *({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": r}
                              for c, r in zip(calls, results, strict=True))]
        finally:
            await out.put(None)

    async def _generate(self, messages: list[dict], out: asyncio.Queue, tools: list[dict] | None,
                        unmentioned: Unmentioned = Unmentioned()) -> tuple[list[ToolCall], bool]:
        """One LLM call: its clauses onto `out`; returns the tool calls it made, and whether it said anything.
        `unmentioned`: what of the question the facts lack (ReplyShaper declines an answer to it)."""
        settings = self.parts.llm_settings
        earlier = self.parts.context.said()

        def new_shaper() -> ReplyShaper:
            return ReplyShaper(max_sentences=settings.max_sentences, said_before=earlier, unmentioned=unmentioned)

        shaper = new_shaper()
        llm = self.parts.llm
        stream = self.guard.stream(llm, lambda: llm.options(stream=True).stream.remote(messages, settings.params,
                                                                                        settings.endpoint, tools))
        said = False
        cut = False
        calls: list[ToolCall] = []
        try:
            async for piece in stream:
                if piece is RESTARTED:  # the LLM replica died: start over, unless some of it was said
                    if said:
                        break
                    shaper = new_shaper()
                    calls = []
                    self.prompt = None
                    continue
                if isinstance(piece, PromptStats):
                    self.prompt = self.prompt or piece  # the turn's prompt; a tool round's comes after it
                    continue
                if isinstance(piece, ToolCall):
                    self.mark("llm_first_token")
                    calls.append(piece)
                    continue
                if isinstance(piece, StreamEnd):
                    cut = piece.finish_reason == "length"
                    break
                self.mark("llm_first_token")
                for clause in shaper.feed(piece):
                    said = True
                    await out.put(clause.text)
                if shaper.done:
                    break
            for clause in shaper.flush(cut=cut):
                said = True
                await out.put(clause.text)
            if shaper.emotion:
                self.parts.animator.emotion = shaper.emotion
            self.declined = self.declined or shaper.declined
        finally:
            await stream.aclose()
        return calls, said

    async def _run_tools(self, tools: ToolRunner, calls: list[ToolCall]) -> list[str] | None:
        """The calls' results once the turn is decided (None if any failed), with the holding phrase if
        they take longer than TOOL_HOLD_S."""
        await self.gate.wait()
        inference_id = uuid.uuid4().hex
        holding = self.parts.tasks.spawn(self._hold_after(TOOL_HOLD_S))
        try:
            results = await asyncio.gather(*(tools.run(c, inference_id) for c in calls))
        finally:
            holding.cancel()
        return None if any(r is None for r in results) else list(results)

    async def _hold_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self._say_holding_phrase()

    def _log_user(self) -> None:
        # The user's words enter the LLM context once the turn is confirmed, before the reply's.
        if self.user_text is not None and not self._user_logged:
            self._user_logged = True
            self.parts.context.add_user(self.user_text)

    def _on_outage(self) -> None:
        if self._holding_task is None:
            self._holding_task = self.parts.tasks.spawn(self._say_holding_phrase())

    async def _say_holding_phrase(self) -> None:
        await self.gate.wait()
        speech = self.parts.holding()
        playing = any(seg.reply_id == self.id for seg in self.parts.playout.segments)
        if speech is not None and not playing and not self.finished.is_set():
            self._play(speech, holding=True)

    def _play(self, speech: SpeechResult, holding: bool = False) -> None:
        seg = play_speech(self.parts.playout, self.parts.animator, speech, self.id)
        (self._holding if holding else self.segments).append(seg)  # a holding phrase is not the reply's words

    # --- playout ---------------------------------------------------------------------------------
    def segment_started(self, seg: Segment) -> bool:
        """The playout reached one of this reply's segments; True for the reply's first audio (a holding
        phrase starts the avatar speaking but is not the reply)."""
        if not self.started:
            self.started = True
            self.parts.emit(Event.REPLICA_STARTED)
        if self.first_audio or any(seg is s for s in self._holding):
            return False
        self.first_audio = True
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
        if self._holding_task is not None:
            self._holding_task.cancel()
        if interrupted and self.task is not None and not self.task.done() and asyncio.current_task() is not self.task:
            self.task.cancel()
        self.parts.on_finished(self)
        if self.started:
            self.parts.emit(Event.REPLICA_STOPPED, interrupted=interrupted)
        if heard:
            self.parts.context.add_assistant(heard)
            extra = {"llm_perception": self.llm_perception} if self.llm_perception else {}
            self.parts.emit(Event.UTTERANCE, role="replica", speech=heard, interrupted=interrupted, **extra)
        if self.timings is not None and self.first_audio:
            extra = ({"passages": {"count": self.passages.count, "prefilled": self.passages.prefilled}}
                     if self.passages is not None else {})
            if self.prompt is not None:
                extra["llm_prompt"] = self.prompt.as_dict()
            if self.declined:
                extra["declined"] = True
            if self.timings.listener_behind_ms is not None:
                extra["listener_behind_ms"] = self.timings.listener_behind_ms
            if self.timings.decision is not None:
                extra["turn_decision"] = self.timings.decision
            self.parts.emit(Event.TURN_TIMINGS, turn_index=self.turn_index, ms_from_speech_end=self.timings.as_ms(),
                            **extra)

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
