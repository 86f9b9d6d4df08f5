"""The reference Gaussian-splat renderer, in plain differentiable torch (CPU or GPU tensors).

The same maths as the numba rasteriser (`raster_cpu`) and gsplat's `rasterization()`: EWA projection
with gsplat's 0.3 px low-pass and 30 % frustum clamp, then front-to-back alpha compositing with
alpha clamped to 0.999, fragments below 1/255 skipped and pixels stopped below 1/255 transmittance.
It is the one place that maths exists outside the numba kernels: tests check the fast renderer
against it, and fitting (`fit.py`) differentiates through it.

Compositing runs over per-pixel lists of Gaussian ids, front to back (`-1` = none). `rasterize`
builds lists holding every Gaussian in depth order (exact, for small scenes); fitting passes the
first K contributors per pixel that the numba rasteriser records (`raster_cpu.contributors`).
"""

from __future__ import annotations

import numpy as np
import torch

from models.avatar.camera import Camera
from models.avatar.raster_cpu import ALPHA_MAX, ALPHA_MIN, EPS2D, T_MIN


def project(means: torch.Tensor, covs: torch.Tensor, cam: Camera, near: float = 0.01):
    """EWA projection: 2D means (N, 2), conics (N, 3: a, b, c of the inverse 2D covariance), radii
    (N,) in px (3 sigma of the larger eigenvalue; 0 = culled) and depths (N,). Differentiable in
    means and covs."""
    R = torch.as_tensor(cam.viewmat[:3, :3], dtype=means.dtype, device=means.device)
    t = torch.as_tensor(cam.viewmat[:3, 3], dtype=means.dtype, device=means.device)
    pc = means @ R.T + t
    x, y, zr = pc[:, 0], pc[:, 1], pc[:, 2]
    z = zr.clamp(min=1e-6)
    cov_c = R @ covs @ R.T
    w, h = cam.width, cam.height
    tx = (x / z).clamp(-(cam.cx + 0.3 * w) / cam.fx, (w - cam.cx + 0.3 * w) / cam.fx) * z
    ty = (y / z).clamp(-(cam.cy + 0.3 * h) / cam.fy, (h - cam.cy + 0.3 * h) / cam.fy) * z
    zero = torch.zeros_like(z)
    J = torch.stack([torch.stack([cam.fx / z, zero, -cam.fx * tx / (z * z)], -1),
                     torch.stack([zero, cam.fy / z, -cam.fy * ty / (z * z)], -1)], -2)  # (N, 2, 3)
    cov2 = J @ cov_c @ J.transpose(1, 2)
    a, b, c = cov2[:, 0, 0] + EPS2D, cov2[:, 0, 1], cov2[:, 1, 1] + EPS2D
    det = a * c - b * b
    ok = (det > 0) & (zr > near)
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), zero)
    conics = torch.stack([c * inv, -b * inv, a * inv], -1)
    mid = 0.5 * (a + c)
    lam = mid + torch.sqrt((mid * mid - det).clamp(min=0.1))
    radii = torch.where(ok, torch.ceil(3.0 * torch.sqrt(lam.detach())), zero.detach()).to(torch.int32)
    means2d = torch.stack([cam.fx * x / z + cam.cx, cam.fy * y / z + cam.cy], -1)
    return means2d, conics, radii, zr


def composite(means2d: torch.Tensor, conics: torch.Tensor, colors: torch.Tensor, opacities: torch.Tensor,
              ids: torch.Tensor, width: int, height: int, background=(0.0, 0.0, 0.0),
              radii: torch.Tensor | None = None) -> torch.Tensor:
    """Front-to-back compositing of each pixel's Gaussians (`ids`: (H*W, K) long, front to back, -1 =
    none) into an (H, W, 3) image. With `radii`, fragments outside a Gaussian's 3-sigma box are
    skipped, as the tiled rasteriser's bounding boxes do."""
    valid = ids >= 0
    g = ids.clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means2d.dtype, device=means2d.device) + 0.5,
                            torch.arange(width, dtype=means2d.dtype, device=means2d.device) + 0.5, indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)[:, None, :]  # (P, 1, 2)
    d = pix - means2d[g]
    con = conics[g]
    sigma = 0.5 * (con[..., 0] * d[..., 0] ** 2 + con[..., 2] * d[..., 1] ** 2) + con[..., 1] * d[..., 0] * d[..., 1]
    alpha = (opacities[g] * torch.exp(-sigma.clamp(min=0))).clamp(max=ALPHA_MAX)
    keep = valid & (sigma >= 0) & (alpha >= ALPHA_MIN)
    if radii is not None:
        r = radii[g].to(d.dtype)
        keep &= (d[..., 0].abs() <= r) & (d[..., 1].abs() <= r) & (r > 0)
    alpha = alpha * keep
    # A pixel stops once its transmittance falls below T_MIN: later fragments do not count.
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], dim=1), dim=1)
    live = (trans[:, :-1] >= T_MIN).detach()
    alpha = alpha * live
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], dim=1), dim=1)
    weight = alpha * trans[:, :-1]
    bg = torch.as_tensor(background, dtype=colors.dtype, device=colors.device)
    rgb = (weight[..., None] * colors[g]).sum(dim=1) + trans[:, -1:] * bg
    return rgb.reshape(height, width, 3)


def rasterize(means, covs, colors, opacities, cam: Camera, background=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Render world-space Gaussians exactly: every pixel composites every Gaussian in depth order.
    Memory grows with pixels x Gaussians, so this is for small scenes (tests, references)."""
    means, covs, colors, opacities = (torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v,
                                                      dtype=torch.float32) for v in (means, covs, colors, opacities))
    means2d, conics, radii, depths = project(means, covs, cam)
    order = torch.argsort(depths, stable=True)
    order = order[radii[order] > 0]
    ids = order[None, :].expand(cam.width * cam.height, -1)
    return composite(means2d, conics, colors, opacities, ids, cam.width, cam.height, background, radii=radii)
