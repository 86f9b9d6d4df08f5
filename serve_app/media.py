"""The avatar's outgoing media: one clock, a speech playout buffer, and aiortc audio/video tracks.

Audio and video frames are both stamped from `MediaClock`: a frame with pts t is sent at wall time
clock.start + t, so the receiver (which syncs tracks by RTCP send-time reports) sees them aligned.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc import MediaStreamTrack

from models.audio import resample
from models.priority import lower_priority

AUDIO_RATE = 48000
AUDIO_FRAME = 960  # 20 ms
VIDEO_CLOCK = 90000
_RAMP = np.linspace(0.0, 1.0, AUDIO_FRAME, dtype=np.float32)


class MediaClock:
    """Shared media time (seconds since the session's media started)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    async def sleep_until(self, t: float) -> None:
        delay = self.start + t - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(eq=False)  # identity semantics: segments hold audio arrays
class Segment:
    """One synthesized clause scheduled on the media clock."""

    pcm: np.ndarray  # int16 mono at 48 kHz
    t0: float
    text: str
    words: list[tuple[str, float, float]]
    phonemes: list[tuple[str, float, float]]
    reply_id: int
    started: bool = False
    cut_at: float | None = None  # media time the segment was cut (barge-in)

    @property
    def t1(self) -> float:
        return self.t0 + self.pcm.size / AUDIO_RATE


@dataclass
class SpeechPlayout:
    """Queue of speech segments laid end to end on the media clock; the audio track reads it.

    `pause()` fades the audio out within one 20 ms frame and holds the timeline (the user started
    talking over the avatar); `resume()` goes on from the same sample, or `flush()` drops the rest."""

    clock: MediaClock
    segments: list[Segment] = field(default_factory=list)
    lead_s: float = 0.03
    on_segment_start: Callable[[Segment], None] | None = None
    on_idle: Callable[[int], None] | None = None
    paused_at: float | None = None  # media time the audio stopped (None: playing)
    _fade: int = 0  # -1: fade the next frame out (then hold), +1: fade it in

    def pause(self) -> None:
        if self.segments and self.paused_at is None and self._fade != -1:
            self._fade = -1

    def resume(self) -> float:
        """Play on from where the audio stopped; returns the seconds the timeline moved."""
        if self._fade == -1:  # paused before a frame was faded: nothing was held back
            self._fade = 0
            return 0.0
        if self.paused_at is None:
            return 0.0
        shift = max(0.0, self.clock.now() + self.lead_s - self.paused_at)
        for seg in self.segments:
            seg.t0 += shift
        self.paused_at = None
        self._fade = 1
        return shift

    def enqueue(self, pcm16: np.ndarray, sample_rate: int, text: str, words, phonemes, reply_id: int) -> Segment:
        audio = pcm16.astype(np.float32) / 32768.0
        pcm = (np.clip(resample(audio, sample_rate, AUDIO_RATE), -1, 1) * 32767).astype(np.int16)
        start = self.clock.now() + self.lead_s
        if self.segments:
            start = max(start, self.segments[-1].t1)
        seg = Segment(pcm, start, text, list(words), list(phonemes), reply_id)
        self.segments.append(seg)
        return seg

    @property
    def active(self) -> bool:
        return bool(self.segments)

    def read(self, t: float, n: int = AUDIO_FRAME) -> np.ndarray:
        """Samples for media time [t, t + n/rate): speech where scheduled, silence elsewhere."""
        out = np.zeros(n, np.int16)
        t_end = t + n / AUDIO_RATE
        if self.paused_at is not None:
            return out
        fade, self._fade = self._fade, 0
        for seg in self.segments:
            if seg.t0 >= t_end or seg.t1 <= t:
                continue
            if not seg.started:
                seg.started = True
                if self.on_segment_start:
                    self.on_segment_start(seg)
            a = int(round((t - seg.t0) * AUDIO_RATE))
            lo, hi = max(a, 0), min(a + n, seg.pcm.size)
            out[lo - a:hi - a] = seg.pcm[lo:hi]
        if fade:
            ramp = _RAMP if fade > 0 else _RAMP[::-1]
            out = (out * ramp[:n]).astype(np.int16)
            if fade < 0:
                self.paused_at = t_end
                return out
        finished = [s for s in self.segments if s.t1 <= t_end]
        if finished:
            self.segments = [s for s in self.segments if s.t1 > t_end]
            if not self.segments and self.on_idle:
                self.on_idle(finished[-1].reply_id)
        return out

    def flush(self) -> tuple[float, list[Segment]]:
        """Drop everything not yet played; returns (the media time the audio stopped, the segments that
        were cut or dropped)."""
        now = self.clock.now() if self.paused_at is None else self.paused_at
        dropped = self.segments
        for seg in dropped:
            seg.cut_at = now
        self.segments = []
        self.paused_at, self._fade = None, 0
        return now, dropped


def spoken_text(seg: Segment, at: float) -> str:
    """The words of a cut segment that were fully heard before media time `at`."""
    heard = at - seg.t0
    if heard <= 0:
        return ""
    if heard >= seg.pcm.size / AUDIO_RATE:
        return seg.text
    return " ".join(w for w, _, end in seg.words if end <= heard)


ORIGIN_FRAMES = 3


def sent_rtp_timestamp(sender) -> tuple[int, int] | None:
    """(RTP timestamp of the last packet `sender` sent, packets sent so far), or None before any.

    aiortc keeps these for its RTCP sender reports but has no public accessor (its getStats() omits
    them), so this reads RTCRtpSender's private fields; tests/test_client_video.py fails if they move."""
    count = getattr(sender, "_RTCRtpSender__packet_count", None)
    ts = getattr(sender, "_RTCRtpSender__rtp_timestamp", None)
    if not count or ts is None:
        return None
    return int(ts), int(count)


class AvatarAudioTrack(MediaStreamTrack):
    """The avatar's voice. Once `sender` (its RTCRtpSender) is set, `rtp_origin` is the RTP timestamp
    media time 0 maps to (rtp = rtp_origin + t * AUDIO_RATE mod 2^32): the browser uses it to show each
    animation pose when the audio sample with the same stamp plays (client video mode)."""

    kind = "audio"

    def __init__(self, clock: MediaClock, playout: SpeechPlayout) -> None:
        super().__init__()
        self.clock = clock
        self.playout = playout
        self._samples = 0
        self.on_frame: Callable[[float, np.ndarray], None] | None = None
        self.sender = None
        self.rtp_origin: int | None = None
        self._last_pts: int | None = None
        self._last_count = 0
        self._candidate: tuple[int, int] = (-1, 0)  # (origin seen, frames in a row)

    def _learn_rtp_origin(self) -> None:
        # aiortc's sender loop is recv -> encode -> send, so when recv is called again the previous
        # frame's packet is out: its RTP timestamp minus its pts is the origin. The opus encoder follows
        # pts (a skip-ahead below included) except on the one frame where pts jumps, so an origin counts
        # once it has held for ORIGIN_FRAMES frames in a row: the glitch never reaches the browser.
        sent = sent_rtp_timestamp(self.sender) if self.sender is not None else None
        if sent is None or self._last_pts is None or sent[1] == self._last_count:
            return
        self._last_count = sent[1]
        origin = (sent[0] - self._last_pts) & 0xFFFFFFFF
        seen, run = self._candidate
        self._candidate = (origin, run + 1) if origin == seen else (origin, 1)
        if self._candidate[1] >= ORIGIN_FRAMES:
            self.rtp_origin = origin

    async def recv(self) -> av.AudioFrame:
        self._learn_rtp_origin()
        t = self._samples / AUDIO_RATE
        if self.clock.now() - t > 0.2:  # we fell behind (e.g. a stall): skip ahead rather than burst
            self._samples = int(self.clock.now() * AUDIO_RATE) // AUDIO_FRAME * AUDIO_FRAME
            t = self._samples / AUDIO_RATE
        await self.clock.sleep_until(t)
        pcm = self.playout.read(t)
        if self.on_frame:
            self.on_frame(t, pcm)
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_FRAME)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._last_pts = self._samples
        self._samples += AUDIO_FRAME
        return frame


RENDER_NICENESS = 5  # the render thread yields the CPU to the reply's LLM, TTS and ASR (all at Ray's nice)


def _lower_priority() -> None:
    """The render thread's initializer: only this thread is lowered."""
    lower_priority(RENDER_NICENESS, thread_name=threading.current_thread().name)


# One render thread per host process, below the model replicas' priority: when the CPU is short the
# current turn's LLM and TTS win, and the video loses frames (AvatarVideoTrack drops late ones).
_RENDER_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avatar-render", initializer=_lower_priority)


class AvatarVideoTrack(MediaStreamTrack):
    """Renders the avatar for each frame's media time. `render(t)` returns an RGB uint8 image."""

    kind = "video"

    def __init__(self, clock: MediaClock, render: Callable[[float], np.ndarray], fps: float) -> None:
        super().__init__()
        self.clock = clock
        self.render = render
        self.fps = fps
        self._index = 0
        self._render_s = 0.02
        self.frames_sent = 0
        self.render_ms: deque[float] = deque(maxlen=600)  # the last ~50 s at 12 fps
        self.on_render: Callable[[float], None] | None = None  # frame-time sink (autoscaling stats)

    async def recv(self) -> av.VideoFrame:
        t = self._index / self.fps
        now = self.clock.now()
        if now - t > 2 / self.fps:  # late: drop frames instead of falling further behind
            self._index = int(now * self.fps) + 1
            t = self._index / self.fps
        # Start rendering early enough that the frame is ready at its media time.
        await self.clock.sleep_until(t - self._render_s)
        t0 = time.perf_counter()
        rgb = await asyncio.get_running_loop().run_in_executor(_RENDER_POOL, self.render, t)
        dt = time.perf_counter() - t0
        self._render_s = 0.8 * self._render_s + 0.2 * dt
        self.render_ms.append(dt * 1000)
        if self.on_render is not None:
            self.on_render(dt * 1000)
        await self.clock.sleep_until(t)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = int(round(t * VIDEO_CLOCK))
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self._index += 1
        self.frames_sent += 1
        return frame
