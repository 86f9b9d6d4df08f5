"""The user's side of a turn: microphone frames -> 32 ms chunks -> VAD -> utterance segmentation ->
at each pause, final ASR and the turn model in parallel -> the end-of-turn decision (made here, once)
-> and, while the avatar talks, barge-in detection.

The listener knows nothing of replies, events or the peer: it reports through `ListenerHooks`.

    speech starts           -> on_user_started()
    a pause, words known    -> on_speculate(turn)      (the reply may start, gated)
    the user goes on        -> on_user_continued()     (drop what was speculated)
    the turn is decided     -> on_user_stopped(turn)   (turn None: it was only noise)
    talking over the avatar -> on_overlap()            (at once: the avatar pauses)
                            -> on_barge_in()           (it was speech that takes the floor)
                            or on_overlap_end()        (a backchannel or a noise: the avatar goes on)
    ASR or the turn model is down -> on_stage_outage() (the avatar may say a holding phrase)

A dead ASR replica is retried (the turn waits for the restarted one); a dead or slow turn model is
skipped: the turn is decided on the words alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from models.perception.prosody import Prosody
from models.turn import TurnDecision, fuse, is_backchannel
from models.vad import CHUNK, SpeechSegmenter
from serve_app.session.recovery import StageGuard, StageHealth
from serve_app.session.tasks import Tasks
from serve_app.session.timings import TurnTimings

RATE = 16000
MAX_INPUT_SAMPLES = RATE * 30  # an utterance longer than 30 s is cut into a turn
PRE_ROLL_CHUNKS = 10  # 320 ms before the VAD fired: the first syllable matters to ASR
TURN_MODEL_BYTES = 8 * RATE * 2  # smart-turn reads the last 8 s
TURN_MODEL_WAIT_S = 2.0  # past this after the words are known, the turn is decided on the words alone
OVERLAP_GRACE_S = 0.3  # the avatar, paused by the user's voice, goes on only after this much silence
INTERIM_AFTER_S = 1.0  # speech into an utterance at which its words so far are transcribed (on_partial)
INTERIM_AGAIN_S = 2.0  # ... and again, if the first words were not enough (hooks.wants_words)


@dataclass
class UserTurn:
    """What the user said in one utterance, and how the turn was taken."""

    text: str
    timings: TurnTimings
    voice: Prosody | None = None  # how it sounded (None when perception is off)
    decision: TurnDecision | None = None  # None until the turn is decided


class ListenerHooks(Protocol):
    def replica_speaking(self) -> bool: ...
    def on_user_started(self) -> None: ...
    def on_user_continued(self) -> None: ...
    def on_speculate(self, turn: UserTurn) -> None: ...
    def on_user_stopped(self, turn: UserTurn | None) -> None: ...
    def on_overlap(self) -> None: ...
    def on_barge_in(self) -> None: ...
    def on_overlap_end(self) -> None: ...
    def on_stage_outage(self) -> None: ...
    def on_partial(self, text: str) -> None: ...
    def wants_words(self) -> bool: ...


class Listener:
    """`asr` and `turn` are the ASR and TurnTaking deployment handles (or anything with the same
    `.method.remote()` calls); `vad(chunk) -> P(speech)` takes float32 chunks of `CHUNK` samples;
    `voice_analysis(pcm16)` runs in a thread beside ASR."""

    def __init__(self, hooks: ListenerHooks, asr: Any, turn: Any, vad: Callable[[np.ndarray], float], tasks: Tasks,
                 patience_s: float, interrupt_after_s: float, health: StageHealth | None = None,
                 voice_analysis: Callable[[bytes], Prosody | None] | None = None, asr_prompt: str | None = None,
                 interim: bool = False) -> None:
        """`asr_prompt`: words ASR should expect (the persona's `stt.hotwords`); `interim`: transcribe each
        utterance INTERIM_AFTER_S into it (`on_partial`), for work that can start before it ends, and
        once more at INTERIM_AGAIN_S if `hooks.wants_words()` then (the first words found nothing)."""
        self.hooks = hooks
        self.asr_prompt = asr_prompt
        self.interim = interim
        self._interims = 0  # interim transcripts started in this utterance
        self._interim_task: asyncio.Task | None = None
        self.asr = asr
        self.turn = turn
        self.vad = vad
        self.tasks = tasks
        self.patience_s = patience_s
        self.interrupt_after_s = interrupt_after_s
        self.voice_analysis = voice_analysis
        self.health = health or StageHealth()
        self.guard = StageGuard(self.health, hooks.on_stage_outage)
        self.segmenter = SpeechSegmenter()
        self.samples_in = 0
        self.in_utterance = False
        self._ring: deque[np.ndarray] = deque(maxlen=PRE_ROLL_CHUNKS)
        self._utt: list[np.ndarray] = []
        self._last_voice_wall = 0.0
        self._wall0: float | None = None  # monotonic time audio sample 0 would have arrived at
        self._eot_task: asyncio.Task | None = None
        self._barge_task: asyncio.Task | None = None
        self._overlap_chunks = 0  # > 0: the avatar was paused for possible speech this many chunks ago
        self._speech_seq = 0  # stretches of speech so far (VAD speech starts)
        self._barge_seq = -1  # the stretch the last barge-in check was for

    @property
    def behind_s(self) -> float:
        """Seconds of the user's audio that arrived but is not processed yet (0 on time; the browser
        sends audio without gaps, so wall time minus audio time is the backlog, plus any jitter)."""
        if self._wall0 is None:
            return 0.0
        return max(0.0, time.monotonic() - self._wall0 - self.samples_in / RATE)

    @property
    def deciding(self) -> bool:
        """A pause is being judged (ASR and the turn model are running for it)."""
        return self._eot_task is not None and not self._eot_task.done()

    async def run(self, track) -> None:
        """Consume the user's audio track until it ends."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        pending = np.zeros(0, np.int16)
        try:
            while True:
                frame = await track.recv()
                if self._wall0 is None:
                    self._wall0 = time.monotonic() - self.samples_in / RATE
                for out in resampler.resample(frame):
                    pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
                n = pending.size // CHUNK
                for i in range(n):
                    self.feed(pending[i * CHUNK:(i + 1) * CHUNK])
                pending = pending[n * CHUNK:]
        except MediaStreamError:
            return

    def feed(self, chunk: np.ndarray) -> None:
        """One chunk of `CHUNK` int16 samples at 16 kHz."""
        t = self.samples_in / RATE
        self.samples_in += CHUNK
        self._ring.append(chunk)
        prob = self.vad(chunk.astype(np.float32) * (1 / 32768))
        if prob >= self.segmenter.on:
            self._last_voice_wall = time.monotonic()
        ev = self.segmenter.update(prob, t)
        if self.in_utterance:
            self._utt.append(chunk)
        self._watch_overlap(prob)
        if ev is not None and ev.kind == "speech_start":
            if not self.in_utterance:
                self.in_utterance = True
                self._interims = 0
                self._utt = list(self._ring)
                self.hooks.on_user_started()
            else:
                self._cancel_pending_turn()
            self._speech_seq += 1
            if self.hooks.replica_speaking() and self._barge_task is None:
                self._start_barge_check(t)
        elif (self.segmenter.speaking and self.in_utterance and self._barge_task is None and not self._overlap_chunks
              and self._barge_seq != self._speech_seq and self.hooks.replica_speaking()):
            # The avatar began a clause while the user was already talking (its audio had paused
            # between clauses, waiting for TTS): pause it now and decide as for any overlap.
            self.hooks.on_overlap()
            self._start_barge_check(self.segmenter.speech_start_t)
        elif ev is not None and ev.kind == "pause" and self.in_utterance:
            self._cancel_pending_turn()
            self._eot_task = self.tasks.spawn(self._end_of_turn())
        if self.interim and self._interims < 2 and self.in_utterance and self.segmenter.speaking:
            self._maybe_interim()
        if (self.in_utterance and self.segmenter.speaking and self._eot_task is None
                and len(self._utt) * CHUNK > MAX_INPUT_SAMPLES):
            self._eot_task = self.tasks.spawn(self._end_of_turn(force=True))

    def _maybe_interim(self) -> None:
        spoken = len(self._utt) * CHUNK - PRE_ROLL_CHUNKS * CHUNK
        if spoken < (INTERIM_AFTER_S if self._interims == 0 else INTERIM_AGAIN_S) * RATE:
            return
        if self._interims == 1 and (self._interim_task is None or not self._interim_task.done()
                                    or not self.hooks.wants_words()):
            self._interims = 2  # the first words were enough (or are not back): one transcript it is
            return
        self._interims += 1
        self._interim_task = self.tasks.spawn(self._interim_words(self._utterance_pcm()))

    async def _interim_words(self, pcm: bytes) -> None:
        call = self.asr.transcribe.remote(pcm, self.asr_prompt, interim=True)
        try:
            text = (await call).text.strip()
        except asyncio.CancelledError:
            call.cancel()  # a Serve request goes on unless its response is cancelled too
            raise
        except Exception:  # a dead ASR: the final transcript (retried) is what counts
            return
        if text and self.in_utterance:
            self.hooks.on_partial(text)

    def _start_barge_check(self, start_t: float) -> None:
        self._overlap_chunks = 0  # the barge-in check owns the pause now
        self._barge_seq = self._speech_seq  # one check per stretch of speech
        self._barge_task = self.tasks.spawn(self._barge_in(start_t))

    def _watch_overlap(self, prob: float) -> None:
        """Pause the avatar on the first voiced chunk that talks over it, one chunk before speech is
        confirmed; let it go on if no speech follows (a click, a cough)."""
        if self._overlap_chunks:
            self._overlap_chunks += 1
            if not self.segmenter.speaking and self._overlap_chunks > 3:
                self._overlap_chunks = 0
                self.hooks.on_overlap_end()
        elif (prob >= self.segmenter.on and self._barge_task is None and not self.segmenter.speaking
              and self.hooks.replica_speaking()):
            self._overlap_chunks = 1
            self.hooks.on_overlap()

    def _utterance_pcm(self) -> bytes:
        return np.concatenate(self._utt).tobytes() if self._utt else b""

    def _cancel_pending_turn(self) -> None:
        if self._eot_task is not None and not self._eot_task.done():
            self._eot_task.cancel()
        self._eot_task = None
        self.hooks.on_user_continued()

    async def _end_of_turn(self, force: bool = False) -> None:
        """At a pause: final ASR and the turn model run together; with the words the reply may start
        (gated); then the turn is decided: complete now, or taken after the persona's patience."""
        timings = TurnTimings(speech_end=self._last_voice_wall, listener_behind_ms=round(self.behind_s * 1000, 1))
        timings.mark("vad_pause")
        if self._interim_task is not None and not self._interim_task.done():
            # Words so far that have not come by the pause are of no use: the final transcript goes first.
            self._interim_task.cancel()
        pcm = self._utterance_pcm()
        turn_call = asyncio.ensure_future(self._turn_score(pcm[-TURN_MODEL_BYTES:]))
        voice = asyncio.ensure_future(asyncio.to_thread(self.voice_analysis, pcm)) if self.voice_analysis else None
        try:
            text = (await self.guard.call(self.asr, lambda: self.asr.transcribe.remote(pcm, self.asr_prompt))).text.strip()
        except BaseException:
            turn_call.cancel()
            raise
        timings.mark("asr_final")
        if not text or (self.hooks.replica_speaking() and is_backchannel(text)):
            # Noise, or "mhm" over the avatar: no turn, and the avatar goes on.
            turn_call.cancel()
            self._end_utterance(None)
            return
        turn = UserTurn(text, timings, voice=await voice if voice is not None else None)
        self.hooks.on_speculate(turn)
        try:
            audio_probability, threshold = await asyncio.wait_for(turn_call, TURN_MODEL_WAIT_S)
        except TimeoutError:
            audio_probability, threshold = None, 0.5
        if audio_probability is None:  # no audio evidence: complete unless the words say otherwise
            audio_probability = threshold
        turn.decision = fuse(audio_probability, text, threshold)
        timings.decision = {"complete": turn.decision.complete, "probability": round(turn.decision.probability, 3),
                            "audio_probability": round(turn.decision.audio_probability, 3),
                            "reason": turn.decision.reason}
        timings.mark("turn_decision")
        if not (turn.decision.complete or force):
            waited = time.monotonic() - timings.marks["vad_pause"]
            await asyncio.sleep(max(0.0, self.patience_s - waited))
            timings.marks["turn_decision"] = time.monotonic()
        self._end_utterance(turn)

    async def _turn_score(self, pcm: bytes) -> tuple[float | None, float]:
        """The turn model's P(complete) and threshold; None when its replica died (words decide)."""
        try:
            score = await self.turn.predict.remote(pcm)
        except self.health.lost:
            self.hooks.on_stage_outage()
            return None, 0.5
        return score.audio_probability, score.threshold

    def _end_utterance(self, turn: UserTurn | None) -> None:
        self.in_utterance = False
        self._utt = []
        self._eot_task = None
        if self._barge_task is not None:
            self._barge_task.cancel()
            self._barge_task = None
        self.hooks.on_user_stopped(turn)

    async def _barge_in(self, start_t: float) -> None:
        """The user talks over the avatar (which paused at once): `interrupt_after_s` after they began
        (with no silence longer than OVERLAP_GRACE_S), barge in unless the words are a backchannel
        ("mhm", "yeah"); shorter sounds are noise and the avatar goes on."""
        barged = False
        quiet_since = None
        try:
            while self.samples_in / RATE - start_t < self.interrupt_after_s:
                if not self.hooks.replica_speaking():
                    return
                if self.segmenter.speaking:
                    quiet_since = None
                else:  # "Wait, ..." stops for a comma: stay paused a moment before going on
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > OVERLAP_GRACE_S:
                        return
                await asyncio.sleep(0.032)
            try:
                takes_floor = not is_backchannel((await self.asr.transcribe.remote(self._utterance_pcm())).text)
            except self.health.lost:
                takes_floor = True  # ASR died: the user spoke over the avatar long enough to take the floor
            if self.hooks.replica_speaking() and takes_floor:
                barged = True
                self.hooks.on_barge_in()
        finally:
            self._barge_task = None
            if not barged:
                self.hooks.on_overlap_end()
