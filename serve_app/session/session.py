"""One live conversation, wired from its parts, with its shutdown rules.

A turn, top to bottom: the transport hands the microphone track to the `Listener`, which segments
speech and, at a pause, runs ASR and the turn model. With the words it calls `on_speculate`: the
session starts a gated `Reply` (LLM -> clauses -> TTS). When the turn is decided, `on_user_stopped`
records the utterance and confirms the reply, whose audio then plays on the media clock; the
playout's first sample marks `first_audio_sent`. Talking over the avatar pauses it at once
(`on_overlap`); then it either ends (`on_barge_in`) or goes on (`on_overlap_end`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from models.avatar.animate import Animator
from models.avatar.render import AvatarRenderer
from models.memory import remembered_name
from serve_app.events import Event, ShutdownReason, event
from serve_app.media import AvatarAudioTrack, AvatarVideoTrack, MediaClock, Segment, SpeechPlayout
from serve_app.session.avatar import AvatarFace
from serve_app.session.config import Handles, SessionSpec, interrupt_after_s, llm_settings, patience_s
from serve_app.session.context import LLMContext
from serve_app.session.control import Control
from serve_app.session.knowledge import TurnKnowledge
from serve_app.session.listener import Listener, UserTurn
from serve_app.session.perceiver import Perceiver
from serve_app.session.pose_stream import POSE_HZ, PoseStream
from serve_app.session.prefill import PromptPrefill
from serve_app.session.recovery import HoldingPhrases
from serve_app.session.reply import Reply, ReplyParts, play_speech
from serve_app.session.tasks import Tasks
from serve_app.session.tools import ToolRunner
from serve_app.session.transport import Transport


class Session:
    """`renderer` None: client video mode (spec.video_mode "client"), where the browser draws the face
    from the poses this session sends, and no video is rendered, encoded or sent here."""

    def __init__(self, spec: SessionSpec, handles: Handles, renderer: AvatarRenderer | None,
                 vad: Callable[[np.ndarray], float], fps: float) -> None:
        self.spec = spec
        self.cid = spec.conversation_id
        persona = spec.persona
        self.events: asyncio.Queue[dict] = asyncio.Queue()  # everything emitted, for the host's stream
        self.tasks = Tasks(on_error=self._task_failed)
        self.shutdown_reason: str | None = None
        self._closed = asyncio.Event()
        self.turns = 0
        self.reply: Reply | None = None
        self._reply_seq = 0
        # Outgoing media on one clock: speech playout and the avatar's face.
        self.clock = MediaClock()
        self.playout = SpeechPlayout(self.clock, on_segment_start=self._on_segment_start, on_idle=self._on_playout_idle)
        self.animator = Animator(emotion=persona.emotion)
        self.face = AvatarFace(renderer, self.animator, yield_cpu=self.preparing_reply)
        self.audio_out = AvatarAudioTrack(self.clock, self.playout)
        self.video_mode = "server" if renderer is not None else "client"
        self.video_out = AvatarVideoTrack(self.clock, self.face.render, fps) if renderer is not None else None
        # What the user told earlier conversations (memory stores) is part of the facts, in the stable prefix.
        remembered = "\n".join(fact for _, fact in spec.memories)
        self.context = LLMContext(persona.system_prompt, "\n".join(x for x in (remembered, persona.context) if x),
                                  spec.conversational_context, grounded=persona.layers.llm.grounding == "strict")
        self.perceiver = Perceiver(persona.layers.perception, handles.perception, self.animator, self.clock,
                                   self.emit, self.tasks, yield_cpu=self.preparing_reply)
        self.listener = Listener(self, handles.asr, handles.turn, vad, self.tasks, patience_s(persona),
                                 interrupt_after_s(persona), health=handles.health,
                                 voice_analysis=self.perceiver.analyse_voice if self.perceiver.enabled else None,
                                 asr_prompt=persona.layers.stt.hotwords,
                                 interim=bool(handles.knowledge is not None and spec.document_ids))
        self.holding = HoldingPhrases(handles.tts, persona.layers.tts.speed)
        self._holding_played_at = -1e9
        settings = llm_settings(persona, self.cid)
        llm_layer = persona.layers.llm
        self.tools = (ToolRunner(self.cid, llm_layer.tools, llm_layer.tool_timeout_s, self.emit, handles.post_json)
                      if llm_layer.tools else None)
        self.prefill = PromptPrefill(handles.llm, self.context, settings.endpoint, self.tasks,
                                     self.tools.definitions if self.tools else None, conversation=self.cid)
        self.knowledge = (TurnKnowledge(handles.knowledge, spec.document_ids, persona.knowledge, self.prefill, self.tasks,
                                        speaking=lambda: self.listener.segmenter.speaking)
                          if handles.knowledge is not None and spec.document_ids else None)
        self.reply_parts = ReplyParts(handles.llm, handles.tts, settings, persona.layers.tts.speed,
                                      self.playout, self.animator, self.context, self.emit, self.tasks,
                                      lambda: self.prefill.seen or None, self.perceiver.llm_heard,
                                      self._reply_finished, handles.health,
                                      self.holding.get, self.tools, self.knowledge.for_turn if self.knowledge else None)
        self.control = Control(self, self.context, self.tell_client, spec.grants, on_context_change=self.prefill.request)
        self.transport = Transport(spec.ice_servers, self._on_track, self.control.on_message)
        self.poses = PoseStream(self.face, self.clock, self.audio_out, self.transport) if renderer is None else None

    def emit(self, event_type: Event, **props: Any) -> None:
        ev = event(self.cid, event_type, **props)
        self.events.put_nowait(ev)
        if event_type is not Event.PERCEPTION_SNAPSHOT:  # for the ingress only
            self.transport.send(ev)

    def tell_client(self, event_type: Event, **props: Any) -> None:
        """An event for the client alone (answers to its own messages): not the webhook, not the stream."""
        self.transport.send(event(self.cid, event_type, **props))

    def _task_failed(self, exc: BaseException) -> None:
        # The details (a Ray traceback with pids, node addresses and paths, or an upstream's body)
        # stay in the host's log (Tasks logs them); the participant and the webhook learn only which
        # kind of part failed.
        self.emit(Event.ERROR, message="a part of the conversation failed", kind=type(exc).__name__)

    # --- lifetime --------------------------------------------------------------------------------
    async def start(self) -> str:
        """The SDP answer to the spec's offer (raises transport.BadOffer)."""
        answer = await self.transport.answer(self.spec.offer_sdp, self.audio_out, self.video_out)
        self.audio_out.sender = self.transport.audio_sender
        spec = self.spec
        self.emit(Event.AVATAR, video_mode=self.video_mode, replica_id=spec.replica_id, head_version=spec.head_version,
                  head_url=f"/v2/replicas/{spec.replica_id}/head?v={spec.head_version}", pose_hz=POSE_HZ)
        # Persona and facts into the LLM's prompt cache while ICE connects (seconds of prompt on a CPU).
        self.prefill.request()
        if self.knowledge is not None:
            self.knowledge.prepare()
        return answer

    def _on_track(self, track) -> None:
        self.tasks.spawn(self._listen(track) if track.kind == "audio" else self.perceiver.run(track))

    async def _listen(self, track) -> None:
        await self.listener.run(track)
        self.transport.participant_left("microphone track ended")

    async def run(self) -> str:
        """Supervises the session until a shutdown rule fires; returns the reason."""
        props = self.spec.properties
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.transport.connected.wait(), timeout=props.participant_absent_timeout)
        except TimeoutError:
            return await self.shutdown(ShutdownReason.PARTICIPANT_ABSENT)
        self.emit(Event.REPLICA_JOINED)
        if self.poses is not None:
            self.tasks.spawn(self.poses.run())
        self.tasks.spawn(self.holding.prepare())  # while TTS is up: it may be the stage that dies later
        greeting = self.greeting()
        if greeting:
            self.say(greeting)
        while not self._closed.is_set():
            self.perceiver.update()
            now = time.monotonic()
            if now - started >= props.max_call_duration:
                return await self.shutdown(ShutdownReason.MAX_CALL_DURATION)
            left = self.transport.left_at
            if left is not None and now - left >= props.participant_left_timeout:
                return await self.shutdown(ShutdownReason.PARTICIPANT_LEFT)
            try:
                await asyncio.wait_for(self._closed.wait(), timeout=0.25)
            except TimeoutError:
                pass
        return self.shutdown_reason or ShutdownReason.ERROR

    def greeting(self) -> str | None:
        """The conversation's custom greeting (`{name}` filled from memory); someone the memory stores know
        by name is welcomed back by it."""
        name = remembered_name(self.spec.memories)
        custom = self.spec.custom_greeting
        if custom:
            return custom.replace("{name}", name or "").replace(" ,", ",").replace("  ", " ")
        return f"Welcome back, {name}! How can I help you today?" if name else None

    def user_said(self) -> list[str]:
        """Everything the user said in the conversation (what memory is extracted from at the end)."""
        return [m["content"] for m in self.context.history if m["role"] == "user"]

    async def shutdown(self, reason: ShutdownReason) -> str:
        """End the session cleanly: finish the transcript, tell the client why, close media."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            self.interrupt()
            if self.perceiver.enabled:
                self.emit(Event.PERCEPTION_ANALYSIS, **self.perceiver.summary())
            self.emit(Event.SHUTDOWN, shutdown_reason=reason)
            await asyncio.sleep(0.05)  # let the data channel carry the reason before we close
            self._closed.set()
        await self.close()
        return self.shutdown_reason

    async def close(self) -> None:
        self.tasks.cancel_all()
        if self.tools is not None:
            self.tools.close()
        await self.transport.close()

    def preparing_reply(self) -> bool:
        """From the user's pause until the reply's first audio, rendering and perception yield the CPU."""
        return self.listener.deciding or (self.reply is not None and not self.reply.started)

    # --- one turn: the listener's hooks, in the order they happen --------------------------------
    def replica_speaking(self) -> bool:
        return self.playout.active

    def on_user_started(self) -> None:
        if self.knowledge is not None:
            self.knowledge.new_utterance()
        if self.prefill.see(self.perceiver.llm_seen()):  # their look as they begin: cached while they speak
            self.prefill.request()
        self.emit(Event.USER_STARTED)

    def on_partial(self, text: str) -> None:
        """The words of the utterance so far (a second into it): its passages are looked up and cached."""
        if self.knowledge is not None:
            self.knowledge.on_partial(text)

    def wants_words(self) -> bool:
        """Whether a later transcript of the utterance so far is worth its ASR time (for its passages)."""
        return self.knowledge is not None and self.knowledge.wants_words()

    def on_speculate(self, turn: UserTurn) -> None:
        self.perceiver.hear(turn.text, turn.voice)
        self._start_reply(user_text=turn.text, timings=turn.timings, gated=True)

    def on_user_continued(self) -> None:
        if self.reply is not None and not self.reply.confirmed:
            self.reply.cancel()  # a speculative reply nobody heard
            self.reply = None
        if self.knowledge is not None and self.reply is None and self.listener.segmenter.speaking:
            self.knowledge.resume()

    def on_user_stopped(self, turn: UserTurn | None) -> None:
        self.emit(Event.USER_STOPPED)
        if turn is None:
            return
        self.turns += 1
        self.emit(Event.UTTERANCE, role="user", speech=turn.text, **self.perceiver.utterance_fields(turn.voice))
        self.animator.nod(self.clock.now())
        if self.reply is not None and self.reply.timings is turn.timings:
            self.reply.confirm(self.turns)

    def on_overlap(self) -> None:
        self.playout.pause()  # silent within a frame; decided after (barge-in or go on)
        self.face.hold_speech()

    def on_barge_in(self) -> None:
        self.interrupt()  # what was heard stays in the context (Reply.finish)

    def on_overlap_end(self) -> None:
        self.face.release_speech(self.playout.resume(), keep=self.reply is not None)

    # --- replies (also what client control messages ask for) -------------------------------------
    def say(self, text: str) -> None:
        """Speak exact text (greeting, conversation.echo), interrupting whatever is being said."""
        self._start_reply(echo_text=text)

    def respond(self, text: str) -> None:
        """Reply to text as if the user had said it (conversation.respond)."""
        self.turns += 1
        self.emit(Event.UTTERANCE, role="user", speech=text)
        self.prefill.see(self.perceiver.llm_seen())  # no utterance began it: their look as it arrives
        self._start_reply(user_text=text, turn_index=self.turns)

    def tool_result(self, tool_call_id: str, result: Any) -> bool:
        """conversation.tool_result; False when no call with that id is waiting (unknown, timed out, or
        its reply was interrupted)."""
        return self.tools is not None and self.tools.answer(tool_call_id, result)

    def interrupt(self) -> None:
        """Stop speaking now; the unsaid rest of the reply is dropped."""
        if self.reply is not None:
            self.reply.finish(interrupted=True)
        elif self.playout.active:  # a holding phrase of no reply
            self.playout.flush()
            self.animator.stop_speaking()

    def on_stage_outage(self) -> None:
        """A model stage the listener called is down: say the holding phrase if the avatar is quiet (a reply
        in progress says its own)."""
        now = time.monotonic()
        speech = self.holding.get()
        if speech is None or self.reply is not None or self.playout.active or now - self._holding_played_at < 8:
            return
        self._holding_played_at = now
        play_speech(self.playout, self.animator, speech, reply_id=0)

    def _start_reply(self, **kwargs: Any) -> None:
        self.interrupt()
        self._reply_seq += 1
        self.reply = Reply(self._reply_seq, self.reply_parts, **kwargs).start()

    def _reply_finished(self, reply: Reply) -> None:
        if self.reply is reply:
            self.reply = None
        # What was heard joins the cached prefix while the user answers (with their look now and their next
        # passages, if known).
        self.prefill.see(self.perceiver.llm_seen())
        self.prefill.request(lead=self.knowledge.pending_lead() if self.knowledge is not None else None)

    def _on_segment_start(self, seg: Segment) -> None:
        reply = self.reply
        if reply is not None and seg.reply_id == reply.id and reply.segment_started(seg):
            self.face.mark_first_frame(reply.timings, seg.t0)

    def _on_playout_idle(self, reply_id: int) -> None:
        if self.reply is not None and self.reply.id == reply_id:
            self.reply.playout_idle()
