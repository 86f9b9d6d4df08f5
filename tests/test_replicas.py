"""Replicas: fitting the stock head to a face by differentiable rendering, and the /v2/replicas API
end to end (upload, training on a real ReplicaTrainer, a conversation that shows the fitted face)."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest

from models.avatar.head import PART_ID, build_head
from models.avatar.render import CPUAvatarRenderer, Pose

TINT = np.array([0.55, 0.75, 1.25], np.float32)  # a person whose skin reads much bluer than the stock head


def person_photo(size: int = 160) -> bytes:
    """A 'photo': the head with another skin colour, off-centre and smaller in a larger frame."""
    from PIL import Image

    head = build_head(20000)
    skin = head.splats.labels == PART_ID["skin"]
    head.splats.colors[skin] = np.clip(head.splats.colors[skin] * TINT, 0, 1)
    face = CPUAvatarRenderer(head, size, size).render(Pose())
    canvas = np.full((240, 320, 3), 200, np.uint8)
    canvas[30:30 + size, 110:110 + size] = face
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def video_of(frames: list[np.ndarray], fps: int = 10) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_fit_recovers_a_face_and_measures_it_on_held_back_pixels():
    from models.avatar.fit import fit_head
    from models.media import decode_media

    frames = decode_media(person_photo(), "image/png")
    result = fit_head(build_head(20000), frames)
    print('psnr', result.psnr_before, result.psnr_after)
    assert result.align_scores[0] > 0.8  # found the face in the larger frame
    assert result.frames_held_back == 1
    assert result.psnr_after > result.psnr_before + 3.0, (result.psnr_before, result.psnr_after)
    cheek = (slice(58, 72), slice(38, 50))  # on a 128x128 render
    fitted = CPUAvatarRenderer(result.head, 128, 128).render(Pose())[cheek].reshape(-1, 3).mean(0)
    stock = CPUAvatarRenderer(build_head(20000), 128, 128).render(Pose())[cheek].reshape(-1, 3).mean(0)
    assert fitted[2] / fitted[0] > 1.3 * stock[2] / stock[0], (fitted, stock)  # the skin turned blue, as in the photo


def test_a_photo_replica_takes_the_persons_shape_and_texture_and_the_rig_still_drives_it():
    """#13: one real photo (matplotlib's Grace Hopper): the face mesh reshapes the head, the photo colours
    it; measured on held-back pixels inside the face and by the face mesh on the frontal render."""
    from benchmarks.replica_fit import grace_hopper
    from models.avatar.face_metrics import EYE, MOUTH_INTERIOR, PartCoverage
    from models.avatar.fit import fit_head

    r = fit_head(build_head(20000), [grace_hopper()])
    print("replica", r.psnr_face_before, r.psnr_face_after, r.landmark_error_before, r.landmark_error_after)
    assert r.shaped and r.holdout == "checkerboard of 1px blocks at 256px"
    assert r.landmark_error_before > 0.05 >= r.landmark_error_after, (r.landmark_error_before, r.landmark_error_after)
    assert r.psnr_face_after >= 26.0 > r.psnr_face_before, (r.psnr_face_before, r.psnr_face_after)
    cover = PartCoverage(r.head, 512, 512)
    assert cover.area(Pose(), MOUTH_INTERIOR) == 0
    assert cover.area(Pose().set(jaw_open=1.0), MOUTH_INTERIOR) > 2000  # the rig opens the reshaped mouth
    eyes = cover.area(Pose(), EYE)
    assert eyes > 500 and cover.area(Pose().set(blink_l=1.0, blink_r=1.0), EYE) <= 0.05 * eyes


def test_media_limits():
    from models.media import MediaError, probe_media

    with pytest.raises(MediaError, match="not a readable PNG image"):
        probe_media(b"\x89PNG garbage", "image/png")
    with pytest.raises(MediaError, match="unsupported"):
        probe_media(b"hello", "text/plain")
    tiny = np.zeros((32, 32, 3), np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tiny).save(buf, format="PNG")
    with pytest.raises(MediaError, match="too small"):
        probe_media(buf.getvalue(), "image/png")
    long_video = video_of([np.zeros((64, 64, 3), np.uint8)] * 62, fps=1)
    with pytest.raises(MediaError, match="at most 60 s"):
        probe_media(long_video, "video/mp4")
    with pytest.raises(MediaError, match="not a decodable video"):
        probe_media(b"\x00" * 1000, "video/mp4")
    ok = probe_media(video_of([np.zeros((96, 96, 3), np.uint8)] * 5), "video/mp4")
    assert ok["kind"] == "video" and ok["width"] == 96


def decompression_bomb(width: int, height: int) -> bytes:
    """A few kB of PNG that claims width x height pixels (1-bit, all zero: it compresses to nothing)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_hostile_uploads_are_refused_before_decoding():
    from models.media import MediaError, probe_media

    for w, h in ((8000, 8000), (20000, 10000)):  # 64 MP (under Pillow's own bomb check), 200 MP (over it)
        bomb = decompression_bomb(w, h)
        assert len(bomb) < 200_000
        with pytest.raises(MediaError):
            probe_media(bomb, "image/png")
    # A playlist sent as a video: no demuxer that follows URLs or file names is ever opened.
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:8265/segment.ts\n#EXT-X-ENDLIST\n"
    with pytest.raises(MediaError):
        probe_media(playlist, "video/mp4")
    concat = b"ffconcat version 1.0\nfile '/etc/passwd'\n"
    with pytest.raises(MediaError):
        probe_media(concat, "video/webm")
    with pytest.raises(MediaError):  # a PNG declared as JPEG is not opened as a PNG
        probe_media(decompression_bomb(100, 100), "image/jpeg")


def test_replica_api_and_a_conversation_with_the_fitted_face(idle, presence, api_key):
    from benchmarks.rtc_client import PresenceRTCClient

    h = {"x-api-key": api_key}
    with httpx.Client(base_url=presence, headers=h, timeout=60) as http:
        stock = http.get("/v2/replicas/r-stock").json()
        assert stock["status"] == "ready" and any(r["replica_id"] == "r-stock" for r in http.get("/v2/replicas").json()["data"])
        assert http.delete("/v2/replicas/r-stock").status_code == 409
        assert httpx.post(f"{presence}/v2/replicas").status_code == 401
        assert http.post("/v2/replicas", json={"x": 1}).status_code == 415
        no_file = http.post("/v2/replicas", data={"replica_name": "nofile"}, files={"other": ("a", b"x", "text/plain")})
        assert no_file.status_code == 400
        assert http.post("/v2/replicas", files={"train_video": ("a.txt", b"hi", "text/plain")}).status_code == 415
        bad = http.post("/v2/replicas", files={"train_video": ("a.png", b"\x89PNG nope", "image/png")})
        assert bad.status_code == 422 and "image" in bad.json()["detail"]
        assert http.get("/v2/replicas/rnope").status_code == 404
        assert http.post("/v2/conversations", json={"replica_id": "rnope"}).status_code == 404

        photo = {"train_video": ("me.png", person_photo(), "image/png")}
        r = http.post("/v2/replicas", data={"replica_name": "blue"}, files=photo)
        assert r.status_code == 200, r.text
        rid = r.json()["replica_id"]
        assert r.json()["status"] == "training"
        deadline = time.time() + 240
        while (got := http.get(f"/v2/replicas/{rid}").json())["status"] == "training" and time.time() < deadline:
            time.sleep(1)
        assert got["status"] == "ready", got
        assert got["psnr_after"] > got["psnr_before"] + 3.0 and "head_path" not in got
        assert got["shaped"] and got["landmark_error_after"] is not None and got["psnr_face_after"] > got["psnr_face_before"]

    async def frames_of(replica_id: str) -> np.ndarray:
        client = PresenceRTCClient(presence, api_key)
        try:
            await client.create(replica_id=replica_id, conversation_name=f"face-{replica_id}")
            await client.connect()
            for _ in range(100):
                if client.rx.frames >= 5:
                    break
                await asyncio.sleep(0.1)
            return client.rx.last_frame.astype(np.float32)
        finally:
            await client.end()
            await client.close()

    fitted = asyncio.run(frames_of(rid))
    stock_frame = asyncio.run(frames_of("r-stock"))
    h_, w_ = fitted.shape[:2]
    cheek = (slice(int(h_ * 0.45), int(h_ * 0.6)), slice(int(w_ * 0.3), int(w_ * 0.4)))
    f, s = fitted[cheek].reshape(-1, 3).mean(0), stock_frame[cheek].reshape(-1, 3).mean(0)
    assert f[2] / f[0] > 1.2 * s[2] / s[0], (f, s)  # the conversation shows the fitted (blue) face

    with httpx.Client(base_url=presence, headers=h) as http:
        assert http.delete(f"/v2/replicas/{rid}").status_code == 204
        assert http.get(f"/v2/replicas/{rid}").status_code == 404


def test_fit_from_a_video_holds_back_frames():
    from PIL import Image

    from models.avatar.fit import fit_head
    from models.media import decode_media

    photo = np.asarray(Image.open(io.BytesIO(person_photo())).convert("RGB"))
    frames = decode_media(video_of([np.roll(photo, 2 * i, axis=1) for i in range(8)]), "video/mp4")
    assert len(frames) == 8
    result = fit_head(build_head(20000), frames, size=64, color_steps=30, offset_steps=10)
    assert result.frames_held_back == 2 and result.frames_used == 6
    assert result.psnr_after > result.psnr_before + 2.0, (result.psnr_before, result.psnr_after)


def test_a_video_adds_views_at_their_own_head_turns():
    """#13: a short video of a person turning their head. Each frame's turn is read from the face mesh
    and the head is fitted (and measured) turned as in that frame, so a side of the face seen only in a
    turned frame takes its colour; fitting every frame as a frontal photo is the comparison. The person
    is a differently coloured and jittered head, so the truth at every turn is known."""
    from models.avatar.fit import fit_head

    person = build_head(20000, seed=3, skin=(0.62, 0.5, 0.78), hair=(0.55, 0.42, 0.2), iris=(0.3, 0.5, 0.3))
    turns = [-0.3, -0.15, 0.0, 0.15, 0.3, 0.4]  # the 4th (0.15) is held back
    r = CPUAvatarRenderer(person, 256, 256)
    frames = [r.render(Pose(yaw=y)) for y in turns]
    views = fit_head(build_head(20000), frames, size=96, color_steps=30, offset_steps=10)
    frontal = fit_head(build_head(20000), frames, size=96, color_steps=30, offset_steps=10, views=False)
    print("turns", views.view_yaws, "held-back PSNR", views.psnr_before, views.psnr_after, "as photos", frontal.psnr_after)
    assert np.abs(np.array(views.view_yaws) - turns).max() < 0.06, views.view_yaws
    assert views.frames_used == 5 and views.frames_held_back == 1
    assert views.psnr_after > frontal.psnr_after + 3.0, (views.psnr_after, frontal.psnr_after)

    def error_turned(head) -> float:  # how far the head, turned as in the last frame, is from the person
        side = CPUAvatarRenderer(head, 128, 128).render(Pose(yaw=0.4)).astype(float)
        return float(np.abs(side - CPUAvatarRenderer(person, 128, 128).render(Pose(yaw=0.4))).mean())

    assert error_turned(views.head) < 0.85 * min(error_turned(frontal.head), error_turned(build_head(20000)))
