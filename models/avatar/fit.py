"""Fit the stock head to a person: decode a photo or short video, find the face by matching it to the
stock head's render, then fit the Gaussians' colours and (second) small position offsets by
differentiable rendering, and report PSNR on held-back data.

Differentiable rendering here is the CPU rasteriser's maths in torch over fixed per-pixel lists: a
numba pass finds, front to back, the first K Gaussians that reach each pixel (as the rasteriser
composites them); torch then evaluates their EWA falloff, alpha and transmittance with gradients to
colours and means. The lists are rebuilt between phases, since offsets move Gaussians a little.
Held-back data: every 4th frame of a video; for a single photo, a checkerboard of 8x8-pixel blocks.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from models.avatar.camera import Camera, portrait_camera
from models.avatar.gaussians import Splats, covariances
from models.avatar.head import Head
from models.avatar.raster_cpu import ALPHA_MAX, ALPHA_MIN, T_MIN, project
from models.avatar.render import BACKGROUND, CPUAvatarRenderer, Pose

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp"}
VIDEO_TYPES = {"video/mp4", "video/webm", "video/quicktime"}
MAX_VIDEO_S = 60.0
MAX_FRAMES = 12
MIN_SIDE = 64


class MediaError(ValueError):
    """Uploaded media that cannot be used (the API answers 422 with this message)."""


# --- decoding ---------------------------------------------------------------------------------------------
def decode_media(data: bytes, content_type: str, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """RGB uint8 frames: the image, or up to `max_frames` frames spread over the video."""
    if content_type in IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise MediaError(f"not a readable image: {exc}") from exc
        frames = [np.asarray(img.convert("RGB"))]
    elif content_type in VIDEO_TYPES:
        frames = _decode_video(data, max_frames)
    else:
        raise MediaError(f"unsupported type {content_type}")
    if min(frames[0].shape[:2]) < MIN_SIDE:
        raise MediaError(f"image too small: {frames[0].shape[1]}x{frames[0].shape[0]} (at least {MIN_SIDE} px a side)")
    return frames


@contextmanager
def _open_video(data: bytes):
    """The upload's first video stream and its duration, after the checks every caller needs;
    FFmpeg errors inside the block (decoding included) become MediaError."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("the upload has no video stream")
            stream = container.streams.video[0]
            duration = (float(stream.duration * stream.time_base) if stream.duration
                        else (container.duration or 0) / 1e6)
            if duration > MAX_VIDEO_S:
                raise MediaError(f"video is {duration:.0f} s long; at most {MAX_VIDEO_S:.0f} s")
            yield container, stream, duration
    except av.error.FFmpegError as exc:
        raise MediaError(f"not a decodable video: {exc}") from exc


def probe_media(data: bytes, content_type: str) -> dict:
    """Cheap checks before a fit is queued: type, decodability, size, duration. Raises MediaError."""
    if content_type in IMAGE_TYPES:
        frame = decode_media(data, content_type)[0]
        return {"kind": "image", "width": int(frame.shape[1]), "height": int(frame.shape[0])}
    if content_type not in VIDEO_TYPES:
        raise MediaError(f"unsupported type {content_type}")
    with _open_video(data) as (container, stream, duration):
        first = next(container.decode(stream), None)
    if first is None:
        raise MediaError("the video has no frames")
    if min(first.width, first.height) < MIN_SIDE:
        raise MediaError(f"video too small: {first.width}x{first.height} (at least {MIN_SIDE} px a side)")
    return {"kind": "video", "width": first.width, "height": first.height, "duration_s": round(duration, 2)}


def _decode_video(data: bytes, max_frames: int) -> list[np.ndarray]:
    """Up to `max_frames` frames spread over the video. Only the chosen frames are converted to RGB,
    so a minute of HD video never sits in memory as arrays."""
    with _open_video(data) as (container, stream, duration):
        total = stream.frames or int(round(duration * float(stream.average_rate or 0)))
        wanted = (set(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int).tolist())
                  if total > 0 else None)  # unknown length: the first max_frames frames
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if wanted is None and len(frames) >= max_frames:
                break
            if wanted is None or i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise MediaError("the video has no frames")
    return frames


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


# --- per-pixel contributor lists ----------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _contributors(means2d, conics, opacities, radii, order, width, height, k_max, out):
    T = np.ones((height, width), dtype=np.float32)
    count = np.zeros((height, width), dtype=np.int32)
    for kk in range(order.shape[0]):
        g = order[kk]
        r = radii[g]
        if r <= 0:
            continue
        mx = means2d[g, 0]
        my = means2d[g, 1]
        ca = conics[g, 0]
        cb = conics[g, 1]
        cc = conics[g, 2]
        op = opacities[g]
        x0 = max(0, int(mx - r))
        x1 = min(width - 1, int(mx + r))
        y0 = max(0, int(my - r))
        y1 = min(height - 1, int(my + r))
        for py in range(y0, y1 + 1):
            dy = py + 0.5 - my
            for px in range(x0, x1 + 1):
                if count[py, px] >= k_max or T[py, px] < T_MIN:
                    continue
                dx = px + 0.5 - mx
                sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                if sigma < 0.0:
                    continue
                alpha = min(ALPHA_MAX, op * np.exp(-sigma))
                if alpha < ALPHA_MIN:
                    continue
                out[py, px, count[py, px]] = g
                count[py, px] += 1
                T[py, px] *= 1.0 - alpha
    return out


def contributor_lists(means: np.ndarray, covs: np.ndarray, opacities: np.ndarray, cam: Camera, k_max: int = 24):
    """(H, W, K) int32 Gaussian ids per pixel, front to back (-1 = none), and the projection used."""
    means2d, conics, radii, depths = project(means, covs, cam)
    order = np.argsort(depths, kind="stable").astype(np.int64)
    out = np.full((cam.height, cam.width, k_max), -1, dtype=np.int32)
    _contributors(means2d, conics, opacities.astype(np.float32), radii, order, cam.width, cam.height, k_max, out)
    return out, conics


# --- the fit ----------------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    head: Head
    psnr_before: float
    psnr_after: float
    frames_used: int
    frames_held_back: int
    align_scores: list[float] = field(default_factory=list)


def _render_torch(torch, ids, conics, means, colors, opacities, cam: Camera):
    """Differentiable render of the pixels' fixed contributor lists (ids: (P, K) long, -1 = none)."""
    valid = ids >= 0
    g = ids.clamp(min=0)
    R = torch.from_numpy(cam.viewmat[:3, :3].astype(np.float32))
    t = torch.from_numpy(cam.viewmat[:3, 3].astype(np.float32))
    pc = means @ R.T + t
    z = pc[:, 2].clamp(min=1e-6)
    mu = torch.stack([cam.fx * pc[:, 0] / z + cam.cx, cam.fy * pc[:, 1] / z + cam.cy], dim=1)
    h, w = cam.height, cam.width
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)[:, None, :]  # (P, 1, 2)
    d = pix - mu[g]
    con = conics[g]
    sigma = 0.5 * (con[..., 0] * d[..., 0] ** 2 + con[..., 2] * d[..., 1] ** 2) + con[..., 1] * d[..., 0] * d[..., 1]
    alpha = (opacities[g] * torch.exp(-sigma.clamp(min=0))).clamp(max=ALPHA_MAX) * valid
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha], dim=1), dim=1)
    weight = alpha * trans[:, :-1]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)
    rgb = (weight[..., None] * colors[g]).sum(dim=1) + trans[:, -1:] * bg
    return rgb.reshape(h, w, 3)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    err = (a - b) ** 2
    mse = float(err[mask].mean()) if mask is not None else float(err.mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def fit_head(head: Head, frames: list[np.ndarray], size: int = 96, color_steps: int = 60, offset_steps: int = 30,
             max_offset: float = 0.003) -> FitResult:
    """Fit `head`'s colours, then small position offsets, to the face in `frames` (RGB uint8)."""
    import torch

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
    base = torch.from_numpy(s.means.astype(np.float32))
    opac = torch.from_numpy(s.opacities.astype(np.float32))
    logit = torch.logit(torch.from_numpy(np.clip(s.colors, 0.02, 0.98).astype(np.float32)))
    logit.requires_grad_(True)
    offset = torch.zeros_like(base, requires_grad=True)

    def lists(means_np: np.ndarray):
        ids, conics = contributor_lists(means_np, covs, s.opacities, cam)
        return torch.from_numpy(ids.reshape(size * size, -1)).long(), torch.from_numpy(conics)

    def evaluate(colors: np.ndarray, means_np: np.ndarray) -> float:
        img = CPUAvatarRenderer(Head(Splats(means_np, s.quats, s.scales, s.opacities, colors, s.labels),
                                     head.deltas, head.head_weight), size, size).render(Pose())
        return float(np.mean([psnr(img.astype(np.float32) / 255, t, m) for t, m in held_pairs]))

    before = evaluate(s.colors, s.means)
    for phase, steps, params, lr in (("colour", color_steps, [logit], 0.08), ("offset", offset_steps, [offset], 3e-4)):
        ids, conics = lists((base + offset).detach().numpy())
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            img = _render_torch(torch, ids, conics, base + offset, torch.sigmoid(logit), opac, cam)
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
