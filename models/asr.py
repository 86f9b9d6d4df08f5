"""Speech recognition with faster-whisper: tiny.en int8 embedded on CPU, a large model on CUDA.

Whisper's encoder is trained on 30 s windows, and on one CPU thread that window costs ~400 ms even
for a 2 s question. CTranslate2 accepts a shorter window, so the CPU profile encodes only the
utterance plus trailing silence (at least `min_window_s`): ~60 ms instead of ~400 ms. A shortened
window makes whisper prone to repeating itself, so repeats are collapsed, output is capped by what
a person can say in the audio's duration, and a capped or doubtful result falls back to the full
30 s window (the path every other profile takes).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np

from models.assets import whisper_tiny_en

SAMPLE_RATE = 16000
_HOP = 160  # whisper mel frames are 10 ms
_FULL_FRAMES = 3000
_LEAD_SAMPLES = 4000  # 0.25 s


@dataclass
class Transcript:
    text: str
    words: list[tuple[str, float, float]]
    audio_s: float
    short_window: bool = False


def collapse_repeats(text: str) -> str:
    """'Yes. Yes. Yes' → 'Yes.': a shortened-window decoding artefact. The text is cut at the first
    sentence that restates (or begins to restate) an earlier one."""
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", text.strip()) if s]
    kept: list[str] = []
    seen: list[list[str]] = []
    for sentence in sentences:
        words = re.findall(r"[\w']+", sentence.lower())
        if kept and words and any(_restates(words, earlier) for earlier in seen):
            break
        kept.append(sentence)
        seen.append(words)
    return " ".join(kept)


def _restates(words: list[str], earlier: list[str]) -> bool:
    if words == earlier[: len(words)]:
        return True
    return difflib.SequenceMatcher(a=words, b=earlier).ratio() >= 0.8


def max_tokens_for(audio_s: float) -> int:
    """An upper bound on tokens in `audio_s` of speech (~4 words/s at ~1.5 tokens/word, plus slack)."""
    return int(8 + 7 * audio_s)


class WhisperASR:
    """Transcribes whole 16 kHz utterances. `model` is a path or a faster-whisper model name.

    `short_window` enables the shortened encoder window described in the module docstring."""

    def __init__(self, model: str | None = None, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 1, language: str | None = "en", num_workers: int = 1,
                 short_window: bool | None = None, min_window_s: float = 10.0) -> None:
        from faster_whisper import WhisperModel  # imported lazily: heavy, and CUDA-aware
        from faster_whisper.tokenizer import Tokenizer

        self.language = language
        self._model = WhisperModel(
            str(model or whisper_tiny_en()), device=device, compute_type=compute_type,
            cpu_threads=cpu_threads, num_workers=num_workers,
        )
        self.short_window = (device == "cpu") if short_window is None else short_window
        self.min_frames = int(min_window_s * 100)
        multilingual = self._model.model.is_multilingual
        self._tokenizer = Tokenizer(self._model.hf_tokenizer, multilingual, task="transcribe",
                                    language=(language or "en") if multilingual else None)
        self.fallbacks = 0

    def transcribe(self, audio16k: np.ndarray, prompt: str | None = None) -> Transcript:
        audio = np.asarray(audio16k, dtype=np.float32)
        audio_s = audio.size / SAMPLE_RATE
        if audio.size < 1600:  # < 0.1 s: nothing to say
            return Transcript("", [], audio_s)
        if self.short_window and audio_s < 28.0:
            text = self._transcribe_short(audio, prompt)
            if text is not None:
                return Transcript(text, [], audio_s, short_window=True)
            self.fallbacks += 1
        segments, _ = self._model.transcribe(
            audio, language=self.language, beam_size=1, best_of=1, temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
            initial_prompt=prompt, no_speech_threshold=0.6,
        )
        texts = [s.text for s in segments if s.no_speech_prob < 0.8 or s.avg_logprob > -0.7]
        return Transcript(" ".join(t.strip() for t in texts).strip(), [], audio_s)

    def _transcribe_short(self, audio: np.ndarray, prompt: str | None) -> str | None:
        """Decode over a window just long enough for the audio; None when the result is doubtful."""
        import ctranslate2

        lead = _LEAD_SAMPLES
        frames = min(_FULL_FRAMES, max(self.min_frames, int(np.ceil(((audio.size + lead) / _HOP + 300) / 100)) * 100))
        # Pad with real silence before the mel transform, as whisper pads its 30 s window; a little
        # silence ahead too, because a shortened window misreads speech that starts on its first frame.
        padded = np.zeros(frames * _HOP + _HOP, dtype=np.float32)
        padded[lead: lead + audio.size] = audio
        features = self._model.feature_extractor(padded)[:, :frames]
        features = np.ascontiguousarray(features[None], dtype=np.float32)
        tok = self._tokenizer
        tokens = list(tok.sot_sequence) + [tok.no_timestamps]
        if prompt:
            tokens = [tok.sot_prev] + tok.encode(" " + prompt.strip())[-100:] + tokens
        limit = max_tokens_for(audio.size / SAMPLE_RATE)
        encoded = self._model.model.encode(ctranslate2.StorageView.from_array(features))
        result = self._model.model.generate(
            encoded, [tokens], beam_size=1, max_length=limit, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True,
        )[0]
        ids = result.sequences_ids[0]
        if len(ids) >= limit - 1:
            return None  # ran into the cap: a repetition loop, not speech
        if result.no_speech_prob > 0.8 and result.scores[0] < -0.7:
            return ""
        return collapse_repeats(tok.decode(ids))
