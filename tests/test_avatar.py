"""The splat head, the CPU rasteriser against a brute-force reference, and lip-sync animation."""

from __future__ import annotations

import numpy as np

from models.avatar.animate import Animator, SpeechTrack, lip_weights, viseme_of
from models.avatar.camera import Camera, look_at, portrait_camera
from models.avatar.gaussians import covariances, quat_from_normal
from models.avatar.head import CHANNELS, PART_ID, PARTS, build_head
from models.avatar.raster_cpu import rasterize, rasterize_reference
from models.avatar.render import CPUAvatarRenderer, Pose


def random_scene(n, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform([-0.3, -0.3, -0.3], [0.3, 0.3, 0.3], (n, 3)).astype(np.float32)
    quats = rng.standard_normal((n, 4)).astype(np.float32)
    scales = rng.uniform(0.01, 0.06, (n, 3)).astype(np.float32)
    colors = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    opac = rng.uniform(0.2, 1.0, n).astype(np.float32)
    return means, covariances(quats, scales).astype(np.float32), colors, opac


def test_tiled_rasteriser_matches_brute_force():
    cam = Camera(look_at(np.array([0.0, 0.0, 1.5]), np.zeros(3)), 60.0, 60.0, 24.0, 20.0, 48, 40)
    for seed in range(3):
        means, covs, colors, opac = random_scene(60, seed)
        fast = rasterize(means, covs, colors, opac, cam, (0.1, 0.2, 0.3))
        ref = rasterize_reference(means, covs, colors, opac, cam, (0.1, 0.2, 0.3))
        assert np.abs(fast - ref).max() < 2e-3


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
    # By default the mouth leads the sound: the shape of t + 50 ms shows at t.
    assert np.allclose(lip_weights(track, 1.15), lip_weights(track, 1.2, lead_s=0.0))
    assert not lip_weights(track, 3.0).any()  # silence long after


def test_animator_blinks_and_stays_restrained():
    anim = Animator(rng=np.random.default_rng(1))
    blink = CHANNELS.index("blink_l")
    poses = [anim.pose(t) for t in np.arange(0, 12, 1 / 30)]
    blinks = np.array([p.weights[blink] for p in poses])
    starts = np.sum((blinks[1:] > 0.5) & (blinks[:-1] <= 0.5))
    assert 2 <= starts <= 6  # every 2-6 s
    assert max(abs(p.yaw) for p in poses) < 0.05  # no constant head swinging
