"""Fit the stock head to a person: decode a photo or short video, find the face by matching it to the
stock head's render, then fit the Gaussians' colours and (second) small position offsets by
differentiable rendering, and report PSNR on held-back data.

Differentiable rendering is the torch reference renderer (`raster_torch`) over fixed per-pixel
lists: the numba rasteriser records, front to back, the first K Gaussians that reach each pixel;
torch then projects and composites them with gradients to colours and means. The lists are rebuilt
between phases, since offsets move Gaussians a little.
Held-back data: every 4th frame of a video; for a single photo, a checkerboard of 8x8-pixel blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.avatar.camera import portrait_camera
from models.avatar.gaussians import Splats, covariances
from models.avatar.head import Head
from models.avatar.raster_cpu import contributors
from models.avatar.render import BACKGROUND, CPUAvatarRenderer, Pose


# --- alignment --------------------------------------------------------------------------------------------
def _gray(img: np.ndarray) -> np.ndarray:
    return img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    src = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))  # mode "F"
    return np.asarray(src.resize((size, size), Image.BILINEAR), dtype=np.float32)


def align_face(frame: np.ndarray, template: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The square crop of `frame` that best matches the stock head's render (normalised
    cross-correlation of luminance over the head's pixels), resized to `size`; and its score."""
    h, w = frame.shape[:2]
    scale = 192.0 / max(h, w)
    small = _resize_rect(frame, max(1, round(w * scale)), max(1, round(h * scale))) if scale < 1 else frame
    sh, sw = small.shape[:2]
    gray = _gray(small)
    q = 32
    tmpl = _resize(_gray(template), q)
    m = _resize(mask.astype(np.float32) * 255, q) > 127
    t = tmpl[m] - tmpl[m].mean()
    t /= np.linalg.norm(t) + 1e-6
    def score(y: int, x: int, side: int) -> float:
        if side < 16 or y < 0 or x < 0 or y + side > sh or x + side > sw:
            return -2.0
        c = _resize(gray[y:y + side, x:x + side], q)[m]
        c = c - c.mean()
        return float(c @ t) / (np.linalg.norm(c) + 1e-6)

    # A coarse grid over sizes and positions, then local refinement with halving steps.
    candidates = [(int(y), int(x), int(min(sh, sw) * frac)) for frac in np.linspace(0.35, 1.0, 9)
                  for y in np.linspace(0, sh - int(min(sh, sw) * frac), 9)
                  for x in np.linspace(0, sw - int(min(sh, sw) * frac), 9)]
    best, best_box = max((score(*b), b) for b in candidates)
    step = max(2, int(min(sh, sw) / 16))
    while step >= 1:
        y0, x0, s0 = best_box
        improved = False
        for dy, dx, ds in ((-step, 0, 0), (step, 0, 0), (0, -step, 0), (0, step, 0), (0, 0, -step), (0, 0, step),
                           (-step, -step, 2 * step), (step, step, -2 * step)):
            cand = (y0 + dy, x0 + dx, s0 + ds)
            sc = score(*cand)
            if sc > best:
                best, best_box, improved = sc, cand, True
        if not improved:
            step //= 2
    y, x, side = (int(round(v / scale)) if scale < 1 else v for v in best_box)
    crop = frame[y:y + side, x:x + side]
    return _resize_rgb(crop, size), best


def _resize_rect(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


# --- the fit ----------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    head: Head
    psnr_before: float
    psnr_after: float
    frames_used: int
    frames_held_back: int
    align_scores: list[float] = field(default_factory=list)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    err = (a - b) ** 2
    mse = float(err[mask].mean()) if mask is not None else float(err.mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def fit_head(head: Head, frames: list[np.ndarray], size: int = 96, color_steps: int = 60, offset_steps: int = 30,
             max_offset: float = 0.003) -> FitResult:
    """Fit `head`'s colours, then small position offsets, to the face in `frames` (RGB uint8)."""
    import torch

    from models.avatar import raster_torch

    torch.set_num_threads(1)
    cam = portrait_camera(size, size)
    s = head.splats
    stock = CPUAvatarRenderer(head, size, size).render(Pose())
    mask = np.abs(stock.astype(np.float32) / 255 - np.array(BACKGROUND, np.float32)).sum(axis=2) > 0.02
    crops, scores = [], []
    for f in frames:
        crop, score = align_face(f, stock, mask, size)
        crops.append(crop)
        scores.append(score)
    if len(crops) > 1:  # a video: hold back every 4th frame (at least one)
        held = [i for i in range(len(crops)) if i % 4 == 3] or [len(crops) - 1]
        train_idx = [i for i in range(len(crops)) if i not in held]
        train_masks = [mask] * len(train_idx)
        held_pairs = [(crops[i], mask) for i in held]
    else:  # one photo: fit on a checkerboard of 8x8 blocks, measure on the other blocks
        yy, xx = np.mgrid[:size, :size]
        board = ((yy // 8 + xx // 8) % 2 == 0)
        train_idx, train_masks = [0], [mask & board]
        held_pairs = [(crops[0], mask & ~board)]
    targets = [torch.from_numpy(crops[i]) for i in train_idx]
    tmask = [torch.from_numpy(m) for m in train_masks]

    covs = covariances(s.quats, s.scales).astype(np.float32)
    covs_t = torch.from_numpy(covs)
    base = torch.from_numpy(s.means.astype(np.float32))
    opac = torch.from_numpy(s.opacities.astype(np.float32))
    logit = torch.logit(torch.from_numpy(np.clip(s.colors, 0.02, 0.98).astype(np.float32)))
    logit.requires_grad_(True)
    offset = torch.zeros_like(base, requires_grad=True)

    def lists(means_np: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(contributors(means_np, covs, s.opacities, cam).reshape(size * size, -1)).long()

    def render(means: torch.Tensor, colors: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        means2d, conics, _, _ = raster_torch.project(means, covs_t, cam)
        return raster_torch.composite(means2d, conics, colors, opac, ids, size, size, BACKGROUND)

    def evaluate(colors: np.ndarray, means_np: np.ndarray) -> float:
        img = CPUAvatarRenderer(Head(Splats(means_np, s.quats, s.scales, s.opacities, colors, s.labels),
                                     head.deltas, head.head_weight), size, size).render(Pose())
        return float(np.mean([psnr(img.astype(np.float32) / 255, t, m) for t, m in held_pairs]))

    before = evaluate(s.colors, s.means)
    for phase, steps, params, lr in (("colour", color_steps, [logit], 0.08), ("offset", offset_steps, [offset], 3e-4)):
        ids = lists((base + offset).detach().numpy())
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            img = render(base + offset, torch.sigmoid(logit), ids)
            loss = sum(((img - t) ** 2)[m].mean() for t, m in zip(targets, tmask, strict=True)) / len(targets)
            if phase == "offset":
                loss = loss + 10.0 * (offset ** 2).sum() / len(offset)  # stay near the rig's shape
            loss.backward()
            opt.step()
            if phase == "offset":
                with torch.no_grad():
                    offset.clamp_(-max_offset, max_offset)
    colors = torch.sigmoid(logit).detach().numpy().astype(np.float32)
    means = (base + offset).detach().numpy().astype(np.float32)
    after = evaluate(colors, means)
    if after < before:  # a fit that does not help the held-back data is not kept
        colors, means, after = s.colors, s.means, before
    fitted = Head(Splats(means, s.quats.copy(), s.scales.copy(), s.opacities.copy(), colors, s.labels.copy()),
                  head.deltas.copy(), head.head_weight.copy())
    return FitResult(fitted, before, after, len(train_idx), len(held_pairs), scores)
