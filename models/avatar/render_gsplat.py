"""GPU rendering: several sessions' heads posed in torch and rasterised in one gsplat
`rasterization()` call (batch dims: [B, N, ...] scenes, one camera each; heads padded to the same N
with zero-opacity Gaussians).

torch and gsplat are imported lazily: the CPU profile never needs them. The posing maths
(`pose_batch`) runs on any torch device and is tested on CPU against `PosedHead`; the rasterisation
needs CUDA (gsplat has no CPU kernels).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from models.avatar.camera import portrait_camera
from models.avatar.gaussians import covariances
from models.avatar.head import CHANNELS, PIVOT, Head
from models.avatar.raster_cpu import EPS2D
from models.avatar.render import BACKGROUND, Pose, euler_to_matrix

# The CPU rasteriser's maths in gsplat's terms (classic 3DGS, its 0.3 px low-pass), dense outputs.
RASTER_OPTIONS = {"packed": False, "rasterize_mode": "classic", "eps2d": EPS2D}


def rasterize_view(means, covs, colors, opacities, cam):
    """One view of one scene through gsplat's CUDA rasteriser, differentiable (the replica fit):
    (H, W, 3) with gradients to means and colours."""
    import torch
    from gsplat import rasterization

    dev = means.device
    img, _, _ = rasterization(
        means=means, quats=None, scales=None, covars=covs, opacities=opacities, colors=colors,
        viewmats=torch.as_tensor(cam.viewmat, dtype=torch.float32, device=dev)[None],
        Ks=torch.as_tensor(cam.K, dtype=torch.float32, device=dev)[None], width=cam.width, height=cam.height,
        backgrounds=torch.tensor(BACKGROUND, dtype=torch.float32, device=dev)[None], **RASTER_OPTIONS)
    return img[0]


class GsplatBatchRenderer:
    """Holds the heads on the device; `render_batch([(head_key, pose), ...])` -> uint8 RGB frames."""

    def __init__(self, heads: dict[str, Head], width: int, height: int, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.width, self.height = width, height
        self._lock = threading.Lock()  # add_head (event loop) vs render_batch (batcher thread)
        self._staging: dict[tuple[int, ...], object] = {}  # pinned host buffers by batch shape
        self._stack(heads)
        self.pivot = torch.from_numpy(PIVOT.astype(np.float32)).to(self.device)
        cam = portrait_camera(width, height)
        self.viewmat = torch.from_numpy(cam.viewmat).to(self.device)
        self.K = torch.from_numpy(cam.K).to(self.device)
        self.background = torch.tensor(BACKGROUND, dtype=torch.float32, device=self.device)

    def _stack(self, heads: dict[str, Head]) -> None:
        """Puts the heads on the device, padded to one N with zero-opacity Gaussians."""
        torch = self.torch
        self.keys = list(heads)
        n = max(len(h) for h in heads.values())
        k = len(CHANNELS)

        def pad(a: np.ndarray, value: float = 0.0) -> np.ndarray:
            out = np.full((n,) + a.shape[1:], value, dtype=np.float32)
            out[: a.shape[0]] = a
            return out

        stack = lambda arrays: torch.from_numpy(np.stack(arrays)).to(self.device)  # noqa: E731
        hs = [heads[key] for key in self.keys]
        self.base = stack([pad(h.splats.means) for h in hs])                                 # [H, N, 3]
        self.deltas = stack([np.concatenate([h.deltas, np.zeros((k, n - len(h), 3), np.float32)], axis=1)
                             .reshape(k, n * 3) for h in hs])                                  # [H, K, N*3]
        self.covs = stack([pad(covariances(h.splats.quats, h.splats.scales)) for h in hs])   # [H, N, 3, 3]
        self.head_weight = stack([pad(h.head_weight) for h in hs])                           # [H, N]
        self.colors = stack([pad(h.splats.colors) for h in hs])                              # [H, N, 3]
        self.opacities = stack([pad(h.splats.opacities) for h in hs])                        # [H, N] (padding 0)
        self.heads = dict(heads)

    def add_head(self, key: str, head: Head) -> None:
        """Adds a replica's head (re-stacks all heads; a handful of MB on the device)."""
        with self._lock:
            self._stack({**self.heads, key: head})

    def pose_batch(self, requests: Sequence[tuple[str, Pose]]):
        """World means [B, N, 3] and covariances [B, N, 3, 3] for B (head, pose) requests: the linear
        rig (means = base + w @ deltas), then the rigid head rotation blended by head_weight."""
        torch = self.torch
        idx = torch.tensor([self.keys.index(h) for h, _ in requests], device=self.device)
        w = torch.from_numpy(np.stack([p.weights.astype(np.float32) for _, p in requests])).to(self.device)
        R = torch.from_numpy(np.stack([euler_to_matrix(p.yaw, p.pitch, p.roll) for _, p in requests])).to(self.device)
        base = self.base[idx]
        means = base + torch.bmm(w[:, None, :], self.deltas[idx]).view_as(base)
        rotated = torch.einsum("bij,bnj->bni", R, means - self.pivot) + self.pivot
        hw = self.head_weight[idx][..., None]
        means = means + hw * (rotated - means)
        covs = self.covs[idx]
        rot_covs = R[:, None] @ covs @ R[:, None].transpose(-1, -2)
        rigid = (self.head_weight[idx] > 0.5)[..., None, None]
        covs = torch.where(rigid, rot_covs, covs)
        return means, covs, idx

    def rasterization_inputs(self, requests: Sequence[tuple[str, Pose]]) -> dict:
        """The keyword arguments of one batched gsplat.rasterization() call."""
        torch = self.torch
        means, covs, idx = self.pose_batch(requests)
        b, n = means.shape[:2]
        return dict(
            means=means, covars=covs,
            quats=torch.zeros((b, n, 4), device=self.device), scales=torch.zeros((b, n, 3), device=self.device),
            opacities=self.opacities[idx], colors=self.colors[idx],
            viewmats=self.viewmat.expand(b, 1, 4, 4).contiguous(), Ks=self.K.expand(b, 1, 3, 3).contiguous(),
            width=self.width, height=self.height, backgrounds=self.background.expand(b, 1, 3).contiguous(),
            **RASTER_OPTIONS,
        )

    def render_batch_device(self, requests: Sequence[tuple[str, Pose]]):
        """The frames as one uint8 tensor [B, H, W, 3] on the device (no copy to the host)."""
        from gsplat import rasterization  # CUDA kernels, compiled by gsplat on first use

        torch = self.torch
        with torch.no_grad(), self._lock:
            colors, _, _ = rasterization(**self.rasterization_inputs(requests))  # [B, 1, H, W, 3]
            return (colors[:, 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8)

    def render_batch(self, requests: Sequence[tuple[str, Pose]]) -> list[np.ndarray]:
        """The frames on the host, each its own array (sessions encode them after the next batch ran)."""
        return self.to_host(self.render_batch_device(requests))

    def to_host(self, frames) -> list[np.ndarray]:
        """Device frames -> host arrays through a reused pinned buffer: a fresh pageable tensor per batch
        copied ~4x slower on an H200 up to ~50 MB a batch (benchmarks/results/render_gpu.json,
        copy_pageable_ms)."""
        torch = self.torch
        if frames.device.type != "cuda":
            return list(frames.numpy())
        shape = tuple(frames.shape)
        staging = self._staging.get(shape)
        if staging is None:
            staging = self._staging[shape] = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        staging.copy_(frames)
        host = staging.numpy()
        return [host[i].copy() for i in range(shape[0])]
