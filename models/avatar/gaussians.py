"""Gaussian splat scenes: the arrays a 3DGS renderer takes, and helpers to build them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Splats:
    """N 3D Gaussians. quats are (w, x, y, z); colours are linear RGB in [0, 1] (SH degree 0)."""

    means: np.ndarray  # (N, 3) float32
    quats: np.ndarray  # (N, 4)
    scales: np.ndarray  # (N, 3)
    opacities: np.ndarray  # (N,)
    colors: np.ndarray  # (N, 3)
    labels: np.ndarray = field(default=None)  # (N,) int16: which part each Gaussian belongs to

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @staticmethod
    def concat(parts: list[Splats]) -> Splats:
        return Splats(*(np.concatenate([getattr(p, f) for p in parts]).astype(np.float32 if f != "labels" else np.int16)
                        for f in ("means", "quats", "scales", "opacities", "colors", "labels")))


def quat_from_normal(normals: np.ndarray) -> np.ndarray:
    """Quaternions (w, x, y, z) rotating +z onto each unit normal (flat splats lie on the surface)."""
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(np.broadcast_to(z, n.shape), n)
    w = 1.0 + n @ z
    q = np.concatenate([w[:, None], axis], axis=1)
    flip = w < 1e-6  # normal is -z: rotate 180 degrees about x
    q[flip] = [0.0, 1.0, 0.0, 0.0]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def quat_to_rotmat(q: np.ndarray) -> np.ndarray:
    """(N, 4) wxyz -> (N, 3, 3)."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=-1).reshape(q.shape[:-1] + (3, 3))


FLAT_RATIO = 0.35  # thinnest axis under this fraction of the widest: a surfel, with a normal
BACKFACE_COS = -0.35  # a surfel this far turned away from the eye is behind the surface: not drawn


def surfel_normals(quats: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(N, 3) unit normals of flat Gaussians (their thinnest axis), zeros for the others."""
    axis = np.argmin(scales, axis=1)
    normal = np.take_along_axis(quat_to_rotmat(quats), axis[:, None, None].repeat(3, 1), 2)[..., 0]
    flat = scales.min(1) < FLAT_RATIO * scales.max(1)
    return np.where(flat[:, None], normal, 0.0).astype(np.float32)


def covariances(quats: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """World-space covariances R S S^T R^T, (N, 3, 3)."""
    rs = quat_to_rotmat(quats) * scales[:, None, :]
    return np.einsum("nij,nkj->nik", rs, rs)


def fibonacci_sphere(n: int) -> np.ndarray:
    """n near-uniform unit vectors."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.sin(phi) * np.cos(theta), np.cos(phi), np.sin(phi) * np.sin(theta)], axis=1)
