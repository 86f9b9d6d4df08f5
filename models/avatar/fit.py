"""Fit the stock head to a person from a photo or a short video.

1. Find the face: the 478-point face mesh (`models.perception.face`) on each frame, mapped by a
   similarity onto the mesh found on the stock head's own frontal render, puts every frame in the
   head's framing (template matching where no mesh is found).
2. Shape: the head is reshaped so its landmarks fall on the person's (`shape.py`); the rig moves with it.
3. Detail and colour: the face's surface parts get Gaussians at half spacing; each Gaussian seen
   from the front takes the frame's colour where it lands on a training pixel; small in-plane offsets
   of the surface parts, then the colours, are fitted by differentiable rendering; Gaussians never
   seen take their seen neighbours' colour, or (sides, back) the seen ones' colour change.
4. Measure on held-back data: PSNR over the head and inside the face mesh's outline, and the mean
   landmark distance between the person's face and the fitted head's frontal render.

Differentiable rendering is the torch reference renderer (`raster_torch`) over fixed per-pixel
lists: the numba rasteriser records, front to back, the first K Gaussians that reach each pixel;
torch then projects and composites them with gradients to colours and means. The lists are rebuilt
between phases, since offsets move Gaussians a little.
Held-back data: every 4th frame of a video; for a single photo, a checkerboard of pixels (`fit_head`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from models.avatar.camera import portrait_camera
from models.avatar.gaussians import Splats, covariances
from models.avatar.head import PIVOT, Head
from models.avatar.raster_cpu import contributors
from models.avatar.render import BACKGROUND, CPUAvatarRenderer, Pose, PosedHead, euler_to_matrix


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
LANDMARK_SIZE = 256  # the face mesh is found on renders and crops of this size (it needs ~100 px of face)


@dataclass
class FitResult:
    head: Head
    psnr_before: float  # held-back pixels of the whole head
    psnr_after: float
    frames_used: int
    frames_held_back: int
    align_scores: list[float] = field(default_factory=list)
    psnr_face_before: float | None = None  # held-back pixels inside the face mesh's outline
    psnr_face_after: float | None = None
    landmark_error_before: float | None = None  # mean face-mesh distance, photo vs frontal render, / inter-ocular
    landmark_error_after: float | None = None
    shaped: bool = False  # the head returned was reshaped to the face mesh (a face was found, the fit kept)
    holdout: str = ""  # what was held back
    view_yaws: list[float] = field(default_factory=list)  # each frame's head turn as fitted (radians; 0: frontal)
    optimise_s: float = 0.0  # the differentiable-rendering phases (offsets, colours), wall time


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    err = (a - b) ** 2
    mse = float(err[mask].mean()) if mask is not None else float(err.mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


@dataclass
class _Frame:
    crop: np.ndarray  # (size, size, 3) float in [0, 1], in the head's frontal framing
    score: float  # how sure the alignment is (face-mesh confidence, or template correlation)
    landmarks: np.ndarray | None  # (478, 3) in LANDMARK_SIZE render pixels; None without a face mesh
    yaw: float = 0.0  # the face analyser's estimate, degrees
    head_yaw: float = 0.0  # the head's turn in this frame as the renderer's Pose takes it (radians)


VIEW_YAWS = np.round(np.arange(-0.7, 0.71, 0.1), 2)  # the head turns a video's views are looked up among


def _view_table(head: Head, analyzer) -> list[tuple[float, float, np.ndarray]]:
    """(yaw, the face analyser's yaw in degrees, face-mesh landmarks) of `head` rendered at each of
    VIEW_YAWS where a mesh is found."""
    r = CPUAvatarRenderer(head, LANDMARK_SIZE, LANDMARK_SIZE)
    found = analyzer.analyse([r.render(Pose(yaw=float(y))) for y in VIEW_YAWS])
    table = [(float(y), float(o.yaw_deg), o.landmarks) for y, o in zip(VIEW_YAWS, found, strict=True) if o.present]
    # Only the turns out to where the reading still changes one way (it falls as yaw grows): beyond,
    # the mesh no longer follows the head and a reading could not be told apart.
    mid = min(range(len(table)), key=lambda i: abs(table[i][0])) if table else 0
    lo = hi = mid
    while lo > 0 and table[lo - 1][1] > table[lo][1]:
        lo -= 1
    while hi < len(table) - 1 and table[hi + 1][1] < table[hi][1]:
        hi += 1
    return table[lo:hi + 1]


def _head_yaw(yaw_deg: float, table: list[tuple[float, float, np.ndarray]]) -> float:
    """The head turn at which the face analyser reads the head as turned by `yaw_deg`: its reading is
    compressed at larger turns (0.45 rad reads as ~32 deg), and the same on the head's own renders, so
    interpolating in the table of those readings undoes it."""
    ys, ds = np.array([t[0] for t in table]), np.array([t[1] for t in table])
    order = np.argsort(ds)
    return round(float(np.interp(yaw_deg, ds[order], ys[order])), 3)


def _align_by_mesh(frames: list[np.ndarray], size: int, stock_lm: np.ndarray | None, analyzer,
                   views: Head | None = None) -> list[_Frame | None]:
    """Each frame in the head's framing by the face mesh (a similarity onto the stock head's landmarks);
    None for a frame where no mesh is found. `views` (a video's head): each frame's head turn is found
    among renders of that head (`_head_yaw`), and the frame is framed onto the head's landmarks at that
    turn, so a turned face is fitted against the turned head instead of being squeezed onto a frontal one."""
    import cv2

    from models.avatar.shape import MESH_POINTS, apply_affine, similarity

    if stock_lm is None:
        return [None] * len(frames)
    table = _view_table(views, analyzer) if views is not None else []
    observed = analyzer.analyse(frames)
    yaws = [_head_yaw(o.yaw_deg, table) if len(table) > 1 and o.present and o.landmarks is not None else 0.0
            for o in observed]
    turned = sorted({y for y in yaws if y != 0.0})
    if turned:  # the head's own landmarks at each frame's turn
        r = CPUAvatarRenderer(views, LANDMARK_SIZE, LANDMARK_SIZE)
        found = analyzer.analyse([r.render(Pose(yaw=y)) for y in turned])
        refs = {y: o.landmarks for y, o in zip(turned, found, strict=True) if o.present}
    else:
        refs = {}
    out: list[_Frame | None] = []
    for f, o, yaw in zip(frames, observed, yaws, strict=True):
        if not (o.present and o.landmarks is not None):
            out.append(None)
            continue
        if yaw != 0.0 and yaw not in refs:  # no mesh on the head's own render at that turn: the nearest that has one
            nearest = min(table, key=lambda t: abs(t[0] - yaw))
            yaw, refs[nearest[0]] = nearest[0], nearest[2]
        ref = refs[yaw] if yaw != 0.0 else stock_lm
        m = similarity(o.landmarks[:MESH_POINTS, :2], ref[:MESH_POINTS, :2])
        lm = o.landmarks.copy()
        lm[:, :2] = apply_affine(m, lm[:, :2])
        crop = cv2.warpAffine(np.ascontiguousarray(f), m * (size / LANDMARK_SIZE), (size, size), flags=cv2.INTER_AREA,
                              borderMode=cv2.BORDER_REPLICATE)
        out.append(_Frame(crop.astype(np.float32) / 255.0, float(o.score), lm, float(o.yaw_deg), yaw))
    return out


def _face_mask(landmarks: np.ndarray | None, size: int) -> np.ndarray | None:
    """Pixels inside the face mesh's outline, at `size`."""
    import cv2

    from models.avatar.shape import MESH_POINTS

    if landmarks is None:
        return None
    pts = landmarks[:MESH_POINTS, :2] * (size / LANDMARK_SIZE)
    hull = cv2.convexHull(pts.astype(np.float32)).round().astype(np.int32)
    out = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def _landmark_distance(found: np.ndarray, person: np.ndarray) -> float:
    """Mean distance between two sets of face-mesh landmarks, in the person's inter-ocular distances."""
    from models.avatar.shape import MESH_POINTS, inter_ocular

    return float(np.linalg.norm(found[:MESH_POINTS, :2] - person[:MESH_POINTS, :2], axis=1).mean() / inter_ocular(person))


def landmark_error(head: Head, landmarks: np.ndarray, analyzer) -> float | None:
    """Mean distance between `landmarks` (the person's, in LANDMARK_SIZE render pixels) and the face mesh
    found on `head`'s frontal render, in inter-ocular distances; None if no face is found on the render."""
    o = analyzer.analyse([CPUAvatarRenderer(head, LANDMARK_SIZE, LANDMARK_SIZE).render(Pose())])[0]
    return _landmark_distance(o.landmarks, landmarks) if o.present else None


def _lands_on(means: np.ndarray, cam, pixels: np.ndarray) -> np.ndarray:
    """Which Gaussians' means (posed) project onto a True pixel of `pixels`."""
    uv, _ = cam.project(means)
    u = np.clip(uv[:, 0].astype(np.int64), 0, cam.width - 1)
    v = np.clip(uv[:, 1].astype(np.int64), 0, cam.height - 1)
    return pixels[v, u]


def _project_colours(means: np.ndarray, crop: np.ndarray, cam) -> np.ndarray:
    """Each Gaussian's colour sampled from `crop` (bilinear, edges clamped) where its mean (posed) projects."""
    uv, _ = cam.project(means)
    h, w = crop.shape[:2]
    u = np.clip(uv[:, 0] - 0.5, 0, w - 1.001)
    v = np.clip(uv[:, 1] - 0.5, 0, h - 1.001)
    x0, y0 = u.astype(np.int64), v.astype(np.int64)
    fx, fy = (u - x0)[:, None], (v - y0)[:, None]
    top = crop[y0, x0] * (1 - fx) + crop[y0, x0 + 1] * fx
    bottom = crop[y0 + 1, x0] * (1 - fx) + crop[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


DETAIL_PARTS = ("skin", "lip", "lid", "brow")
MOVABLE_PARTS = ("skin", "hair", "ear", "neck", "shirt", "brow")


def split_splats(head: Head, which: np.ndarray) -> Head:
    """`head` with each Gaussian in `which` replaced by four at half its spacing on its own surface
    (half the width along its two wide axes, same thickness), so a face can hold the detail of a photo.
    The children keep their parent's opacity, colour, rig deltas and head weight."""
    from models.avatar.gaussians import quat_to_rotmat

    s = head.splats
    idx = np.flatnonzero(which)
    rot = quat_to_rotmat(s.quats[idx])  # columns: the Gaussian's axes
    order = np.argsort(s.scales[idx], axis=1)  # thin, mid, wide
    a1 = np.take_along_axis(rot, order[:, None, 2:3].repeat(3, 1), 2)[..., 0]
    a2 = np.take_along_axis(rot, order[:, None, 1:2].repeat(3, 1), 2)[..., 0]
    s1 = np.take_along_axis(s.scales[idx], order[:, 2:3], 1)
    s2 = np.take_along_axis(s.scales[idx], order[:, 1:2], 1)
    shrink = np.ones_like(s.scales[idx])
    np.put_along_axis(shrink, order[:, 1:], 0.5, 1)
    children = []
    for i, j in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        children.append(s.means[idx] + 0.4 * (i * s1 * a1 + j * s2 * a2))
    keep = np.flatnonzero(~which)
    means = np.concatenate([s.means[keep]] + children).astype(np.float32)
    rep = np.concatenate([keep] + [idx] * 4)
    scales = np.concatenate([s.scales[keep]] + [s.scales[idx] * shrink] * 4).astype(np.float32)
    splats = Splats(means, s.quats[rep].copy(), scales, s.opacities[rep].copy(), s.colors[rep].copy(),
                    s.labels[rep].copy())
    return Head(splats, head.deltas[:, rep].copy(), head.head_weight[rep].copy())


# Parts whose unseen Gaussians take their colour from the seen ones (a turned head shows them).
TONE_GROUPS = {"skin": ("skin", "ear", "neck", "lid", "lip", "brow"), "hair": ("hair",)}
NEAR_M = 0.01  # unseen Gaussians this close to seen ones take their neighbours' colour


def _carry_colours(means: np.ndarray, stock: np.ndarray, fitted: np.ndarray, seen: np.ndarray,
                   labels: np.ndarray) -> np.ndarray:
    """Colours of the Gaussians the fit never saw, from the seen ones of their group: near a seen one
    (a pixel the fit held back, the edge of the face), the inverse-distance mean of the 6 nearest seen;
    farther (the sides and back of the head), the stock colour changed as the seen ones were
    (per-channel gain of the medians)."""
    import torch

    from models.avatar.head import PART_ID

    out = fitted.copy()
    for group in TONE_GROUPS.values():
        members = np.isin(labels, [PART_ID[p] for p in group])
        ref = np.flatnonzero(members & seen)
        if len(ref) < 20:
            continue
        unseen = np.flatnonzero(members & ~seen)
        gain = np.median(fitted[ref], 0) / np.maximum(np.median(stock[ref], 0), 1e-3)
        out[unseen] = np.clip(stock[unseen] * gain, 0, 1)
        ref_t = torch.from_numpy(means[ref])
        for start in range(0, len(unseen), 4096):
            rows = unseen[start:start + 4096]
            dist, nn = torch.cdist(torch.from_numpy(means[rows]), ref_t).topk(6, largest=False)
            dist, nn = dist.numpy(), nn.numpy()
            near = dist[:, 0] < NEAR_M
            w = 1.0 / np.maximum(dist[near], 1e-5)
            out[rows[near]] = (fitted[ref[nn[near]]] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    return out


def visibility(head: Head, cam, pixels: np.ndarray, pose: Pose | None = None) -> np.ndarray:
    """How much each Gaussian makes up of the render at `pose` (frontal by default) at `pixels` (H, W
    bool): the gradient of the summed render by the Gaussian's colour."""
    import torch

    from models.avatar import raster_torch
    from models.avatar.render import PosedHead

    s = head.splats
    means, covs = PosedHead(head)(pose or Pose())
    means, covs = means.astype(np.float32), covs.astype(np.float32)
    ids = torch.from_numpy(contributors(means, covs, s.opacities, cam).reshape(cam.width * cam.height, -1)).long()
    means2d, conics, _, _ = raster_torch.project(torch.from_numpy(means), torch.from_numpy(covs), cam)
    probe = torch.zeros((len(s), 3), requires_grad=True)
    img = raster_torch.composite(means2d, conics, probe, torch.from_numpy(s.opacities), ids, cam.width, cam.height)
    (img[..., 0] * torch.from_numpy(pixels.astype(np.float32))).sum().backward()
    return probe.grad[:, 0].numpy()


def fit_head(head: Head, frames: list[np.ndarray], size: int = 256, color_steps: int = 60, offset_steps: int = 30,
             max_offset: float = 0.003, holdout_block: int = 1, detail: bool | None = None, analyzer=None,
             views: bool = True, rasteriser: str = "reference") -> FitResult:
    """Fit `head` to the face in `frames` (RGB uint8): reshape it to the face mesh, give the face finer
    Gaussians (`detail`; by default when `size` >= 192, where pixels are finer than the stock head's
    Gaussians: at coarser sizes split Gaussians would only alias), colour it from the frames (projected,
    then fitted by differentiable rendering) after fitting small position offsets. A single photo is
    fitted on a checkerboard of `holdout_block`-pixel blocks and measured on the others; a video holds
    back every 4th frame. A video's frames are views: each is fitted (and measured) at the head turn the
    face mesh shows in it (`views=False`: every frame as a frontal photo, for comparison); a frame where no
    mesh is found is matched to the frontal render.

    The default checkerboard is of single pixels: with larger blocks the held-back number measures
    inpainting, not the replica (on matplotlib's Grace Hopper at 192^2, the best image-space
    interpolation of held-back 8x8 blocks scores 19 dB inside the face, of single pixels 26 dB).

    `rasteriser`: "reference" differentiates the plain-torch renderer over per-pixel lists on the CPU
    (the CPU profile); "gsplat" differentiates gsplat's CUDA `rasterization()` (the gpu profile; needs
    CUDA). Everything else (alignment, shaping, evaluation) is the same code."""
    import cv2
    import torch

    from models.avatar import raster_torch
    from models.avatar.head import PART_ID
    from models.avatar.shape import shape_to_landmarks
    from models.perception.face import FaceAnalyzer

    if rasteriser not in ("reference", "gsplat"):
        raise ValueError(f"unknown rasteriser {rasteriser!r}: 'reference' or 'gsplat'")
    torch.set_num_threads(1)
    dev = torch.device("cuda" if rasteriser == "gsplat" else "cpu")
    if rasteriser == "gsplat":
        from models.avatar.render_gsplat import rasterize_view
    analyzer = analyzer or FaceAnalyzer()
    cam = portrait_camera(size, size)

    def silhouette(img: np.ndarray) -> np.ndarray:
        return np.abs(img.astype(np.float32) / 255 - np.array(BACKGROUND, np.float32)).sum(axis=2) > 0.02

    original = head
    template = CPUAvatarRenderer(head, size, size).render(Pose())
    mask = silhouette(template)
    stock_obs = analyzer.analyse([CPUAvatarRenderer(head, LANDMARK_SIZE, LANDMARK_SIZE).render(Pose())])[0]
    stock_lm = stock_obs.landmarks if stock_obs.present else None
    video = len(frames) > 1
    by_mesh = _align_by_mesh(frames, size, stock_lm, analyzer, views=head if video and views else None)
    held = []  # a video holds back every 4th frame (at least one)
    if video:
        held = [i for i in range(len(frames)) if i % 4 == 3] or [len(frames) - 1]
    # The face the head takes the shape of: the most confident, most frontal training view.
    meshed = [a for i, a in enumerate(by_mesh) if a is not None and i not in held]
    ref = max(meshed, key=lambda a: a.score - abs(a.yaw) / 45.0) if meshed else None
    face = _face_mask(ref.landmarks if ref else None, size)
    lm_before = lm_after = None
    if ref is not None:
        lm_before = _landmark_distance(stock_lm, ref.landmarks)  # (the mesh found on the stock head's render)
        head = shape_to_landmarks(head, portrait_camera(LANDMARK_SIZE, LANDMARK_SIZE), stock_lm, ref.landmarks)
        template = CPUAvatarRenderer(head, size, size).render(Pose())
        mask = silhouette(template)
        if detail or (detail is None and size >= 192):
            near_face = cv2.dilate(face.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            parts = np.isin(head.splats.labels, [PART_ID[p] for p in DETAIL_PARTS])
            head = split_splats(head, parts & (visibility(head, cam, near_face) > 0.05))
    # Frames without a mesh are found by matching the (reshaped) head's own render.
    aligned = [a if a is not None else _Frame(*align_face(f, template, mask, size), None)
               for f, a in zip(frames, by_mesh, strict=True)]
    crops = [a.crop for a in aligned]
    # Each frame's view of the head: its turn, and the head's silhouette and face outline at that turn.
    poses = [Pose(yaw=a.head_yaw) for a in aligned]
    turned_view = CPUAvatarRenderer(head, size, size) if any(p.yaw != 0.0 for p in poses) else None
    masks = [mask if p.yaw == 0.0 else silhouette(turned_view.render(p)) for p in poses]
    faces = [_face_mask(a.landmarks, size) if a.landmarks is not None and video else face for a in aligned]
    if video:
        train_idx = [i for i in range(len(crops)) if i not in held]
        train_masks = [masks[i] for i in train_idx]
        held_views = [(crops[i], masks[i], faces[i], poses[i]) for i in held]
    else:  # one photo: fit on a checkerboard of blocks, measure on the other blocks
        yy, xx = np.mgrid[:size, :size]
        board = ((yy // holdout_block + xx // holdout_block) % 2 == 0)
        train_idx, train_masks = [0], [mask & board]
        held_views = [(crops[0], mask & ~board, face, poses[0])]
    targets = [torch.from_numpy(crops[i]).to(dev) for i in train_idx]
    tmask = [torch.from_numpy(m).to(dev) for m in train_masks]

    s = head.splats
    covs = covariances(s.quats, s.scales).astype(np.float32)
    base = torch.from_numpy(s.means.astype(np.float32)).to(dev)
    opac = torch.from_numpy(s.opacities.astype(np.float32)).to(dev)
    posed_head = PosedHead(head)
    hw = torch.from_numpy(head.head_weight.astype(np.float32))[:, None].to(dev)
    pivot = torch.from_numpy(PIVOT.astype(np.float32)).to(dev)
    # Per training view: the head's rotation (None: frontal) and the covariances turned with it.
    turns = [None if poses[i].yaw == 0.0 else torch.from_numpy(euler_to_matrix(poses[i].yaw, 0.0, 0.0)).to(dev)
             for i in train_idx]
    view_covs = [torch.from_numpy(covs if poses[i].yaw == 0.0 else posed_head(poses[i])[1].astype(np.float32)).to(dev)
                 for i in train_idx]

    def turn(means: torch.Tensor, R: torch.Tensor | None) -> torch.Tensor:
        """The means as the head's turn moves them (each Gaussian by its head weight), as PosedHead does."""
        return means if R is None else means + hw * ((means - pivot) @ R.T + pivot - means)

    def lists(means: torch.Tensor, k: int) -> torch.Tensor | None:
        if rasteriser == "gsplat":  # gsplat sorts and tiles every call itself
            return None
        m = turn(means, turns[k]).detach().numpy()
        return torch.from_numpy(contributors(m, view_covs[k].numpy(), s.opacities, cam).reshape(size * size, -1)).long()

    def render(means: torch.Tensor, colors: torch.Tensor, ids: torch.Tensor | None, k: int) -> torch.Tensor:
        if rasteriser == "gsplat":
            return rasterize_view(turn(means, turns[k]), view_covs[k], colors, opac, cam)
        means2d, conics, _, _ = raster_torch.project(turn(means, turns[k]), view_covs[k], cam)
        return raster_torch.composite(means2d, conics, colors, opac, ids, size, size, BACKGROUND)

    def evaluate(h: Head) -> tuple[float, float | None]:
        r = CPUAvatarRenderer(h, size, size)
        imgs = [r.render(p).astype(np.float32) / 255 for _, _, _, p in held_views]
        whole = float(np.mean([psnr(img, t, m) for img, (t, m, _, _) in zip(imgs, held_views, strict=True)]))
        in_face = [psnr(img, t, m & f) for img, (t, m, f, _) in zip(imgs, held_views, strict=True) if f is not None]
        return whole, (float(np.mean(in_face)) if in_face else None)

    before, face_before = evaluate(original)
    stock_colors = s.colors.copy()
    init = stock_colors.copy()
    # Projected colours only where a view shows the Gaussian and its mean lands on a training pixel (the
    # held-back ones stay unseen), averaged over the views that do.
    total, count = np.zeros_like(init), np.zeros(len(s), np.float32)
    seen = np.zeros(len(s), bool)
    for k, i in enumerate(train_idx):
        shown = visibility(head, cam, train_masks[k], poses[i]) > 0.05
        means_i = posed_head(poses[i])[0]
        use = shown & _lands_on(means_i, cam, train_masks[k])
        total[use] += _project_colours(means_i, crops[i], cam)[use]
        count[use] += 1
        seen |= shown
    init[count > 0] = total[count > 0] / count[count > 0, None]
    logit = torch.logit(torch.from_numpy(np.clip(init, 0.02, 0.98).astype(np.float32))).to(dev)
    logit.requires_grad_(True)
    offset = torch.zeros_like(base, requires_grad=True)
    # Offsets move surface parts across the image only: a frontal view says nothing of depth, and an
    # eye, lid or mouth part moved on its own would show through the lids in a blink or the lips at rest.
    movable = torch.from_numpy(np.isin(s.labels, [PART_ID[p] for p in MOVABLE_PARTS]).astype(np.float32)).to(dev)
    step_mask = movable[:, None] * torch.tensor([1.0, 1.0, 0.0], device=dev)
    # Offsets first (against the projected colours), then the colours at the final positions.
    t_opt = time.perf_counter()
    for phase, steps, params, lr in (("offset", offset_steps, [offset], 3e-4), ("colour", color_steps, [logit], 0.08)):
        ids = [lists(base + offset, k) for k in range(len(train_idx))]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            colors = torch.sigmoid(logit)
            loss = sum(((render(base + offset, colors, ids[k], k) - t) ** 2)[m].mean()
                       for k, (t, m) in enumerate(zip(targets, tmask, strict=True))) / len(targets)
            if phase == "offset":
                loss = loss + 10.0 * (offset ** 2).sum() / len(offset)  # stay near the rig's shape
            loss.backward()
            if phase == "offset":
                offset.grad *= step_mask
            opt.step()
            if phase == "offset":
                with torch.no_grad():
                    offset.clamp_(-max_offset, max_offset)
    colors = torch.sigmoid(logit).detach().cpu().numpy().astype(np.float32)  # (waits for the device)
    optimise_s = time.perf_counter() - t_opt
    colors = _carry_colours(s.means, stock_colors, colors, seen, s.labels)
    means = (base + offset).detach().cpu().numpy().astype(np.float32)
    fitted = Head(Splats(means, s.quats.copy(), s.scales.copy(), s.opacities.copy(), colors, s.labels.copy()),
                  head.deltas.copy(), head.head_weight.copy())
    after, face_after = evaluate(fitted)
    shaped = ref is not None
    if after < before:  # a fit that does not help the held-back data is not kept
        fitted, after, face_after, shaped = original, before, face_before, False
    if ref is not None:
        lm_after = landmark_error(fitted, ref.landmarks, analyzer)
    holdout = (f"every 4th frame at {size}px" if held
               else f"checkerboard of {holdout_block}px blocks at {size}px")
    return FitResult(fitted, before, after, len(train_idx), len(held_views), [a.score for a in aligned],
                     face_before, face_after, lm_before, lm_after, shaped, holdout,
                     [round(p.yaw, 3) for p in poses], optimise_s)
