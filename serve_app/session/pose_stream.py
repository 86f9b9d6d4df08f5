"""Client video mode: the avatar's animation state, not its pixels. At POSE_HZ the face's pose for the
media time POSE_LEAD_S ahead goes to the browser on the `avatar` data channel, stamped with that media time; the
browser shows it when the audio sample with the same stamp plays (it maps RTP timestamps to media time
with the `clock` message, sent again whenever the mapping changes)."""

from __future__ import annotations

import json
import struct
from collections import deque

from models.avatar.animate import TRACK_TAIL_S, SpeechTrack
from models.avatar.head import CHANNELS
from models.avatar.render import Pose
from serve_app.media import AUDIO_RATE, AvatarAudioTrack, MediaClock
from serve_app.session.avatar import AvatarFace
from serve_app.session.transport import Transport

POSE_HZ = 30.0
# Each pose goes this far ahead of the audio it belongs to: a pose sent as its audio was sent arrived
# after that audio played ~19 % of the time on a loaded box (the data channel has no jitter buffer
# to hide a late event loop), and the face then lagged the voice. The browser keeps poses by stamp.
POSE_LEAD_S = 0.12
# Poses already sent for audio the browser may not have played yet (its jitter buffer holds ~20-100 ms):
# sent again with the new speech when the speech changes under them.
RESEND_BEHIND_S = 0.1
# little-endian: f64 media time, f32 yaw pitch roll speaking, f32 per rig channel (CHANNELS order)
POSE_FORMAT = struct.Struct(f"<d4f{len(CHANNELS)}f")


def pose_message(t: float, pose: Pose, speaking: bool) -> bytes:
    """One pose as the browser reads it (80 bytes)."""
    return POSE_FORMAT.pack(t, pose.yaw, pose.pitch, pose.roll, 1.0 if speaking else 0.0, *pose.weights.tolist())


def read_pose_message(data: bytes) -> tuple[float, Pose, bool]:
    """The inverse of `pose_message` (tests and scripted clients)."""
    import numpy as np

    v = POSE_FORMAT.unpack(data)
    return v[0], Pose(weights=np.array(v[5:], np.float32), yaw=v[1], pitch=v[2], roll=v[3]), v[4] > 0.5


def clock_message(rtp_origin: int) -> str:
    return json.dumps({"clock": {"rtp_origin": rtp_origin, "rate": AUDIO_RATE}})


class PoseStream:
    """Sends the face's poses while the session lives (`run`); `sent` counts them."""

    def __init__(self, face: AvatarFace, clock: MediaClock, audio: AvatarAudioTrack, transport: Transport,
                 hz: float = POSE_HZ) -> None:
        self.face = face
        self.clock = clock
        self.audio = audio
        self.transport = transport
        self.hz = hz
        self.sent = 0
        self.resent = 0
        self._origin_sent: int | None = None
        self._stamps: deque[float] = deque(maxlen=int(hz * (POSE_LEAD_S + RESEND_BEHIND_S)) + 2)
        self._speech: dict[tuple[int, float], SpeechTrack] = {}

    async def run(self) -> None:
        index = int(self.clock.now() * self.hz) + 1
        while True:
            t = index / self.hz
            now = self.clock.now()
            if now - t > 2 / self.hz:  # the loop stalled: go on from now, not in a burst
                index = int(now * self.hz) + 1
                t = index / self.hz
            await self.clock.sleep_until(t)
            self.send(t + POSE_LEAD_S)
            index += 1

    def send(self, t: float) -> None:
        origin = self.audio.rtp_origin
        # Again every ~0.5 s as well: the channel is unreliable, and the face waits for the mapping.
        if origin is not None and (origin != self._origin_sent or self.sent % 15 == 0) \
                and self.transport.send_avatar(clock_message(origin)):
            self._origin_sent = origin
        # Speech starts ~30 ms after it is queued (SpeechPlayout.lead_s) but poses go POSE_LEAD_S ahead, so
        # the poses for a new reply's first syllable (or for audio paused or shifted by a barge-in) were
        # already sent without it: the browser would show the mouth shut there. Send them again; the
        # browser keeps the newest pose per stamp.
        if self._speech_changed():
            behind = self.clock.now() - RESEND_BEHIND_S
            for stamp in [s for s in self._stamps if s >= behind]:
                if self._send_pose(stamp):
                    self.resent += 1
        if self._send_pose(t):
            self.sent += 1
            self._stamps.append(t)

    def _speech_changed(self) -> bool:
        """Speech was queued or moved, or taken away before it was over (a hold, a flush): the animator's
        own dropping of a track once the newest pose is past it changes nothing sent."""
        old, self._speech = self._speech, {(id(tr), tr.t0): tr for tr in self.face.animator.tracks}
        newest = self._stamps[-1] if self._stamps else float("-inf")
        return any(key not in old for key in self._speech) or any(
            key not in self._speech and tr.t0 + tr.duration + TRACK_TAIL_S >= newest for key, tr in old.items())

    def _send_pose(self, t: float) -> bool:
        return self.transport.send_avatar(pose_message(t, self.face.pose(t), self.face.animator.is_speaking(t)))
