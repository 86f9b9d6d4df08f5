"""TTS deployment: one clause in, its audio and phoneme/word timings out."""

from __future__ import annotations

from ray import serve

from deployments.common import PriorityLock, ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.audio import float_to_pcm16
from models.tts import PiperTTS
from models.wire import SpeechResult


@serve.deployment
class TTS:
    def __init__(self, use_cuda: bool = False) -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("TTS")
        self.model = PiperTTS(use_cuda=use_cuda)
        self.times = ServiceTimes()
        self._turns = PriorityLock()
        self.model.synthesize("Hello there.")

    async def synthesize(self, text: str, speed: float = 1.0, first: bool = False) -> SpeechResult:
        """`first`: the first clause of a reply, which its user is waiting for: it goes before the
        later clauses of other sessions' replies (those play after audio already queued)."""
        with self.times.measure() as timing:
            # A clause dropped by a barge-in still runs to its end in its thread: the next clause
            # waits for it rather than sharing the core with it.
            speech = await self._turns.run_in_thread(0 if first else 1, self.model.synthesize, text, speed)
        return SpeechResult(
            text, float_to_pcm16(speech.audio).tobytes(), speech.sample_rate,
            [(p, float(a), float(b)) for p, a, b in speech.phonemes],
            [(w, float(a), float(b)) for w, a, b in speech.words], timing["ms"])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.times.stats()
