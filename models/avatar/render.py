"""Pose the rigged head for one frame and render it (CPU rasteriser; gsplat on CUDA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.avatar.camera import Camera, portrait_camera
from models.avatar.gaussians import BACKFACE_COS, covariances, surfel_normals
from models.avatar.head import CHANNELS, PIVOT, Head
from models.avatar.raster_cpu import rasterize

BACKGROUND = (0.86, 0.88, 0.9)


@dataclass
class Pose:
    """Everything that changes per frame: rig weights and rigid head rotation (radians)."""

    weights: np.ndarray = field(default_factory=lambda: np.zeros(len(CHANNELS), np.float32))
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    def set(self, **w: float) -> Pose:
        for name, value in w.items():
            self.weights[CHANNELS.index(name)] = value
        return self


def euler_to_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return (ry @ rx @ rz).astype(np.float32)


class PosedHead:
    """Applies the linear rig and head pose: world-space means and covariances for a frame."""

    def __init__(self, head: Head) -> None:
        self.head = head
        n = len(head)
        self._deltas = head.deltas.reshape(len(CHANNELS), n * 3)
        self._base = head.splats.means.astype(np.float32)
        self._covs = covariances(head.splats.quats, head.splats.scales).astype(np.float32)
        self._rigid = head.head_weight > 0.5
        self._hw = head.head_weight[:, None].astype(np.float32)

    def __call__(self, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        means, R = self.means(pose)
        if R is None:
            return means, self._covs
        covs = self._covs.copy()
        covs[self._rigid] = R @ self._covs[self._rigid] @ R.T
        return means, covs

    def means(self, pose: Pose) -> tuple[np.ndarray, np.ndarray | None]:
        """Posed means, and the head rotation still to apply to the rigid Gaussians' covariances
        (None when the head is not turned). The renderer hands both to the projection kernel,
        which rotates covariances on the fly instead of copying all of them."""
        means = self._base + (pose.weights.astype(np.float32) @ self._deltas).reshape(-1, 3)
        if pose.yaw == 0.0 and pose.pitch == 0.0 and pose.roll == 0.0:
            return means, None
        R = euler_to_matrix(pose.yaw, pose.pitch, pose.roll)
        rotated = (means - PIVOT) @ R.T + PIVOT
        means += self._hw * (rotated - means)
        return means, R


class AvatarRenderer(Protocol):
    """What a session renders with: CPUAvatarRenderer, or BatchedRenderer on a shared gsplat batch."""

    def render(self, pose: Pose) -> np.ndarray: ...


class CPUAvatarRenderer:
    """Renders one head at a fixed resolution on the CPU; returns uint8 RGB frames."""

    def __init__(self, head: Head, width: int = 256, height: int = 256) -> None:
        self.posed = PosedHead(head)
        self.camera: Camera = portrait_camera(width, height)
        s = head.splats
        self._colors = s.colors.astype(np.float32)
        self._opac = s.opacities.astype(np.float32)
        self._buf = np.empty((height, width, 3), np.float32)
        self._normals = surfel_normals(s.quats, s.scales)
        self._eye = self.camera.position

    def hidden(self, means: np.ndarray, R: np.ndarray | None) -> np.ndarray:
        """Surfels facing away from the camera (the back of the head, behind the face): the browser's
        renderer skips the same ones. The rig moves means, not orientations; the head pose turns both."""
        n = self._normals
        if R is not None:
            n = np.where(self.posed._rigid[:, None], n @ R.T, n)
        to_eye = self._eye - means
        cos = np.einsum("ij,ij->i", n, to_eye) / np.linalg.norm(to_eye, axis=1)
        return cos < BACKFACE_COS

    def render(self, pose: Pose) -> np.ndarray:
        means, R = self.posed.means(pose)
        img = rasterize(means, self.posed._covs, self._colors, self._opac, self.camera, BACKGROUND, out=self._buf,
                        pose_R=R, rigid=self.posed._rigid if R is not None else None, hidden=self.hidden(means, R))
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
