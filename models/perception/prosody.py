"""Voice prosody of one utterance with cheap numpy features: pitch level and movement
(YIN on 40 ms frames), energy, speaking rate (syllable nuclei from the energy
envelope), pauses and hesitation; and a plain-language description an LLM or an event can carry.

Vectorised over frames: YIN's difference function for all frames of the utterance from one pair of
FFTs. Thresholds in `describe` are heuristics tuned on piper speech, not a trained model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

SR = 16000
FRAME = 640  # 40 ms: two periods of a 50 Hz voice
HOP = 160  # 10 ms
F0_MIN, F0_MAX = 60.0, 400.0
FILLERS = re.compile(r"\b(um+|uh+|erm?|hmm+|you know|i mean|like,)\b", re.IGNORECASE)


@dataclass
class Prosody:
    voiced_s: float
    pitch_hz: float | None  # median f0 of voiced frames
    pitch_range_st: float  # spread of f0 (semitones, 10th..90th percentile)
    pitch_slope_st: float  # f0 movement over the last half second vs the median (semitones): + rising
    energy_db: float  # mean level of voiced frames, dBFS
    syllables_per_s: float  # over voiced + short-pause time
    pauses: int  # silences >= 250 ms inside the utterance
    pause_ratio: float  # silent share of the utterance between its first and last voiced frame
    fillers: int  # "um", "uh", ... in the transcript

    def as_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _frames(audio: np.ndarray) -> np.ndarray:
    n = 1 + max(0, (audio.size - FRAME) // HOP)
    idx = np.arange(FRAME)[None, :] + HOP * np.arange(n)[:, None]
    return audio[np.minimum(idx, audio.size - 1)]


def count_fillers(transcript: str) -> int:
    return len(FILLERS.findall(transcript))


def analyse(audio16k: np.ndarray, transcript: str = "") -> Prosody:
    """Prosody of a 16 kHz mono float utterance (`fillers` counted in `transcript`)."""
    audio = np.asarray(audio16k, dtype=np.float32)
    if audio.size < FRAME:
        return Prosody(0.0, None, 0.0, 0.0, -100.0, 0.0, 0, 0.0, count_fillers(transcript))
    frames = _frames(audio - audio.mean())
    rms = np.sqrt(np.mean(frames * frames, axis=1)) + 1e-9
    db = 20 * np.log10(rms)
    active = db > max(db.max() - 30.0, -55.0)
    # YIN (cumulative mean normalised difference) for every frame at once, through FFTs.
    lo, hi = int(SR / F0_MAX), int(SR / F0_MIN)
    w = FRAME - hi  # integration window
    nfft = 2 * FRAME
    fx = np.fft.rfft(frames, n=nfft, axis=1)
    fw = np.fft.rfft(frames[:, :w], n=nfft, axis=1)
    r = np.fft.irfft(np.conj(fw) * fx, n=nfft, axis=1)[:, :hi + 1]  # r[tau] = sum_j x_j x_{j+tau}, j < w
    sq = np.concatenate([np.zeros((len(frames), 1), np.float32), np.cumsum(frames * frames, axis=1)], axis=1)
    taus = np.arange(hi + 1)
    e_tau = sq[:, taus + w] - sq[:, taus]  # energy of the shifted window
    d = sq[:, w:w + 1] + e_tau - 2 * r
    d[:, 0] = 0.0
    cum = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-12)
    band = cmnd[:, lo:hi + 1]
    below = band < 0.15
    first = np.where(below.any(axis=1), below.argmax(axis=1), band.argmin(axis=1))
    # Walk down to the local minimum after the first dip under the threshold.
    rows = np.arange(len(band))
    for _ in range(8):
        nxt = np.minimum(first + 1, band.shape[1] - 1)
        better = band[rows, nxt] < band[rows, first]
        if not better.any():
            break
        first = np.where(better, nxt, first)
    lag = lo + first
    voiced = active & (band[rows, first] < 0.3)
    f0 = SR / lag.astype(np.float32)
    pitch = float(np.median(f0[voiced])) if voiced.sum() >= 3 else None
    if pitch is not None:
        st = 12 * np.log2(f0[voiced] / pitch)
        spread = float(np.percentile(st, 90) - np.percentile(st, 10))
        tail = st[-50:]  # the last ~0.5 s of voiced frames
        slope = float(np.median(tail[-15:]) - np.median(st)) if tail.size >= 15 else 0.0
    else:
        spread, slope = 0.0, 0.0
    # Pauses: runs of inactive frames between the first and last active frame.
    idx = np.flatnonzero(active)
    pauses, pause_ratio = 0, 0.0
    if idx.size:
        inner = ~active[idx[0]:idx[-1] + 1]
        pause_ratio = float(inner.mean()) if inner.size else 0.0
        edges = np.diff(np.concatenate([[0], inner.astype(np.int8), [0]]))
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        pauses = int(np.sum(runs >= 25))
    # Syllable nuclei: peaks of the smoothed active-frame envelope that stand out by 3 dB.
    env = np.convolve(np.where(active, db, db.min()), np.ones(5) / 5, mode="same")
    is_peak = (env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & active[1:-1]
    peaks = np.flatnonzero(is_peak) + 1
    nuclei, last = 0, -100
    for p in peaks:
        left = env[max(0, p - 12):p].min() if p > 0 else env[p]
        if env[p] - left >= 3.0 and p - last >= 8:  # >= 80 ms apart
            nuclei += 1
            last = p
    speech_s = (idx[-1] - idx[0] + 1) * HOP / SR if idx.size else 0.0
    talk_s = max(1e-3, speech_s * (1 - pause_ratio) + 0.25 * pauses)
    return Prosody(
        voiced_s=float(voiced.sum() * HOP / SR), pitch_hz=pitch, pitch_range_st=spread, pitch_slope_st=slope,
        energy_db=float(db[active].mean()) if active.any() else -100.0, syllables_per_s=nuclei / talk_s,
        pauses=pauses, pause_ratio=pause_ratio, fillers=count_fillers(transcript),
    )


_EVEN_PACE = "at an even pace"
# Each trait as `brief` names it (the LLM's note) and as `describe` says it (events, the description).
_PHRASES = {"fast": "quickly", "slow": "slowly", "loud": "loudly", "quiet": "quietly",
            "lively": "with a lively, varied pitch", "monotone": "in a flat, monotone voice",
            "rising at the end": ", and their pitch rose at the end", "long pauses": " with long pauses",
            "hesitant": ", and sounded hesitant"}


def _trait_words(p: Prosody) -> tuple[str, str, str, str, str, str]:
    """What a listener hears in the voice: rate, level, melody, a rising end, pauses, hesitation ("" where
    nothing stands out)."""
    rate = "fast" if p.syllables_per_s > 6.5 else "slow" if p.syllables_per_s < 4.8 else ""
    level = "loud" if p.energy_db > -14 else "quiet" if p.energy_db < -36 else ""
    melody = "lively" if p.pitch_range_st > 11 else "monotone" if p.pitch_range_st < 4 else ""
    ending = "rising at the end" if p.pitch_slope_st > 2.0 else ""
    pauses = "long pauses" if p.pause_ratio > 0.3 or p.pauses >= 3 else ""
    hesitant = "hesitant" if p.fillers >= 2 or (p.pauses >= 2 and p.syllables_per_s < 4.8) else ""
    return rate, level, melody, ending, pauses, hesitant


def describe(p: Prosody) -> str:
    """One sentence for the utterance event and the perception description (the rate is always said)."""
    if p.voiced_s < 0.2:
        return "The user's voice was too short or too quiet to read."
    rate, level, melody, ending, pauses, hesitant = (_PHRASES[w] if w else "" for w in _trait_words(p))
    parts = " and ".join(x for x in (rate or _EVEN_PACE, level) if x) + (" " + melody if melody else "")
    return f"The user spoke {parts}{pauses}{ending}{hesitant}."


def brief(p: Prosody) -> str:
    """What `describe` says, in a few words for the LLM ("fast, monotone, rising at the end"; "" when it
    says nothing `remarkable`). The note is prompt a reply reads after the user's words, at ~13-27 ms a
    token on the CPU profile's model: 44 characters instead of the sentence's 94 on average
    (benchmarks/results/voice_note_eval.json), ~10 fewer tokens a turn in the realistic benchmark."""
    if p.voiced_s < 0.2:
        return ""
    return ", ".join(w for w in _trait_words(p) if w)


def remarkable(p: Prosody) -> bool:
    """True when `describe` says more than "The user spoke at an even pace." (fast or slow, loud or
    quiet, lively or flat, a rising end, long pauses, hesitant): something a listener would notice."""
    return p.voiced_s >= 0.2 and any(_trait_words(p))


@dataclass
class ProsodyTrend:
    """The user's voice across the call (running means over utterances), so one utterance can be
    described against their own usual pace, pitch and loudness."""

    utterances: int = 0
    rate: float = 0.0
    pitch_hz: float = 0.0
    energy_db: float = 0.0

    def describe_change(self, p: Prosody) -> str:
        """A sentence when this utterance differs from the user's usual voice ("" otherwise)."""
        changes = self.changes(p)
        return f"They spoke {' and '.join(changes)} than earlier in the call." if changes else ""

    def brief_change(self, p: Prosody) -> str:
        """`describe_change` in a few words, for the LLM ("faster than before"; "" for no change)."""
        changes = self.changes(p)
        return f"{' and '.join(changes)} than before" if changes else ""

    def changes(self, p: Prosody) -> list[str]:
        """How this utterance differs from the user's usual voice: "faster", "more quietly", ..."""
        if self.utterances < 2 or p.voiced_s < 0.5:
            return []
        changes = []
        if p.syllables_per_s > 1.25 * self.rate:
            changes.append("faster")
        elif p.syllables_per_s < 0.8 * self.rate:
            changes.append("slower")
        if p.energy_db > self.energy_db + 6:
            changes.append("louder")
        elif p.energy_db < self.energy_db - 6:
            changes.append("more quietly")
        if p.pitch_hz and self.pitch_hz and p.pitch_hz > 1.15 * self.pitch_hz:
            changes.append("at a higher pitch")
        return changes

    def add(self, p: Prosody) -> None:
        if p.voiced_s < 0.5:
            return
        self.utterances += 1
        a = 1.0 / min(self.utterances, 8)  # the mean of the first 8, then a moving average
        self.rate += a * (p.syllables_per_s - self.rate)
        self.energy_db += a * (p.energy_db - self.energy_db)
        if p.pitch_hz:
            self.pitch_hz = p.pitch_hz if not self.pitch_hz else self.pitch_hz + a * (p.pitch_hz - self.pitch_hz)
