"""Audio helpers shared by the speech models: PCM conversion, resampling, Whisper log-mel."""

from __future__ import annotations

import numpy as np
import soxr

SAMPLE_RATE = 16000


def pcm16_to_float(pcm: np.ndarray | bytes) -> np.ndarray:
    """int16 PCM (array or bytes) -> float32 in [-1, 1]."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        pcm = np.frombuffer(pcm, dtype=np.int16)
    return pcm.astype(np.float32) * (1.0 / 32768.0)


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 PCM (clipped)."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """High-quality one-shot resampling of mono float32 audio."""
    if src_rate == dst_rate:
        return x.astype(np.float32, copy=False)
    return soxr.resample(x.astype(np.float32, copy=False), src_rate, dst_rate, quality="HQ")


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above (what Whisper was trained with).
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filterbank(n_fft: int = 400, n_mels: int = 80, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular filters, shape (n_fft//2+1, n_mels)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mels + 2))
    bins = np.linspace(0, rate // 2, n_fft // 2 + 1)[:, None]
    lower = (bins - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None, :]
    upper = (edges[None, 2:] - bins) / (edges[2:] - edges[1:-1])[None, :]
    tri = np.maximum(0.0, np.minimum(lower, upper))
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_N_FFT, _HOP = 400, 160
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT)  # periodic Hann
_MELS = mel_filterbank()


def whisper_log_mel(audio: np.ndarray, seconds: int = 8, normalize: bool = True) -> np.ndarray:
    """Whisper-style log-mel features (80 x seconds*100) of 16 kHz audio.

    Matches the feature extractor smart-turn v3 was trained with: the input is zero-padded at the
    end (callers front-pad), optionally normalised to zero mean / unit variance, STFT with a
    centred reflect-padded periodic Hann window, Slaney mels, log10, 8-decade dynamic range clamp.
    """
    n = SAMPLE_RATE * seconds
    x = np.zeros(n, dtype=np.float32)
    a = np.asarray(audio, dtype=np.float32)[:n]
    x[: a.size] = a
    if normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), (_N_FFT // 2, _N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    power = np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2  # (frames, bins)
    log_spec = np.log10(np.maximum(power @ _MELS, 1e-10)).T[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def rms_dbfs(x: np.ndarray) -> float:
    """Root-mean-square level of float audio in dBFS."""
    return float(20.0 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-9))
