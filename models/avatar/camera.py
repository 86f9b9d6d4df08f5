"""Pinhole cameras in the OpenCV convention gsplat uses (x right, y down, z forward)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Camera:
    viewmat: np.ndarray  # (4, 4) world -> camera
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @property
    def position(self) -> np.ndarray:
        """Where the camera is, in world coordinates."""
        return (-self.viewmat[:3, :3].T @ self.viewmat[:3, 3]).astype(np.float32)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (N, 3) -> their pixel positions (N, 2) and depths (N,), pinhole (no clamping)."""
        pc = points @ self.viewmat[:3, :3].T + self.viewmat[:3, 3]
        z = pc[:, 2]
        return np.stack([self.fx * pc[:, 0] / z + self.cx, self.fy * pc[:, 1] / z + self.cy], 1), z

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float32)


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """World->camera matrix for a camera at `eye` looking at `target` (OpenCV axes)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    f = target - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    d = np.cross(f, r)  # camera y points down
    R = np.stack([r, d, f])
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M.astype(np.float32)


def portrait_camera(width: int, height: int, distance: float = 0.55, fov_y_deg: float = 30.0,
                    target=(0.0, -0.025, 0.0)) -> Camera:
    """The conversation framing: head and shoulders, slightly above the chin."""
    fy = 0.5 * height / np.tan(np.radians(fov_y_deg) / 2)
    eye = np.array([0.0, target[1] + 0.01, distance])
    return Camera(look_at(eye, np.array(target)), fy, fy, width / 2, height / 2, width, height)
