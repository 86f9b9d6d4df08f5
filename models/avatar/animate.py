"""Facial animation: lip sync from phoneme timings (or the audio envelope), emotion, and the
listening behaviour (blinks, saccades, nods) that keeps a face alive. Output: a Pose per frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.avatar.head import CHANNELS
from models.avatar.render import Pose

_IDX = {c: i for i, c in enumerate(CHANNELS)}

# Mouth shapes as rig weights (jaw_open, mouth_wide, mouth_round, lip_press, lip_tuck).
VISEMES: dict[str, dict[str, float]] = {
    "sil": {},
    "PP": {"lip_press": 1.0},  # p b m
    "FF": {"jaw_open": 0.05, "lip_tuck": 1.0},  # f v: upper teeth on the lower lip
    "TH": {"jaw_open": 0.25, "mouth_wide": 0.2},
    "DD": {"jaw_open": 0.3, "mouth_wide": 0.25},  # t d n l
    "kk": {"jaw_open": 0.35},  # k g ng h
    "SS": {"jaw_open": 0.12, "mouth_wide": 0.55},  # s z
    "CH": {"jaw_open": 0.22, "mouth_round": 0.5},  # sh ch j
    "RR": {"jaw_open": 0.2, "mouth_round": 0.55},
    "aa": {"jaw_open": 0.85, "mouth_wide": 0.15},
    "E": {"jaw_open": 0.45, "mouth_wide": 0.55},
    "I": {"jaw_open": 0.3, "mouth_wide": 0.7},
    "O": {"jaw_open": 0.55, "mouth_round": 0.8},
    "U": {"jaw_open": 0.25, "mouth_round": 1.0},
}

_PHONEME_TO_VISEME = {}
for chars, vis in (
    ("pbm", "PP"), ("fv", "FF"), ("θð", "TH"), ("tdnlɾ", "DD"), ("kgŋhx", "kk"), ("sz", "SS"),
    ("ʃʒ", "CH"), ("ɹrw", "RR"), ("aɑæʌɐ", "aa"), ("eɛə", "E"), ("iɪj", "I"), ("oɔɒ", "O"), ("uʊ", "U"),
):
    for c in chars:
        _PHONEME_TO_VISEME[c] = vis


def viseme_of(phoneme: str) -> str:
    """espeak IPA phoneme -> viseme name; stress marks and unknown symbols are silent."""
    for c in phoneme:
        if c in _PHONEME_TO_VISEME:
            return _PHONEME_TO_VISEME[c]
    return "sil"


def _viseme_vector(name: str) -> np.ndarray:
    v = np.zeros(len(CHANNELS), np.float32)
    for k, w in VISEMES[name].items():
        v[_IDX[k]] = w
    return v


_VIS_VEC = {name: _viseme_vector(name) for name in VISEMES}

# espeak's stress marks are tokens of their own in piper's alignment, and the voice spends real time on
# them: the start of the stressed vowel (up to ~120 ms). The length mark is the vowel held on. Shown as
# silence, they had closed the mouth during the loudest parts of words (in-page lip sync +30 to +120 ms).
_STRESS_MARKS = "ˈˌ"
_LENGTH_MARKS = "ːˑ"


def track_visemes(phonemes: list[tuple[str, float, float]]) -> list[str]:
    """The viseme shown over each phoneme's span: stress marks take the next phoneme's, length marks
    the previous one's."""
    names = [viseme_of(ph) for ph, _, _ in phonemes]
    for i in range(len(names) - 2, -1, -1):
        if phonemes[i][0] and all(c in _STRESS_MARKS for c in phonemes[i][0]):
            names[i] = names[i + 1]
    for i in range(1, len(names)):
        if phonemes[i][0] and all(c in _LENGTH_MARKS for c in phonemes[i][0]):
            names[i] = names[i - 1]
    return names

EMOTIONS: dict[str, dict[str, float]] = {
    "neutral": {},
    # Each face carries its action units at full strength (the face perception reads the same cues on
    # people): joy lifts the mouth corners and cheeks; sadness pulls the corners down and the inner
    # brows up; anger lowers the brows, narrows the eyes and presses the lips; surprise raises the
    # brows, widens the eyes and drops the jaw.
    "joy": {"smile": 1.5, "brows_up": 0.15, "cheek_puff": 0.35, "jaw_open": 0.06},
    "sadness": {"frown": 1.4, "brows_up": 0.2, "jaw_open": 0.02, "blink_l": 0.2, "blink_r": 0.2},
    "anger": {"brows_down": 1.5, "lip_press": 0.6, "frown": 0.5, "blink_l": 0.3, "blink_r": 0.3},
    "surprise": {"brows_up": 1.3, "jaw_open": 0.6, "mouth_round": 0.3, "blink_l": -0.35, "blink_r": -0.35},
}


# Following the user's face: a face at the edge of a webcam's frame is ~30 degrees off its axis; the
# eyes turn up to ~11 degrees (gaze weights are radians of eyeball rotation) and the head ~4.
FOLLOW_EYES = 0.2
FOLLOW_HEAD = 0.07
FOLLOW_S = 0.25  # how quickly the face turns to where the user now is
_CAMERA = np.zeros(2, np.float32)  # where the face looks when the user's is not seen


@dataclass
class SpeechTrack:
    """A clause being spoken: starts at `t0` on the media clock; phonemes relative to t0."""

    t0: float
    phonemes: list[tuple[str, float, float]]
    envelope: np.ndarray | None = None  # RMS per 10 ms, fallback when timings are missing
    duration: float = 0.0
    visemes: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.visemes = track_visemes(self.phonemes)


# How far the mouth's shape runs ahead of the sound: lips shape before the sound comes out, and viewers
# tolerate a picture early far better than late (ITU-R BT.1359: ~125 ms vs ~45 ms). Measured against
# piper's audio level over eight sentences, 20 ms puts the best-correlating lag at -20..+20 ms.
LIP_LEAD_S = 0.02
TRACK_TAIL_S = 0.3  # a clause's track is kept this long after its audio ends (the mouth closes)


def lip_weights(track: SpeechTrack, t: float, kernel_s: float = 0.045, lead_s: float = LIP_LEAD_S) -> np.ndarray:
    """Coarticulated mouth weights at media time t: each phoneme's viseme, weighted by a smooth
    kernel around its span, so neighbouring shapes blend instead of snapping. The mouth leads the
    sound by `lead_s`, as lips do (they shape before the sound comes out)."""
    rel = t - track.t0 + lead_s
    out = np.zeros(len(CHANNELS), np.float32)
    if rel < -0.1 or rel > track.duration + 0.15:
        return out
    if track.phonemes:
        total = 0.0
        for (_, a, b), vis in zip(track.phonemes, track.visemes, strict=True):
            if b < rel - 0.15 or a > rel + 0.15:
                continue
            mid, half = 0.5 * (a + b), 0.5 * (b - a)
            d = max(0.0, abs(rel - mid) - half)
            w = np.exp(-(d / kernel_s) ** 2)
            out += w * _VIS_VEC[vis]
            total += w
        return out / max(total, 1.0)
    if track.envelope is not None and track.envelope.size:
        i = int(rel * 100)
        if 0 <= i < track.envelope.size:
            out[_IDX["jaw_open"]] = float(np.clip(track.envelope[i] * 6.0, 0, 0.8))
    return out


@dataclass
class Animator:
    """State of one avatar's face. Call `pose(t)` for each video frame on the shared media clock."""

    emotion: str = "neutral"
    emotion_level: float = 1.0
    # While listening (not speaking) the face may answer what it sees of the user (perception):
    # a smile back, concern. None: keep `emotion`.
    listening_emotion: str | None = None
    listening_level: float = 0.5
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng())
    tracks: list[SpeechTrack] = field(default_factory=list)
    listening: bool = False
    _next_blink: float = 1.5
    _blink_t: float = -10.0
    _gaze: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    _gaze_target: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))
    _next_saccade: float = 0.8
    _look: np.ndarray | None = None  # where the user's face is in their camera's frame (-1..1, x right, y down)
    _follow: np.ndarray = field(default_factory=lambda: np.zeros(2, np.float32))  # eased towards _look
    _nod_t: float = -10.0
    _emo: np.ndarray = field(default_factory=lambda: np.zeros(len(CHANNELS), np.float32))
    _last_t: float = 0.0

    def watch(self, x: float | None, y: float = 0.0) -> None:
        """The user's face is at (x, y) of their camera's frame (-1..1 from the centre, x right, y down),
        or gone (None): the eyes, and a little the head, turn to follow them."""
        self._look = None if x is None else np.clip(np.array([x, y], np.float32), -1.0, 1.0)

    def speak(self, track: SpeechTrack) -> None:
        self.tracks.append(track)

    def stop_speaking(self) -> None:
        self.tracks.clear()

    def nod(self, t: float) -> None:
        """A small acknowledging nod (at the user's pauses)."""
        if t - self._nod_t > 1.5:
            self._nod_t = t

    def is_speaking(self, t: float) -> bool:
        return any(tr.t0 - 0.05 <= t <= tr.t0 + tr.duration + 0.05 for tr in self.tracks)

    def pose(self, t: float) -> Pose:
        # A pose asked again for an earlier time (client mode sends poses again when speech is queued
        # under them) leaves the eased state where it was.
        dt = min(max(t - self._last_t, 0.0), 0.2)
        self._last_t = max(self._last_t, t)
        p = Pose()
        # Emotion eases in and out over ~300 ms.
        target = np.zeros(len(CHANNELS), np.float32)
        emotion, level = self.emotion, self.emotion_level
        if self.listening_emotion is not None and not self.is_speaking(t):
            emotion, level = self.listening_emotion, self.listening_level
        for k, w in EMOTIONS.get(emotion, {}).items():
            target[_IDX[k]] = w * level
        self._emo += (target - self._emo) * (1 - np.exp(-dt / 0.3))
        p.weights[:] = self._emo
        self.tracks = [tr for tr in self.tracks if t <= tr.t0 + tr.duration + TRACK_TAIL_S]
        for tr in self.tracks:
            p.weights += lip_weights(tr, t)
        # Blinks every 2-6 s, ~150 ms each.
        if t >= self._next_blink:
            self._blink_t = t
            self._next_blink = t + self.rng.uniform(2.0, 6.0)
        bt = (t - self._blink_t) / 0.15
        blink = float(np.sin(np.pi * bt)) if 0 <= bt <= 1 else 0.0
        p.weights[_IDX["blink_l"]] += blink
        p.weights[_IDX["blink_r"]] += blink
        # Gaze stays on the user (the camera when their face is not seen) with small saccades. The user's
        # camera faces them: a user on the left of its frame is on the avatar's left, which the video
        # shows on the right (gaze_x and yaw turn to the image's right, gaze_y up, pitch down).
        if t >= self._next_saccade:
            self._gaze_target = self.rng.normal(0, 0.05, 2).astype(np.float32)
            self._next_saccade = t + self.rng.uniform(0.6, 2.5)
        self._gaze += (self._gaze_target - self._gaze) * min(1.0, dt / 0.04)
        look = self._look if self._look is not None else _CAMERA
        self._follow += (look - self._follow) * min(1.0, dt / FOLLOW_S)
        p.weights[_IDX["gaze_x"]] += self._gaze[0] - FOLLOW_EYES * self._follow[0]
        p.weights[_IDX["gaze_y"]] += self._gaze[1] - FOLLOW_EYES * self._follow[1]
        np.clip(p.weights, -1.0, 1.5, out=p.weights)
        # Restrained head motion: slow breathing sway, a nod when asked, a little life while talking.
        p.pitch = 0.01 * np.sin(2 * np.pi * t / 4.5) + FOLLOW_HEAD * self._follow[1]
        p.yaw = 0.008 * np.sin(2 * np.pi * t / 7.3) - FOLLOW_HEAD * self._follow[0]
        nt = (t - self._nod_t) / 0.6
        if 0 <= nt <= 1:
            p.pitch += 0.07 * np.sin(np.pi * nt) ** 2
        if self.is_speaking(t):
            p.pitch += 0.015 * np.sin(2 * np.pi * t / 1.7)
        return p
