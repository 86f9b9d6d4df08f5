"""CPU Gaussian-splat rasteriser: the maths of gsplat's rasterization() (EWA projection, tiles,
depth order, front-to-back alpha compositing) in numba. `raster_torch` is the same maths in plain,
differentiable torch: the reference the tests hold this one to, and what fitting differentiates.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from models.avatar.camera import Camera

EPS2D = 0.3  # low-pass added to each 2D covariance, as gsplat does (antialiased=False)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1.0 / 255.0  # what is left behind a pixel this opaque cannot change its 8-bit value by more than 1
TILE = 16
# exp(-sigma) from a table: the scalar exp was 40 % of compositing, and 8-bit output needs no more
# than this (linear interpolation is not needed: the nearest of 2048 steps per unit is within 0.05 %).
EXP_SCALE = 2048.0
EXP_TABLE = np.exp(-(np.arange(int(8 * EXP_SCALE) + 2) + 0.5) / EXP_SCALE).astype(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _sandwich(R, A, tmp, out):
    """out = R A R^T for 3x3 matrices (out may be A: A is only read into tmp first)."""
    for i in range(3):
        for j in range(3):
            acc = 0.0
            for k in range(3):
                acc += R[i, k] * A[k, j]
            tmp[i, j] = acc
    for i in range(3):
        for j in range(3):
            acc = 0.0
            for k in range(3):
                acc += tmp[i, k] * R[j, k]
            out[i, j] = acc


@njit(cache=True, nogil=True)
def _project_kernel(means, covs, pose_R, rigid, vR, vt, fx, fy, cx, cy, width, height, near,
                    means2d, conics, radii, depths):
    """Per Gaussian: optionally rotate its covariance by the head pose (rigid), then the EWA
    projection (raster_torch.project). One pass, no temporaries (the numpy version allocates ~10)."""
    lim_x0 = -(cx + 0.3 * width) / fx
    lim_x1 = (width - cx + 0.3 * width) / fx
    lim_y0 = -(cy + 0.3 * height) / fy
    lim_y1 = (height - cy + 0.3 * height) / fy
    C = np.empty((3, 3), dtype=np.float32)
    M = np.empty((3, 3), dtype=np.float32)
    for n in range(means.shape[0]):
        # world covariance (rigidly rotated with the head where it follows the head)
        if rigid[n]:
            _sandwich(pose_R, covs[n], M, C)
        else:
            for i in range(3):
                for j in range(3):
                    C[i, j] = covs[n, i, j]
        # camera space
        x = vR[0, 0] * means[n, 0] + vR[0, 1] * means[n, 1] + vR[0, 2] * means[n, 2] + vt[0]
        y = vR[1, 0] * means[n, 0] + vR[1, 1] * means[n, 1] + vR[1, 2] * means[n, 2] + vt[1]
        zr = vR[2, 0] * means[n, 0] + vR[2, 1] * means[n, 1] + vR[2, 2] * means[n, 2] + vt[2]
        z = max(zr, 1e-6)
        _sandwich(vR, C, M, C)
        tx = min(max(x / z, lim_x0), lim_x1) * z
        ty = min(max(y / z, lim_y0), lim_y1) * z
        j00 = fx / z
        j02 = -fx * tx / (z * z)
        j11 = fy / z
        j12 = -fy * ty / (z * z)
        # cov2 = J C J^T with J = [[j00, 0, j02], [0, j11, j12]]
        a = j00 * (j00 * C[0, 0] + j02 * C[2, 0]) + j02 * (j00 * C[0, 2] + j02 * C[2, 2]) + EPS2D
        b = j00 * (j11 * C[0, 1] + j12 * C[0, 2]) + j02 * (j11 * C[2, 1] + j12 * C[2, 2])
        c = j11 * (j11 * C[1, 1] + j12 * C[2, 1]) + j12 * (j11 * C[1, 2] + j12 * C[2, 2]) + EPS2D
        det = a * c - b * b
        depths[n] = zr
        means2d[n, 0] = fx * x / z + cx
        means2d[n, 1] = fy * y / z + cy
        if det > 0 and zr > near:
            inv = 1.0 / det
            conics[n, 0] = c * inv
            conics[n, 1] = -b * inv
            conics[n, 2] = a * inv
            mid = 0.5 * (a + c)
            lam = mid + np.sqrt(max(0.1, mid * mid - det))
            radii[n] = int(np.ceil(3.0 * np.sqrt(lam)))
        else:
            conics[n, 0] = 0.0
            conics[n, 1] = 0.0
            conics[n, 2] = 0.0
            radii[n] = 0


_NO_ROTATION = np.eye(3, dtype=np.float32)


def project(means: np.ndarray, covs: np.ndarray, cam: Camera, near: float = 0.01,
            pose_R: np.ndarray | None = None, rigid: np.ndarray | None = None):
    """EWA projection (numba): 2D means, conics, radii, depths, as raster_torch.project. With `pose_R`
    and `rigid`, covariances of the `rigid` Gaussians are first rotated by the head pose."""
    n = means.shape[0]
    means2d = np.empty((n, 2), np.float32)
    conics = np.empty((n, 3), np.float32)
    radii = np.empty(n, np.int32)
    depths = np.empty(n, np.float32)
    if rigid is None:
        rigid = np.zeros(n, np.bool_)
    _project_kernel(np.ascontiguousarray(means, np.float32), np.ascontiguousarray(covs, np.float32),
                    _NO_ROTATION if pose_R is None else np.ascontiguousarray(pose_R, np.float32), rigid,
                    np.ascontiguousarray(cam.viewmat[:3, :3], np.float32),
                    np.ascontiguousarray(cam.viewmat[:3, 3], np.float32),
                    float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy), cam.width, cam.height, near,
                    means2d, conics, radii, depths)
    return means2d, conics, radii, depths


@njit(cache=True, nogil=True, inline="always")
def _tile_range(mx, my, r, tiles_x, tiles_y):
    """Inclusive tile index range covered by a Gaussian's 3-sigma box."""
    return (max(0, int((mx - r) // TILE)), min(tiles_x - 1, int((mx + r) // TILE)),
            max(0, int((my - r) // TILE)), min(tiles_y - 1, int((my + r) // TILE)))


@njit(cache=True, nogil=True, fastmath=True)
def _composite(means2d, conics, colors, opacities, radii, order, width, height, bg, out, ids, exp_table):
    # ids (H, W, K): when K > 0, each pixel's first K contributing Gaussians, front to back, are recorded.
    k_ids = ids.shape[2]
    tiles_x = (width + TILE - 1) // TILE
    tiles_y = (height + TILE - 1) // TILE
    n_tiles = tiles_x * tiles_y
    counts = np.zeros(n_tiles + 1, dtype=np.int64)
    # Pass 1: how many Gaussians touch each tile (bounding box of the 3-sigma radius).
    for k in range(order.shape[0]):
        g = order[k]
        r = radii[g]
        if r <= 0:
            continue
        x0, x1, y0, y1 = _tile_range(means2d[g, 0], means2d[g, 1], r, tiles_x, tiles_y)
        for ty in range(y0, y1 + 1):
            for tx in range(x0, x1 + 1):
                counts[ty * tiles_x + tx + 1] += 1
    for i in range(n_tiles):
        counts[i + 1] += counts[i]
    lists = np.empty(counts[n_tiles], dtype=np.int32)
    fill = counts[:n_tiles].copy()
    # Pass 2: per-tile lists in depth order (we walk Gaussians front to back).
    for k in range(order.shape[0]):
        g = order[k]
        r = radii[g]
        if r <= 0:
            continue
        x0, x1, y0, y1 = _tile_range(means2d[g, 0], means2d[g, 1], r, tiles_x, tiles_y)
        for ty in range(y0, y1 + 1):
            for tx in range(x0, x1 + 1):
                t = ty * tiles_x + tx
                lists[fill[t]] = g
                fill[t] += 1
    # Per Gaussian, once (not per tile): ln(255 op), beyond which alpha < 1/255, and the tight
    # half-extents of that ellipse (sigma^2 * 2 ln(255 op) along each axis).
    n = means2d.shape[0]
    cut = np.empty(n, dtype=np.float32)
    hxs = np.empty(n, dtype=np.float32)
    hys = np.empty(n, dtype=np.float32)
    for g in range(n):
        cut[g] = -1.0
        if radii[g] <= 0:
            continue
        ln = min(np.log(max(opacities[g] * 255.0, 1.0)), 7.9)  # the exp table ends at 8
        det = conics[g, 0] * conics[g, 2] - conics[g, 1] * conics[g, 1]
        if ln <= 0.0 or det <= 0.0:
            continue
        cut[g] = ln
        hxs[g] = min(np.sqrt(2.0 * ln * conics[g, 2] / det), radii[g])
        hys[g] = min(np.sqrt(2.0 * ln * conics[g, 0] / det), radii[g])
    T = np.empty((TILE, TILE), dtype=np.float32)
    acc = np.empty((TILE, TILE, 3), dtype=np.float32)
    cnt = np.zeros((TILE, TILE), dtype=np.int32)
    for t in range(n_tiles):
        ox = (t % tiles_x) * TILE
        oy = (t // tiles_x) * TILE
        w = min(TILE, width - ox)
        h = min(TILE, height - oy)
        T[:, :] = 1.0
        acc[:, :, :] = 0.0
        if k_ids > 0:
            cnt[:, :] = 0
        alive = w * h
        for k in range(counts[t], counts[t + 1]):
            g = lists[k]
            mx = means2d[g, 0]; my = means2d[g, 1]
            ca = conics[g, 0]; cb = conics[g, 1]; cc = conics[g, 2]
            op = opacities[g]
            lim = cut[g]
            if lim < 0.0:
                continue
            hx = hxs[g]
            hy = hys[g]
            px0 = max(0, int(np.ceil(mx - hx - 0.5)) - ox); px1 = min(w - 1, int(np.floor(mx + hx - 0.5)) - ox)
            py0 = max(0, int(np.ceil(my - hy - 0.5)) - oy); py1 = min(h - 1, int(np.floor(my + hy - 0.5)) - oy)
            cr = colors[g, 0]; cg = colors[g, 1]; cbl = colors[g, 2]
            for py in range(py0, py1 + 1):
                dy = oy + py + 0.5 - my
                for px in range(px0, px1 + 1):
                    tr = T[py, px]
                    if tr < T_MIN:
                        continue
                    dx = ox + px + 0.5 - mx
                    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0.0 or sigma > lim:  # beyond lim, alpha < 1/255: skip the exp
                        continue
                    alpha = min(ALPHA_MAX, op * exp_table[int(sigma * EXP_SCALE)])  # 0 <= sigma <= lim < 8
                    if alpha < ALPHA_MIN:
                        continue
                    if k_ids > 0 and cnt[py, px] < k_ids:
                        ids[oy + py, ox + px, cnt[py, px]] = g
                        cnt[py, px] += 1
                    wgt = alpha * tr
                    acc[py, px, 0] += wgt * cr
                    acc[py, px, 1] += wgt * cg
                    acc[py, px, 2] += wgt * cbl
                    tr *= 1.0 - alpha
                    T[py, px] = tr
                    if tr < T_MIN:
                        alive -= 1
            if alive <= 0:
                break
        for py in range(h):
            for px in range(w):
                for ch in range(3):
                    out[oy + py, ox + px, ch] = acc[py, px, ch] + T[py, px] * bg[ch]
    return out


def rasterize(means: np.ndarray, covs: np.ndarray, colors: np.ndarray, opacities: np.ndarray, cam: Camera,
              background=(0.0, 0.0, 0.0), out: np.ndarray | None = None, pose_R: np.ndarray | None = None,
              rigid: np.ndarray | None = None, hidden: np.ndarray | None = None) -> np.ndarray:
    """Render world-space Gaussians to an (H, W, 3) float32 image in [0, 1]. `pose_R`/`rigid`: see project;
    `hidden`: a mask of Gaussians not to draw (back-facing surfels)."""
    means2d, conics, radii, depths = project(means, covs, cam, pose_R=pose_R, rigid=rigid)
    if hidden is not None:
        radii[hidden] = 0
    order = np.argsort(depths, kind="stable").astype(np.int32)
    if out is None:
        out = np.empty((cam.height, cam.width, 3), dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    return _composite(means2d, conics, colors.astype(np.float32), opacities.astype(np.float32), radii, order,
                      cam.width, cam.height, bg, out, _NO_IDS, EXP_TABLE)


_NO_IDS = np.zeros((0, 0, 0), np.int32)


def contributors(means: np.ndarray, covs: np.ndarray, opacities: np.ndarray, cam: Camera, k_max: int = 24) -> np.ndarray:
    """(H, W, k_max) int32: each pixel's first `k_max` Gaussians, front to back, as this rasteriser
    composites them (-1 = none). Fitting differentiates through these lists (raster_torch.composite)."""
    means2d, conics, radii, depths = project(means, covs, cam)
    order = np.argsort(depths, kind="stable").astype(np.int32)
    ids = np.full((cam.height, cam.width, k_max), -1, dtype=np.int32)
    out = np.empty((cam.height, cam.width, 3), dtype=np.float32)
    _composite(means2d, conics, np.zeros((len(means), 3), np.float32), opacities.astype(np.float32), radii, order,
               cam.width, cam.height, np.zeros(3, np.float32), out, ids, EXP_TABLE)
    return ids
