"""Perception's camera side on real images: mediapipe's detector/mesh/iris and fer's expression model
(through LiteRT) on a photo that ships with matplotlib and on faces rendered by our own avatar; then
fusion, sentiment, incongruence, perception tools and the end-of-call summary."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from models.avatar.animate import EMOTIONS as AVATAR_EMOTIONS
from models.avatar.head import build_head
from models.avatar.render import CPUAvatarRenderer, Pose
from models.perception.face import FaceAnalyzer, FaceObservation
from models.perception.fusion import SessionPerception, VisualTrack, fuse
from models.perception.prosody import Prosody
from models.perception.sentiment import sentiment
from models.perception.tools import ToolWatch


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def faces():
    """Our avatar as a user's camera would show it (320×240), per emotion, plus a head turn."""
    r = CPUAvatarRenderer(build_head(20000), 320, 240)
    out = {emo: r.render(Pose().set(**w)).copy() for emo, w in AVATAR_EMOTIONS.items()}
    out["turned"] = r.render(Pose(yaw=0.5)).copy()
    return out


def photo() -> np.ndarray:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return np.asarray(Image.open(path).convert("RGB"))


def test_real_photo_mesh_iris_and_attention(analyzer):
    img = photo()
    o, empty = analyzer.analyse([img, np.full((240, 320, 3), 128, np.uint8)])
    assert not empty.present and empty.landmarks is None
    assert o.present and o.score > 0.8
    assert o.landmarks.shape == (478, 3)
    x0, y0, x1, y1 = o.box
    # The face is in the upper middle of the portrait; the mesh lies on it.
    assert 150 < x0 < x1 < 380 and 120 < y0 < y1 < 360
    pts = o.landmarks[:468, :2]
    assert (pts[:, 0] > x0 - 40).all() and (pts[:, 0] < x1 + 40).all()
    # Each iris centre sits between its eye's corners.
    for iris, (a, b) in ((468, (33, 133)), (473, (263, 362))):
        lo, hi = sorted((o.landmarks[a, 0], o.landmarks[b, 0]))
        assert lo < o.landmarks[iris, 0] < hi
    assert o.looking_at_camera and abs(o.yaw_deg) < 15 and 0.15 < o.eyes_open < 0.5
    assert sum(o.expression.values()) == pytest.approx(1.0, abs=1e-3)
    # A mirrored photo turns the other way by about as much (the geometry is symmetric).
    m = analyzer.analyse([img[:, ::-1].copy()])[0]
    assert m.present and abs(m.yaw_deg + o.yaw_deg) < 6


def test_head_turn_and_summary_round_trip(analyzer, faces):
    front, turned = analyzer.analyse([faces["neutral"], faces["turned"]])
    assert front.looking_at_camera and not turned.looking_at_camera
    assert abs(turned.yaw_deg) > abs(front.yaw_deg) + 15
    back = FaceObservation.from_summary(front.summary())
    assert back.landmarks is None and back.expression.keys() == front.expression.keys()
    assert back.smile == pytest.approx(front.smile, abs=1e-3)


def test_tracking_from_the_previous_frame_and_losing_it(analyzer, faces):
    from deployments.perception import _valid_hint

    first = analyzer.analyse([faces["neutral"]])[0]
    assert first.roi is not None
    tracked = analyzer.analyse([faces["neutral"]], [first.roi])[0]
    assert tracked.present and abs(tracked.yaw_deg - first.yaw_deg) < 5
    assert abs(tracked.smile - first.smile) < 0.008  # inside the calm band: tracking does not read as an expression
    # A hint where no face is: the mesh model finds nothing there, and the frame is detected afresh.
    lost = analyzer.analyse([faces["neutral"]], [(12.0, 12.0, 40.0, 0.0)])[0]
    assert lost.present and abs(lost.box[0] - first.box[0]) < 8
    assert _valid_hint(first.roi) == first.roi
    assert _valid_hint(None) is None and _valid_hint("abcd") is None and _valid_hint([1, 2, 3]) is None
    assert _valid_hint([1.0, 2.0, float("nan"), 0.0]) is None and _valid_hint([1, 2, 4, 0]) is None


def test_frames_on_the_wire_and_bad_frames(analyzer, faces):
    import io

    import av
    from PIL import Image

    from models.perception.frames import MAX_PIXELS, decode_frame, wire_size

    assert wire_size(640, 480) == (294, 220) and wire_size(1280, 720) == (340, 192)
    assert wire_size(480, 640) == (220, 294) and wire_size(160, 120) == (160, 120)
    assert all(w * h <= MAX_PIXELS and w % 2 == h % 2 == 0 for w, h in (wire_size(1920, 1080), wire_size(333, 999)))
    img = faces["neutral"]
    big = av.VideoFrame.from_ndarray(np.asarray(Image.fromarray(img).resize((640, 480))), format="rgb24")
    i420 = big.reformat(format="yuv420p").to_ndarray(format="yuv420p", width=294, height=220)
    assert i420.shape == (330, 294) and i420.nbytes < 100 * 1024  # passed inline by Ray, not via the object store
    back = decode_frame(i420)
    assert back.shape == (220, 294, 3)
    small = np.asarray(Image.fromarray(img).resize((294, 220)))
    assert np.abs(back.astype(int) - small).mean() < 6
    direct, via_wire = analyzer.analyse([small, back])
    assert via_wire.present and abs(via_wire.yaw_deg - direct.yaw_deg) < 3
    assert decode_frame(img) is img
    jpeg = io.BytesIO()
    Image.fromarray(img).save(jpeg, format="JPEG")
    assert np.abs(decode_frame(jpeg.getvalue()).astype(int) - img).mean() < 4
    png = io.BytesIO()
    Image.new("RGB", (2000, 100)).save(png, format="PNG")  # too big: refused before decoding
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    for bad in (b"not an image", jpeg.getvalue()[:200], png.getvalue(), gif.getvalue(), b"x" * (2 << 20),
                img.astype(np.float32), img[:8], img[..., :2].copy(), i420[:, :-1], i420[:-1], np.zeros((990, 660), np.uint8),
                "frame", None):
        with pytest.raises(ValueError):
            decode_frame(bad)


def test_smile_against_the_users_resting_face(analyzer, faces):
    track = VisualTrack()
    for i in range(4):
        track.add(i * 0.25, analyzer.analyse([faces["neutral"]])[0])
    assert track.emotion()[0] == "neutral"
    neutral_text = fuse(track, 1.0).visual
    assert neutral_text == "The user looks calm, looking at you."
    assert not fuse(track, 1.0).notable and not fuse(track, 1.0).visual_notable  # the everyday look: nothing to tell
    for i in range(6):
        track.add(1.0 + i * 0.25, analyzer.analyse([faces["joy"]])[0])
    emotion, conf = track.emotion()
    assert emotion == "joy" and conf > 0.45
    state = fuse(track, 2.5)
    assert state.visual == "The user is smiling and looks happy, looking at you." and state.valence > 0.3
    assert state.notable and state.visual_notable and state.incongruence == ""
    # The camera goes dark: the user is no longer visible after the attention window.
    for i in range(10):
        track.add(2.5 + i * 0.25, FaceObservation(present=False))
    assert fuse(track, 5.0).visual == "The user is not visible on camera." and fuse(track, 5.0).notable


def test_sentiment_and_incongruence():
    assert sentiment("I am fine, everything is great.").label == "positive"
    assert sentiment("This is terrible, I hate it.").label == "negative"
    assert sentiment("What time is it?").label == "neutral"
    track = VisualTrack()
    sad = FaceObservation(present=True, expression={"sad": 1.0}, smile=-0.02, mouth_open=0.012, brow_raise=0.128,
                          eyes_open=0.3)
    for i in range(8):
        track.add(i * 0.25, sad)
    state = fuse(track, 2.0, words=sentiment("I'm fine, really, everything is great."))
    assert state.emotion == "sadness" and state.incongruent
    assert "say something positive but look sad" in state.description
    assert state.incongruence.startswith("They say something positive but look sad") and state.visual_notable
    # Hesitant voice with positive words, face not visible.
    hesitant = Prosody(2.0, 120.0, 2.0, 0.0, -30.0, 2.2, 3, 0.45, 2)
    state = fuse(None, 2.0, voice=hesitant, voice_text="The user spoke slowly and hesitantly.",
                 words=sentiment("Yes, that sounds good."))
    assert state.incongruent and "voice sounds hesitant" in state.description
    assert state.incongruence == "Their words are positive but their voice sounds hesitant."
    assert state.description.startswith("The user is not visible on camera. The user spoke slowly")
    from models.perception.prosody import remarkable

    even = Prosody(2.0, 120.0, 6.0, 0.0, -24.0, 5.5, 0, 0.1, 0)
    assert remarkable(hesitant) and not remarkable(even)


def test_perception_tool_fires_once_after_holding_and_rearms():
    tool = ToolWatch(name="user_frustrated", signal="frustrated", for_s=5.0, min_confidence=0.5)
    track = VisualTrack()
    angry = FaceObservation(present=True, expression={"angry": 1.0}, smile=0.0, mouth_open=0.012, brow_raise=0.1,
                            eyes_open=0.3)
    calm = FaceObservation(present=True, expression={"neutral": 1.0}, smile=0.004, mouth_open=0.012, brow_raise=0.128,
                           eyes_open=0.3)
    fired = []
    log = SessionPerception()
    for i in range(72):  # 18 s at 4 frames/s: angry 0-8 s, calm 8-10 s, angry again 10-18 s
        t = i * 0.25
        track.add(t, calm if 8 <= t < 10 else angry)
        state = fuse(track, t)
        log.add(state)
        if (args := tool.update(state)) is not None:
            fired.append((t, args))
    assert len(fired) == 2
    assert 5.0 <= fired[0][0] <= 6.5 and fired[0][1]["signal"] == "frustrated" and fired[0][1]["held_s"] >= 5.0
    assert 15.0 <= fired[1][0] <= 16.5  # re-armed while calm, then held 5 s again

    # One analysed frame that reads otherwise (every 3 s) neither re-fires the tool nor restarts its timer.
    from dataclasses import replace

    tool, track, fired = ToolWatch(name="user_smiling", signal="joy", for_s=2.0, min_confidence=0.3), VisualTrack(), []
    smiling = FaceObservation(present=True, expression={"happy": 1.0}, smile=0.03, mouth_open=0.012, brow_raise=0.128,
                              eyes_open=0.3)
    for i in range(48):  # 12 s at 4 frames/s
        t = i * 0.25
        track.add(t, smiling)
        state = fuse(track, t)
        assert state.emotion == "joy"
        if (args := tool.update(replace(state, emotion="neutral") if i % 12 == 11 else state)) is not None:
            fired.append(t)
    assert len(fired) == 1 and fired[0] <= 3.0, fired
    summary = log.summary()
    assert summary["dominant_emotion"] == "anger" and summary["attention"] > 0.9
    assert summary["summary"].startswith("The user was visible 100% of the call")
