"""A scripted WebRTC participant (aiortc): speaks pre-rendered utterances into the microphone,
shows a camera, and records what comes back (events, reply audio level, avatar frames).

Used by the tests and by the latency/capacity benchmarks. Media stays on loopback.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from serve_app.ice import use_loopback_candidates, use_rfc_consent

RATE = 48000
FRAME = 960


def speech_pcm48k(text: str, tts=None) -> np.ndarray:
    """Render a user's utterance with the embedded piper voice, as 48 kHz int16."""
    from models.audio import resample
    from models.tts import PiperTTS

    tts = tts or PiperTTS()
    speech = tts.synthesize(text)
    audio = resample(speech.audio, speech.sample_rate, RATE)
    return (np.clip(audio, -1, 1) * 32767 * 0.8).astype(np.int16)


class SessionEnded(RuntimeError):
    """The session ended under the client (a `system.shutdown`, or the peer connection closed) while it
    waited for an event or spoke."""


class ScriptedMic(MediaStreamTrack):
    """Real-time paced microphone: silence (with faint noise) until `play()` queues an utterance."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[np.ndarray] = []
        self._pos = 0
        self._start: float | None = None
        self._sent = 0
        self._rng = np.random.default_rng(0)
        self.last_speech_sent: float = 0.0
        self.clip_started: float = 0.0  # wall time the latest clip's first sample was sent
        # How late (s) the last speech frame left, after the time it was due: a starved client sends its
        # audio late, and the server hears it late (the latency is still counted from when it was due).
        self.last_speech_late: float = 0.0
        self._done: asyncio.Event | None = None

    def play(self, pcm: np.ndarray) -> asyncio.Event:
        self._queue.append(pcm)
        self._done = asyncio.Event()
        return self._done

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        target = self._start + self._sent / RATE
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        out = (self._rng.standard_normal(FRAME) * 20).astype(np.int16)  # room noise, not digital silence
        if self._queue:
            clip = self._queue[0]
            if self._pos == 0:
                self.clip_started = target
            n = min(FRAME, clip.size - self._pos)
            out[:n] = clip[self._pos:self._pos + n]
            self._pos += n
            if self._pos >= clip.size:
                self._queue.pop(0)
                self._pos = 0
                # Wall time at which the last speech sample leaves: sent frames are paced in real time.
                self.last_speech_sent = target + n / RATE
                self.last_speech_late = max(0.0, time.monotonic() - target)
                if self._done is not None:
                    self._done.set()
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(out.tobytes())
        frame.sample_rate = RATE
        frame.pts = self._sent
        frame.time_base = fractions.Fraction(1, RATE)
        self._sent += FRAME
        return frame


class FakeCamera(MediaStreamTrack):
    kind = "video"

    def __init__(self, image: np.ndarray | None = None, fps: int = 10) -> None:
        super().__init__()
        self.image = image if image is not None else np.full((120, 160, 3), 110, np.uint8)
        self.fps = fps
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._n / self.fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts = self._n * (90000 // self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self._n += 1
        return frame


@dataclass
class Received:
    audio: list[tuple[float, float]] = field(default_factory=list)  # (wall time, rms)
    frames: int = 0
    mouth: list[tuple[float, float]] = field(default_factory=list)  # (wall time, mean abs change of mouth box)
    last_frame: np.ndarray | None = None
    audio_rtp: list[tuple[int, float]] = field(default_factory=list)  # (RTP timestamp, rms) per audio frame
    video_tracks: int = 0
    # client video mode, from the avatar channel: (wall time, media time, jaw_open, speaking) per pose
    poses: list[tuple[float, float, float, bool]] = field(default_factory=list)
    rtp_origin: int | None = None  # the session's audio RTP timestamp at media time 0


class PresenceRTCClient:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=60)
        self.mic = ScriptedMic()
        self.camera = FakeCamera()
        self.events: list[dict] = []
        self.rx = Received()
        self.pc: RTCPeerConnection | None = None
        self.channel = None
        self.conversation: dict = {}
        self._new_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def create(self, **body) -> dict:
        r = await self.http.post("/v2/conversations", json=body, headers={"x-api-key": self.api_key})
        r.raise_for_status()
        self.conversation = r.json()
        return self.conversation

    async def connect(self, timeout: float = 60, as_operator: bool = True) -> None:
        """Join the created conversation. `as_operator`: with the API key too, so the data channel takes
        echo and context changes (the meeting token alone grants a participant's respond/interrupt)."""
        use_loopback_candidates()
        use_rfc_consent()  # as a browser does: consent lasts until no check is answered for 30 s
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", self._on_message)
        avatar = self.pc.createDataChannel("avatar", ordered=False, maxRetransmits=0)
        avatar.on("message", self._on_avatar)
        self.pc.addTrack(self.mic)
        self.pc.addTrack(self.camera)
        self.pc.on("connectionstatechange", self._new_event.set)  # a waiter learns the peer is gone

        @self.pc.on("track")
        def on_track(track):
            reader = self._read_audio(track) if track.kind == "audio" else self._read_video(track)
            self._tasks.append(asyncio.ensure_future(reader))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        cid = self.conversation["conversation_id"]
        r = await self.http.post(f"/v2/conversations/{cid}/webrtc", content=self.pc.localDescription.sdp,
                                 headers={"content-type": "application/sdp",
                                          "authorization": f"Bearer {self.conversation['meeting_token']}",
                                          **({"x-api-key": self.api_key} if as_operator else {})})
        if r.status_code != 201:
            raise RuntimeError(f"offer refused: {r.status_code} {r.text}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=r.text, type="answer"))
        await self.wait_event("system.replica_joined", timeout=timeout)

    def _on_avatar(self, message) -> None:
        from serve_app.session.pose_stream import read_pose_message

        if isinstance(message, str):
            self.rx.rtp_origin = json.loads(message)["clock"]["rtp_origin"]
            return
        t, pose, speaking = read_pose_message(message)
        poses = self.rx.poses
        i = len(poses)
        while i > 0 and poses[i - 1][1] > t:  # the channel is unordered: keep the poses by stamp
            i -= 1
        if i > 0 and poses[i - 1][1] == t:  # sent again with speech queued since: the newest wins
            poses[i - 1] = (poses[i - 1][0], t, float(pose.weights[0]), speaking)
        else:
            poses.insert(i, (time.monotonic(), t, float(pose.weights[0]), speaking))

    def _on_message(self, message: str) -> None:
        ev = json.loads(message)
        ev["received_at"] = time.monotonic()
        self.events.append(ev)
        self._new_event.set()

    def _rtp_base(self, track) -> int | None:
        """aiortc's receiver stamps decoded frames with RTP time since its first packet; that packet's RTP
        timestamp (private to aiortc, read for this scripted client only) turns them back into RTP time."""
        for receiver in self.pc.getReceivers():
            if receiver.track is track:
                return getattr(getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None), "_origin", None)
        return None

    async def _read_audio(self, track) -> None:
        base = None
        try:
            while True:
                frame = await track.recv()
                base = base if base is not None else self._rtp_base(track)  # fixed from the first packet on
                pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                rms = float(np.sqrt(np.mean(pcm * pcm)))
                self.rx.audio.append((time.monotonic(), rms))
                self.rx.audio_rtp.append((((base or 0) + int(frame.pts)) & 0xFFFFFFFF, rms))
        except MediaStreamError:
            return

    async def _read_video(self, track) -> None:
        self.rx.video_tracks += 1
        prev = None
        try:
            while True:
                frame = await track.recv()
                img = frame.to_ndarray(format="rgb24")
                h, w = img.shape[:2]
                box = img[int(h * 0.5):int(h * 0.7), int(w * 0.35):int(w * 0.65)].astype(np.int16)
                if prev is not None and prev.shape == box.shape:
                    self.rx.mouth.append((time.monotonic(), float(np.abs(box - prev).mean())))
                prev = box
                self.rx.frames += 1
                self.rx.last_frame = img
        except MediaStreamError:
            return

    def send(self, event_type: str, **properties) -> None:
        self.channel.send(json.dumps({"message_type": "conversation", "event_type": event_type,
                                      "conversation_id": self.conversation["conversation_id"], "properties": properties}))

    def _raise_if_closed(self, doing: str) -> None:
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            raise SessionEnded(f"the peer connection is {self.pc.connectionState} while {doing}")

    async def wait_event(self, event_type: str, timeout: float = 30, since: int = 0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[since:]:
                if ev["event_type"] == event_type and all(ev["properties"].get(k) == v for k, v in match.items()):
                    return ev
                if ev["event_type"] == "system.shutdown" and event_type != "system.shutdown":
                    raise SessionEnded(f"the session ended ({ev['properties'].get('shutdown_reason')}) while waiting "
                                       f"for {event_type}")
            self._raise_if_closed(f"waiting for {event_type}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event_type} {match} within {timeout}s; got {[e['event_type'] for e in self.events]}")
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), timeout=left)
            except TimeoutError:
                pass

    async def wait_event_after(self, event_type: str, t: float, timeout: float = 30, **match) -> dict:
        """The first `event_type` event received after wall time `t`."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if (ev["received_at"] > t and ev["event_type"] == event_type
                        and all(ev["properties"].get(k) == v for k, v in match.items())):
                    return ev
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {event_type} {match} after t within {timeout}s")
            self._new_event.clear()
            try:
                await asyncio.wait_for(self._new_event.wait(), timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass

    async def say(self, pcm48k: np.ndarray) -> float:
        """Speak an utterance; returns the wall time its last sample was sent (speech end)."""
        done = self.mic.play(pcm48k)
        while not done.is_set():  # a closed peer stops pulling the microphone: the clip would never end
            self._raise_if_closed("speaking")
            try:
                await asyncio.wait_for(done.wait(), timeout=0.25)
            except TimeoutError:
                pass
        return self.mic.last_speech_sent

    def first_audio_after(self, t: float, threshold: float = 0.01) -> float | None:
        for ts, rms in self.rx.audio:
            if ts > t and rms > threshold:
                return ts
        return None

    async def end(self) -> None:
        """End the conversation through the REST API (frees the session slot at once)."""
        if self.conversation:
            await self.http.post(f"/v2/conversations/{self.conversation['conversation_id']}/end",
                                 headers={"x-api-key": self.api_key})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await self.pc.close()
        await self.http.aclose()
