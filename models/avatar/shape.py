"""Shape the stock head to a person's face from the 478-point face mesh.

The mesh is found on the photo and on a frontal render of the stock head (the project's own
`models.perception.face.FaceAnalyzer`). A similarity transform puts the photo into the head's
framing; a smoothed thin-plate spline then maps the stock head's landmarks onto the person's in
the image plane. Every Gaussian that follows the head is moved by that map at its own depth, its
covariance by the map's local Jacobian and its rig deltas through the map, so the rig still drives
the reshaped face.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.avatar.camera import Camera
from models.avatar.gaussians import Splats, covariances, surfel_normals
from models.avatar.head import Head

MESH_POINTS = 468  # the face mesh proper; 468..477 are the irises
IRIS_CENTRES = (468, 473)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) rotation + uniform scale + translation that best maps 2D points `src` onto `dst`
    (least squares, Umeyama)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sv, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, d]) @ vt
    scale = (sv[0] + d * sv[1]) / (a ** 2).sum(1).mean()
    m = scale * rot
    return np.concatenate([m, (mu_d - m @ mu_s)[:, None]], 1)


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def inter_ocular(landmarks: np.ndarray) -> float:
    """Distance between the iris centres, the unit landmark errors are given in."""
    return float(np.linalg.norm(landmarks[IRIS_CENTRES[0], :2] - landmarks[IRIS_CENTRES[1], :2]))


@dataclass
class ThinPlate:
    """A 2D thin-plate spline: affine part plus radial terms r^2 log r around `centres`."""

    centres: np.ndarray  # (M, 2)
    weights: np.ndarray  # (M, 2)
    affine: np.ndarray  # (3, 2): [1, x, y] -> (x', y')

    @staticmethod
    def fit(src: np.ndarray, dst: np.ndarray, smoothing: float) -> ThinPlate:
        """The spline taking `src` near `dst`; `smoothing` (in the kernel's units, px^2) trades
        exactness at the points for a smoother field (landmarks carry detector noise)."""
        src = src.astype(np.float64)
        m = len(src)
        k = _kernel(src, src) + smoothing * np.eye(m)
        p = np.concatenate([np.ones((m, 1)), src], 1)
        a = np.zeros((m + 3, m + 3))
        a[:m, :m], a[:m, m:], a[m:, :m] = k, p, p.T
        rhs = np.zeros((m + 3, 2))
        rhs[:m] = dst
        sol = np.linalg.solve(a, rhs)
        return ThinPlate(src, sol[:m], sol[m:])

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64)
        out = np.concatenate([np.ones((len(pts), 1)), pts], 1) @ self.affine
        for start in range(0, len(pts), 8192):  # bounded memory: (chunk, M) kernel blocks
            sl = slice(start, start + 8192)
            out[sl] += _kernel(pts[sl], self.centres) @ self.weights
        return out


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return 0.5 * r2 * np.log(np.maximum(r2, 1e-12))


def image_warp(cam: Camera, warp: ThinPlate):
    """The world-space map f(points, weights) that moves each point across the camera's image plane
    by `warp` (pixels in, pixels out) at its own depth, by its weight of the way (0: stays)."""
    R = cam.viewmat[:3, :3].astype(np.float64)
    t = cam.viewmat[:3, 3].astype(np.float64)

    def f(p: np.ndarray, weight: np.ndarray) -> np.ndarray:
        uv, z = cam.project(p.astype(np.float64))
        moved = uv + weight[:, None] * (warp(uv) - uv)
        out = np.stack([(moved[:, 0] - cam.cx) * z / cam.fx, (moved[:, 1] - cam.cy) * z / cam.fy, z], 1)
        return (out - t) @ R

    return f


def rotmat_to_quat(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) proper rotations -> (N, 4) wxyz quaternions."""
    w = np.sqrt(np.clip(1 + m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2], 0, None)) / 2
    x = np.sqrt(np.clip(1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], 0, None)) / 2
    y = np.sqrt(np.clip(1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 0, None)) / 2
    z = np.sqrt(np.clip(1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2], 0, None)) / 2
    x = np.copysign(x, m[:, 2, 1] - m[:, 1, 2])
    y = np.copysign(y, m[:, 0, 2] - m[:, 2, 0])
    z = np.copysign(z, m[:, 1, 0] - m[:, 0, 1])
    q = np.stack([w, x, y, z], 1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def scales_and_quats(covs: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (N, 3, 3) covariances into per-axis scales and rotations (wxyz). The thinnest axis keeps
    the side `normals` point to: a surfel's front is what the renderers' back-face test reads."""
    vals, vecs = np.linalg.eigh(covs)  # ascending: column 0 is the thinnest axis
    flip = np.einsum("ni,ni->n", vecs[:, :, 0], normals) < 0
    vecs[flip, :, 0] *= -1
    vecs[np.linalg.det(vecs) < 0, :, 2] *= -1  # a proper rotation
    return np.sqrt(np.clip(vals, 1e-14, None)), rotmat_to_quat(vecs)


def warp_head(head: Head, f, eps: float = 5e-4) -> Head:
    """`head` with every Gaussian moved by the world-space map `f` (see `image_warp`), each by its head
    weight: means f(p), covariances J C J^T with J the map's Jacobian at p, rig deltas f(p + d) - f(p)."""
    s = head.splats
    p = s.means.astype(np.float64)
    w = np.clip(head.head_weight, 0, 1).astype(np.float64)
    moved = f(p, w)
    jac = np.stack([(f(p + eps * e, w) - f(p - eps * e, w)) / (2 * eps) for e in np.eye(3)], 2)  # (N, 3, 3)
    covs = jac @ covariances(s.quats, s.scales).astype(np.float64) @ jac.transpose(0, 2, 1)
    normals = np.einsum("nji,nj->ni", np.linalg.inv(jac), surfel_normals(s.quats, s.scales))  # J^-T n
    scales, quats = scales_and_quats(covs, normals)
    deltas = np.zeros(head.deltas.shape, np.float64)
    for c, d in enumerate(head.deltas.astype(np.float64)):
        rows = np.flatnonzero(np.any(d != 0, axis=1))  # most channels move a few parts only
        if len(rows):
            deltas[c, rows] = f(p[rows] + d[rows], w[rows]) - moved[rows]
    splats = Splats(moved.astype(np.float32), quats.astype(np.float32), scales.astype(np.float32),
                    s.opacities.copy(), s.colors.copy(), s.labels.copy())
    return Head(splats, deltas.astype(np.float32), head.head_weight.copy())


def shape_to_landmarks(head: Head, cam: Camera, stock: np.ndarray, person: np.ndarray,
                       smoothing: float | None = None) -> Head:
    """Reshape `head` so that its frontal render through `cam` puts the face mesh's landmarks where
    `person`'s are. `stock` are the landmarks found on the head's own render through `cam`, `person`
    the person's, already in that render's pixels (after `similarity`). Gaussians move with their
    head weight, so the neck blends into the shoulders, which stay."""
    src, dst = stock[:MESH_POINTS, :2], person[:MESH_POINTS, :2]
    if smoothing is None:
        smoothing = 0.5 * inter_ocular(stock) ** 2 / MESH_POINTS
    warp = ThinPlate.fit(src, dst, smoothing)
    return warp_head(head, image_warp(cam, warp))
