"""Client video mode's parts without Ray or a peer: the head file the browser reads, the pose wire
format, the RTP clock mapping, and a session that sends poses instead of rendering."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from models.avatar.gaussians import covariances
from models.avatar.head import CHANNELS, build_head
from models.avatar.headfile import HeadFileError, decode_head, encode_head
from models.avatar.render import Pose
from serve_app.media import AvatarAudioTrack, MediaClock, SpeechPlayout
from serve_app.schemas import ConversationIn, PersonaIn
from serve_app.session import Handles, Session, SessionSpec
from serve_app.session.pose_stream import pose_message, read_pose_message
from tests.session_fakes import Models, fake_vad


def test_head_file_round_trip():
    head = build_head(4000)
    header, a = decode_head(encode_head(head, {"fov_y_deg": 30.0}))
    n = len(head)
    assert header["count"] == n and header["channels"] == list(CHANNELS) and header["camera"]["fov_y_deg"] == 30.0
    np.testing.assert_array_equal(a["means"], head.splats.means)
    c = covariances(head.splats.quats, head.splats.scales)
    np.testing.assert_allclose(a["cov"][:, [0, 1, 2, 3, 4, 5]], c[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]], rtol=1e-5)
    np.testing.assert_allclose(a["deltas"], head.deltas, atol=2e-3)  # float16
    assert a["rgba"].dtype == np.uint8 and a["rgba"].shape == (n, 4)
    # Surfels carry unit normals (x127); the skin's face the camera on the front of the head.
    flat = np.abs(a["normal"]).sum(1) > 0
    assert flat.mean() > 0.5
    lengths = np.linalg.norm(a["normal"][flat].astype(float), axis=1)
    assert np.all(np.abs(lengths - 127) < 3)
    with pytest.raises(HeadFileError):
        decode_head(b"PLY not a head")


def test_pose_message_round_trip():
    pose = Pose(weights=np.linspace(0, 1, len(CHANNELS)).astype(np.float32), yaw=0.1, pitch=-0.05, roll=0.01)
    data = pose_message(1234.5678, pose, True)
    assert len(data) == 8 + 4 * (4 + len(CHANNELS))
    t, back, speaking = read_pose_message(data)
    assert t == 1234.5678 and speaking
    np.testing.assert_allclose(back.weights, pose.weights, atol=1e-6)
    assert abs(back.yaw - 0.1) < 1e-6 and abs(back.pitch + 0.05) < 1e-6


class FakeSender:
    """What AvatarAudioTrack reads of aiortc's RTCRtpSender (the fields its RTCP reports use)."""

    def __init__(self) -> None:
        self._RTCRtpSender__rtp_timestamp = 0
        self._RTCRtpSender__packet_count = 0

    def sent(self, rtp: int) -> None:
        self._RTCRtpSender__rtp_timestamp = rtp & 0xFFFFFFFF
        self._RTCRtpSender__packet_count += 1


def test_rtp_origin_is_learnt_and_ignores_the_encoders_glitch_at_a_jump():
    async def run():
        clock = MediaClock()
        track = AvatarAudioTrack(clock, SpeechPlayout(clock))
        track.sender = sender = FakeSender()
        origin = 4_294_960_000  # wraps past 2^32 within the call
        learnt, prev = [], 0
        for k in range(12):
            frame = await track.recv()
            rtp = origin + frame.pts
            if k == 6:  # aiortc's opus encoder stamps the frame after a pts jump as if no jump happened
                rtp = origin + prev + 960
            sender.sent(rtp)
            prev = frame.pts
            learnt.append(track.rtp_origin)
            if k == 5:
                track._samples += 48000 // 5  # a skip-ahead (the loop stalled)
        return learnt, origin & 0xFFFFFFFF

    learnt, origin = asyncio.run(run())
    assert learnt[:3] == [None, None, None]
    assert all(v == origin for v in learnt[3:]), learnt


def test_video_mode_is_validated():
    assert ConversationIn(video_mode="client").video_mode == "client"
    with pytest.raises(ValueError):
        PersonaIn(persona_name="x", video_mode="hologram")


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list = []

    def send_avatar(self, data) -> bool:
        self.sent.append(data)
        return True


def test_a_client_mode_session_sends_poses_and_renders_nothing():
    async def run():
        models = Models()
        spec = SessionSpec("c-test", "v=0", PersonaIn(persona_name="x", video_mode="client"), video_mode="client",
                           replica_id="r-stock", head_version="abc")
        handles = Handles(turn=models.turn, asr=models.asr, llm=models.llm, tts=models.tts, health=models.health)
        s = Session(spec, handles, None, fake_vad, fps=10)
        assert s.video_out is None and s.video_mode == "client"
        s.poses.transport = fake = FakeTransport()
        s.audio_out.rtp_origin = 1000
        task = asyncio.ensure_future(s.poses.run())
        await asyncio.sleep(0.5)
        task.cancel()
        await s.close()
        return fake.sent

    sent = asyncio.run(run())
    clocks = [json.loads(m) for m in sent if isinstance(m, str)]
    poses = [read_pose_message(m) for m in sent if isinstance(m, bytes)]
    assert clocks and clocks[0] == {"clock": {"rtp_origin": 1000, "rate": 48000}}
    assert 12 <= len(poses) <= 17  # 30 Hz
    ts = [t for t, _, _ in poses]
    assert np.allclose(np.diff(ts), 1 / 30, atol=1e-6)


class SteppedClock(MediaClock):
    """Media time set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0

    def now(self) -> float:
        return self.t


def test_poses_sent_ahead_are_sent_again_when_speech_is_queued_under_them():
    """Speech starts ~30 ms after it is queued, poses go 120 ms ahead: the poses already sent for the new
    speech's first syllable go again with the mouth open (and shut again when a barge-in holds it), and
    the browser keeps the newest pose per stamp."""
    from models.avatar.animate import Animator, SpeechTrack
    from serve_app.session.avatar import AvatarFace
    from serve_app.session.pose_stream import POSE_LEAD_S, PoseStream

    clock, fake = SteppedClock(), FakeTransport()
    face = AvatarFace(None, Animator(rng=np.random.default_rng(0)))
    audio = type("Audio", (), {"rtp_origin": None})()
    stream = PoseStream(face, clock, audio, fake)
    jaw = CHANNELS.index("jaw_open")
    track, resent = None, {}
    for i in range(1, 91):
        clock.t = i / 30
        if i == 30:  # a reply is queued: it plays from now + 30 ms
            track = SpeechTrack(clock.t + 0.03, [("a", 0.0, 0.5)], duration=0.5)
            face.animator.speak(track)
        if i == 40:  # the user talks over it
            face.hold_speech()
        if i == 50:  # the next reply, played to its end
            face.release_speech(0.0, keep=False)
            face.animator.speak(SpeechTrack(clock.t + 0.03, [("a", 0.0, 0.2)], duration=0.2))
        stream.send(clock.t + POSE_LEAD_S)
        resent[i] = stream.resent
    first, last = {}, {}
    for m in fake.sent:
        t, pose, _ = read_pose_message(m)
        first.setdefault(t, pose.weights[jaw])
        last[t] = pose.weights[jaw]
    assert resent[29] == 0 and resent[30] > 0 and len(last) == stream.sent == 90
    assert resent[90] == resent[50]  # a clause ending (and dropped by the animator) changes nothing sent
    start = [t for t in last if track.t0 + 0.01 <= t <= 29 / 30 + POSE_LEAD_S + 1e-9]  # sent before it
    assert start and all(first[t] < 0.05 for t in start)  # sent shut before the reply was queued ...
    assert all(last[t] > 0.2 for t in start)  # ... and again open: the first syllable is mouthed
    held = [t for t in last if 40 / 30 - 0.05 <= t <= 39 / 30 + POSE_LEAD_S + 1e-9]
    assert held and all(first[t] > 0.2 for t in held) and all(last[t] < 0.05 for t in held)
