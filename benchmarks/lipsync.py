"""Lip-sync offset between two signals on one time axis: the audio level and the mouth opening.

Both are resampled to a 10 ms grid and the lag that best correlates them is found; positive means the
mouth moves after the sound. Used by the tests (aiortc client, the browser page) and benchmarks."""

from __future__ import annotations

import numpy as np

STEP_S = 0.01
SMOOTH_S = 0.08  # both signals are smoothed to the syllable scale first: frame-level detail is noise here


def _smooth(x: np.ndarray) -> np.ndarray:
    k = np.ones(max(1, int(round(SMOOTH_S / STEP_S)))) / max(1, int(round(SMOOTH_S / STEP_S)))
    return np.convolve(x, k, mode="same")


def lipsync_offset_ms(audio: list[tuple[float, float]], mouth: list[tuple[float, float]],
                      max_lag_s: float = 0.25) -> tuple[float, float]:
    """(offset in ms, correlation at it) of `mouth` (time s, opening) against `audio` (time s, level)."""
    a, m = np.asarray(audio, np.float64), np.asarray(mouth, np.float64)
    if len(a) < 10 or len(m) < 10:
        raise ValueError("too few samples to measure lip sync")
    lo, hi = max(a[0, 0], m[0, 0]) + max_lag_s, min(a[-1, 0], m[-1, 0]) - max_lag_s
    if hi - lo < 1.0:
        raise ValueError("the two signals overlap for less than a second")
    grid = np.arange(lo, hi, STEP_S)
    ia = _smooth(np.interp(grid, a[:, 0], a[:, 1]))
    ia = (ia - ia.mean()) / (ia.std() + 1e-9)
    best = (0.0, -2.0)
    for lag in np.arange(-max_lag_s, max_lag_s + 1e-9, STEP_S):
        im = _smooth(np.interp(grid + lag, m[:, 0], m[:, 1]))
        im = (im - im.mean()) / (im.std() + 1e-9)
        r = float(np.mean(ia * im))
        if r > best[1]:
            best = (lag * 1000.0, r)
    return round(best[0], 1), round(best[1], 3)
