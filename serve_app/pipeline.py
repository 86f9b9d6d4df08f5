"""The per-session pipeline: microphone -> VAD -> (speculative ASR + turn model) -> LLM -> clauses ->
TTS -> playout + lip-synced avatar, with barge-in, data-channel control and shutdown rules.

One `ConversationSession` per conversation, living inside a SessionHost replica. Model stages are
shared deployments reached through handles; only whole utterances and clauses cross processes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from PIL import Image

from deployments.perception import decode_frame, wire_size
from models.avatar.animate import Animator, SpeechTrack
from models.avatar.render import AvatarRenderer, Pose
from models.llm import ReplyShaper, build_messages, context_start
from models.perception.face import FaceObservation
from models.perception.fusion import PerceptionState, SessionPerception, VisualTrack
from models.perception.fusion import fuse as fuse_perception
from models.perception.prosody import Prosody, ProsodyTrend, count_fillers
from models.perception.prosody import analyse as analyse_prosody
from models.perception.prosody import describe as describe_prosody
from models.perception.sentiment import Sentiment, sentiment
from models.perception.tools import watches
from models.turn import fuse, is_backchannel
from models.vad import CHUNK, SileroVAD, SpeechSegmenter
from serve_app.events import event
from serve_app.media import AvatarAudioTrack, AvatarVideoTrack, MediaClock, SpeechPlayout, spoken_text

log = logging.getLogger("presence.session")

PATIENCE_S = {"low": 0.6, "medium": 1.1, "high": 2.0}  # silence after which an "incomplete" turn is taken anyway
INTERRUPT_AFTER_S = {"low": 0.9, "medium": 0.45, "high": 0.2}  # user speech needed before a barge-in check
MAX_INPUT_SAMPLES = 16000 * 30  # an utterance longer than 30 s is cut into a turn
PARTIAL_EVERY_S = 1.5  # mid-speech re-transcription cadence (feeds the turn model's text gate)
SNAPSHOT_EVERY_S = 5.0  # the perception summary the ingress keeps for the end-of-call webhook
# The avatar's listening face answers the user's: a smile back, concern for sadness or anger.
MIRROR = {"joy": ("joy", 0.55), "sadness": ("sadness", 0.45), "anger": ("sadness", 0.3), "surprise": ("surprise", 0.35)}


class BadOffer(ValueError):
    """The client's SDP offer cannot be used."""


@dataclass
class Handles:
    turn: Any
    asr: Any
    llm: Any
    tts: Any
    perception: Any = None  # the Perception deployment (None: no visual perception)


@dataclass
class SessionSpec:
    conversation_id: str
    offer_sdp: str
    persona: dict
    conversational_context: str = ""
    custom_greeting: str | None = None
    properties: dict = field(default_factory=dict)
    ice_servers: list[dict] = field(default_factory=list)
    replica_head: str | None = None  # a fitted replica's head file (None: the stock head)


@dataclass
class TurnTimings:
    speech_end: float = 0.0  # wall (monotonic) time of the last voiced chunk
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def as_ms(self) -> dict[str, float]:
        return {k: round((v - self.speech_end) * 1000, 1) for k, v in self.marks.items()}


@dataclass
class Reply:
    id: int
    gate: asyncio.Event
    timings: TurnTimings | None
    task: asyncio.Task | None = None
    segments: list = field(default_factory=list)
    text: str = ""
    started: bool = False
    done_generating: bool = False
    user_logged: bool = False
    llm_perception: str | None = None  # what the LLM was told about the user for this reply
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class ConversationSession:
    """One live conversation: the peer connection, the media clock and the turn-taking loop."""

    def __init__(self, spec: SessionSpec, handles: Handles, renderer: AvatarRenderer, vad_session,
                 fps: float) -> None:
        self.spec = spec
        self.cid = spec.conversation_id
        self.h = handles
        self.persona = spec.persona
        layers = self.persona.get("layers") or {}
        flow = layers.get("conversational_flow") or {}
        self.patience_s = PATIENCE_S[flow.get("turn_taking_patience", "medium")]
        self.interrupt_after_s = INTERRUPT_AFTER_S[flow.get("replica_interruptibility", "medium")]
        llm = layers.get("llm") or {}
        self.llm_params = {"max_tokens": int(llm.get("max_tokens", 80)), "temperature": float(llm.get("temperature", 0.4))}
        self.llm_endpoint = {k: llm.get(k) for k in ("base_url", "api_key", "model")} if llm.get("base_url") else None
        self.tts_speed = float((layers.get("tts") or {}).get("speed", 1.0))
        perception = layers.get("perception") or {}
        self.perceiving = perception.get("perception_model", "basic") != "off"
        self.perception_in_llm = self.perceiving and bool(perception.get("llm_context", True))
        self.camera_period_s = 1.0 / float(perception.get("camera_fps", 4.0))
        self.tool_frames = bool(perception.get("tool_call_frames", True))
        self.tools = watches(perception.get("perception_tools") or []) if self.perceiving else []
        self.visual = VisualTrack()
        self.perception: PerceptionState | None = None
        self.perception_log = SessionPerception()
        self._voice: tuple[Prosody | None, str | None] = (None, None)  # the last utterance's voice + description
        self._words: Sentiment | None = None
        self.voice_trend = ProsodyTrend()
        self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=3)  # recent analysed frames (I420), memory only
        self._perceive_task: asyncio.Task | None = None
        self._snapshot_at = 0.0
        self.context = spec.conversational_context or ""
        self.history: list[dict] = []
        self._ctx_start = 0  # first history message in the LLM's window (see context_start)
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.shutdown_reason: str | None = None
        self._closed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

        self.clock = MediaClock()
        self.playout = SpeechPlayout(self.clock, on_segment_start=self._on_segment_start, on_idle=self._on_playout_idle)
        self.animator = Animator(emotion=self.persona.get("emotion") or "neutral")
        self.renderer = renderer
        self._last_pose: Pose | None = None
        self._last_frame: np.ndarray | None = None
        self.audio_out = AvatarAudioTrack(self.clock, self.playout)
        self.video_out = AvatarVideoTrack(self.clock, self._render, fps)

        self.vad = SileroVAD(vad_session)
        self.segmenter = SpeechSegmenter()
        self.samples_in = 0
        self._ring: deque[np.ndarray] = deque(maxlen=int(8 * 16000 / CHUNK))
        self.in_utterance = False
        self._utt: list[np.ndarray] = []
        self._last_voice_wall = 0.0
        self._partial_text = ""
        self._partial_task: asyncio.Task | None = None
        self._partial_at = 0.0
        self._eot_task: asyncio.Task | None = None
        self._barge_task: asyncio.Task | None = None
        self.reply: Reply | None = None
        self._reply_seq = 0
        self.turns = 0

        self.pc: RTCPeerConnection | None = None
        self.channel = None
        self._backlog: list[dict] = []
        self.connected = asyncio.Event()
        self._left_at: float | None = None

    # --- events --------------------------------------------------------------------------------
    def emit(self, event_type: str, **props: Any) -> None:
        ev = event(self.cid, event_type, **props)
        self.events.put_nowait(ev)
        if self.channel is not None and self.channel.readyState == "open":
            self._send(ev)
        elif len(self._backlog) < 1000:
            self._backlog.append(ev)  # the channel opens after ICE/DTLS: hold events until then

    def _send(self, ev: dict) -> None:
        try:
            self.channel.send(json.dumps(ev))
        except Exception:  # a closing channel must not take the session down
            log.debug("data channel send failed", exc_info=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s task failed", self.cid, exc_info=task.exception())
            self.emit("system.error", message=f"{type(task.exception()).__name__}: {task.exception()}")

    # --- signalling ------------------------------------------------------------------------------
    async def start(self) -> str:
        """Apply the client's offer; returns the SDP answer (non-trickle: candidates included)."""
        sdp = self.spec.offer_sdp
        if not isinstance(sdp, str) or not sdp.startswith("v=0") or "m=" not in sdp:
            raise BadOffer("body is not an SDP offer (must start with 'v=0' and contain media sections)")
        servers = [RTCIceServer(**s) for s in self.spec.ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel):
            self.channel = channel
            channel.on("message", self._on_client_message)
            backlog, self._backlog = self._backlog, []
            for ev in backlog:
                self._send(ev)

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                self._spawn(self._audio_in(track))
            else:
                self._spawn(self._video_in(track))

        @pc.on("connectionstatechange")
        async def on_state():
            state = pc.connectionState
            if state == "connected":
                self._left_at = None
                self.connected.set()
            elif state in ("failed", "closed", "disconnected"):
                self._left_at = self._left_at or time.monotonic()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError and friends on malformed SDP
            await pc.close()
            raise BadOffer(f"malformed SDP offer: {exc}") from exc
        kinds = {t.kind for t in pc.getTransceivers()}
        if "audio" not in kinds:
            await pc.close()
            raise BadOffer("the offer has no audio section: the user's microphone is required")
        for t in pc.getTransceivers():
            if t.kind == "audio":
                t.sender.replaceTrack(self.audio_out) if t.sender.track else pc.addTrack(self.audio_out)
                t.direction = "sendrecv"
            elif t.kind == "video":
                t.sender.replaceTrack(self.video_out) if t.sender.track else pc.addTrack(self.video_out)
                t.direction = "sendrecv"
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)  # waits for ICE gathering
        return pc.localDescription.sdp

    # --- lifetime ----------------------------------------------------------------------------------
    async def run(self) -> str:
        """Supervises the session until a shutdown rule fires; returns the reason."""
        props = self.spec.properties
        max_s = float(props.get("max_call_duration", 1800))
        absent_s = float(props.get("participant_absent_timeout", 300))
        left_s = float(props.get("participant_left_timeout", 60))
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.connected.wait(), timeout=absent_s)
        except TimeoutError:
            return await self.shutdown("participant_absent_timeout")
        self.emit("system.replica_joined")
        if self.spec.custom_greeting:
            self.say(self.spec.custom_greeting)
        while not self._closed.is_set():
            self._update_perception()
            now = time.monotonic()
            if now - started >= max_s:
                return await self.shutdown("max_call_duration")
            if self._left_at is not None and now - self._left_at >= left_s:
                return await self.shutdown("participant_left_timeout")
            try:
                await asyncio.wait_for(self._closed.wait(), timeout=0.25)
            except TimeoutError:
                pass
        return self.shutdown_reason or "error"

    async def shutdown(self, reason: str) -> str:
        """End the session cleanly: finish the transcript, tell the client why, close media."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            self._finish_reply(interrupted=True)
            if self.perceiving:
                self.emit("application.perception_analysis", **self.perception_log.summary())
            self.emit("system.shutdown", shutdown_reason=reason)
            await asyncio.sleep(0.05)  # let the data channel carry the reason before we close
            self._closed.set()
        await self.close()
        return self.shutdown_reason

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.pc is not None:
            await self.pc.close()

    # --- incoming media ----------------------------------------------------------------------------
    async def _video_in(self, track) -> None:
        """The user's camera: every frame is consumed (so none pile up); a few per second, downscaled,
        go to the Perception deployment. Frames stay in memory (the last few, for tool calls)."""
        last = -1e9
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if (not self.perceiving or self.h.perception is None or now - last < self.camera_period_s
                        or (self._perceive_task is not None and not self._perceive_task.done())):
                    continue
                last = now
                w, h = wire_size(frame.width, frame.height)
                i420 = frame.to_ndarray(format="yuv420p", width=w, height=h)
                self._frames.append((now, i420))
                self._perceive_task = self._spawn(self._perceive(i420, now))
        except MediaStreamError:
            return

    async def _perceive(self, i420: np.ndarray, t: float) -> None:
        try:
            hint = self.visual.last.roi if self.visual.last is not None else None  # None once the face is lost
            summary = await self.h.perception.analyse.remote(i420, hint)
        except Exception as exc:  # a perception outage degrades the session, it does not end it
            log.warning("session %s perception failed: %s", self.cid, exc)
            return
        self.visual.add(t, FaceObservation.from_summary(summary))
        self._update_perception()

    def _update_perception(self) -> None:
        """Refresh the fused state (per analysed frame and at least every 250 ms), run the perception
        tools and set the avatar's listening expression."""
        if not self.perceiving:
            return
        now = time.monotonic()
        state = fuse_perception(self.visual, now, voice=self._voice[0], voice_text=self._voice[1], words=self._words)
        prev, self.perception = self.perception, state
        self.perception_log.add(state)
        if prev is None or (prev.visual, prev.emotion, prev.visible) != (state.visual, state.emotion, state.visible):
            self.emit("conversation.perception", **state.as_dict())
        for tool in self.tools:
            args = tool.update(state)
            if args is not None:
                self._fire_tool(tool, args, now)
        mirror = MIRROR.get(state.emotion) if state.visible and state.confidence >= 0.45 else None
        self.animator.listening_emotion = mirror[0] if mirror else None
        if mirror:
            self.animator.listening_level = mirror[1]
        if now - self._snapshot_at >= SNAPSHOT_EVERY_S:
            self._snapshot_at = now
            # For the ingress only (not the client): the end-of-call analysis if the stream is cut.
            self.events.put_nowait(event(self.cid, "internal.perception_snapshot", **self.perception_log.summary()))

    def _fire_tool(self, tool, args: dict, now: float) -> None:
        frames = []
        if self.tool_frames:
            for t, i420 in list(self._frames)[-2:]:
                buf = io.BytesIO()
                img = Image.fromarray(decode_frame(i420))
                img.thumbnail((160, 160))
                img.save(buf, format="JPEG", quality=70)
                frames.append({"age_s": round(now - t, 2), "jpeg_base64": base64.b64encode(buf.getvalue()).decode()})
        self.perception_log.tool_calls.append((self.clock.now(), tool.name))
        self.emit("conversation.perception_tool_call", name=tool.name, arguments=args, frames=frames)
        if tool.llm_tool_call:
            self.emit("conversation.tool_call", name=tool.name, arguments=json.dumps(args), source="perception")

    async def _audio_in(self, track) -> None:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        pending = np.zeros(0, np.int16)
        try:
            while True:
                frame = await track.recv()
                for out in resampler.resample(frame):
                    pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
                n = pending.size // CHUNK
                for i in range(n):
                    self._on_chunk(pending[i * CHUNK:(i + 1) * CHUNK])
                pending = pending[n * CHUNK:]
        except MediaStreamError:
            self._left_at = self._left_at or time.monotonic()

    def _on_chunk(self, chunk: np.ndarray) -> None:
        t = self.samples_in / 16000
        self.samples_in += CHUNK
        self._ring.append(chunk)
        prob = self.vad(chunk.astype(np.float32) * (1 / 32768))
        if prob >= self.segmenter.on:
            self._last_voice_wall = time.monotonic()
        ev = self.segmenter.update(prob, t)
        if self.in_utterance:
            self._utt.append(chunk)
        if ev is not None and ev.kind == "speech_start":
            if not self.in_utterance:
                self.in_utterance = True
                self._utt = list(self._ring)[-10:]  # 320 ms of pre-roll: the first syllable matters to ASR
                self._partial_text = ""
                self._partial_at = t
                self.emit("conversation.user.started_speaking")
            else:
                self._cancel_pending_turn()
            if self._replica_speaking() and self._barge_task is None:
                self._barge_task = self._spawn(self._barge_in(t))
        elif ev is not None and ev.kind == "pause" and self.in_utterance:
            self._cancel_pending_turn()
            self._eot_task = self._spawn(self._end_of_turn())
        if self.in_utterance and self.segmenter.speaking:
            if t - self._partial_at >= PARTIAL_EVERY_S and (self._partial_task is None or self._partial_task.done()):
                self._partial_at = t
                self._partial_task = self._spawn(self._partial_asr())
            if len(self._utt) * CHUNK > MAX_INPUT_SAMPLES and self._eot_task is None:
                self._eot_task = self._spawn(self._end_of_turn(force=True))

    # --- turn taking ---------------------------------------------------------------------------------
    def _utterance_pcm(self) -> bytes:
        return np.concatenate(self._utt).tobytes() if self._utt else b""

    async def _partial_asr(self) -> None:
        result = await self.h.asr.transcribe.remote(self._utterance_pcm(), partial=True)
        if self.in_utterance and result["text"] is not None:
            self._partial_text = result["text"]

    def _cancel_pending_turn(self) -> None:
        if self._eot_task is not None and not self._eot_task.done():
            self._eot_task.cancel()
        self._eot_task = None
        if self.reply is not None and not self.reply.gate.is_set():
            self.reply.task.cancel()  # a speculative reply nobody heard
            self.reply = None

    async def _end_of_turn(self, force: bool = False) -> None:
        timings = TurnTimings(speech_end=self._last_voice_wall)
        timings.mark("vad_pause")
        pcm = self._utterance_pcm()
        tail = pcm[-8 * 16000 * 2:]
        asr_call = self.h.asr.transcribe.remote(pcm)
        turn_call = self.h.turn.predict.remote(tail, self._partial_text)
        # The voice's prosody is computed while ASR runs, off the event loop and off the turn's path.
        prosody = asyncio.ensure_future(asyncio.to_thread(self._voice_prosody, pcm))
        text = (await asr_call)["text"].strip()
        timings.mark("asr_final")
        if not text:
            turn_call.cancel()
            self._end_utterance(None)
            return
        voice = await prosody  # done by now: it is ~10 ms of numpy and ran alongside ASR
        if voice is not None:
            voice.fillers = count_fillers(text)
            change = self.voice_trend.describe_change(voice)
            self.voice_trend.add(voice)
            self._voice = (voice, " ".join(x for x in (describe_prosody(voice), change) if x))
            self._words = sentiment(text)
            self._update_perception()
        # Speculation: start the reply now, gated until the turn is confirmed.
        reply = self._start_reply(text, timings, gated=True)
        turn = await turn_call
        decision = fuse(turn["audio_probability"], text)
        timings.mark("turn_decision")
        if not (decision.complete or force):
            waited = time.monotonic() - timings.marks["vad_pause"]
            await asyncio.sleep(max(0.0, self.patience_s - waited))
            timings.marks["turn_decision"] = time.monotonic()
        self._end_utterance(text, self._voice[1] if voice is not None else None)
        reply.gate.set()

    def _voice_prosody(self, pcm: bytes) -> Prosody | None:
        """How the user's voice sounded in this utterance (models/perception/prosody.py), unless the
        persona turned perception off."""
        if not self.perceiving:
            return None
        return analyse_prosody(np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0)

    def _end_utterance(self, text: str | None, audio_analysis: str | None = None) -> None:
        self.in_utterance = False
        self._utt = []
        self._eot_task = None
        if self._barge_task is not None:
            self._barge_task.cancel()
            self._barge_task = None
        self.emit("conversation.user.stopped_speaking")
        if text:
            self.turns += 1
            extra = {"user_audio_analysis": audio_analysis} if audio_analysis else {}
            state = self.perception
            if state is not None:
                extra["user_visual_analysis"] = state.visual
                extra["user_perception"] = state.description
                if state.incongruent:
                    self.perception_log.incongruent_moments.append((self.clock.now(), state.description))
            self.emit("conversation.utterance", role="user", speech=text, **extra)
            self.animator.nod(self.clock.now())

    # --- barge-in ---------------------------------------------------------------------------------------
    def _replica_speaking(self) -> bool:
        return self.playout.active

    async def _barge_in(self, start_t: float) -> None:
        """The user talks over the avatar: after `interrupt_after_s` of speech, interrupt unless it
        is a backchannel ("mhm", "yeah")."""
        try:
            while self.samples_in / 16000 - start_t < self.interrupt_after_s:
                if not self.segmenter.speaking or not self._replica_speaking():
                    return
                await asyncio.sleep(0.032)
            text = (await self.h.asr.transcribe.remote(self._utterance_pcm()))["text"]
            if self._replica_speaking() and not is_backchannel(text):
                self.interrupt()
        finally:
            self._barge_task = None

    def interrupt(self) -> None:
        """Stop speaking now; the unsaid rest of the reply is dropped."""
        self._finish_reply(interrupted=True)

    # --- replies ----------------------------------------------------------------------------------------
    def _start_reply(self, user_text: str | None, timings: TurnTimings | None, gated: bool,
                     echo_text: str | None = None) -> Reply:
        if self.reply is not None:
            self._finish_reply(interrupted=True)
        self._reply_seq += 1
        gate = asyncio.Event()
        if not gated:
            gate.set()
        reply = Reply(self._reply_seq, gate, timings)
        reply.task = self._spawn(self._generate(reply, user_text, echo_text))
        self.reply = reply
        return reply

    async def _clauses_from_llm(self, reply: Reply, user_text: str, out: asyncio.Queue) -> None:
        self._ctx_start = context_start(self.history, self._ctx_start)
        history = self.history[self._ctx_start:] + [{"role": "user", "content": user_text}]
        reply.llm_perception = self.llm_perception()
        messages = build_messages(self.persona.get("system_prompt", ""), "\n".join(
            x for x in (self.persona.get("context", ""), self.context) if x), history, perception=reply.llm_perception)
        shaper = ReplyShaper()
        stream = self.h.llm.options(stream=True).stream.remote(messages, self.llm_params, self.llm_endpoint)
        try:
            async for piece in stream:
                if reply.timings:
                    reply.timings.mark("llm_first_token")
                for clause in shaper.feed(piece):
                    await out.put(clause.text)
                if shaper.done:
                    break
            for clause in shaper.flush():
                await out.put(clause.text)
            if shaper.emotion:
                self.animator.emotion = shaper.emotion
        finally:
            stream.cancel()
            await out.put(None)

    def llm_perception(self) -> str | None:
        """What the LLM is told about the user for this reply (persona: layers.perception.llm_context)."""
        if not self.perception_in_llm or self.perception is None:
            return None
        return self.perception.description

    async def _generate(self, reply: Reply, user_text: str | None, echo_text: str | None) -> None:
        clauses: asyncio.Queue = asyncio.Queue()
        if echo_text is not None:
            shaper = ReplyShaper(max_sentences=50, max_chars=5000)
            for c in shaper.feed(echo_text) + shaper.flush():
                clauses.put_nowait(c.text)
            clauses.put_nowait(None)
            producer = None
        else:
            producer = self._spawn(self._clauses_from_llm(reply, user_text, clauses))
        try:
            while (text := await clauses.get()) is not None:
                if reply.timings:
                    reply.timings.mark("first_clause")
                speech = await self.h.tts.synthesize.remote(text, self.tts_speed)
                if reply.timings:
                    reply.timings.mark("tts_first_audio")
                await reply.gate.wait()
                self._log_user(reply, user_text)
                pcm = np.frombuffer(speech["pcm16"], dtype=np.int16)
                seg = self.playout.enqueue(pcm, speech["sample_rate"], text, speech["words"], speech["phonemes"], reply.id)
                reply.segments.append(seg)
                self.animator.speak(SpeechTrack(seg.t0, [(p, a * 1.0, b * 1.0) for p, a, b in speech["phonemes"]],
                                                duration=seg.pcm.size / 48000))
        except asyncio.CancelledError:
            if producer:
                producer.cancel()
            raise
        reply.done_generating = True
        await reply.gate.wait()
        self._log_user(reply, user_text)
        if not reply.segments:
            self._finish_reply(interrupted=False, reply=reply)
            return
        await reply.finished.wait()

    def _log_user(self, reply: Reply, user_text: str | None) -> None:
        # The user's words enter the LLM context once the turn is confirmed, before the reply's.
        if user_text is not None and not reply.user_logged:
            reply.user_logged = True
            self.history.append({"role": "user", "content": user_text})

    def _on_segment_start(self, seg) -> None:
        reply = self.reply
        if reply is None or seg.reply_id != reply.id or reply.started:
            return
        reply.started = True
        self.emit("conversation.replica.started_speaking")
        if reply.timings:
            reply.timings.mark("first_audio_sent")
            self._pending_frame_mark = (reply, seg.t0)

    _pending_frame_mark: tuple | None = None

    def _on_playout_idle(self, reply_id: int) -> None:
        reply = self.reply
        if reply is not None and reply.id == reply_id and reply.done_generating:
            self._finish_reply(interrupted=False)

    def _finish_reply(self, interrupted: bool, reply: Reply | None = None) -> None:
        """Close the current reply: keep only what was actually said in the context and transcript."""
        reply = reply or self.reply
        if reply is None or reply.finished.is_set():
            return
        if reply is self.reply:
            self.reply = None
        now, cut = self.playout.flush() if interrupted else (self.clock.now(), [])
        self.animator.stop_speaking() if interrupted else None
        spoken = []
        for seg in reply.segments:
            if seg in cut:
                if seg.started or seg.t0 < now:
                    spoken.append(spoken_text(seg, now))
            else:
                spoken.append(seg.text)
        text = " ".join(s for s in spoken if s).strip()
        reply.finished.set()
        if reply.task is not None and interrupted and not reply.task.done() and asyncio.current_task() is not reply.task:
            reply.task.cancel()
        if reply.started:
            self.emit("conversation.replica.stopped_speaking", interrupted=interrupted)
        if text:
            self.history.append({"role": "assistant", "content": text})
            extra = {"llm_perception": reply.llm_perception} if reply.llm_perception else {}
            self.emit("conversation.utterance", role="replica", speech=text, interrupted=interrupted, **extra)
        if reply.timings and reply.started:
            self.emit("conversation.turn_timings", turn_index=self.turns, ms_from_speech_end=reply.timings.as_ms())

    def say(self, text: str) -> None:
        """Speak exact text (greeting, conversation.echo), interrupting whatever is being said."""
        self._start_reply(None, None, gated=False, echo_text=text)

    # --- video -------------------------------------------------------------------------------------
    def _render(self, t: float) -> np.ndarray:
        pose = self.animator.pose(t)
        last = self._last_pose
        if (self._last_frame is not None and last is not None and np.abs(pose.weights - last.weights).max() < 0.015
                and abs(pose.yaw - last.yaw) < 0.004 and abs(pose.pitch - last.pitch) < 0.004):
            frame = self._last_frame  # nothing visible changed: reuse the frame
        else:
            frame = self.renderer.render(pose).copy()
            self._last_pose, self._last_frame = pose, frame
        mark = self._pending_frame_mark
        if mark is not None and t >= mark[1]:
            self._pending_frame_mark = None
            if mark[0].timings:
                mark[0].timings.mark("first_frame_sent")
        return frame

    # --- data channel ------------------------------------------------------------------------------
    def _on_client_message(self, message: Any) -> None:
        try:
            msg = json.loads(message)
            kind = msg["event_type"]
            props = msg.get("properties") or {}
            if not isinstance(props, dict):
                raise ValueError("properties must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            self.emit("system.error", message=f"bad client message: {exc}")
            return
        if kind == "conversation.echo":
            text = str(props.get("text", "")).strip()[:5000]
            if text:
                self.say(text)
        elif kind == "conversation.respond":
            text = str(props.get("text", "")).strip()[:5000]
            if text:
                self.turns += 1
                self.emit("conversation.utterance", role="user", speech=text)
                self._start_reply(text, None, gated=False)
        elif kind == "conversation.interrupt":
            self.interrupt()
        elif kind == "conversation.append_llm_context":
            self.context = (self.context + "\n" + str(props.get("context", ""))[:20000]).strip()
        elif kind == "conversation.overwrite_llm_context":
            self.context = str(props.get("context", ""))[:50000]
        else:
            self.emit("system.error", message=f"unknown event_type {kind!r}")
