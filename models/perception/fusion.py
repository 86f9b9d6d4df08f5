"""Fusion of face, voice and words into one perception state per session, in plain language.

`VisualTrack` keeps a short rolling memory of face observations (a few per second): it smooths the
expression over ~1 s and measures attention over ~2 s. Expression is read two ways and blended:
- the `fer` model's class probabilities (trained on real faces: weak on some faces and lighting);
- facial action cues (mouth-corner lift, mouth opening, brow height) relative to this user's own
  resting face, which the track learns from frames without an expression. Measuring against the
  person's own baseline is what makes geometry usable across faces.
`fuse` adds the voice (prosody) and the words (sentiment), derives valence/arousal, flags
incongruence (the words say one thing, the face or voice another), and writes the description.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from models.perception.face import FaceObservation
from models.perception.prosody import Prosody
from models.perception.sentiment import Sentiment

EMOTIONS = ("neutral", "joy", "sadness", "anger", "surprise")
# fer's 7 classes onto the avatar's 5 emotions (disgust reads as anger, fear as surprise).
_FER_TO = {"neutral": "neutral", "happy": "joy", "sad": "sadness", "angry": "anger", "disgust": "anger",
           "surprise": "surprise", "fear": "surprise"}
_VALENCE = {"neutral": 0.0, "joy": 0.8, "sadness": -0.6, "anger": -0.7, "surprise": 0.1}
_AROUSAL = {"neutral": 0.3, "joy": 0.55, "sadness": 0.2, "anger": 0.75, "surprise": 0.8}
_LOOKS = {"neutral": "looks calm", "joy": "is smiling and looks happy", "sadness": "looks sad",
          "anger": "looks tense or annoyed", "surprise": "looks surprised"}
# Resting-face prior (mean of the cues on frontal neutral faces), used until the user's own is learnt.
_PRIOR = np.array([0.004, 0.012, 0.128, 0.3], np.float32)  # smile, mouth_open, brow_raise, eyes_open
_FIRST_BAND = np.array([0.02, 0.025, 0.02, 0.12], np.float32)  # faces differ this much at rest
_CALM_BAND = np.array([0.008, 0.012, 0.01, 0.03], np.float32)  # below the expression thresholds


def fer_to_emotions(expression: dict[str, float]) -> np.ndarray:
    """fer probabilities -> [5] over EMOTIONS."""
    p = np.zeros(len(EMOTIONS), np.float32)
    for k, v in expression.items():
        p[EMOTIONS.index(_FER_TO[k])] += v
    return p / max(float(p.sum()), 1e-6)


def _cues(o: FaceObservation) -> np.ndarray:
    return np.array([o.smile, o.mouth_open, o.brow_raise, o.eyes_open], np.float32)


def action_evidence(delta: np.ndarray) -> np.ndarray:
    """[5] evidence per emotion from cue changes against the resting face (smile, mouth open, brow
    height, eye openness: the mouth-corner, jaw-drop, brow and lid action units)."""
    def sig(x: float) -> float:
        return float(1 / (1 + np.exp(-x)))

    smile, opened, brow, eyes = (float(v) for v in delta)
    widened = sig((eyes - 0.04) / 0.01)
    joy = sig((smile - 0.012) / 0.003) * (1 - sig((opened - 0.035) / 0.006))
    surprise = max(sig((opened - 0.025) / 0.005), sig((brow - 0.02) / 0.004), widened) * (1 - 0.7 * joy)
    # Lowered brows (the brow lowerer, anger's mark) turn corners pulled down from sadness to anger;
    # sad brows rise at the inner ends, so they do not read as lowered.
    lowered = sig((-brow - 0.006) / 0.002)
    down = sig((-smile - 0.006) / 0.002)
    sadness = down * (1 - lowered)
    narrowed = sig((-eyes - 0.03) / 0.01) if eyes > -0.15 else 0.0  # not a blink
    anger = max(sig((-brow - 0.009) / 0.0025), lowered * sig((-smile - 0.002) / 0.002),
                narrowed * (1 - sig((smile - 0.005) / 0.003)))
    ev = np.array([0.0, joy, sadness, anger, surprise], np.float32)
    ev[0] = 1.0 - ev[1:].max()
    return ev


def visual_emotion(o: FaceObservation, rest: np.ndarray | None = None, fer_weight: float = 0.35) -> np.ndarray:
    """[5] probabilities over EMOTIONS for one observation, given the user's resting cues."""
    ev = action_evidence(_cues(o) - (_PRIOR if rest is None else rest))
    p = fer_weight * fer_to_emotions(o.expression) + (1 - fer_weight) * ev / max(float(ev.sum()), 1e-6)
    return p / float(p.sum())


@dataclass
class VisualTrack:
    """Rolling visual state of one user from timestamped observations."""

    smooth_s: float = 1.0  # expression smoothing time constant
    attention_window_s: float = 2.0
    rest: np.ndarray = field(default_factory=lambda: _PRIOR.copy())
    rest_frames: int = 0
    probs: np.ndarray = field(default_factory=lambda: np.eye(len(EMOTIONS), dtype=np.float32)[0])
    last_t: float | None = None
    last_face_t: float | None = None
    last: FaceObservation | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=64))  # (t, present, looking, eyes_open)

    def add(self, t: float, o: FaceObservation) -> None:
        looking = o.looking_at_camera
        self.history.append((t, o.present, looking, o.eyes_open))
        self.last = o
        if not o.present:
            self.last_t = t
            return
        # Learn the resting face from frontal frames without an expression: at first, frames within a
        # loose band of the population prior (fast); later, frames close to the learnt rest (slowly).
        cues = _cues(o)
        if self.rest_frames < 3:
            calm = bool((np.abs(cues - _PRIOR) < _FIRST_BAND).all())
        else:
            calm = bool((np.abs(cues - self.rest) < _CALM_BAND).all())
        if looking and calm:
            rate = 0.5 if self.rest_frames < 6 else 0.05
            self.rest = self.rest + rate * (cues - self.rest)
            self.rest_frames += 1
        p = visual_emotion(o, self.rest)
        dt = 0.0 if self.last_t is None else max(0.0, t - self.last_t)
        a = 1.0 if self.last_face_t is None else 1 - float(np.exp(-dt / self.smooth_s))
        self.probs = (1 - a) * self.probs + a * p
        self.last_t = self.last_face_t = t

    def emotion(self) -> tuple[str, float]:
        i = int(np.argmax(self.probs))
        return EMOTIONS[i], float(self.probs[i])

    def attention(self, now: float) -> dict:
        recent = [h for h in self.history if now - h[0] <= self.attention_window_s]
        if not recent:
            return {"visible": False, "looking": 0.0, "eyes_closed": False}
        present = [h for h in recent if h[1]]
        return {"visible": bool(present) and recent[-1][1],
                "looking": sum(1 for h in recent if h[2]) / len(recent),
                "eyes_closed": bool(present) and all(h[3] < 0.12 for h in present)}


@dataclass
class PerceptionState:
    """What the AI human perceives of the user now."""

    t: float
    visible: bool
    emotion: str  # one of EMOTIONS
    confidence: float
    valence: float  # -1..1
    arousal: float  # 0..1
    attention: float  # share of the last 2 s spent looking at the camera, 0..1
    eyes_closed: bool
    incongruent: bool
    visual: str  # the face alone, e.g. "The user is smiling and looks happy, looking at you."
    description: str  # face + voice + words, for the LLM
    # Worth telling the LLM: anything but the everyday calm, attentive look (an emotion, looking away,
    # absent, eyes closed, words and face disagreeing). The voice's part is judged by the session.
    notable: bool
    visual_notable: bool = False  # the face alone is worth telling (the LLM reads `visual` then)
    incongruence: str = ""  # the sentence saying how words, face and voice disagree ("" when they do not)

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def describe_visual(track: VisualTrack, now: float) -> str:
    att = track.attention(now)
    if not att["visible"]:
        return "The user is not visible on camera."
    emotion, conf = track.emotion()
    looks = _LOOKS[emotion] if conf >= 0.4 else "has an unclear expression"
    if att["eyes_closed"]:
        where = "with their eyes closed"
    elif att["looking"] >= 0.6:
        where = "looking at you"
    elif att["looking"] >= 0.25:
        where = "glancing away now and then"
    else:
        where = "looking away from the screen"
    return f"The user {looks}, {where}."


def fuse(track: VisualTrack | None, now: float, voice: Prosody | None = None, voice_text: str | None = None,
         words: Sentiment | None = None) -> PerceptionState:
    """One state from the latest face track, the last utterance's voice (and its description) and
    the sentiment of its words."""
    att = track.attention(now) if track is not None else {"visible": False, "looking": 0.0, "eyes_closed": False}
    visible = att["visible"]
    emotion, conf = track.emotion() if (track is not None and visible) else ("neutral", 0.0)
    valence = _VALENCE[emotion] * conf if visible else 0.0
    arousal = _AROUSAL[emotion] if visible else 0.3
    if voice is not None and voice.voiced_s > 0.3:
        loud = float(np.clip((voice.energy_db + 30) / 20, 0, 1))
        fast = float(np.clip((voice.syllables_per_s - 4.0) / 3, 0, 1))  # describe(): slow < 4.8 < 6.5 < fast
        lively = float(np.clip(voice.pitch_range_st / 8, 0, 1))
        arousal = 0.5 * arousal + 0.5 * (0.4 * loud + 0.35 * fast + 0.25 * lively)
    if words is not None and words.label != "neutral":
        valence = 0.6 * valence + 0.4 * words.compound if visible else words.compound
    parts = [describe_visual(track, now) if track is not None else "The user is not visible on camera."]
    if voice_text:
        parts.append(voice_text)
    incongruent = False
    if words is not None and visible and conf >= 0.45:
        if words.compound >= 0.3 and emotion in ("sadness", "anger"):
            incongruent = True
            parts.append(f"They say something positive but {_LOOKS[emotion].replace('looks', 'look')}: "
                         "their words and face disagree.")
        elif words.compound <= -0.3 and emotion == "joy":
            incongruent = True
            parts.append("They say something negative while smiling: perhaps joking, or masking how they feel.")
    if (not incongruent and words is not None and words.compound >= 0.3 and voice is not None
            and (voice.fillers >= 2 or voice.pause_ratio > 0.35) and voice.syllables_per_s < 3.0):
        incongruent = True
        parts.append("Their words are positive but their voice sounds hesitant.")
    everyday_look = visible and att["looking"] >= 0.6 and not att["eyes_closed"] and (emotion == "neutral" or conf < 0.45)
    return PerceptionState(t=now, visible=visible, emotion=emotion, confidence=conf, valence=float(np.clip(valence, -1, 1)),
                           arousal=float(np.clip(arousal, 0, 1)), attention=float(att["looking"]),
                           eyes_closed=bool(att["eyes_closed"]), incongruent=incongruent, visual=parts[0],
                           description=" ".join(parts), notable=incongruent or not everyday_look,
                           visual_notable=not everyday_look, incongruence=parts[-1] if incongruent else "")


@dataclass
class SessionPerception:
    """Time-weighted record of a session's perception states, for the end-of-call analysis."""

    visible_s: float = 0.0
    total_s: float = 0.0
    looking_s: float = 0.0
    emotion_s: dict = field(default_factory=lambda: dict.fromkeys(EMOTIONS, 0.0))
    valence_sum: float = 0.0
    arousal_sum: float = 0.0
    incongruent_moments: list = field(default_factory=list)  # (t, description)
    tool_calls: list = field(default_factory=list)  # (t, name)
    _last_t: float | None = None

    def add(self, state: PerceptionState) -> None:
        dt = 0.0 if self._last_t is None else min(max(state.t - self._last_t, 0.0), 2.0)
        self._last_t = state.t
        self.total_s += dt
        if state.visible:
            self.visible_s += dt
            self.looking_s += dt * state.attention
            self.emotion_s[state.emotion] += dt
            self.valence_sum += dt * state.valence
            self.arousal_sum += dt * state.arousal

    def summary(self) -> dict:
        vis = max(self.visible_s, 1e-6)
        shares = {k: round(v / vis, 3) for k, v in self.emotion_s.items()} if self.visible_s else {}
        main = max(shares, key=shares.get) if shares else None
        text = []
        if self.visible_s < 0.5:
            text.append("The user was not visible on camera.")
        else:
            text.append(f"The user was visible {100 * self.visible_s / max(self.total_s, 1e-6):.0f}% of the call and looked "
                        f"at the screen {100 * self.looking_s / vis:.0f}% of the time they were visible.")
            others = [f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.1 and k != main]
            text.append(f"Mostly {_LOOKS[main].replace('is smiling and ', '').replace('looks ', '')}"
                        + (f" (also {', '.join(others)})." if others else "."))
        if self.incongruent_moments:
            text.append(f"{len(self.incongruent_moments)} moment(s) where words and face or voice disagreed.")
        if self.tool_calls:
            text.append("Perception tools fired: " + ", ".join(n for _, n in self.tool_calls) + ".")
        return {"visible_s": round(self.visible_s, 1), "duration_s": round(self.total_s, 1),
                "attention": round(self.looking_s / vis, 3) if self.visible_s else 0.0,
                "emotion_shares": shares, "dominant_emotion": main,
                "mean_valence": round(self.valence_sum / vis, 3) if self.visible_s else 0.0,
                "mean_arousal": round(self.arousal_sum / vis, 3) if self.visible_s else 0.0,
                "incongruent_moments": [{"t": round(t, 1), "description": d} for t, d in self.incongruent_moments],
                "tool_calls": [{"t": round(t, 1), "name": n} for t, n in self.tool_calls],
                "summary": " ".join(text)}
