"""A replica from one photo, measured: matplotlib's Grace Hopper (the photo ships in a package we
already depend on) through the same fit `POST /v2/replicas` runs (`models/avatar/fit.py`).

Reports, in `benchmarks/results/replica_fit.json`:
- face-region PSNR on held-back pixels (inside the face mesh's outline), before (the stock head) and
  after, with the default single-pixel checkerboard and with 8x8 blocks; beside each, the best that
  image-space interpolation of the photo itself reaches on the same held-back pixels (normalised
  Gaussian convolution, best of six widths): no replica can be expected to beat that by much;
- the mean face-mesh landmark distance between the photo and the frontal render, in inter-ocular
  distances, before and after;
- the rig on the fitted head: mouth-interior pixels at rest and with the jaw open, eye pixels left at
  full blink; the fit's time and Gaussian count;
- a short video of a turning person (a recoloured head, so the truth is known at every turn), fitted
  at each frame's own head turn and as frontal photos: the turns found, held-back PSNR, and the colour
  error at turns beyond the video's.
`benchmarks/results/replica_grace_hopper.png`: the aligned photo, the stock head, the replica, and the
replica speaking with the head turned.

    python -m benchmarks.replica_fit
    python -m benchmarks.replica_fit --compare-gsplat [--out F]   # on a CUDA machine: the fit through
        gsplat's differentiable rasteriser beside the CPU reference fit, same photo, same machine
        (benchmarks/results/replica_fit_gpu.json)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def grace_hopper() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    return np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))


def interpolation_bound(crop: np.ndarray, face: np.ndarray, block: int) -> float:
    """PSNR inside `face` of the photo's held-back checkerboard pixels predicted from its other pixels."""
    import cv2

    from models.avatar.fit import psnr

    yy, xx = np.mgrid[:crop.shape[0], :crop.shape[1]]
    board = ((yy // block + xx // block) % 2 == 0)
    best = 0.0
    for sigma in (0.7, 1.0, 1.5, 2.0, 3.0, 4.0):
        num = cv2.GaussianBlur(crop * board[..., None], (0, 0), sigma)
        den = cv2.GaussianBlur(board.astype(np.float32), (0, 0), sigma)
        best = max(best, psnr(num / np.maximum(den[..., None], 1e-6), crop, face & ~board))
    return best


def video_views(size: int = 128) -> dict:
    """A short video of a person turning their head, fitted at each frame's own turn and, for comparison,
    with every frame as a frontal photo. The person is the head with other colours and jitter, so the
    truth is known at any turn; the frames 0.3 and -0.3 are the held-back ones."""
    from models.avatar.fit import fit_head
    from models.avatar.head import build_head
    from models.avatar.render import CPUAvatarRenderer, Pose

    person = build_head(20000, seed=3, skin=(0.62, 0.5, 0.78), hair=(0.55, 0.42, 0.2), iris=(0.3, 0.5, 0.3))
    turns = [-0.4, -0.2, 0.0, 0.3, 0.2, 0.4, -0.1, -0.3]
    r = CPUAvatarRenderer(person, 256, 256)
    frames = [r.render(Pose(yaw=y)) for y in turns]

    def error_at(head, yaw: float) -> float:
        seen = CPUAvatarRenderer(head, size, size).render(Pose(yaw=yaw)).astype(float)
        return round(float(np.abs(seen - CPUAvatarRenderer(person, size, size).render(Pose(yaw=yaw))).mean()), 2)

    out: dict = {"turns": turns, "fit_size": size,
                 "stock_mean_abs_error_at": {str(y): error_at(build_head(20000), y) for y in (-0.45, 0.45)}}
    for name, views in (("views", True), ("as_photos", False)):
        t0 = time.perf_counter()
        res = fit_head(build_head(20000), frames, size=size, views=views)
        out[name] = {"fit_s": round(time.perf_counter() - t0, 1), "turns_found": res.view_yaws,
                     "psnr_head_held_back": [round(res.psnr_before, 2), round(res.psnr_after, 2)],
                     "psnr_face_held_back": [round(res.psnr_face_before, 2), round(res.psnr_face_after, 2)],
                     # colour error (0-255) of the fitted head against the person at turns past any frame
                     "mean_abs_error_at": {str(y): error_at(res.head, y) for y in (-0.45, 0.45)}}
        print(name, json.dumps(out[name]), flush=True)
    return out


def warm_gsplat() -> None:
    """Loads gsplat's kernels and the CUDA context once, so the timed fits don't pay for it."""
    import torch

    from models.avatar.camera import portrait_camera
    from models.avatar.render_gsplat import rasterize_view

    cam = portrait_camera(64, 64)
    means = torch.tensor([[0.0, 0.0, 0.0]], device="cuda", requires_grad=True)
    img = rasterize_view(means, torch.eye(3, device="cuda")[None] * 1e-4, torch.ones((1, 3), device="cuda"),
                         torch.ones(1, device="cuda"), cam)
    img.sum().backward()
    torch.cuda.synchronize()


def compare_gsplat(out: Path, sizes: tuple[int, ...] = (256, 512)) -> dict:
    """The Grace Hopper photo fit at each size through both rasterisers: wall time of the whole fit and of
    its differentiable phases, and the held-back face PSNR each reaches (the quality must match)."""
    import torch

    from models.avatar.fit import fit_head
    from models.avatar.head import build_head
    from models.perception.face import FaceAnalyzer

    analyzer = FaceAnalyzer()
    photo = grace_hopper()
    warm_gsplat()
    report = {"photo": "matplotlib sample_data/grace_hopper.jpg", "gpu": torch.cuda.get_device_name(0),
              "cpu_threads": 1, "fits": []}
    for size in sizes:
        # gsplat twice: the first fit loads CUDA's kernels lazily
        for rasteriser, first in (("gsplat", True), ("gsplat", False), ("reference", False)):
            if rasteriser == "reference" and size > 256:
                continue  # the per-pixel lists grow with pixels x K: minutes on one thread, as the CPU profile never runs it
            t0 = time.perf_counter()
            r = fit_head(build_head(20000), [photo], size=size, analyzer=analyzer, rasteriser=rasteriser)
            row = {"size": size, "rasteriser": rasteriser, "first_on_the_gpu": first, "fit_s": round(time.perf_counter() - t0, 2),
                   "optimise_s": round(r.optimise_s, 2), "gaussians": len(r.head),
                   "psnr_face_after": round(r.psnr_face_after, 2), "psnr_head_after": round(r.psnr_after, 2),
                   "landmark_error_after": round(r.landmark_error_after, 4)}
            report["fits"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    from PIL import Image

    from models.avatar.face_metrics import EYE, MOUTH_INTERIOR, PartCoverage
    from models.avatar.fit import LANDMARK_SIZE, _align_by_mesh, _face_mask, fit_head
    from models.avatar.head import build_head
    from models.avatar.render import CPUAvatarRenderer, Pose
    from models.perception.face import FaceAnalyzer

    analyzer = FaceAnalyzer()
    photo = grace_hopper()
    stock = build_head(20000)
    size = 256
    stock_lm = analyzer.analyse([CPUAvatarRenderer(stock, LANDMARK_SIZE, LANDMARK_SIZE).render(Pose())])[0].landmarks
    aligned = _align_by_mesh([photo], size, stock_lm, analyzer)[0]
    face = _face_mask(aligned.landmarks, size)
    runs = {}
    fitted = None
    for block in (1, 8):
        t0 = time.perf_counter()
        r = fit_head(stock, [photo], size=size, holdout_block=block, analyzer=analyzer)
        runs[f"{block}px"] = {
            "holdout": r.holdout, "fit_s": round(time.perf_counter() - t0, 1),
            "psnr_face_before": round(r.psnr_face_before, 2), "psnr_face_after": round(r.psnr_face_after, 2),
            "psnr_face_interpolation_bound": round(interpolation_bound(aligned.crop, face, block), 2),
            "psnr_head_before": round(r.psnr_before, 2), "psnr_head_after": round(r.psnr_after, 2),
            "landmark_error_before": round(r.landmark_error_before, 4),
            "landmark_error_after": round(r.landmark_error_after, 4),
            "gaussians": len(r.head)}
        print(json.dumps(runs[f"{block}px"]))
        fitted = fitted or r.head
    cover = PartCoverage(fitted, 512, 512)
    eye_open = cover.area(Pose(), EYE)
    rig = {"mouth_interior_px_rest": cover.area(Pose(), MOUTH_INTERIOR),
           "mouth_interior_px_jaw_open": cover.area(Pose().set(jaw_open=1.0), MOUTH_INTERIOR),
           "eye_px_open": eye_open,
           "eye_visible_at_full_blink": round(cover.area(Pose().set(blink_l=1.0, blink_r=1.0), EYE) / max(eye_open, 1), 3),
           "at": "512x512"}
    print(json.dumps(rig))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "replica_fit.json").write_text(json.dumps({
        "photo": "matplotlib sample_data/grace_hopper.jpg", "fit_size": size, "runs": runs, "rig": rig,
        "video": video_views(),
        "targets": {"psnr_face_after": 26.0, "landmark_error_after": 0.05}}, indent=2))
    crop = (aligned.crop * 255).astype(np.uint8)
    tiles = [np.asarray(Image.fromarray(crop)), CPUAvatarRenderer(stock, size, size).render(Pose()),
             CPUAvatarRenderer(fitted, size, size).render(Pose()),
             CPUAvatarRenderer(fitted, size, size).render(Pose(yaw=0.3).set(jaw_open=0.7, smile=0.4))]
    Image.fromarray(np.concatenate(tiles, 1)).save(OUT / "replica_grace_hopper.png")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--compare-gsplat", action="store_true", help="gsplat (CUDA) vs the CPU reference fit")
    ap.add_argument("--out", type=Path, default=OUT / "replica_fit_gpu.json")
    args = ap.parse_args()
    compare_gsplat(args.out) if args.compare_gsplat else main()
