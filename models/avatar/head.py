"""A procedural Gaussian-splat head with a linear expression rig.

The head is built from analytic surfaces (a skull ellipsoid with nose, brow and chin relief, eyes
with sclera/iris/pupil, lid curtains, brows, lips, mouth interior, teeth, hair, ears, neck and
shoulders), each sampled into flat Gaussians with baked Lambert shading. The rig stores one
per-Gaussian displacement field per expression channel: means = base + sum_i w_i * delta_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.avatar.gaussians import Splats, fibonacci_sphere, quat_from_normal

CHANNELS = (
    "jaw_open", "mouth_wide", "mouth_round", "lip_press", "smile", "frown", "brows_up", "brows_down",
    "blink_l", "blink_r", "gaze_x", "gaze_y", "cheek_puff", "lip_tuck",
)
PARTS = ("skin", "hair", "sclera", "iris", "pupil", "lid", "lash", "brow", "lip", "mouth", "teeth",
         "tongue", "ear", "neck", "shirt")
PART_ID = {p: i for i, p in enumerate(PARTS)}
PIVOT = np.array([0.0, -0.085, -0.01], dtype=np.float32)  # head pose rotates about the top of the neck
LIGHT = np.array([-0.35, 0.55, 0.75]) / np.linalg.norm([-0.35, 0.55, 0.75])
EYES = {"l": np.array([0.032, 0.028, 0.063]), "r": np.array([-0.032, 0.028, 0.063])}
EYE_R = 0.0125
MOUTH_Y = -0.047


@dataclass
class Head:
    """Base splats plus the rig."""

    splats: Splats
    deltas: np.ndarray  # (len(CHANNELS), N, 3) float32
    head_weight: np.ndarray  # (N,) how much each Gaussian follows the rigid head pose

    def __len__(self) -> int:
        return len(self.splats)


def _shade(albedo: np.ndarray, normals: np.ndarray, ambient: float = 0.38) -> np.ndarray:
    lam = np.clip(normals @ LIGHT, 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(normals[:, 2]), 0, 1) ** 3 * 0.08  # soft rim keeps the silhouette readable
    return np.clip(albedo * (ambient + 0.72 * lam)[:, None] + rim[:, None], 0.0, 1.0)


def _splats(pos, normals, spacing, albedo, part, opacity=0.96, thickness=0.15, rng=None, jitter=0.0, aniso=(1.0, 1.0)):
    n = pos.shape[0]
    albedo = np.broadcast_to(np.asarray(albedo, dtype=np.float64), (n, 3)).copy()
    if jitter and rng is not None:
        albedo *= 1.0 + jitter * rng.standard_normal((n, 1))
    scales = np.empty((n, 3), dtype=np.float32)
    scales[:, 0] = spacing * 0.62 * aniso[0]
    scales[:, 1] = spacing * 0.62 * aniso[1]
    scales[:, 2] = spacing * thickness
    return Splats(pos.astype(np.float32), quat_from_normal(normals), scales,
                  np.full(n, opacity, dtype=np.float32), _shade(albedo, normals).astype(np.float32),
                  np.full(n, PART_ID[part], dtype=np.int16))


def _face_relief(x, y):
    """Height field added to the skull's front (z): nose, brow ridge, eye sockets, cheekbones, chin."""
    ax = np.abs(x)
    nose = 0.015 * np.exp(-(x / 0.0095) ** 2 - ((y + 0.01) / 0.019) ** 2)
    bridge = 0.006 * np.exp(-(x / 0.008) ** 2 - ((y - 0.02) / 0.015) ** 2)
    brow = 0.0045 * np.exp(-((y - 0.047) / 0.008) ** 2) * np.exp(-((ax - 0.03) / 0.03) ** 2)
    socket = -0.006 * np.exp(-((ax - 0.032) / 0.014) ** 2 - ((y - 0.028) / 0.011) ** 2)
    cheek = 0.004 * np.exp(-((ax - 0.045) / 0.016) ** 2 - ((y + 0.008) / 0.016) ** 2)
    muzzle = 0.006 * np.exp(-(x / 0.03) ** 2 - ((y - MOUTH_Y) / 0.02) ** 2)
    chin = 0.006 * np.exp(-(x / 0.018) ** 2 - ((y + 0.088) / 0.012) ** 2)
    return nose + bridge + brow + socket + cheek + muzzle + chin


def _skull(dirs):
    """Skull surface from unit directions: an ellipsoid tapered at the jaw, with face relief."""
    c = np.array([0.0, 0.012, 0.0])
    r = np.array([0.073, 0.1, 0.088])
    p = c + dirs * r
    below = np.clip((0.0 - p[:, 1]) / 0.09, 0, 1)
    p[:, 0] *= 1.0 - 0.22 * below ** 1.5  # narrower jaw and chin
    front = np.clip(p[:, 2] / 0.088, 0, 1) ** 2
    p[:, 2] += _face_relief(p[:, 0], p[:, 1]) * front
    return p


def _skull_normals(p, eps=1e-4):
    # Numerical normal of the relief-displaced front, blended with the ellipsoid normal.
    r = np.array([0.073, 0.1, 0.088])
    n = (p - np.array([0.0, 0.012, 0.0])) / r ** 2
    front = np.clip(p[:, 2] / 0.088, 0, 1) ** 2
    dzdx = (_face_relief(p[:, 0] + eps, p[:, 1]) - _face_relief(p[:, 0] - eps, p[:, 1])) / (2 * eps)
    dzdy = (_face_relief(p[:, 0], p[:, 1] + eps) - _face_relief(p[:, 0], p[:, 1] - eps)) / (2 * eps)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    n[:, 0] -= dzdx * front * 0.9
    n[:, 1] -= dzdy * front * 0.9
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def skull_z(x, y):
    """z of the face surface in front of (x, y) (for placing features on the skin)."""
    c = np.array([0.0, 0.012, 0.0])
    r = np.array([0.073, 0.1, 0.088])
    below = np.clip((0.0 - y) / 0.09, 0, 1)
    xs = x / (1.0 - 0.22 * below ** 1.5)
    inside = np.clip(1 - (xs / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2, 0.0, 1.0)
    z = r[2] * np.sqrt(inside)
    return z + _face_relief(x, y) * np.clip(z / 0.088, 0, 1) ** 2


def _in_ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1.0


def _grid(x0, x1, y0, y1, n):
    """~n jittered points on a rectangle."""
    aspect = (x1 - x0) / max(y1 - y0, 1e-9)
    nx = max(2, int(round(np.sqrt(n * aspect))))
    ny = max(2, int(round(n / nx)))
    gx, gy = np.meshgrid(np.linspace(x0, x1, nx), np.linspace(y0, y1, ny))
    return gx.ravel(), gy.ravel(), (x1 - x0) / nx


def build_head(n_gaussians: int = 20000, seed: int = 7, skin=(0.86, 0.64, 0.52), hair=(0.2, 0.13, 0.08),
               iris=(0.3, 0.42, 0.55), shirt=(0.18, 0.27, 0.42)) -> Head:
    """The default head with about `n_gaussians` Gaussians."""
    rng = np.random.default_rng(seed)
    s = n_gaussians / 20000.0
    parts: list[Splats] = []
    deltas: list[np.ndarray] = []
    head_w: list[np.ndarray] = []
    k = len(CHANNELS)
    ch = {c: i for i, c in enumerate(CHANNELS)}

    def add(sp: Splats, delta: np.ndarray | None = None, hw: float | np.ndarray = 1.0):
        parts.append(sp)
        deltas.append(np.zeros((k, len(sp), 3), np.float32) if delta is None else delta.astype(np.float32))
        head_w.append(np.broadcast_to(np.asarray(hw, np.float32), (len(sp),)).copy())

    def jaw_field(p):
        """How much each point follows the jaw: 1 below the lip line at the front, fading at the sides."""
        below = np.clip((MOUTH_Y + 0.001 - p[:, 1]) / 0.006, 0, 1)
        front = np.clip((p[:, 2] + 0.02) / 0.06, 0, 1)
        side = np.exp(-(np.maximum(np.abs(p[:, 0]) - 0.03, 0) / 0.03) ** 2)
        return below * front * side

    def mouth_fields(p, lips: bool):
        """Displacements of the mouth shapes for points p (lips: full effect; skin: falls off)."""
        d = np.zeros((k, len(p), 3))
        jf = jaw_field(p)
        d[ch["jaw_open"], :, 1] = -0.017 * jf
        d[ch["jaw_open"], :, 2] = -0.004 * jf
        near = np.exp(-(p[:, 0] / 0.035) ** 2 - ((p[:, 1] - MOUTH_Y) / 0.014) ** 2)
        if lips:
            near = np.ones(len(p))
        rel_y = p[:, 1] - MOUTH_Y
        d[ch["mouth_wide"], :, 0] = 0.16 * p[:, 0] * near
        d[ch["mouth_wide"], :, 1] = -0.1 * rel_y * near
        d[ch["mouth_round"], :, 0] = -0.32 * p[:, 0] * near
        d[ch["mouth_round"], :, 1] = 0.25 * rel_y * near
        d[ch["mouth_round"], :, 2] = 0.006 * near
        d[ch["lip_press"], :, 1] = -0.35 * rel_y * near
        d[ch["lip_press"], :, 2] = -0.001 * near
        # f/v: the skin under the lower lip rises a little with it (the lips' own motion is set below)
        d[ch["lip_tuck"], :, 1] = 0.0008 * near * (rel_y < 0)
        corner = np.clip(np.abs(p[:, 0]) / 0.024, 0, 1.2) ** 2 * near
        d[ch["smile"], :, 0] += 0.005 * np.sign(p[:, 0]) * corner
        d[ch["smile"], :, 1] += 0.008 * corner
        d[ch["frown"], :, 1] += -0.006 * corner
        return d

    # --- skin --------------------------------------------------------------------------------------
    n_skin = int(9000 * s)
    dirs = fibonacci_sphere(int(n_skin * 1.25))
    p = _skull(dirs)
    keep = ~(np.any([_in_ellipse(np.abs(p[:, 0]), p[:, 1], 0.032, 0.029, 0.0145, 0.0085)], axis=0) & (p[:, 2] > 0.03))
    keep &= ~(_in_ellipse(p[:, 0], p[:, 1], 0.0, MOUTH_Y, 0.026, 0.0075) & (p[:, 2] > 0.03))
    keep &= p[:, 1] > -0.095 - 0.02 * (p[:, 2] < 0)  # the neck takes over below the jaw
    p = p[keep]
    nrm = _skull_normals(p)
    spacing = np.sqrt(0.1 / len(p)) * 1.05
    albedo = np.tile(np.array(skin), (len(p), 1))
    blush = np.exp(-((np.abs(p[:, 0]) - 0.045) / 0.018) ** 2 - ((p[:, 1] + 0.012) / 0.018) ** 2) * (p[:, 2] > 0)
    albedo[:, 0] += 0.05 * blush
    albedo[:, 1] -= 0.04 * blush
    d = mouth_fields(p, lips=False)
    cheek = np.exp(-((np.abs(p[:, 0]) - 0.042) / 0.016) ** 2 - ((p[:, 1] + 0.014) / 0.016) ** 2) * (p[:, 2] > 0.03)
    d[ch["smile"], :, 1] += 0.0035 * cheek
    d[ch["smile"], :, 2] += 0.0025 * cheek
    d[ch["cheek_puff"], :, 2] += 0.006 * cheek
    under_eye = np.exp(-((np.abs(p[:, 0]) - 0.032) / 0.014) ** 2 - ((p[:, 1] - 0.016) / 0.006) ** 2)
    d[ch["smile"], :, 1] += 0.0018 * under_eye  # a real smile narrows the eyes from below
    add(_splats(p, nrm, spacing, albedo, "skin", rng=rng, jitter=0.025), d)

    # --- ears -------------------------------------------------------------------------------------
    for side in (1, -1):
        m = int(260 * s)
        dirs = fibonacci_sphere(m)
        c = np.array([side * 0.074, 0.008, -0.006])
        ep = c + dirs * np.array([0.009, 0.022, 0.014])
        add(_splats(ep, dirs * np.array([1, 1, 1]), np.sqrt(0.0025 / m) * 1.6, np.array(skin) * [1.0, 0.92, 0.9], "ear"))

    # --- hair -------------------------------------------------------------------------------------
    n_hair = int(4600 * s)
    dirs = fibonacci_sphere(int(n_hair * 2.2))
    hp = _skull(dirs) * np.array([1.07, 1.05, 1.06]) + np.array([0, 0.004, -0.004])
    hairline = 0.06 + 0.01 * (np.abs(hp[:, 0]) / 0.05) ** 2
    x, y, z = hp[:, 0], hp[:, 1], hp[:, 2]
    sel = (y > hairline) | ((z < 0.015) & (y > -0.05)) | ((np.abs(x) > 0.062) & (y > 0.03) & (z < 0.05))
    sel &= ~((np.abs(np.abs(x) - 0.074) < 0.02) & (np.abs(y - 0.008) < 0.026) & (z > -0.03) & (y < 0.03))  # ears
    hp = hp[sel][:n_hair]
    hn = (hp - np.array([0, 0.012, 0])) / np.array([0.073, 0.1, 0.088]) ** 2
    hn /= np.linalg.norm(hn, axis=1, keepdims=True)
    hs = _splats(hp, hn, np.sqrt(0.13 / len(hp)) * 1.15, hair, "hair", rng=rng, jitter=0.12, aniso=(0.7, 1.6), thickness=0.35)
    add(hs)

    # --- eyes: sclera, iris, pupil; lids and lashes; brows ---------------------------------------------
    for name, c in EYES.items():
        m = int(420 * s)
        dirs = fibonacci_sphere(m * 2)
        dirs = dirs[dirs[:, 2] > -0.2][:m]
        ep = c + dirs * EYE_R
        ang = np.degrees(np.arccos(np.clip(dirs[:, 2], -1, 1)))
        is_pupil = ang < 11
        is_iris = (ang >= 11) & (ang < 27)
        gaze = np.zeros((k, len(ep), 3))
        rel = ep - c
        # Small-angle rotation of the eyeball: d/dtheta (R p) = omega x p.
        gaze[ch["gaze_x"]] = np.cross(np.array([0, 1.0, 0]), rel)
        gaze[ch["gaze_y"]] = np.cross(np.array([-1.0, 0, 0]), rel)
        iris_col = np.array(iris) * (0.75 + 0.5 * np.clip((ang - 11) / 16, 0, 1))[:, None]
        for part, mask, col in (("sclera", ~(is_pupil | is_iris), np.array([0.95, 0.93, 0.9])),
                                ("iris", is_iris, iris_col), ("pupil", is_pupil, np.array([0.03, 0.03, 0.04]))):
            colm = col[mask] if np.ndim(col) == 2 else col
            add(_splats(ep[mask] + dirs[mask] * 0.0004, dirs[mask], EYE_R * 0.22, colm, part, thickness=0.2), gaze[:, mask])
        # A highlight on the cornea makes the eye read as wet and alive.
        hl = c + np.array([[-0.004, 0.004, EYE_R + 0.0006]])
        add(Splats(hl.astype(np.float32), np.array([[1, 0, 0, 0]], np.float32), np.full((1, 3), 0.0011, np.float32),
                   np.array([0.9], np.float32), np.array([[1.0, 1.0, 1.0]], np.float32), np.array([PART_ID["iris"]], np.int16)),
            gaze[:, :1] * 0)
        # Upper lid: a curtain of skin over the eyeball; a blink slides it down over the opening.
        lx, ly, sp = _grid(c[0] - 0.017, c[0] + 0.017, c[1] + 0.006, c[1] + 0.024, int(480 * s))
        keep = ((lx - c[0]) / 0.018) ** 2 + ((ly - c[1] - 0.006) / 0.02) ** 2 < 1
        lx, ly = lx[keep], ly[keep]

        def lid_z(x, y, c=c):
            return c[2] + np.sqrt(np.clip((EYE_R + 0.0016) ** 2 - (x - c[0]) ** 2 - (y - c[1]) ** 2, 0, None)) + 0.0008

        lp = np.stack([lx, ly, lid_z(lx, ly)], 1)
        # Lid splats face the camera more than the eyeball's surface does: the rig moves means, not
        # orientations, so a surface-tangent splat slid down over the eye would be seen edge-on and
        # let the eye show through in stripes.
        ln = (lp - c) / EYE_R * 0.4 + np.array([0.0, 0.0, 1.0])
        ln /= np.linalg.norm(ln, axis=1, keepdims=True)
        drop = 0.0165
        blink = np.zeros((k, len(lp), 3))
        chan = ch["blink_l" if name == "l" else "blink_r"]
        blink[chan, :, 1] = -drop
        blink[chan, :, 2] = lid_z(lx, ly - drop) - lp[:, 2]
        blink[ch["smile"], :, 1] = -0.0015  # smiling eyes: lids lower a little
        blink[ch["brows_up"], :, 1] = 0.0015
        add(_splats(lp, ln, sp * 1.6, np.array(skin) * 0.95, "lid", opacity=0.99, thickness=0.45), blink)
        # Lashes along the lid's lower edge.
        ex = np.linspace(c[0] - 0.014, c[0] + 0.014, int(50 * s) + 2)
        ey = c[1] + 0.0065 - 0.0 * ex
        lashp = np.stack([ex, ey, lid_z(ex, ey) + 0.0005], 1)
        lb = np.zeros((k, len(lashp), 3))
        lb[chan, :, 1] = -drop
        lb[chan, :, 2] = lid_z(ex, ey - drop) - lashp[:, 2]
        lb[ch["smile"], :, 1] = -0.0015
        lb[ch["brows_up"], :, 1] = 0.0015
        add(_splats(lashp, np.tile([0, 0, 1.0], (len(lashp), 1)), 0.0013, np.array([0.05, 0.04, 0.04]), "lash",
                    aniso=(1.2, 0.5)), lb)
        # Lower lid line: a faint shadow under the eye.
        # Brow: an arc of dark elongated splats.
        sgn = np.sign(c[0])
        t = np.linspace(0, 1, int(170 * s))
        bx = sgn * (0.013 + 0.036 * t) + rng.normal(0, 0.0008, len(t))
        by = 0.049 + 0.006 * np.sin(np.pi * t ** 0.8) - 0.004 * t + rng.normal(0, 0.0012, len(t))
        bp = np.stack([bx, by, skull_z(bx, by) + 0.0015], 1)
        bd = np.zeros((k, len(bp), 3))
        bd[ch["brows_up"], :, 1] = 0.0065
        bd[ch["brows_down"], :, 1] = -0.0045 * (1.2 - t)
        bd[ch["brows_down"], :, 0] = -sgn * 0.002 * (1 - t)
        # Lowered brows ride over the brow ridge, which bulges forward: keep them above the skin.
        bd[ch["brows_down"], :, 2] = 0.0025 * (1.2 - t)
        bd[ch["frown"], :, 1] = 0.003 * (1 - t)  # sadness lifts the inner brow
        bd[ch["smile"], :, 1] = 0.001
        add(_splats(bp, np.tile([0, 0, 1.0], (len(bp), 1)), 0.0032, np.array(hair) * 0.8, "brow", aniso=(1.5, 0.6),
                    thickness=0.3, rng=rng, jitter=0.1), bd)

    # --- mouth: lips, interior, teeth, tongue ---------------------------------------------------
    lx, ly, sp = _grid(-0.027, 0.027, MOUTH_Y - 0.011, MOUTH_Y + 0.01, int(1000 * s))
    w = 0.026 * np.sqrt(np.clip(1 - (ly - MOUTH_Y) ** 2 / 0.012 ** 2, 0, 1))
    upper_h = 0.0085 - 0.0025 * np.exp(-(lx / 0.004) ** 2) + 0.0012 * np.exp(-((np.abs(lx) - 0.006) / 0.004) ** 2)
    lower_h = 0.0095
    ax = np.clip(np.abs(lx) / 0.026, 0, 1)
    in_upper = (ly >= MOUTH_Y) & (ly - MOUTH_Y < upper_h * np.sqrt(1 - ax ** 2))
    in_lower = (ly < MOUTH_Y) & (MOUTH_Y - ly < lower_h * np.sqrt(1 - ax ** 2))
    sel = (in_upper | in_lower) & (np.abs(lx) < w + 0.001)
    lx, ly = lx[sel], ly[sel]
    bulge = 0.0045 * (1 - (lx / 0.027) ** 2) * np.exp(-((ly - MOUTH_Y) / 0.01) ** 2)
    lp = np.stack([lx, ly, skull_z(lx, ly) + bulge + 0.001], 1)
    ln = np.stack([-lx * 2, (ly - MOUTH_Y) * 6 + 0.02, np.ones_like(lx)], 1)
    ln /= np.linalg.norm(ln, axis=1, keepdims=True)
    lip_col = np.where((ly < MOUTH_Y)[:, None], [0.74, 0.38, 0.38], [0.66, 0.33, 0.34])
    d = mouth_fields(lp, lips=True)
    # The upper lip does not follow the jaw; the lower lip does, fully.
    d[ch["jaw_open"]] = 0
    d[ch["jaw_open"], ly < MOUTH_Y, 1] = -0.017
    d[ch["jaw_open"], ly < MOUTH_Y, 2] = -0.004
    d[ch["jaw_open"], ly >= MOUTH_Y, 1] = 0.0015
    # f/v: the upper lip lifts off the upper teeth (its edge most) and the lower lip rolls up and back
    # until its top rests just over the teeth's edge: a band of upper teeth shows, resting on the lip.
    upper, lower = ly >= MOUTH_Y, ly < MOUTH_Y
    edge_up = 1 - np.clip((ly - MOUTH_Y) / 0.0085, 0, 1)
    top_low = 1 - np.clip((MOUTH_Y - ly) / lower_h, 0, 1)
    d[ch["lip_tuck"]] = 0
    d[ch["lip_tuck"], upper, 1] = 0.0006 + 0.0042 * edge_up[upper]
    d[ch["lip_tuck"], upper, 2] = 0.0008 * edge_up[upper]
    d[ch["lip_tuck"], lower, 1] = 0.0008 + 0.00155 * top_low[lower]
    d[ch["lip_tuck"], lower, 2] = -0.003 * top_low[lower]
    add(_splats(lp, ln, sp * 1.15, lip_col, "lip", rng=rng, jitter=0.04, thickness=0.3), d)

    mx, my, sp = _grid(-0.024, 0.024, MOUTH_Y - 0.026, MOUTH_Y + 0.006, int(340 * s))
    keep = ((mx / 0.024) ** 2 + ((my - MOUTH_Y + 0.01) / 0.017) ** 2) < 1
    mp = np.stack([mx[keep], my[keep], skull_z(mx[keep], my[keep]) - 0.009], 1)
    add(_splats(mp, np.tile([0, 0, 1.0], (len(mp), 1)), sp * 1.4, np.array([0.16, 0.05, 0.06]), "mouth", thickness=0.5),
        None)
    for upper in (True, False):
        tx, ty, sp = _grid(-0.0135, 0.0135, 0, 0.0045, int(160 * s))
        ty = (MOUTH_Y + 0.0005 + ty) if upper else (MOUTH_Y - 0.0005 - ty)
        tp = np.stack([tx, ty, skull_z(tx, ty) - 0.0025 - 0.03 * tx ** 2 / 0.0135], 1)
        td = np.zeros((k, len(tp), 3))
        if not upper:
            td[ch["jaw_open"], :, 1] = -0.014
            td[ch["jaw_open"], :, 2] = -0.003
        add(_splats(tp, np.tile([0, 0.2, 1.0], (len(tp), 1)) / 1.02, sp * 1.2, np.array([0.94, 0.92, 0.86]), "teeth",
                    thickness=0.3), td)
    gx, gy, sp = _grid(-0.014, 0.014, MOUTH_Y - 0.014, MOUTH_Y - 0.006, int(120 * s))
    gp = np.stack([gx, gy, skull_z(gx, gy) - 0.007], 1)
    gd = np.zeros((k, len(gp), 3))
    gd[ch["jaw_open"], :, 1] = -0.01
    add(_splats(gp, np.tile([0, 0.5, 1.0], (len(gp), 1)) / 1.12, sp * 1.4, np.array([0.62, 0.3, 0.3]), "tongue"), gd)

    # --- neck and shoulders ----------------------------------------------------------------------
    n_neck = int(1300 * s)
    th, ny_ = (a.ravel() for a in np.meshgrid(np.linspace(-np.pi, np.pi, 48, endpoint=False),
                                               np.linspace(-0.19, -0.055, max(4, n_neck // 48))))
    n_neck = th.size
    npnt = np.stack([0.043 * np.sin(th), ny_, -0.012 + 0.041 * np.cos(th)], 1)
    nn = np.stack([np.sin(th), np.zeros(n_neck), np.cos(th)], 1)
    shade = np.array(skin) * (0.82 + 0.18 * np.clip((ny_ + 0.2) / 0.1, 0, 1))[:, None]
    neck_w = np.clip((ny_ + 0.15) / 0.07, 0, 1)
    add(_splats(npnt, nn, np.sqrt(0.04 / n_neck) * 1.7, shade * np.array([0.93, 0.9, 0.9]), "neck"), None, neck_w)

    n_sh = int(2200 * s)
    dirs = fibonacci_sphere(n_sh * 2)
    dirs = dirs[dirs[:, 1] > -0.1][:n_sh]
    spnt = np.array([0.0, -0.215, -0.02]) + dirs * np.array([0.19, 0.07, 0.09])
    collar = np.exp(-((spnt[:, 0]) / 0.05) ** 2 - ((spnt[:, 1] + 0.17) / 0.015) ** 2) * (spnt[:, 2] > 0)
    sh_col = np.array(shirt) * (1 - 0.35 * collar)[:, None]
    add(_splats(spnt, dirs, np.sqrt(0.09 / n_sh) * 1.25, sh_col, "shirt", rng=rng, jitter=0.03), None, 0.0)

    splats = Splats.concat(parts)
    return Head(splats, np.concatenate(deltas, axis=1), np.concatenate(head_w))
