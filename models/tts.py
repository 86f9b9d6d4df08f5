"""Text to speech with piper (embedded joe-medium voice), with phoneme and word timings.

piper-tts and espeak-ng are GPL-3.0: they stay behind this interface so another engine can replace them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.assets import onnx_session, piper_voice


@dataclass
class Speech:
    """One synthesized clause: mono float32 audio and its alignments (seconds from its start)."""

    text: str
    audio: np.ndarray
    sample_rate: int
    phonemes: list[tuple[str, float, float]] = field(default_factory=list)
    words: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate


def words_from_phonemes(text: str, phonemes: list[tuple[str, float, float]], duration: float) -> list[tuple[str, float, float]]:
    """Word timings: phoneme groups between spaces map onto the text's words when they line up;
    otherwise words share the voiced span in proportion to their length."""
    words = re.findall(r"\S+", text)
    if not words:
        return []
    groups: list[list[tuple[str, float, float]]] = [[]]
    for ph in phonemes:
        if ph[0] == " ":
            if groups[-1]:
                groups.append([])
        elif ph[0] not in ("^", "$", "_") and not re.fullmatch(r"[.,!?;:]", ph[0]):
            groups[-1].append(ph)
    groups = [g for g in groups if g]
    if len(groups) == len(words):
        return [(w, g[0][1], g[-1][2]) for w, g in zip(words, groups, strict=True)]
    voiced = [p for g in groups for p in g]
    start = voiced[0][1] if voiced else 0.0
    end = voiced[-1][2] if voiced else duration
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    return [(w, float(edges[i]), float(edges[i + 1])) for i, w in enumerate(words)]


def with_alignments(model: Path) -> bytes:
    """The voice model with its phoneme-alignment output exposed (piper's own patch, in memory)."""
    import onnx
    from piper.patch_voice_with_alignment import add_alignment_output

    graph = onnx.load(str(model))
    add_alignment_output(graph)
    return graph.SerializeToString()


class PiperTTS:
    """piper VITS voice on ONNX Runtime (one thread)."""

    def __init__(self, model_path: str | None = None, config_path: str | None = None, use_cuda: bool = False,
                 length_scale: float = 1.0, sampled: bool = True) -> None:
        """`sampled`: VITS samples each take (pitch and timing vary a little, as a person's do); False
        gives the same audio for the same text every time (measurements that compare takes)."""
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        model, config = (model_path, config_path) if model_path else piper_voice()
        if use_cuda:
            self._voice = PiperVoice.load(str(model), config_path=str(config), use_cuda=True, include_alignments=True)
        else:
            # PiperVoice.load gives ONNX Runtime its default threads, which spin between ops: beside the
            # LLM and the session host on 2 cores a first clause took ~3x as long as alone (p50 425 ms
            # against 120). Two threads that sleep when idle: as fast alone, ~25 % faster beside two
            # busy threads than the default or one thread (~300 / 240 / 240 ms for a 2 s clause).
            self._voice = PiperVoice(config=PiperConfig.from_dict(json.loads(Path(config).read_text())),
                                     session=onnx_session(with_alignments(Path(model)), threads=2, spin=False))
        self._syn = SynthesisConfig(length_scale=length_scale)
        if not sampled:
            self._syn.noise_scale, self._syn.noise_w_scale = 0.0, 0.0
        self.sample_rate = int(self._voice.config.sample_rate)

    def synthesize(self, text: str, speed: float = 1.0) -> Speech:
        """Speak `text`; `speed` > 1 talks faster (piper's length_scale is its inverse)."""
        syn = self._syn
        if speed != 1.0:
            syn = dataclasses.replace(syn, length_scale=syn.length_scale / max(0.25, float(speed)))
        pieces, phonemes = [], []
        t = 0.0
        for chunk in self._voice.synthesize(text, syn_config=syn, include_alignments=True):
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            if chunk.phoneme_alignments:
                pos = t
                for al in chunk.phoneme_alignments:
                    dur = al.num_samples / self.sample_rate
                    phonemes.append((al.phoneme, pos, pos + dur))
                    pos += dur
            pieces.append(audio)
            t += audio.size / self.sample_rate
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        speech = Speech(text, audio, self.sample_rate, phonemes)
        speech.words = words_from_phonemes(text, phonemes, speech.duration_s)
        return speech
