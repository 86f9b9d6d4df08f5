"""What a rendered face shows, measured from pixels: which parts of the head cover the image (the
mouth interior while speaking, the eyes during a blink), and what the project's own face perception
reads on it. These are the numbers `benchmarks/render.py` reports and the avatar tests assert.
"""

from __future__ import annotations

import numpy as np

from models.avatar.head import PART_ID, Head
from models.avatar.raster_cpu import rasterize
from models.avatar.render import CPUAvatarRenderer, Pose

MOUTH_INTERIOR = ("mouth", "teeth", "tongue")
EYE = ("sclera", "iris", "pupil")


class PartCoverage:
    """Renders, per pixel, how much of the image a group of head parts makes up (0..1), with the
    same rasteriser, rig and camera as the video: a part hidden behind another does not count."""

    def __init__(self, head: Head, width: int, height: int) -> None:
        self.renderer = CPUAvatarRenderer(head, width, height)
        self.labels = head.splats.labels

    def __call__(self, pose: Pose, *groups: tuple[str, ...]) -> list[np.ndarray]:
        """One (H, W) coverage map per group (up to 3 groups: one colour channel each)."""
        if not 1 <= len(groups) <= 3:
            raise ValueError("1 to 3 part groups per render")
        colors = np.zeros((len(self.labels), 3), np.float32)
        for i, parts in enumerate(groups):
            colors[np.isin(self.labels, [PART_ID[p] for p in parts]), i] = 1.0
        r = self.renderer
        means, R = r.posed.means(pose)
        img = rasterize(means, r.posed._covs, colors, r._opac, r.camera, (0.0, 0.0, 0.0), pose_R=R,
                        rigid=r.posed._rigid if R is not None else None, hidden=r.hidden(means, R))
        return [img[..., i] for i in range(len(groups))]

    def area(self, pose: Pose, parts: tuple[str, ...], threshold: float = 0.5) -> int:
        """Pixels where `parts` make up more than `threshold` of the colour."""
        return int((self(pose, parts)[0] > threshold).sum())


def emotion_frames(head: Head, size: int = 512, per_emotion: int = 10, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Rendered frames of each emotion as a user sees them: the animator's own poses over time
    (the expression eased in, blinks, saccades, breathing sway; no speech), then three fixed head
    turns (yaw ±0.1 rad, pitch 0.06 rad) at full strength."""
    from models.avatar.animate import EMOTIONS, Animator

    r = CPUAvatarRenderer(head, size, size)
    frames = []
    for emotion, weights in EMOTIONS.items():
        anim = Animator(emotion=emotion, rng=np.random.default_rng(seed))
        for k in range(30 + per_emotion * 4):  # at 30 fps; every 4th frame from 1 s in (eased in by then)
            pose = anim.pose(k / 30.0)
            if k >= 30 and k % 4 == 2:
                frames.append((emotion, r.render(pose)))
        for yaw, pitch in ((0.1, 0.0), (-0.1, 0.0), (0.0, 0.06)):
            frames.append((emotion, r.render(Pose(yaw=yaw, pitch=pitch).set(**weights))))
    return frames


def emotion_readback(head: Head, size: int = 512, per_emotion: int = 10, seed: int = 0) -> dict:
    """Face perception run on `emotion_frames`: accuracy, per-emotion accuracy and the confusions.
    The resting face is learnt from a frontal neutral frame, as a session learns its user's."""
    from models.perception.face import FaceAnalyzer
    from models.perception.fusion import EMOTIONS, _cues, visual_emotion

    analyzer = FaceAnalyzer()
    rest = _cues(analyzer.analyse([CPUAvatarRenderer(head, size, size).render(Pose())])[0])
    frames = emotion_frames(head, size, per_emotion, seed)
    shown = [e for e, _ in frames]
    read = []
    for i in range(0, len(frames), 8):
        for o in analyzer.analyse([f for _, f in frames[i:i + 8]]):
            read.append(EMOTIONS[int(np.argmax(visual_emotion(o, rest)))] if o.present else "none")
    per = {e: float(np.mean([r == e for s, r in zip(shown, read, strict=True) if s == e])) for e in dict.fromkeys(shown)}
    confusions: dict[str, int] = {}
    for s, r in zip(shown, read, strict=True):
        if s != r:
            confusions[f"{s}->{r}"] = confusions.get(f"{s}->{r}", 0) + 1
    return {"size": size, "frames": len(frames), "accuracy": float(np.mean([s == r for s, r in zip(shown, read, strict=True)])),
            "per_emotion": per, "confusions": confusions}
