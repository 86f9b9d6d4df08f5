"""The user's face from one camera frame: detection, the 478-point mesh, facial expression and
attention (present, head pose, gaze toward the camera, eyes open).

Runs the models that ship inside packages, through LiteRT (`ai-edge-litert`):
- mediapipe 0.10.21's BlazeFace short-range detector, its 468-point face mesh and its iris model
  (5 points per eye: 468 + 10 = 478, the refined topology's numbering). mediapipe itself is installed
  only as a data package and never imported: its Python side needs protobuf < 5, which Ray's
  protobuf breaks. (The mesh-with-attention model needs mediapipe's custom ops, so it is not used.)
- the `fer` package's quantised expression model (64×64 grey, 7 classes), without TensorFlow.

Pre/post-processing is numpy + OpenCV (warps and resizes; PIL's affine transform cost 5× more): SSD
anchors and box decoding for BlazeFace, a rotated square crop (eyes level, 1.5× the face box, as
mediapipe's graph does) for the mesh, and geometry for pose, gaze and eye openness. Frames are
analysed in batches, stage by stage (each model is invoked sample by sample: its batch size is fixed at 1).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import cv2
import numpy as np

FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
DET_SIZE = 128
MESH_SIZE = 192
FER_SIZE = 64

# Mesh indices (mediapipe's canonical face topology).
EYE_R = (33, 133, 159, 145, 160, 144, 158, 153)  # the person's right eye: outer, inner, top, bottom, ...
EYE_L = (263, 362, 386, 374, 387, 373, 385, 380)
MOUTH_CORNERS = (61, 291)
LIP_TOP, LIP_BOTTOM = 13, 14
SUBNASALE, CHIN, FOREHEAD = 2, 152, 10
CHEEK_R, CHEEK_L = 234, 454
BROW_R, BROW_L = 105, 334


class FaceModelsMissing(RuntimeError):
    """The packages that carry the face models are not installed."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing(f"package {name!r} (model files) is not installed; run scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def model_paths() -> dict[str, Path]:
    mp = _package_dir("mediapipe") / "modules"
    paths = {
        "detector": mp / "face_detection" / "face_detection_short_range.tflite",
        "mesh": mp / "face_landmark" / "face_landmark.tflite",
        "iris": mp / "iris_landmark" / "iris_landmark.tflite",
        "expression": _package_dir("fer") / "data" / "emotion_model_quantized.tflite",
    }
    for p in paths.values():
        if not p.is_file():
            raise FaceModelsMissing(f"model file missing: {p}")
    return paths


def _ssd_anchors() -> np.ndarray:
    """BlazeFace short-range anchors (mediapipe's SsdAnchorsCalculator options for this model):
    strides 8, 16, 16, 16 on a 128² input, 2 anchors per layer per cell, fixed size 1."""
    centers = []
    for stride, per_cell in ((8, 2), (16, 6)):
        n = DET_SIZE // stride
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        c = np.stack([xs.ravel(), ys.ravel()], 1)
        centers.append(np.repeat(c, per_cell, axis=0))
    return np.concatenate(centers).astype(np.float32)  # [896, 2] (x, y) in [0, 1]


ANCHORS = _ssd_anchors()


@dataclass
class FaceObservation:
    """What one frame shows of the user's face. Coordinates are in the frame's pixels."""

    present: bool
    score: float = 0.0
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    expression: dict[str, float] = field(default_factory=dict)  # FER_CLASSES -> probability
    yaw_deg: float = 0.0  # left/right turn (0: facing the camera; a mirrored image flips the sign)
    pitch_deg: float = 0.0  # + head tilted down
    roll_deg: float = 0.0
    gaze: tuple[float, float] = (0.0, 0.0)  # iris offset in the eye, -1..1 (x: image right +, y: down +)
    eyes_open: float = 0.0  # eye aspect ratio, mean of both eyes (~0.25-0.35 open, < 0.15 closed)
    smile: float = 0.0  # mouth-corner lift relative to the lip line, in face heights
    mouth_open: float = 0.0  # inner-lip gap in face heights
    brow_raise: float = 0.0  # brow-to-eye distance in face heights
    landmarks: np.ndarray | None = None  # [478, 3]; kept in memory only (biometric)
    roi: tuple[float, float, float, float] | None = None  # where to look for this face in the next frame

    @property
    def looking_at_camera(self) -> bool:
        return (self.present and abs(self.yaw_deg) < 20 and abs(self.pitch_deg) < 20
                and abs(self.gaze[0]) < 0.45 and abs(self.gaze[1]) < 0.6)

    def summary(self) -> dict:
        """A JSON-safe view without the landmarks."""
        d = {k: getattr(self, k) for k in ("present", "score", "box", "roi", "yaw_deg", "pitch_deg", "roll_deg", "gaze",
                                           "eyes_open", "smile", "mouth_open", "brow_raise")}
        d["expression"] = {k: round(v, 3) for k, v in self.expression.items()}
        d["looking_at_camera"] = self.looking_at_camera
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}

    @classmethod
    def from_summary(cls, d: dict) -> FaceObservation:
        """Rebuild an observation (without landmarks) from `summary()`, e.g. after a Serve call."""
        keep = {k: d[k] for k in ("present", "score", "yaw_deg", "pitch_deg", "roll_deg", "eyes_open", "smile",
                                  "mouth_open", "brow_raise") if k in d}
        box, roi = d.get("box"), d.get("roi")
        return cls(**keep, box=tuple(box) if box else None, roi=tuple(roi) if roi else None,
                   gaze=tuple(d.get("gaze", (0.0, 0.0))), expression=dict(d.get("expression") or {}))


class _Model:
    """One LiteRT interpreter run over a batch. These models reshape with a hard-coded batch of 1,
    so a batch is invoked sample by sample (the interpreter and its buffers are reused)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.outs = {d["name"]: d["index"] for d in self.it.get_output_details()}

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs: dict[str, list[np.ndarray]] = {name: [] for name in self.outs}
        for sample in np.ascontiguousarray(x, np.float32):
            self.it.set_tensor(self.inp["index"], sample[None])
            self.it.invoke()
            for name, i in self.outs.items():
                outs[name].append(self.it.get_tensor(i).copy())
        return {name: np.concatenate(v) for name, v in outs.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


class FaceAnalyzer:
    """Analyse camera frames (RGB uint8, any size) into `FaceObservation`s, one per frame.

    Only the most confident face per frame is analysed: a conversation has one user."""

    def __init__(self, min_score: float = 0.5, threads: int = 1) -> None:
        cv2.setNumThreads(threads)  # the warps are small: OpenCV's thread pool would only add contention
        paths = model_paths()
        self.detector = _Model(paths["detector"], threads)
        self.mesh = _Model(paths["mesh"], threads)
        self.iris = _Model(paths["iris"], threads)
        self.expression = _Model(paths["expression"], threads)
        self.min_score = min_score

    # --- detection ---------------------------------------------------------------------------------
    def _detect(self, frames: list[np.ndarray]) -> list[tuple[float, np.ndarray, np.ndarray] | None]:
        """Best face per frame: (score, box [4] x0 y0 x1 y1 px, keypoints [6, 2] px) or None."""
        batch = np.empty((len(frames), DET_SIZE, DET_SIZE, 3), np.float32)
        scales = []
        for i, f in enumerate(frames):
            h, w = f.shape[:2]
            side = max(h, w)
            # Letterbox to a square (the detector was trained on undistorted faces).
            iw, ih = max(1, round(w * DET_SIZE / side)), max(1, round(h * DET_SIZE / side))
            img = cv2.resize(f, (iw, ih), interpolation=cv2.INTER_AREA)
            ox, oy = (DET_SIZE - iw) // 2, (DET_SIZE - ih) // 2
            batch[i] = 0.0
            batch[i, oy:oy + ih, ox:ox + iw] = img
            scales.append((side / DET_SIZE, ox, oy))
        batch = batch * (2 / 255.0) - 1.0
        out = self.detector(batch)
        reg, cls = out["regressors"], out["classificators"][..., 0]
        scores = _sigmoid(cls)
        results: list[tuple[float, np.ndarray, np.ndarray] | None] = []
        for i, (s, ox, oy) in enumerate(scales):
            j = int(np.argmax(scores[i]))
            if scores[i, j] < self.min_score:
                results.append(None)
                continue
            # Average the overlapping candidates of the best face (mediapipe's weighted NMS).
            r = reg[i] / DET_SIZE
            cx, cy = r[:, 0] + ANCHORS[:, 0], r[:, 1] + ANCHORS[:, 1]
            bw, bh = r[:, 2], r[:, 3]
            x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
            ix = np.clip(np.minimum(x1, x1[j]) - np.maximum(x0, x0[j]), 0, None)
            iy = np.clip(np.minimum(y1, y1[j]) - np.maximum(y0, y0[j]), 0, None)
            inter = ix * iy
            iou = inter / (bw * bh + bw[j] * bh[j] - inter + 1e-9)
            sel = (iou > 0.3) & (scores[i] >= self.min_score)
            wts = scores[i][sel] / scores[i][sel].sum()
            box = np.array([x0[sel] @ wts, y0[sel] @ wts, x1[sel] @ wts, y1[sel] @ wts]) * DET_SIZE
            kp = (r[sel, 4:16].reshape(-1, 6, 2) + ANCHORS[sel, None, :]) * DET_SIZE
            kp = np.einsum("n,nkc->kc", wts, kp)
            box = (box - [ox, oy, ox, oy]) * s
            kp = (kp - [ox, oy]) * s
            results.append((float(scores[i, j]), box, kp))
        return results

    # --- mesh ----------------------------------------------------------------------------------------
    @staticmethod
    def _roi_from_detection(box: np.ndarray, kp: np.ndarray) -> tuple[float, float, float, float]:
        """The mesh crop (cx, cy, size, angle) for a detection: square, 1.5× the face box, eyes level."""
        (rx, ry), (lx, ly) = kp[0], kp[1]  # the person's right eye appears on the image's left
        return (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2,
                1.5 * float(max(box[2] - box[0], box[3] - box[1])), math.atan2(ly - ry, lx - rx))

    @staticmethod
    def _affine(roi: tuple[float, float, float, float]) -> np.ndarray:
        """Affine map crop px -> frame px for a mesh crop (cx, cy, size, angle)."""
        cx, cy, size, angle = roi
        c, s = math.cos(angle), math.sin(angle)
        k = size / MESH_SIZE
        # frame = centre + R(angle) · k · (crop - MESH_SIZE/2)
        a = np.array([[c * k, -s * k], [s * k, c * k]])
        t = np.array([cx, cy]) - a @ np.array([MESH_SIZE / 2, MESH_SIZE / 2])
        return np.concatenate([a, t[:, None]], 1)  # [2, 3]

    def analyse(self, frames: list[np.ndarray], hints: list | None = None) -> list[FaceObservation]:
        """One observation per frame, in order.

        `hints[i]` may be the previous frame's `FaceObservation.roi` for frame i: the mesh crop is then
        taken there and detection is skipped (mediapipe's tracking); if the mesh model finds no face
        in it, the frame is detected afresh."""
        if not frames:
            return []
        hints = hints or [None] * len(frames)
        # Where to crop each frame for the mesh (cx, cy, size, angle), and how sure we are a face is there.
        crop_at: list[tuple[float, float, float, float] | None] = [None] * len(frames)
        scores = [1.0] * len(frames)
        need = [i for i, h in enumerate(hints) if h is None]
        for i, d in zip(need, self._detect([frames[i] for i in need]) if need else [], strict=True):
            if d is not None:
                scores[i], box, kp = d
                crop_at[i] = self._roi_from_detection(box, kp)
        for i, h in enumerate(hints):
            if h is not None:
                crop_at[i] = tuple(float(v) for v in h)
        found = [i for i, r in enumerate(crop_at) if r is not None]
        obs = [FaceObservation(present=False) for _ in frames]
        if not found:
            return obs
        crops = np.empty((len(found), MESH_SIZE, MESH_SIZE, 3), np.uint8)
        rois = []
        for n, i in enumerate(found):
            m = self._affine(crop_at[i])
            rois.append(m)
            # m maps crop -> frame, so it is the inverse map the warp samples through.
            cv2.warpAffine(frames[i], _pixel_centres(m), (MESH_SIZE, MESH_SIZE), dst=crops[n],
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
        out = self.mesh(crops.astype(np.float32) * (1 / 255.0))
        mesh = out["conv2d_21"].reshape(len(found), 468, 3)
        flag = _sigmoid(out["conv2d_31"].reshape(-1))
        iris = self._irises(crops, mesh)
        faces = self._expression_inputs(crops, mesh)
        probs = self.expression(faces)["Identity"]
        lost = []
        for n, i in enumerate(found):
            score = float(min(scores[i], flag[n]))
            if flag[n] < 0.5:
                if hints[i] is not None:
                    lost.append(i)  # tracking lost the face: detect it again below
                continue  # the detector fired but the mesh model sees no face
            pts = np.empty((478, 3), np.float32)
            pts[:468] = mesh[n]
            pts[468:] = iris[n]
            m = rois[n]
            lin = m[:, :2]
            scale = float(np.sqrt(abs(np.linalg.det(lin))))
            frame_pts = pts.copy()
            frame_pts[:, :2] = pts[:, :2] @ lin.T + m[:, 2]
            frame_pts[:, 2] *= scale
            p = probs[n] / max(float(probs[n].sum()), 1e-6)
            mesh_h = float(np.ptp(mesh[n, :, 1]))
            # The next frame's crop: centred on this face, same scale, eyes level; dropped (so the next
            # frame is detected) when the face no longer fills the crop the way the mesh model expects.
            (x0, y0), (x1, y1) = frame_pts[:468, :2].min(0), frame_pts[:468, :2].max(0)
            eyes = frame_pts[EYE_L[0], :2] - frame_pts[EYE_R[0], :2]
            roi = ((float(x0 + x1) / 2, float(y0 + y1) / 2, scale * MESH_SIZE, math.atan2(eyes[1], eyes[0]))
                   if 0.45 * MESH_SIZE < mesh_h < 0.9 * MESH_SIZE else None)
            obs[i] = _describe_geometry(FaceObservation(
                present=True, score=score, box=(float(x0), float(y0), float(x1), float(y1)), roi=roi,
                expression={c: float(v) for c, v in zip(FER_CLASSES, p, strict=True)}, landmarks=frame_pts),
                pts, roll=math.degrees(math.atan2(lin[1, 0], lin[0, 0])))
        if lost:
            for i, o in zip(lost, self.analyse([frames[i] for i in lost]), strict=True):
                obs[i] = o
        return obs

    def _irises(self, crops: np.ndarray, mesh: np.ndarray) -> np.ndarray:
        """Iris points [n, 10, 3] in crop px: 468-472 the person's right eye, 473-477 the left.

        Each eye is cropped square around its corners at 2.3× the eye's width (mediapipe's iris ROI);
        the model was trained on left eyes, so right-eye crops are mirrored in and out."""
        eyes = np.empty((2 * len(crops), 64, 64, 3), np.float32)
        boxes = []
        for n, img in enumerate(crops):
            for k, (a, b) in enumerate(((EYE_R[0], EYE_R[1]), (EYE_L[1], EYE_L[0]))):
                c = 0.5 * (mesh[n, a, :2] + mesh[n, b, :2])
                half = 1.15 * abs(mesh[n, b, 0] - mesh[n, a, 0]) + 1.0
                # A scale + shift warp (zero outside the crop); the right eye's is mirrored.
                x0, y0 = float(c[0] - half), float(c[1] - half)
                s = 64 / (2 * half)
                m = (np.array([[-s, 0, s * (x0 + 2 * half)], [0, s, -s * y0]]) if k == 0
                     else np.array([[s, 0, -s * x0], [0, s, -s * y0]]))
                eyes[2 * n + k] = cv2.warpAffine(img, _pixel_centres(m), (64, 64), flags=cv2.INTER_LINEAR,
                                                 borderMode=cv2.BORDER_CONSTANT)
                boxes.append((x0, y0, 2 * half))
        pts = self.iris(eyes * (1 / 255.0))["output_iris"].reshape(-1, 5, 3).copy()
        pts[0::2, :, 0] = 64 - pts[0::2, :, 0]  # un-mirror the right eyes
        for i, (x0, y0, side) in enumerate(boxes):
            s = side / 64
            pts[i, :, :2] = pts[i, :, :2] * s + (x0, y0)
            pts[i, :, 2] *= s
        return pts.reshape(len(crops), 10, 3)

    @staticmethod
    def _expression_inputs(crops: np.ndarray, mesh: np.ndarray) -> np.ndarray:
        """fer's input: the tight face box (from the mesh, in the upright crop), grey, 64², in [-1, 1]."""
        out = np.empty((len(crops), FER_SIZE, FER_SIZE, 1), np.float32)
        for n, img in enumerate(crops):
            x0, y0 = np.clip(mesh[n, :, :2].min(0), 0, MESH_SIZE - 2)
            x1, y1 = np.clip(mesh[n, :, :2].max(0), x0 + 2, MESH_SIZE)
            # Area resampling: the face box is shrunk ~2× and fer was trained on smooth 64² faces.
            x0, y0, x1, y1 = int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))
            grey = cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
            out[n, :, :, 0] = cv2.resize(grey, (FER_SIZE, FER_SIZE), interpolation=cv2.INTER_AREA)
        return out * (2 / 255.0) - 1.0


def _pixel_centres(m: np.ndarray) -> np.ndarray:
    """An affine map between continuous image coordinates (pixel i spans [i, i+1], as the models'
    points are) rewritten for OpenCV, which puts pixel i at coordinate i."""
    out = m.astype(np.float64, copy=True)
    out[:, 2] += out[:, :2].sum(1) * 0.5 - 0.5
    return out


def _describe_geometry(o: FaceObservation, pts: np.ndarray, roll: float) -> FaceObservation:
    """Head pose, gaze, eye openness and expression cues from the upright-crop mesh `pts`."""
    face_h = float(np.linalg.norm(pts[FOREHEAD, :2] - pts[CHIN, :2])) + 1e-6
    # Pose from the mesh's depth: yaw from the cheek-to-cheek line, pitch from forehead to the base of
    # the nose (not the chin, which drops with the jaw; not the mouth corners, which rise in a smile).
    across = pts[CHEEK_L] - pts[CHEEK_R]
    o.yaw_deg = float(np.degrees(np.arctan2(-across[2], across[0])))
    down = pts[SUBNASALE] - pts[FOREHEAD]
    o.pitch_deg = float(np.degrees(np.arctan2(down[2], down[1])))
    o.roll_deg = float(roll)
    mouth_y = 0.5 * (pts[MOUTH_CORNERS[0], 1] + pts[MOUTH_CORNERS[1], 1])

    def ear(e: tuple[int, ...]) -> float:
        width = np.linalg.norm(pts[e[0], :2] - pts[e[1], :2]) + 1e-6
        lids = (np.linalg.norm(pts[e[2], :2] - pts[e[3], :2]) + np.linalg.norm(pts[e[4], :2] - pts[e[5], :2])
                + np.linalg.norm(pts[e[6], :2] - pts[e[7], :2])) / 3
        return float(lids / width)

    o.eyes_open = 0.5 * (ear(EYE_R) + ear(EYE_L))

    def gaze(e: tuple[int, ...], iris_centre: np.ndarray) -> np.ndarray:
        a, b = pts[e[0], :2], pts[e[1], :2]
        centre = 0.5 * (a + b)
        half_w = 0.5 * abs(b[0] - a[0]) + 1e-6
        half_h = 0.5 * abs(pts[e[3], 1] - pts[e[2], 1]) + 1e-6
        return np.array([(iris_centre[0] - centre[0]) / half_w, (iris_centre[1] - centre[1]) / max(half_h, 0.3 * half_w)])

    g = 0.5 * (gaze(EYE_R, pts[468, :2]) + gaze(EYE_L, pts[473, :2]))
    o.gaze = (float(g[0]), float(g[1]))
    # Corners against the upper lip's centre, which stays put when the jaw drops (the lip centre line
    # would move down with the jaw and read an open mouth as a smile).
    o.smile = float((pts[LIP_TOP, 1] - mouth_y) / face_h)
    o.mouth_open = float((pts[LIP_BOTTOM, 1] - pts[LIP_TOP, 1]) / face_h)
    brows = 0.5 * ((pts[EYE_R[2], 1] - pts[BROW_R, 1]) + (pts[EYE_L[2], 1] - pts[BROW_L, 1]))
    o.brow_raise = float(brows / face_h)
    return o
