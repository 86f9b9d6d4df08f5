"""The splat head, the CPU rasteriser against the torch reference renderer, and lip-sync animation."""

from __future__ import annotations

import numpy as np
import pytest

from models.avatar import raster_torch
from models.avatar.animate import LIP_LEAD_S, Animator, SpeechTrack, lip_weights, viseme_of
from models.avatar.camera import Camera, look_at, portrait_camera
from models.avatar.gaussians import covariances, quat_from_normal
from models.avatar.head import CHANNELS, MOUTH_Y, PART_ID, PARTS, build_head
from models.avatar.raster_cpu import contributors, rasterize
from models.avatar.render import CPUAvatarRenderer, Pose


def random_scene(n, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform([-0.3, -0.3, -0.3], [0.3, 0.3, 0.3], (n, 3)).astype(np.float32)
    quats = rng.standard_normal((n, 4)).astype(np.float32)
    scales = rng.uniform(0.01, 0.06, (n, 3)).astype(np.float32)
    colors = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    opac = rng.uniform(0.2, 1.0, n).astype(np.float32)
    return means, covariances(quats, scales).astype(np.float32), colors, opac


def test_tiled_rasteriser_matches_torch_reference():
    cam = Camera(look_at(np.array([0.0, 0.0, 1.5]), np.zeros(3)), 60.0, 60.0, 24.0, 20.0, 48, 40)
    for seed in range(3):
        means, covs, colors, opac = random_scene(60, seed)
        fast = rasterize(means, covs, colors, opac, cam, (0.1, 0.2, 0.3))
        ref = raster_torch.rasterize(means, covs, colors, opac, cam, (0.1, 0.2, 0.3)).numpy()
        assert np.abs(fast - ref).max() < 2e-3


def test_contributor_lists_reproduce_the_render_and_carry_gradients():
    """Fitting composites the numba rasteriser's per-pixel lists in torch: with enough slots per
    pixel the image is the rasteriser's, and gradients reach colours and positions."""
    import torch

    cam = Camera(look_at(np.array([0.0, 0.0, 1.5]), np.zeros(3)), 60.0, 60.0, 24.0, 20.0, 48, 40)
    means, covs, colors, opac = random_scene(60, 1)
    ids = torch.from_numpy(contributors(means, covs, opac, cam, k_max=64).reshape(48 * 40, -1)).long()
    m = torch.from_numpy(means).requires_grad_(True)
    c = torch.from_numpy(colors).requires_grad_(True)
    means2d, conics, _, _ = raster_torch.project(m, torch.from_numpy(covs), cam)
    img = raster_torch.composite(means2d, conics, c, torch.from_numpy(opac), ids, 48, 40, (0.1, 0.2, 0.3))
    fast = rasterize(means, covs, colors, opac, cam, (0.1, 0.2, 0.3))
    assert np.abs(img.detach().numpy() - fast).max() < 2e-3
    img.sum().backward()
    assert c.grad.abs().sum() > 0 and m.grad.abs().sum() > 0


def test_empty_scene_is_background():
    cam = portrait_camera(32, 32)
    img = rasterize(np.zeros((0, 3), np.float32), np.zeros((0, 3, 3), np.float32), np.zeros((0, 3), np.float32),
                    np.zeros(0, np.float32), cam, (0.5, 0.25, 1.0))
    assert np.allclose(img, [0.5, 0.25, 1.0])


def test_quat_from_normal_rotates_z_onto_normal():
    from models.avatar.gaussians import quat_to_rotmat

    n = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])
    R = quat_to_rotmat(quat_from_normal(n))
    assert np.allclose(R[:, :, 2], n, atol=1e-6)


def test_head_has_all_parts_and_rig():
    head = build_head(20000)
    assert len(head) >= 20000
    present = set(np.unique(head.splats.labels))
    assert present == set(range(len(PARTS)))
    assert head.deltas.shape == (len(CHANNELS), len(head), 3)
    # The jaw moves lower lip and teeth but not the eyes.
    jaw = head.deltas[CHANNELS.index("jaw_open")]
    labels = head.splats.labels
    assert np.abs(jaw[labels == PART_ID["teeth"]]).max() > 0.01
    assert np.abs(jaw[labels == PART_ID["sclera"]]).max() == 0


def test_expressions_change_the_right_pixels():
    r = CPUAvatarRenderer(build_head(8000), 128, 128)
    neutral = r.render(Pose()).astype(int)
    open_mouth = r.render(Pose().set(jaw_open=1.0)).astype(int)
    blink = r.render(Pose().set(blink_l=1.0, blink_r=1.0)).astype(int)
    mouth_box = (slice(64, 96), slice(40, 88))
    eye_box = (slice(30, 60), slice(30, 98))
    assert np.abs(open_mouth - neutral)[mouth_box].mean() > 3 * np.abs(open_mouth - neutral)[eye_box].mean()
    assert np.abs(blink - neutral)[eye_box].mean() > 3 * np.abs(blink - neutral)[mouth_box].mean()
    assert 40 < neutral.mean() < 240  # a face on a light background, not a blank frame


def test_lip_sync_follows_phonemes():
    assert viseme_of("ˈa") == "aa" and viseme_of("m") == "PP" and viseme_of("ˈ") == "sil"
    track = SpeechTrack(t0=1.0, phonemes=[("m", 0.0, 0.1), ("a", 0.1, 0.3), ("m", 0.3, 0.4)], duration=0.4)
    jaw = CHANNELS.index("jaw_open")
    press = CHANNELS.index("lip_press")
    assert lip_weights(track, 1.2, lead_s=0.0)[jaw] > 0.5  # the vowel opens the jaw
    assert lip_weights(track, 1.05, lead_s=0.0)[press] > 0.5  # /m/ closes the lips
    # By default the mouth leads the sound: the shape of t + LIP_LEAD_S shows at t.
    assert np.allclose(lip_weights(track, 1.2 - LIP_LEAD_S), lip_weights(track, 1.2, lead_s=0.0))
    assert not lip_weights(track, 3.0).any()  # silence long after
    # A stress mark is the start of its vowel (piper times it as a token of its own), a length mark its
    # end: the jaw is open across both.
    stressed = SpeechTrack(t0=0.0, phonemes=[("m", 0.0, 0.1), ("ˈ", 0.1, 0.2), ("ɑ", 0.2, 0.3), ("ː", 0.3, 0.4),
                                             ("m", 0.4, 0.5)], duration=0.5)
    assert stressed.visemes == ["PP", "aa", "aa", "aa", "PP"]
    assert all(lip_weights(stressed, t, lead_s=0.0)[jaw] > 0.5 for t in (0.15, 0.25, 0.35))


def test_animator_blinks_and_stays_restrained():
    anim = Animator(rng=np.random.default_rng(1))
    blink = CHANNELS.index("blink_l")
    poses = [anim.pose(t) for t in np.arange(0, 12, 1 / 30)]
    blinks = np.array([p.weights[blink] for p in poses])
    starts = np.sum((blinks[1:] > 0.5) & (blinks[:-1] <= 0.5))
    assert 2 <= starts <= 6  # every 2-6 s
    assert max(abs(p.yaw) for p in poses) < 0.05  # no constant head swinging


def test_projection_matches_gsplat_torch_reference():
    """Our EWA projection against gsplat's own pure-torch fully-fused projection, on the real head
    seen from a turned camera: same 2D means, conics and depths."""
    import torch
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    from models.avatar.raster_cpu import project

    head = build_head(20000)
    s = head.splats
    cam = portrait_camera(256, 256)
    cam.viewmat = look_at(np.array([0.12, 0.0, 0.5]), np.array([0.0, -0.02, 0.0]))
    covs = covariances(s.quats, s.scales).astype(np.float32)
    means2d, conics, radii, depths = project(s.means, covs, cam)

    t = torch.from_numpy
    covars_ref, _ = _quat_scale_to_covar_preci(t(s.quats), t(s.scales), compute_preci=False)
    assert np.allclose(covars_ref.numpy(), covs, atol=1e-9, rtol=1e-4)
    radii_ref, means2d_ref, depths_ref, conics_ref, _ = _fully_fused_projection(
        t(s.means)[None], covars_ref[None], t(cam.viewmat)[None, None], t(cam.K)[None, None], cam.width, cam.height)
    means2d_ref, conics_ref = means2d_ref[0, 0].numpy(), conics_ref[0, 0].numpy()
    visible = radii_ref[0, 0].numpy().max(axis=1) > 0
    assert visible.mean() > 0.9
    assert np.allclose(means2d[visible], means2d_ref[visible], atol=1e-3)
    assert np.allclose(depths[visible], depths_ref[0, 0].numpy()[visible], rtol=1e-5)
    assert np.allclose(conics[visible], conics_ref[visible], rtol=2e-3, atol=1e-3 * np.abs(conics_ref).max())
    # gsplat bounds each axis at 3.33 sigma, we bound the major axis at 3 sigma: same extent within 12 %.
    ref_extent = radii_ref[0, 0].numpy()[visible].max(axis=1)
    assert np.all(radii[visible] >= np.floor(ref_extent * 3.0 / 3.33) - 1)
    # Our torch reference projection (what fitting differentiates) is the numba one.
    m2, c2, r2, d2 = raster_torch.project(t(s.means), t(covs), cam)
    assert np.allclose(m2.numpy(), means2d, atol=1e-3) and np.allclose(d2.numpy(), depths, rtol=1e-5)
    assert np.allclose(c2.numpy(), conics, rtol=2e-3, atol=1e-3 * np.abs(conics).max())
    assert np.abs(r2.numpy() - radii).max() <= 1


def test_head_file_round_trip(tmp_path):
    """The head saved as a 3DGS PLY + rig loads back to the same splats, rig and rendered frames."""
    from models.avatar.headfile import HeadFileError, load_head, read_ply, save_head

    head = build_head(20000)
    ply, rig = save_head(head, tmp_path / "stock.ply")
    header = ply.read_bytes()[:1000].decode("ascii", errors="replace")
    assert "element vertex" in header and "property float f_dc_0" in header and "property float rot_3" in header
    loaded = load_head(ply)
    s, r = head.splats, loaded.splats
    assert len(loaded) == len(head)
    assert np.allclose(r.means, s.means) and np.allclose(r.scales, s.scales, rtol=1e-5)
    assert np.allclose(r.opacities, np.clip(s.opacities, 1e-6, 1 - 1e-6), atol=1e-6)
    assert np.allclose(r.colors, np.clip(s.colors, 0, 1), atol=1e-6)
    assert np.array_equal(r.labels, s.labels) and np.allclose(loaded.deltas, head.deltas)
    pose = Pose(weights=np.eye(len(CHANNELS), dtype=np.float32)[CHANNELS.index("jaw_open")], yaw=0.2)
    a = CPUAvatarRenderer(head, 96, 96).render(pose).astype(int)
    b = CPUAvatarRenderer(loaded, 96, 96).render(pose).astype(int)
    assert np.abs(a - b).max() <= 2
    rig.unlink()
    try:
        load_head(ply)
        raise AssertionError("a PLY without its rig must not load as a head")
    except HeadFileError:
        pass
    (tmp_path / "bad.ply").write_bytes(b"not a ply")
    try:
        read_ply(tmp_path / "bad.ply")
        raise AssertionError("garbage must not parse")
    except HeadFileError:
        pass


def test_gsplat_batch_posing_matches_the_cpu_path():
    """The GPU renderer's batched torch posing (run here on CPU) equals PosedHead for each session,
    pads a smaller head with invisible Gaussians, and its rasterization() inputs project, through
    gsplat's torch reference, to the same pixels as our CPU projection."""
    import torch
    from gsplat.cuda._torch_impl import _fully_fused_projection

    from models.avatar.raster_cpu import project
    from models.avatar.render import PosedHead
    from models.avatar.render_gsplat import GsplatBatchRenderer

    big, small = build_head(20000), build_head(8000)
    gpu = GsplatBatchRenderer({"stock": big, "small": small}, 128, 128, device="cpu")
    poses = [Pose().set(jaw_open=0.8, smile=0.5), Pose(yaw=0.3, pitch=-0.1).set(blink_l=1.0), Pose(roll=0.1)]
    requests = [("stock", poses[0]), ("stock", poses[1]), ("small", poses[2])]
    means, covs, _ = gpu.pose_batch(requests)
    n = len(big)
    assert means.shape == (3, n, 3) and covs.shape == (3, n, 3, 3)
    for i, (key, pose) in enumerate(requests):
        head = big if key == "stock" else small
        m_ref, c_ref = PosedHead(head)(pose)
        assert np.allclose(means[i, : len(head)].numpy(), m_ref, atol=1e-5)
        assert np.allclose(covs[i, : len(head)].numpy(), c_ref, atol=1e-7)
    kw = gpu.rasterization_inputs(requests)
    assert kw["opacities"][2, len(small):].abs().max() == 0  # padding never shows
    assert kw["viewmats"].shape == (3, 1, 4, 4) and kw["backgrounds"].shape == (3, 1, 3)
    radii, means2d, _, _, _ = _fully_fused_projection(kw["means"], kw["covars"], kw["viewmats"], kw["Ks"], 128, 128)
    cam = portrait_camera(128, 128)
    ours, _, _, _ = project(*PosedHead(big)(poses[1]), cam)
    visible = radii[1, 0].numpy().max(axis=1) > 0
    assert np.allclose(means2d[1, 0].numpy()[visible], ours[visible], atol=1e-3)
    assert torch.is_tensor(kw["means"]) and kw["width"] == 128


def test_gpu_paths_reject_an_unknown_rasteriser_and_hand_each_session_its_own_frame():
    """The replica fit and its Serve deployment refuse a rasteriser they do not have (a config typo is
    an error at deploy time, not a silent CPU fit); the batch renderer's host frames are one array per
    session."""
    import torch

    from deployments.replica_trainer import ReplicaTrainer
    from models.avatar.fit import fit_head
    from models.avatar.render_gsplat import GsplatBatchRenderer

    photo = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="rasteriser"):
        fit_head(build_head(2000), [photo], size=64, rasteriser="opengl")
    with pytest.raises(ValueError, match="rasteriser"):
        ReplicaTrainer.func_or_class(rasteriser="cuda")
    gpu = GsplatBatchRenderer({"stock": build_head(2000)}, 8, 8, device="cpu")
    frames = gpu.to_host(torch.arange(2 * 8 * 8 * 3, dtype=torch.uint8).reshape(2, 8, 8, 3))
    assert len(frames) == 2 and frames[0].shape == (8, 8, 3) and frames[1][0, 0, 0] == 192


def test_frame_batcher_batches_sessions_and_keeps_frames_apart():
    """Four sessions rendering at once are served in shared batches, each gets its own frame, and a
    failing batch reaches every waiter instead of hanging them."""
    from concurrent.futures import ThreadPoolExecutor

    from models.avatar.batching import BatchedRenderer, FrameBatcher

    head = build_head(20000)
    cpu = CPUAvatarRenderer(head, 64, 64)
    batcher = FrameBatcher(lambda reqs: [cpu.render(p).copy() for _, p in reqs], max_batch=8, max_wait_s=0.05)
    poses = [Pose().set(jaw_open=0.25 * i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        frames = list(pool.map(lambda p: BatchedRenderer(batcher).render(p), poses))
    assert max(batcher.batch_sizes) > 1
    for pose, frame in zip(poses, frames, strict=True):
        assert np.array_equal(frame, cpu.render(pose))
    assert not np.array_equal(frames[0], frames[3])
    batcher.close()

    def broken(reqs):
        raise RuntimeError("device lost")

    failing = FrameBatcher(broken)
    try:
        BatchedRenderer(failing).render(Pose())
        raise AssertionError("the failure must reach the caller")
    except RuntimeError as exc:
        assert "device lost" in str(exc)
    failing.close()


def test_face_shows_speech_blinks_and_emotions():
    """Measured from pixels at 512^2, as benchmarks/render.py reports them: an open vowel shows the
    mouth interior and teeth, p/b/m close the lips, f/v rest the upper teeth on the lower lip, a blink
    closes the lids over the eyes, and the project's own face perception names the emotion it shows."""
    from models.avatar.animate import VISEMES
    from models.avatar.face_metrics import EYE, MOUTH_INTERIOR, PartCoverage, emotion_readback

    head = build_head(20000)
    cover = PartCoverage(head, 512, 512)
    rest = cover.area(Pose(), MOUTH_INTERIOR)
    aa = Pose().set(**VISEMES["aa"])
    assert cover.area(aa, MOUTH_INTERIOR) >= 4 * max(rest, 1) and cover.area(aa, ("teeth",)) > 100
    assert cover.area(Pose().set(**VISEMES["PP"]), MOUTH_INTERIOR) == 0
    # f/v: a band of the upper teeth shows, resting on the lower lip (the dark mouth barely shows), above
    # the line where the closed lips meet.
    teeth, dark = cover(Pose().set(**VISEMES["FF"]), ("teeth",), ("mouth", "tongue"))
    teeth, dark = teeth > 0.5, dark > 0.5
    s = head.splats
    line = (s.labels == PART_ID["lip"]) & (np.abs(s.means[:, 1] - MOUTH_Y) < 0.001)
    lips_meet = portrait_camera(512, 512).project(s.means[line])[0][:, 1].mean()  # image row
    assert teeth.sum() > 100 and dark.sum() < 0.5 * teeth.sum(), (teeth.sum(), dark.sum())
    assert np.where(teeth.any(axis=1))[0].max() < lips_meet
    open_px = cover.area(Pose(), EYE, threshold=0.2)
    assert open_px > 1000  # both eyes are in the picture
    assert cover.area(Pose().set(blink_l=1.0, blink_r=1.0), EYE, threshold=0.2) <= 0.05 * open_px
    # Part maps come from the same renderer as the video: their coverage adds up where the head is.
    skin, eye, rest_of_head = cover(Pose(), ("skin",), EYE, tuple(p for p in PARTS if p not in ("skin", *EYE)))
    assert np.all(skin + eye + rest_of_head <= 1.0 + 1e-3)
    got = emotion_readback(head, 512, per_emotion=4)
    assert got["frames"] == 5 * (4 + 3)
    assert got["accuracy"] >= 0.9, got


def test_back_facing_surfels_are_not_drawn():
    """The CPU renderer skips surfels turned away from the camera (as the browser's does): the back
    of the head is hidden, the face is not, and turning the head changes which are hidden."""
    head = build_head(8000)
    r = CPUAvatarRenderer(head, 128, 128)
    means, _ = r.posed.means(Pose())
    hidden = r.hidden(means, None)
    z = head.splats.means[:, 2]
    skin = head.splats.labels == PART_ID["skin"]
    assert hidden[skin & (z < -0.05)].mean() > 0.9 and not hidden[skin & (z > 0.06)].any()
    turned = Pose(yaw=0.6)
    means_t, R = r.posed.means(turned)
    assert (r.hidden(means_t, R) != hidden).sum() > 100


def test_the_eyes_and_head_follow_the_users_face():
    """The user's face on the left of their camera's frame is on the avatar's left: its eyes and head turn
    to the image's right, as the project's own face perception reads them on the rendered frames; back
    to the camera when the face is gone."""
    from models.perception.face import FaceAnalyzer

    analyzer = FaceAnalyzer()
    renderer = CPUAvatarRenderer(build_head(20000), 256, 256)

    def seen(x: float | None) -> tuple[float, float]:
        anim = Animator(rng=np.random.default_rng(1))
        anim.watch(x, 0.0)
        poses = [anim.pose(k / 30) for k in range(45)]  # 1.5 s: eased in (FOLLOW_S 0.25 s)
        obs = analyzer.analyse([renderer.render(p) for p in poses[-3:]])
        return float(np.mean([o.gaze[0] for o in obs])), float(np.mean([o.yaw_deg for o in obs]))

    left, right, gone = seen(-0.8), seen(0.8), seen(None)
    assert left[0] > gone[0] > right[0] and left[0] - right[0] > 0.12, (left, gone, right)  # iris offset, image right +
    assert left[1] < gone[1] < right[1] and right[1] - left[1] > 5.0, (left, gone, right)  # the head turns too (degrees)
