"""What the session notices about the user: camera frames (a few per second) -> the Perception
deployment -> the visual track; the voice and words of each utterance; all fused into one state
that feeds the LLM, the perception tools, the avatar's listening face and the end-of-call analysis.

Frames stay in memory: the last few analysed ones, only to attach to a perception tool call."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc.mediastreams import MediaStreamError
from PIL import Image

from models.avatar.animate import Animator
from models.perception.face import FaceObservation
from models.perception.frames import decode_frame, wire_size
from models.perception.fusion import PerceptionState, SessionPerception, VisualTrack, fuse
from models.perception.prosody import Prosody, ProsodyTrend, count_fillers
from models.perception.prosody import analyse as analyse_prosody
from models.perception.prosody import brief as brief_prosody
from models.perception.prosody import describe as describe_prosody
from models.perception.prosody import remarkable as remarkable_voice
from models.perception.sentiment import Sentiment, sentiment
from models.perception.tools import watches
from models.priority import BACKGROUND_NICE, lower_priority
from serve_app.events import Event
from serve_app.media import MediaClock
from serve_app.schemas import PerceptionLayer
from serve_app.session.tasks import Tasks

log = logging.getLogger("presence.session")

SNAPSHOT_EVERY_S = 5.0  # the perception summary the ingress keeps for the end-of-call webhook
# While a reply is prepared, one frame a second: inside VisualTrack's 2 s attention window, so the
# user never seems to vanish (which would re-arm and re-fire perception tools).
YIELD_PERIOD_S = 1.0
# The avatar's listening face answers the user's: a smile back, concern for sadness or anger.
MIRROR = {"joy": ("joy", 0.55), "sadness": ("sadness", 0.45), "anger": ("sadness", 0.3), "surprise": ("surprise", 0.35)}


class Perceiver:
    def __init__(self, layer: PerceptionLayer, handle: Any, animator: Animator, clock: MediaClock,
                 emit: Callable[..., None], tasks: Tasks, yield_cpu: Callable[[], bool] = bool) -> None:
        self.enabled = layer.perception_model != "off"
        self.in_llm = self.enabled and layer.llm_context
        self.handle = handle if self.enabled else None
        self.camera_period_s = 1.0 / layer.camera_fps
        self.tool_frames = layer.tool_call_frames
        self.tools = watches([t.model_dump() for t in layer.perception_tools]) if self.enabled else []
        self.animator = animator
        self.clock = clock
        self.emit = emit
        self.tasks = tasks
        self.yield_cpu = yield_cpu  # True while a reply is being prepared: fewer camera frames
        self.visual = VisualTrack()
        self.state: PerceptionState | None = None
        self.log = SessionPerception()
        self.voice_trend = ProsodyTrend()
        self._voice: Prosody | None = None
        self._voice_text: str | None = None  # the sentence (events, the perception description)
        self._voice_brief = ""  # the same in a few words, for the LLM (read while the reply waits)
        self._voice_notable = False  # the last utterance's voice was worth remarking on
        self._words: Sentiment | None = None
        self._frames: deque[tuple[float, np.ndarray]] = deque(maxlen=3)  # recent analysed frames (I420)
        self._perceive_task: asyncio.Task | None = None
        self._snapshot_at = 0.0
        self.camera = False  # the user sends video (without it, "not visible on camera" is no news)

    # --- camera ----------------------------------------------------------------------------------
    async def run(self, track) -> None:
        """Consume every camera frame (so none pile up); a few per second, downscaled, are analysed
        (one a second while a reply is prepared: the reply path comes first)."""
        last = -1e9
        decoder_lowered = False
        self.camera = True
        try:
            while True:
                frame = await track.recv()
                if not decoder_lowered:
                    # aiortc decodes every camera frame in its own thread (running now that one came out);
                    # only a few a second are analysed, so on a busy CPU decoding yields to the reply path.
                    lower_priority(BACKGROUND_NICE, thread_name="video-decoder")
                    decoder_lowered = True
                now = time.monotonic()
                period = max(self.camera_period_s, YIELD_PERIOD_S) if self.yield_cpu() else self.camera_period_s
                if (self.handle is None or now - last < period
                        or (self._perceive_task is not None and not self._perceive_task.done())):
                    continue
                last = now
                w, h = wire_size(frame.width, frame.height)
                i420 = frame.to_ndarray(format="yuv420p", width=w, height=h)
                self._frames.append((now, i420))
                self._perceive_task = self.tasks.spawn(self._perceive(i420, now))
        except MediaStreamError:
            return

    async def _perceive(self, i420: np.ndarray, t: float) -> None:
        try:
            hint = self.visual.last.roi if self.visual.last is not None else None  # None once the face is lost
            summary = await self.handle.analyse.remote(i420, hint)
        except Exception as exc:  # a perception outage degrades the session, it does not end it
            log.warning("perception failed: %s", exc)
            return
        seen = FaceObservation.from_summary(summary)
        self.visual.add(t, seen)
        if seen.present and seen.box is not None:  # the avatar's eyes follow the user's face
            h, w = i420.shape[0] * 2 // 3, i420.shape[1]
            x0, y0, x1, y1 = seen.box
            self.animator.watch((x0 + x1) / w - 1.0, (y0 + y1) / h - 1.0)
        else:
            self.animator.watch(None)
        self.update()

    # --- voice and words -------------------------------------------------------------------------
    def analyse_voice(self, pcm16: bytes) -> Prosody | None:
        """How the user's voice sounded in one utterance (runs in a thread, beside ASR)."""
        if not self.enabled:
            return None
        return analyse_prosody(np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768.0)

    def hear(self, text: str, voice: Prosody | None) -> None:
        """An utterance's words and voice join the state."""
        if voice is None:
            return
        voice.fillers = count_fillers(text)
        change = self.voice_trend.describe_change(voice)
        self._voice_brief = "; ".join(x for x in (brief_prosody(voice), self.voice_trend.brief_change(voice)) if x)
        self.voice_trend.add(voice)
        self._voice, self._voice_text = voice, " ".join(x for x in (describe_prosody(voice), change) if x)
        self._voice_notable = remarkable_voice(voice) or bool(change)
        self._words = sentiment(text)
        self.update()

    # --- the fused state -------------------------------------------------------------------------
    def update(self) -> None:
        """Refresh the fused state (per analysed frame and at least every 250 ms), run the perception
        tools and set the avatar's listening expression."""
        if not self.enabled:
            return
        now = time.monotonic()
        state = fuse(self.visual, now, voice=self._voice, voice_text=self._voice_text, words=self._words)
        prev, self.state = self.state, state
        self.log.add(state)
        if prev is None or (prev.visual, prev.emotion, prev.visible) != (state.visual, state.emotion, state.visible):
            self.emit(Event.PERCEPTION, **state.as_dict())
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
            self.emit(Event.PERCEPTION_SNAPSHOT, **self.log.summary())

    def llm_seen(self) -> str | None:
        """What the LLM is told the user looks like (persona: layers.perception.llm_context), at the start of
        their message: nothing for the everyday calm, attentive look (a note that says nothing is noise to
        a small model). It depends on the camera alone, so the session puts it in the prompt cache while
        the user is still speaking (`PromptPrefill.seen`)."""
        state = self.state
        if not self.in_llm or not self.camera or state is None or not state.visual_notable:
            return None
        return state.visual

    def llm_heard(self) -> str | None:
        """What the LLM is told about how the user just spoke, after their words: the voice in a few words
        (`prosody.brief`), when it was remarkable, and words that disagree with the face or voice. It needs
        the utterance itself, so it is prompt the reply reads (~13-27 ms a token for the CPU profile's
        model): only when there is something to say, and briefly."""
        state = self.state
        if not self.in_llm:
            return None
        parts = [self._voice_brief if self._voice_notable else None, state.incongruence if state is not None else None]
        return ". ".join(p for p in parts if p) or None

    def utterance_fields(self, voice: Prosody | None) -> dict:
        """The perception fields of a user utterance event."""
        extra = {"user_audio_analysis": self._voice_text} if voice is not None and self._voice_text else {}
        state = self.state
        if state is not None:
            extra["user_visual_analysis"] = state.visual
            extra["user_perception"] = state.description
            if state.incongruent:
                self.log.incongruent_moments.append((self.clock.now(), state.description))
        return extra

    def summary(self) -> dict:
        return self.log.summary()

    def _fire_tool(self, tool, args: dict, now: float) -> None:
        frames = []
        if self.tool_frames:
            for t, i420 in list(self._frames)[-2:]:
                buf = io.BytesIO()
                img = Image.fromarray(decode_frame(i420))
                img.thumbnail((160, 160))
                img.save(buf, format="JPEG", quality=70)
                frames.append({"age_s": round(now - t, 2), "jpeg_base64": base64.b64encode(buf.getvalue()).decode()})
        self.log.tool_calls.append((self.clock.now(), tool.name))
        self.emit(Event.PERCEPTION_TOOL_CALL, name=tool.name, arguments=args, frames=frames)
        if tool.llm_tool_call:
            self.emit(Event.TOOL_CALL, name=tool.name, arguments=json.dumps(args), source="perception")
