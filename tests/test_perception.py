"""Voice prosody (the first part of perception) on synthetic speech with varied prosody."""

from __future__ import annotations

import numpy as np
import pytest

from models.audio import resample
from models.perception.prosody import analyse, describe

SENTENCE = "I went to the market yesterday and bought some apples and pears."


@pytest.fixture(scope="module")
def voice(tts):
    def speak(text: str = SENTENCE, speed: float = 1.0, gain: float = 1.0, pitch: float = 1.0) -> np.ndarray:
        s = tts.synthesize(text, speed=speed)
        # Resampling to fewer samples and playing them at 16 kHz raises the pitch by `pitch`.
        return (resample(s.audio, s.sample_rate, int(16000 / pitch)) * gain).astype(np.float32)

    return speak


def test_prosody_orders_rate_pitch_and_energy(voice):
    normal, fast, slow = analyse(voice()), analyse(voice(speed=1.6)), analyse(voice(speed=0.6))
    assert fast.syllables_per_s > normal.syllables_per_s > slow.syllables_per_s
    high = analyse(voice(pitch=1.5))
    assert high.pitch_hz / normal.pitch_hz == pytest.approx(1.5, rel=0.12)
    quiet = analyse(voice(gain=0.05))
    assert quiet.energy_db < normal.energy_db - 20
    assert "slowly" in describe(slow) and "quickly" in describe(fast) and "quietly" in describe(quiet)


def test_hesitation_and_silence(voice):
    gap = np.zeros(12000, np.float32)
    halting = np.concatenate([voice("Well, um,"), gap, voice("I think, uh,"), gap, voice("maybe.")])
    p = analyse(halting, "Well, um, I think, uh, maybe.")
    assert p.pauses >= 2 and p.fillers == 2 and "hesitant" in describe(p)
    assert "too short or too quiet" in describe(analyse(np.zeros(8000, np.float32)))
