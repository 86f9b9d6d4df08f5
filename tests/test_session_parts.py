"""The session's turn logic, unit by unit, with fake audio and fake model handles: plain asyncio, no
Ray, no network. The listener's decisions, a reply's life, client control and shutdown reasons."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from models.grounding import DECLINE
from models.llm import knowledge_block
from serve_app.events import Event, ShutdownReason
from serve_app.schemas import DEFAULT_PERSONA, OPERATOR_GRANTS, ConversationProperties, PersonaIn
from serve_app.session import Handles, Session, SessionSpec
from serve_app.session.listener import Listener, UserTurn
from serve_app.session.recovery import HOLDING_PHRASE
from serve_app.session.tasks import Tasks
from tests.session_fakes import Models, fake_vad, pause, speak


class Hooks:
    """Records what a listener reports."""

    def __init__(self, speaking: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.turns: list[UserTurn | None] = []
        self.speaking = speaking

    def replica_speaking(self) -> bool:
        return self.speaking

    def _log(self, name: str) -> None:
        self.calls.append((name, time.monotonic()))

    def on_user_started(self) -> None:
        self._log("started")

    def on_user_continued(self) -> None:
        self._log("continued")

    def on_speculate(self, turn: UserTurn) -> None:
        self._log("speculate")

    def on_user_stopped(self, turn: UserTurn | None) -> None:
        self._log("stopped")
        self.turns.append(turn)

    def on_overlap(self) -> None:
        self._log("overlap")

    def on_barge_in(self) -> None:
        self._log("barge_in")

    def on_overlap_end(self) -> None:
        self._log("overlap_end")

    def on_stage_outage(self) -> None:
        self._log("outage")

    def names(self) -> list[str]:
        return [n for n, _ in self.calls if n != "continued"]

    def at(self, name: str) -> float:
        return next(t for n, t in self.calls if n == name)


def listener(models: Models, hooks: Hooks, patience_s: float = 1.1, interrupt_after_s: float = 0.45) -> Listener:
    return Listener(hooks, models.asr, models.turn, fake_vad, Tasks(), patience_s, interrupt_after_s)


def test_a_complete_turn_is_taken_at_once_and_reported_in_order():
    async def run():
        hooks, models = Hooks(), Models(transcript="What time do you open?", audio_p=0.9)
        lst = listener(models, hooks)
        await speak(lst.feed, 0.5)
        await pause(lst.feed, 0.4)
        return hooks, models

    hooks, models = asyncio.run(run())
    assert hooks.names() == ["started", "speculate", "stopped"]
    turn = hooks.turns[0]
    assert turn.text == "What time do you open?" and turn.decision.complete
    assert set(turn.timings.marks) == {"vad_pause", "asr_final", "turn_decision"}
    # The turn model hears the end of the utterance, pre-roll included, never more than 8 s.
    assert 0 < len(models.turn.predict.calls[0][0]) <= 8 * 16000 * 2


def test_the_listener_knows_how_far_behind_the_microphone_it_is():
    """Audio that queued while the session's loop was held (a starved CPU) is the listener's backlog,
    which each turn's timings report: the user's speech ended that much before the server heard it."""
    import av
    from aiortc.mediastreams import MediaStreamError

    seen: list[float] = []

    class Track:  # 20 ms frames: on time, then the loop held for 0.5 s, then the queued ones at once
        def __init__(self) -> None:
            self.n = 0

        async def recv(self) -> av.AudioFrame:
            seen.append(lst.behind_s)
            self.n += 1
            if self.n > 60:
                raise MediaStreamError
            if self.n <= 25:
                await asyncio.sleep(0.02)
            elif self.n == 26:
                time.sleep(0.5)
            frame = av.AudioFrame(format="s16", layout="mono", samples=960)
            frame.planes[0].update(np.zeros(960, np.int16).tobytes())
            frame.sample_rate, frame.pts = 48000, (self.n - 1) * 960
            return frame

    lst = listener(Models(), Hooks())
    asyncio.run(lst.run(Track()))
    assert max(seen[:25]) < 0.1  # on time (scheduling jitter only)
    assert 0.4 < seen[26] < 0.65  # the held half second is waiting
    assert seen[-1] < seen[26] - 0.4  # caught up as the queued frames were processed


def test_the_configured_threshold_decides_the_turn():
    """The TurnTaking deployment's threshold is applied once, in the listener: the same audio score
    is a finished turn at threshold 0.5 and an unfinished one (taken after the patience) at 0.8."""
    async def one(threshold: float) -> tuple[UserTurn, float]:
        hooks, models = Hooks(), Models(transcript="I need a check-up", audio_p=0.7, threshold=threshold)
        lst = listener(models, hooks, patience_s=0.8)
        await speak(lst.feed, 0.4)
        t0 = time.monotonic()
        await pause(lst.feed, 1.2)
        return hooks.turns[0], hooks.at("stopped") - t0

    low, low_s = asyncio.run(one(0.5))
    high, high_s = asyncio.run(one(0.8))
    assert low.decision.complete and low.decision.probability == 0.7 and low_s < 0.4
    assert not high.decision.complete and high_s >= 0.8


def test_patience_follows_the_persona_setting():
    """An unfinished-sounding turn ("... to the") is taken after the persona's patience."""
    async def wait_for(patience_s: float) -> float:
        hooks, models = Hooks(), Models(transcript="I would like to go to the", audio_p=0.9)
        lst = listener(models, hooks, patience_s=patience_s)
        await speak(lst.feed, 0.4)
        t0 = time.monotonic()
        await pause(lst.feed, patience_s + 0.6)
        assert hooks.turns and not hooks.turns[0].decision.complete
        return hooks.at("stopped") - t0

    from serve_app.session.config import PATIENCE_S

    low, high = asyncio.run(wait_for(PATIENCE_S["low"])), asyncio.run(wait_for(PATIENCE_S["high"]))
    assert PATIENCE_S["low"] <= low < PATIENCE_S["low"] + 0.4
    assert PATIENCE_S["high"] <= high < PATIENCE_S["high"] + 0.4


def test_the_user_going_on_cancels_the_speculated_turn():
    async def run():
        hooks, models = Hooks(), Models(transcript="My appointment is on", audio_p=0.9)
        lst = listener(models, hooks, patience_s=1.1)
        await speak(lst.feed, 0.4)
        await pause(lst.feed, 0.3)  # a mid-turn pause: ASR runs, the turn waits for patience
        assert hooks.names() == ["started", "speculate"]
        models.transcript = "My appointment is on Tuesday."
        await speak(lst.feed, 0.4)  # ... and the user goes on
        assert "continued" in [n for n, _ in hooks.calls]
        assert not hooks.turns
        await pause(lst.feed, 0.3)
        return hooks

    hooks = asyncio.run(run())
    assert hooks.names() == ["started", "speculate", "speculate", "stopped"]
    assert [t.text for t in hooks.turns] == ["My appointment is on Tuesday."]


def test_noise_without_words_ends_the_utterance_without_a_turn():
    async def run():
        hooks, models = Hooks(), Models(transcript="")
        lst = listener(models, hooks)
        await speak(lst.feed, 0.3)
        await pause(lst.feed, 0.3)
        return hooks

    hooks = asyncio.run(run())
    assert hooks.names() == ["started", "stopped"] and hooks.turns == [None]


def test_barge_in_versus_backchannel():
    async def run(words: str) -> Hooks:
        hooks, models = Hooks(speaking=True), Models(transcript=words)
        lst = listener(models, hooks, interrupt_after_s=0.3)
        await speak(lst.feed, 0.6)
        await asyncio.sleep(0.1)
        return hooks

    # The avatar pauses on the first voiced chunk, before speech is confirmed, then the words decide.
    assert asyncio.run(run("Sorry, wait a second")).names() == ["overlap", "started", "barge_in"]
    assert asyncio.run(run("mhm")).names() == ["overlap", "started", "overlap_end"]
    assert asyncio.run(run("yeah, okay")).names() == ["overlap", "started", "overlap_end"]


def test_a_click_over_the_avatar_pauses_it_only_briefly():
    async def run() -> Hooks:
        hooks = Hooks(speaking=True)
        lst = listener(Models(), hooks)
        await speak(lst.feed, 0.032)  # one voiced chunk, then quiet
        await pause(lst.feed, 0.2)
        return hooks

    hooks = asyncio.run(run())
    assert hooks.names() == ["overlap", "overlap_end"]
    assert hooks.at("overlap_end") - hooks.at("overlap") < 0.2


def test_prompt_prefix_is_stable_while_perception_changes():
    """Persona, context and history stay byte-identical from turn to turn; what the user looks like
    (changing every turn) only ever appears in the last message, after the history; the prefix the
    session prefills (`LLMContext.prefix`) is exactly what the next reply's prompt starts with."""
    from models.llm import GROUNDING_RULES, seen_lead, user_words
    from serve_app.session.context import LLMContext

    def render(messages: list[dict]) -> str:  # a ChatML-like template, as llama.cpp applies one
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    ctx = LLMContext("You are Maya.", "Open 8 to 6.", "The patient is Ann.")
    looks = ["The user is smiling and looks happy.", "The user looks sad.", "The user is looking away."]
    system = f"You are Maya.\n\nFacts:\n- Open 8 to 6.\n- The patient is Ann.\n\n{GROUNDING_RULES}"
    previous, jumps = None, 0
    for i in range(24):
        prefix = ctx.prefix()
        msgs = ctx.messages(f"Question {i}?", seen=looks[i % 3], heard="They spoke quickly.")
        assert msgs[0]["content"] == system
        assert msgs[:-1] == prefix and render(msgs).startswith(render(prefix))
        assert all(look not in m["content"] for m in msgs[:-1] for look in looks)
        # The look opens the message (prefilled while the user speaks), how they spoke follows the words.
        last = msgs[-1]["content"]
        assert last.startswith(seen_lead(looks[i % 3])) and last.endswith("They spoke quickly.)")
        assert user_words(last) == f"Question {i}?"
        said_before = render(previous[:-1] + [{"role": "user", "content": f"Question {i - 1}?"}]) if previous else ""
        if previous is not None and not render(msgs).startswith(said_before):
            jumps += 1  # the history window moved on (rarely: see context_start)
        previous = msgs
        ctx.add_user(f"Question {i}?")  # as the reply records it: the words, not the camera note
        ctx.add_assistant(f"Answer {i}.")
    assert jumps <= 3
    ungrounded = LLMContext("You are Maya.", "Open 8 to 6.", grounded=False)
    assert ungrounded.prefix()[0]["content"] == "You are Maya.\n\nOpen 8 to 6."


def test_the_prompt_prefix_is_prefilled_when_it_changes():
    """The session warms the LLM's prompt cache with the conversation prefix (at the start: `start()`),
    after each reply, with what was heard, and when the client changes the context; a dead LLM only
    skips it."""
    models = Models(reply="We open at nine. See you then.", clause_s=0.3)

    async def run():
        s = make_session(models)
        player = asyncio.ensure_future(play_audio(s))
        s.prefill.request()  # what start() does with the SDP answer
        await asyncio.wait_for(_until(lambda: len(models.prefills) == 1), 2)
        assert [m["role"] for m in models.prefills[0]] == ["system"]
        await speak(s.listener.feed, 0.5)
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        await asyncio.wait_for(_until(lambda: len(models.prefills) == 2), 2)
        last = models.prefills[1]
        assert [m["role"] for m in last] == ["system", "user", "assistant"]
        assert last[2]["content"] == "We open at nine. See you then." and last == s.context.prefix()
        assert last[1]["content"] == "What time do you open?"  # the words, without the camera note
        s.control.on_message(json.dumps({"event_type": "conversation.append_llm_context",
                                         "properties": {"context": "The patient prefers mornings."}}))
        await asyncio.wait_for(_until(lambda: len(models.prefills) == 3), 2)
        assert "The patient prefers mornings." in models.prefills[2][0]["content"]
        models.outages["llm"].kill()
        s.prefill.request()
        await asyncio.sleep(0.2)
        assert s.prefill.tokens == [1, 3, 3] and len(models.prefills) == 3
        player.cancel()
        await s.close()

    asyncio.run(run())


def test_the_users_look_is_prefilled_while_they_speak_and_opens_the_reply_prompt():
    """What the camera shows is taken as the user begins to speak and prefilled at the start of their next
    message; the reply's prompt opens with exactly that note (so the LLM reads only the words after it),
    how they spoke follows the words, and the history keeps the words alone."""
    from models.llm import seen_lead

    models = Models(reply="We open at nine.", clause_s=0.3)
    looks = {"now": "The user looks sad, looking at you."}

    async def run():
        s = make_session(models)
        s.perceiver.llm_seen = lambda: looks["now"]
        s.reply_parts.heard_text = lambda: "fast"
        player = asyncio.ensure_future(play_audio(s))
        s.prefill.request()
        await asyncio.wait_for(_until(lambda: len(models.prefills) == 1), 2)
        assert models.prefill_leads == [""]
        await speak(s.listener.feed, 0.5)
        assert models.prefill_leads[-1] == seen_lead(looks["now"])  # cached before the user finished
        prefilled = len(models.prefills)
        looks["now"] = "The user is smiling and looks happy, looking at you."  # changes while they speak
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        prompt = models.prompts[0][-1]["content"]
        heard = "\n\n(Their voice: fast)"
        assert prompt == seen_lead("The user looks sad, looking at you.") + "What time do you open?" + heard
        assert len(models.prefills) >= prefilled and s.context.history[0]["content"] == "What time do you open?"
        # After the reply, the look now opens the next message's prefill.
        await asyncio.wait_for(_until(lambda: models.prefill_leads[-1] == seen_lead(looks["now"])), 2)
        assert models.prefills[-1] == s.context.prefix()
        player.cancel()
        await s.close()

    asyncio.run(run())


def test_the_face_renders_less_while_a_reply_is_prepared():
    """The reply path comes first: while the LLM and TTS make a reply's first audio, the face renders
    at YIELD_FPS (repeating the last frame in between); otherwise every changed pose is rendered."""
    from models.avatar.render import Pose
    from serve_app.session.avatar import YIELD_FPS, AvatarFace

    class Moving:  # a pose that changes every frame
        def pose(self, t: float) -> Pose:
            p = Pose()
            p.weights = np.full_like(p.weights, (t * 7) % 1.0)
            return p

    class Counting:
        n = 0

        def render(self, pose) -> np.ndarray:
            self.n += 1
            return np.zeros((8, 8, 3), np.uint8)

    for preparing, expected in ((False, 36), (True, 3 * YIELD_FPS)):
        renderer = Counting()
        face = AvatarFace(renderer, Moving(), yield_cpu=lambda p=preparing: p)
        for i in range(36):  # 3 s at 12 fps
            face.render(i / 12)
        assert abs(renderer.n - expected) <= 1, (preparing, renderer.n)


# --- the session's parts together (a real Session with fake handles and no peer) -------------------

class BlankRenderer:
    def render(self, pose) -> np.ndarray:
        return np.zeros((16, 16, 3), np.uint8)


def make_session(models: Models, persona: PersonaIn = DEFAULT_PERSONA, grants: frozenset[str] = OPERATOR_GRANTS,
                 document_ids: list[str] | None = None, memories: list[tuple[str, str]] | None = None,
                 **props) -> Session:
    properties = ConversationProperties.model_construct(**{**ConversationProperties().model_dump(), **props})
    spec = SessionSpec("c-test", "v=0", persona, properties, grants=grants, document_ids=document_ids or [],
                       memories=memories or [])
    handles = Handles(turn=models.turn, asr=models.asr, llm=models.llm, tts=models.tts, health=models.health,
                      knowledge=models.knowledge)
    return Session(spec, handles, BlankRenderer(), fake_vad, fps=10)


async def play_audio(session: Session, heard: list[tuple[float, float]] | None = None) -> None:
    """Pull the avatar's audio track at its media pace, as the peer connection would; `heard` gets
    (wall time, rms) per 20 ms frame."""
    while True:
        frame = await session.audio_out.recv()
        if heard is not None:
            pcm = frame.to_ndarray().astype(np.float32) / 32768
            heard.append((time.monotonic(), float(np.sqrt(np.mean(pcm * pcm)))))


def events(session: Session) -> list[dict]:
    out = []
    while not session.events.empty():
        out.append(session.events.get_nowait())
    return out


def of_type(evs: list[dict], kind: Event) -> list[dict]:
    return [e for e in evs if e["event_type"] == kind]


def test_a_spoken_turn_through_the_session():
    async def run():
        models = Models(reply="We open at nine. See you then.", clause_s=0.3)
        s = make_session(models)
        player = asyncio.ensure_future(play_audio(s))
        await speak(s.listener.feed, 0.5)
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        await asyncio.sleep(0.1)
        player.cancel()
        await s.close()
        return s, models, events(s)

    s, models, evs = asyncio.run(run())
    kinds = [e["event_type"] for e in evs]
    order = [Event.USER_STARTED, Event.USER_STOPPED, Event.UTTERANCE, Event.REPLICA_STARTED, Event.REPLICA_STOPPED]
    assert [kinds.index(k) for k in order] == sorted(kinds.index(k) for k in order), kinds
    assert [e["properties"]["role"] for e in of_type(evs, Event.UTTERANCE)] == ["user", "replica"]
    timings = of_type(evs, Event.TURN_TIMINGS)[0]["properties"]
    assert timings["turn_index"] == 1
    assert {"vad_pause", "asr_final", "llm_first_token", "first_audio_sent"} <= set(timings["ms_from_speech_end"])
    assert [m["role"] for m in s.context.history] == ["user", "assistant"]
    assert s.context.history[1]["content"] == "We open at nine. See you then."


@pytest.mark.parametrize("reply, spoken, declined", [
    ("Yes, we do laser eye surgery.", DECLINE, True),  # an invented yes: the fallback is said instead
    ("Dr. Ortiz does cleanings. Laser eye surgery is done by Dr. Lee.", "Dr. Ortiz does cleanings.", False),
])
def test_a_grounded_reply_does_not_answer_what_the_facts_do_not_mention(reply, spoken, declined):
    """The clinic's facts never mention laser eye surgery: the reply's answer to it is never spoken."""
    persona = DEFAULT_PERSONA.model_copy(update={"context": "Open 8 to 6.\nDr. Ortiz does cleanings for 95 dollars."})

    async def speech(s):
        await speak(s.listener.feed, 0.5)
        await pause(s.listener.feed, 0.3)

    models = Models(transcript="Do you do laser eye surgery?", reply=reply, clause_s=0.1)
    evs = _one_turn(models, speech, document_ids=(), persona=persona)
    assert [e["properties"]["speech"] for e in of_type(evs, Event.UTTERANCE)] == ["Do you do laser eye surgery?", spoken]
    assert of_type(evs, Event.TURN_TIMINGS)[0]["properties"].get("declined", False) is declined


def test_a_speculative_reply_is_dropped_when_the_user_goes_on():
    async def run():
        models = Models(transcript="I want to book an", reply="Sure, when would you like to come in?")
        s = make_session(models)
        await speak(s.listener.feed, 0.4)
        await pause(s.listener.feed, 0.3)  # mid-turn pause: the reply is speculated, held at its gate
        speculative = s.reply
        assert speculative is not None and not speculative.confirmed
        await speak(s.listener.feed, 0.3)
        await asyncio.sleep(0.05)
        await s.close()
        return s, models, speculative, events(s)

    s, models, speculative, evs = asyncio.run(run())
    assert speculative.task.cancelled() and s.reply is None
    assert models.streams and models.streams[0].cancelled  # the LLM stopped generating
    assert s.context.history == [] and not of_type(evs, Event.REPLICA_STARTED)
    assert not of_type(evs, Event.UTTERANCE)


def test_an_interrupted_reply_keeps_only_what_was_heard():
    async def run():
        models = Models(clause_s=1.0)
        s = make_session(models)
        player = asyncio.ensure_future(play_audio(s))
        s.respond("When are you open?")
        await asyncio.wait_for(_until(lambda: s.reply is not None and s.reply.started), 5)
        await asyncio.sleep(1.5)  # all of "We open at nine." and half of "See you then."
        s.control.on_message(json.dumps({"event_type": "conversation.interrupt"}))
        await asyncio.sleep(0.05)
        player.cancel()
        await s.close()
        return s, events(s)

    s, evs = asyncio.run(run())
    said = of_type(evs, Event.UTTERANCE)[-1]["properties"]
    assert said["role"] == "replica" and said["interrupted"]
    assert said["speech"].startswith("We open at nine.") and said["speech"] != "We open at nine. See you then."
    assert s.context.history[-1] == {"role": "assistant", "content": said["speech"]}
    assert of_type(evs, Event.REPLICA_STOPPED)[-1]["properties"]["interrupted"] is True


def test_talking_over_the_avatar_pauses_it_at_once_then_barge_in_or_go_on():
    """The avatar's audio is silent within 300 ms of the user starting to talk over it; a backchannel
    ("mhm") lets it go on from where it paused, and all of it is heard; real words end the reply,
    and the context keeps only what was heard before the pause."""
    text = "This is a long sentence that the avatar is saying. And another one after it."

    async def run(words: str, then_quiet: bool = False):
        models = Models(clause_s=2.0, transcript=words)
        s = make_session(models)
        heard: list[tuple[float, float]] = []
        player = asyncio.ensure_future(play_audio(s, heard))
        s.say(text)
        await asyncio.wait_for(_until(lambda: s.reply is not None and s.reply.started), 5)
        await asyncio.sleep(0.5)
        t_talk = time.monotonic()
        await speak(s.listener.feed, 0.7)
        decided = time.monotonic()
        if then_quiet:  # the user stops: the pause ends the utterance, and "mhm" is no turn
            await pause(s.listener.feed, 0.5)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(_until(lambda: s.reply is None), 8)
        player.cancel()
        await s.close()
        return t_talk, decided, heard, events(s)

    def silent_after(heard, t: float) -> float:
        return next(ts for ts, rms in heard if ts > t and rms < 1e-3) - t

    for then_quiet in (False, True):
        t_talk, decided, heard, evs = asyncio.run(run("mhm", then_quiet))
        assert silent_after(heard, t_talk) < 0.3
        assert any(rms > 0.01 for ts, rms in heard if ts > decided + 0.1)  # it went on
        said = of_type(evs, Event.UTTERANCE)[-1]["properties"]
        assert said["speech"] == text and not said["interrupted"]
        assert not of_type(evs, Event.REPLICA_STOPPED)[-1]["properties"]["interrupted"]
        assert not [e for e in of_type(evs, Event.UTTERANCE) if e["properties"]["role"] == "user"]

    t_talk, decided, heard, evs = asyncio.run(run("No, stop, that is wrong."))
    assert silent_after(heard, t_talk) < 0.3
    assert not any(rms > 0.01 for ts, rms in heard if ts > decided + 0.1)
    said = of_type(evs, Event.UTTERANCE)[-1]["properties"]
    assert said["interrupted"] and said["speech"].startswith("This is") and said["speech"] != text
    assert of_type(evs, Event.REPLICA_STOPPED)[0]["properties"]["interrupted"] is True


def test_a_clause_that_starts_while_the_user_talks_is_paused_at_once():
    """The user starts talking while the avatar waits for its next clause (silent, TTS still busy):
    when that clause arrives it is paused within a frame or two, and real words end the reply."""

    async def run():
        models = Models(clause_s=1.5, transcript="No, stop, that is wrong.", tts_delays_s=[0.01, 2.5])
        s = make_session(models)
        heard: list[tuple[float, float]] = []
        player = asyncio.ensure_future(play_audio(s, heard))
        s.say("First part. Second part comes late.")
        await asyncio.wait_for(_until(lambda: s.reply is not None and s.reply.started), 5)
        await asyncio.sleep(1.7)  # the first clause played out; the second is still being synthesised
        t_talk = time.monotonic()
        await speak(s.listener.feed, 1.5)  # the second clause becomes ready ~0.8 s into this
        t_end = time.monotonic()
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: s.reply is None), 8)
        player.cancel()
        await s.close()
        return t_talk, t_end, heard, events(s)

    t_talk, t_end, heard, evs = asyncio.run(run())
    loud_s = 0.02 * sum(rms > 0.01 for ts, rms in heard if t_talk < ts < t_end)  # the reply to the words comes later
    assert loud_s <= 0.1, loud_s  # before this rule, the late clause played on over the user (~1 s)
    said = [e["properties"] for e in of_type(evs, Event.UTTERANCE) if e["properties"]["role"] == "replica"][0]
    assert said["interrupted"] and said["speech"].startswith("First part.")


def test_a_short_word_then_a_comma_pause_over_the_avatar_keeps_it_paused():
    """"Wait, ..." over the avatar: the word is shorter than the barge-in check needs and a comma pause
    follows; the avatar stays silent through the pause (it does not resume for a moment and get cut
    again) and the words end the reply."""

    async def run():
        models = Models(clause_s=3.0, transcript="Wait,")
        s = make_session(models)
        heard: list[tuple[float, float]] = []
        player = asyncio.ensure_future(play_audio(s, heard))
        s.say("Dr. Haddad does braces for children and adults alike.")
        await asyncio.wait_for(_until(lambda: s.reply is not None and s.reply.started), 5)
        await asyncio.sleep(0.5)
        t_talk = time.monotonic()
        await speak(s.listener.feed, 0.25)
        await pause(s.listener.feed, 0.2)
        await speak(s.listener.feed, 1.0)
        t_end = time.monotonic()
        await asyncio.wait_for(_until(lambda: of_type(events(s), Event.REPLICA_STOPPED) or s.reply is None), 5)
        player.cancel()
        await s.close()
        return t_talk, t_end, heard

    t_talk, t_end, heard = asyncio.run(run())
    loud = [ts - t_talk for ts, rms in heard if t_talk + 0.15 < ts < t_end and rms > 0.01]
    assert not loud, loud[:5]


def test_a_reply_ends_when_its_last_words_are_dropped_after_the_audio_played():
    """The token budget cuts the reply after its first sentence played out: the unfinished rest is
    not spoken, and the reply still ends (stopped_speaking, the context keeps the sentence)."""
    async def run():
        models = Models(reply="We open at nine. And on Saturdays we", clause_s=0.2, last_piece_s=0.8,
                        finish_reason="length")
        s = make_session(models)
        player = asyncio.ensure_future(play_audio(s))
        s.respond("When do you open?")
        await asyncio.wait_for(_until(lambda: s.reply is None), 5)
        player.cancel()
        await s.close()
        return s, events(s)

    s, evs = asyncio.run(run())
    assert of_type(evs, Event.REPLICA_STOPPED)[-1]["properties"]["interrupted"] is False
    assert of_type(evs, Event.UTTERANCE)[-1]["properties"]["speech"] == "We open at nine."
    assert s.context.history[-1] == {"role": "assistant", "content": "We open at nine."}


def test_client_control_messages():
    async def run():
        models = Models(clause_s=0.2)
        s = make_session(models)
        told: list[dict] = []
        s.control.reply = lambda event_type, **props: told.append({"event_type": event_type, **props})
        player = asyncio.ensure_future(play_audio(s))
        send = s.control.on_message
        send(json.dumps({"event_type": "conversation.echo", "properties": {"text": "Hello there."}}))
        await asyncio.wait_for(_until(lambda: s.reply is None), 5)
        send(json.dumps({"event_type": "conversation.append_llm_context", "properties": {"context": "Closed Sundays."}}))
        send(json.dumps({"event_type": "conversation.respond", "properties": {"text": "Are you open Sunday?"}}))
        await asyncio.wait_for(_until(lambda: s.reply is None and s.turns == 1), 5)
        send("{not json")
        send(json.dumps({"event_type": "conversation.dance"}))
        send(json.dumps({"event_type": "conversation.echo", "properties": ["not", "an", "object"]}))
        player.cancel()
        await s.close()
        return models, events(s), told

    models, evs, told = asyncio.run(run())
    assert models.tts.synthesize.calls[0][0] == "Hello there."
    assert len(models.prompts) == 1  # echo never asks the LLM
    prompt = models.prompts[0]
    assert "Closed Sundays." in prompt[0]["content"] and prompt[-1] == {"role": "user", "content": "Are you open Sunday?"}
    speech = [(e["properties"]["role"], e["properties"]["speech"]) for e in of_type(evs, Event.UTTERANCE)]
    assert speech[:2] == [("replica", "Hello there."), ("user", "Are you open Sunday?")]
    # Refusals go to the sender alone, never to the stream (and so never to the webhook), without its text.
    assert not of_type(evs, Event.ERROR)
    assert [t["code"] for t in told] == ["bad_message", "unknown_event", "bad_message"]
    assert "dance" not in json.dumps(told)


def test_shutdown_reasons():
    async def reason_of(setup, **props) -> tuple[str, list[dict]]:
        s = make_session(Models(), **props)
        setup(s)
        reason = await asyncio.wait_for(s.run(), 5)
        return reason, events(s)

    def connected(s: Session) -> None:
        s.transport.connected.set()

    def left(s: Session) -> None:
        s.transport.connected.set()
        s.transport.participant_left()

    reason, evs = asyncio.run(reason_of(lambda s: None, participant_absent_timeout=0.2))
    assert reason == ShutdownReason.PARTICIPANT_ABSENT and not of_type(evs, Event.REPLICA_JOINED)
    reason, evs = asyncio.run(reason_of(connected, max_call_duration=0.3))
    assert reason == ShutdownReason.MAX_CALL_DURATION and of_type(evs, Event.REPLICA_JOINED)
    reason, evs = asyncio.run(reason_of(left, participant_left_timeout=0.2))
    assert reason == ShutdownReason.PARTICIPANT_LEFT
    shutdown = of_type(evs, Event.SHUTDOWN)
    assert len(shutdown) == 1 and shutdown[0]["properties"]["shutdown_reason"] == "participant_left_timeout"
    assert of_type(evs, Event.PERCEPTION_ANALYSIS)  # perception is on by default: the end-of-call summary

    async def ended_by_host() -> tuple[str, list[dict]]:
        s = make_session(Models())
        s.transport.connected.set()
        runner = asyncio.ensure_future(s.run())
        await asyncio.sleep(0.3)
        await s.shutdown(ShutdownReason.ENDPOINT_HIT)
        return await asyncio.wait_for(runner, 2), events(s)

    reason, evs = asyncio.run(ended_by_host())
    assert reason == ShutdownReason.ENDPOINT_HIT and len(of_type(evs, Event.SHUTDOWN)) == 1


@pytest.mark.parametrize("stage", ["tts", "llm", "asr"])
def test_a_model_stage_killed_mid_turn_says_a_holding_phrase_and_the_turn_goes_on(stage):
    """The stage's replica dies at the turn's first call and takes 3 s to come back: the avatar says
    the holding phrase within 2 s of the user's pause, then the real reply; only the reply is recorded."""
    async def run():
        models = Models(reply="We open at nine. See you then.", clause_s=0.3)
        models.outages[stage].restart_s = 3.0
        s = make_session(models)
        await s.holding.prepare()
        heard: list[tuple[float, float]] = []
        player = asyncio.ensure_future(play_audio(s, heard))
        models.outages[stage].kill()
        await speak(s.listener.feed, 0.5)
        paused_at = time.monotonic()
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 10)
        await asyncio.sleep(0.1)
        player.cancel()
        await s.close()
        return s, events(s), heard, paused_at

    s, evs, heard, paused_at = asyncio.run(run())
    audible = [t - paused_at for t, rms in heard if rms > 0.01 and t > paused_at]
    assert audible and audible[0] < 2.0, audible[:3]  # the holding phrase
    assert s.context.history[1] == {"role": "assistant", "content": "We open at nine. See you then."}
    said = [e["properties"]["speech"] for e in of_type(evs, Event.UTTERANCE)]
    assert said == ["What time do you open?", "We open at nine. See you then."]
    assert not any(HOLDING_PHRASE in m["content"] for m in s.context.history)
    if stage != "asr":  # the reply's own first audio came after the restart, and its timings say so
        timings = of_type(evs, Event.TURN_TIMINGS)[0]["properties"]["ms_from_speech_end"]
        assert timings["first_audio_sent"] > 2500
    assert not of_type(evs, Event.ERROR)


async def _until(cond, step: float = 0.01) -> None:
    while not cond():
        await asyncio.sleep(step)


def _one_turn(models: Models, speech, document_ids: tuple[str, ...] = ("d1",), **session_kw) -> list[dict]:
    """A session (with a document unless told otherwise), through `speech(session)` (what the user says),
    until its one reply has finished; returns its events."""
    async def run():
        s = make_session(models, document_ids=list(document_ids), **session_kw)
        player = asyncio.ensure_future(play_audio(s))
        await speech(s)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        player.cancel()
        await s.close()
        return events(s)

    return asyncio.run(run())


def test_passages_are_looked_up_from_the_words_so_far_and_prefilled_before_the_turn_ends():
    """A second into the utterance its words so far are transcribed once; the passages for them open the
    next user message and are prefilled with the prefix, one at a time, so the reply's prompt starts
    with exactly that (cached) text. Hotwords reach ASR as its prompt."""


    models = Models(transcript="How much does the K20 cost?", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros"]
    persona = DEFAULT_PERSONA.model_copy(update={"layers": DEFAULT_PERSONA.layers.model_copy(update={
        "stt": DEFAULT_PERSONA.layers.stt.model_copy(update={"hotwords": "Brightline K20"})})})

    async def run():
        s = make_session(models, persona=persona, document_ids=["d1"])
        player = asyncio.ensure_future(play_audio(s))
        await speak(s.listener.feed, 1.8)
        await asyncio.wait_for(_until(lambda: models.passages[1] in "".join(models.prefill_leads)), 2)
        assert models.searches == ["How much does the K20 cost?"] and s.turns == 0  # still speaking
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        player.cancel()
        await s.close()
        return s, events(s)

    s, evs = asyncio.run(run())
    first, both = knowledge_block(models.passages[:1], closed=False), knowledge_block(models.passages, closed=False)
    assert [lead for lead in models.prefill_leads if lead] == [first, both]  # best first, each on the last
    assert models.prompts[-1][-1]["content"].startswith(knowledge_block(models.passages) + "How much does the K20 cost?")
    assert knowledge_block(models.passages).startswith(both)
    assert models.searches == ["How much does the K20 cost?"]  # the reply used the prefetched passages
    assert s.context.history[0]["content"] == "How much does the K20 cost?"  # the history keeps the words only
    assert set(models.asr_prompts) == {"Brightline K20"}
    assert models.prefill_leads[-1] == ""  # after the reply: the next turn's passages are not known yet
    timings = of_type(evs, Event.TURN_TIMINGS)
    assert timings[0]["properties"]["passages"] == {"count": 2, "prefilled": True}


def test_a_reply_reads_only_the_passages_prefilled_while_the_user_spoke():
    """Prefilling a passage takes time on a CPU; none starts after the user stopped speaking, and the
    reply does not read the ones that did not make it (they would be its latency)."""
    models = Models(transcript="How much does the K20 cost?", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros",
                       "Milk jug: 19 euros"]
    models.prefill_s = 0.5

    async def speech(s):
        await speak(s.listener.feed, 1.5)  # the interim lookup at ~1.0 s, the first passage's prefill till ~1.55 s
        await pause(s.listener.feed, 0.3)

    evs = _one_turn(models, speech)
    content = models.prompts[-1][-1]["content"]
    assert models.passages[0] in content and models.passages[1] not in content
    assert not any(models.passages[1] in lead for lead in models.prefill_leads)  # never started
    timings = of_type(evs, Event.TURN_TIMINGS)
    assert timings[0]["properties"]["passages"] == {"count": 1, "prefilled": True}


def test_a_reply_does_not_wait_for_a_further_passage_once_one_is_cached():
    """The user stops while the second passage is being prefilled: the reply reads the first (cached)
    at once, and the second's prefill is stopped rather than waited for (it would be the reply's latency)."""
    models = Models(transcript="How much does the K20 cost?", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros"]
    models.prefill_s = 0.8

    async def speech(s):
        await speak(s.listener.feed, 2.4)  # the interim lookup at ~1.3 s; passage 1 cached at ~2.1 s
        await pause(s.listener.feed, 0.3)

    evs = _one_turn(models, speech)
    assert any(models.passages[1] in lead for lead in models.prefill_leads)  # it had started
    assert models.prefill_cancelled == 1
    content = models.prompts[-1][-1]["content"]
    assert content.startswith(knowledge_block(models.passages[:1])) and models.passages[1] not in content
    assert of_type(evs, Event.TURN_TIMINGS)[0]["properties"]["passages"] == {"count": 1, "prefilled": True}


def test_an_interim_transcript_not_back_by_the_pause_is_dropped_for_the_final_one():
    """The words so far are transcribed as an interim (after any final transcript waiting at the shared
    ASR); one still pending when the user pauses is cancelled, and the reply looks its passages up from the
    final words, at once."""
    models = Models(transcript="How much does the K20 cost?", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros"]
    models.interim_asr_s = 5.0

    async def run():
        s = make_session(models, document_ids=["d1"])
        player = asyncio.ensure_future(play_audio(s))
        await speak(s.listener.feed, 1.6)
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 3)
        cancelled.append(models.asr_cancelled)
        player.cancel()
        await s.close()
        return events(s)

    cancelled: list[int] = []
    evs = asyncio.run(run())
    assert cancelled == [1]  # by the pause, not by the session's end
    assert models.asr_interim == [True, False]
    assert models.searches == ["How much does the K20 cost?"]  # the late lookup; the interim never came
    assert of_type(evs, Event.TURN_TIMINGS)[0]["properties"]["passages"] == {"count": 1, "prefilled": False}


def test_passages_go_on_prefilling_when_the_user_goes_on_after_a_pause():
    """A mid-turn pause stops the prefills (a speculative reply takes the passages); when the user goes on,
    the speculative reply is dropped and the rest of the passages are prefilled for the real one."""
    models = Models(transcript="How much does the", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros"]
    models.prefill_s = 0.4

    async def run():
        s = make_session(models, document_ids=["d1"])
        player = asyncio.ensure_future(play_audio(s))
        await speak(s.listener.feed, 1.2)
        await pause(s.listener.feed, 0.5)  # "... does the": the turn waits for patience
        assert not any(models.passages[1] in lead for lead in models.prefill_leads)
        models.transcript = "How much does the K20 cost?"
        await speak(s.listener.feed, 1.0)
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        player.cancel()
        await s.close()
        return events(s)

    evs = asyncio.run(run())
    assert models.prompts[-1][-1]["content"].startswith(knowledge_block(models.passages))
    assert of_type(evs, Event.TURN_TIMINGS)[-1]["properties"]["passages"] == {"count": 2, "prefilled": True}


@pytest.mark.parametrize("first_finds", [False, True])
def test_words_that_find_nothing_are_transcribed_again_a_second_later(first_finds):
    """The interim words at 1 s ("How much") often name nothing yet: then the words at 2 s are
    transcribed and looked up too, and their passages are prefilled before the user stops. Words that
    found passages are not transcribed again (an interim ASR is a core's time while the user speaks)."""
    models = Models(transcript="How much", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros"]
    models.finds = lambda words: models.passages if first_finds or "K20" in words else []

    async def speech(s):
        await speak(s.listener.feed, 1.5)
        models.transcript = "How much does the K20 cost?"
        await speak(s.listener.feed, 1.0)
        await pause(s.listener.feed, 0.3)

    evs = _one_turn(models, speech)
    if first_finds:
        assert models.asr_interim == [True, False] and models.searches == ["How much"]
    else:
        assert models.asr_interim == [True, True, False]
        assert models.searches == ["How much", "How much does the K20 cost?"]  # no late lookup
    assert models.prompts[-1][-1]["content"].startswith(knowledge_block(models.passages))
    assert of_type(evs, Event.TURN_TIMINGS)[0]["properties"]["passages"] == {"count": 1, "prefilled": True}


def test_the_words_before_a_pause_are_looked_up_again_when_the_user_goes_on():
    """The interim words ("Well") found the wrong passage; the words at a mid-turn pause ("Well, the
    K20 and the") say more. When the user goes on, those are looked up, and their passages replace the
    prefilled one while the user finishes, so the reply reads them without prompt processing."""
    models = Models(transcript="Well", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros"]
    other = "Opening hours: 9 to 17"
    models.finds = lambda words: models.passages if "K20" in words else [other]
    models.prefill_s = 0.2

    async def speech(s):
        await speak(s.listener.feed, 1.5)  # the interim words: "Well"
        models.transcript = "Well, the K20 and the"
        await pause(s.listener.feed, 0.5)  # the speculative reply to "... and the" waits for patience
        models.transcript = "Well, the K20 and the milk jug, how much are they?"
        await speak(s.listener.feed, 1.0)
        await pause(s.listener.feed, 0.3)

    evs = _one_turn(models, speech)
    # The interim words, then the pause's words when the user went on (the speculative reply read the
    # prefilled passage); the reply found its passages cached.
    assert models.searches == ["Well", "Well, the K20 and the"]
    content = models.prompts[-1][-1]["content"]
    assert content.startswith(knowledge_block(models.passages)) and other not in content
    assert of_type(evs, Event.TURN_TIMINGS)[-1]["properties"]["passages"] == {"count": 2, "prefilled": True}


@pytest.mark.parametrize("caches", [True, False])
def test_a_short_utterance_gets_late_passages_from_its_final_words(caches):
    """Too short for the interim lookup: the reply looks the passages up from the final words, and reads
    `late_passages` of them where reading is prompt processing on the critical path (a warmed cache),
    every one where the backend caches prompts its own way (a remote endpoint)."""
    models = Models(transcript="And the K20?", reply="It costs 449 euros.", clause_s=0.3)
    models.passages = ["Machines: K20 espresso machine: 449 euros", "Grinders: G2 burr grinder: 129 euros"]
    models.prefill_caches = caches

    async def run():
        s = make_session(models, document_ids=["d1"])
        s.prefill.request()  # as the session's start does: the backend's answer says whether it caches
        await asyncio.wait_for(_until(lambda: s.prefill.warms is not None), 2)
        player = asyncio.ensure_future(play_audio(s))
        await speak(s.listener.feed, 0.6)
        await pause(s.listener.feed, 0.3)
        await asyncio.wait_for(_until(lambda: len(s.context.history) == 2 and s.reply is None), 5)
        player.cancel()
        await s.close()
        return events(s)

    evs = asyncio.run(run())
    assert models.searches == ["And the K20?"]
    content = models.prompts[-1][-1]["content"]
    assert models.passages[0] in content and (models.passages[1] in content) is (not caches)
    timings = of_type(evs, Event.TURN_TIMINGS)
    assert timings[0]["properties"]["passages"] == {"count": 1 if caches else 2, "prefilled": False}


def test_remembered_facts_are_in_the_prefix_and_the_user_is_welcomed_back():
    models = Models()
    memories = [("name", "The user's name is Maria."), ("allergy", "The user is allergic to penicillin.")]
    s = make_session(models, memories=memories)
    system = s.context.prefix()[0]["content"]
    assert "- The user's name is Maria.\n- The user is allergic to penicillin." in system
    assert s.greeting() == "Welcome back, Maria! How can I help you today?"
    assert make_session(models).greeting() is None
    s.spec.custom_greeting = "Hello {name}, this is Riverside Dental."
    assert s.greeting() == "Hello Maria, this is Riverside Dental."


def test_the_avatar_watches_where_the_perceived_face_is():
    """Each analysed camera frame tells the animator where the user's face is in their frame (-1..1),
    or that it is gone."""
    from models.avatar.animate import Animator
    from serve_app.media import MediaClock
    from serve_app.schemas import PerceptionLayer
    from serve_app.session.perceiver import Perceiver
    from serve_app.session.tasks import Tasks

    class Perception:
        def __init__(self) -> None:
            self.summaries = [{"present": True, "score": 0.9, "box": [20.0, 40.0, 100.0, 140.0]},  # left, a bit low
                              {"present": False}]
            self.analyse = self

        async def remote(self, i420, hint):
            return self.summaries.pop(0)

    async def run():
        animator = Animator()
        perceiver = Perceiver(PerceptionLayer(), Perception(), animator, MediaClock(), lambda *a, **k: None, Tasks())
        i420 = np.zeros((240 * 3 // 2, 320), np.uint8)  # a 320x240 frame
        await perceiver._perceive(i420, 0.0)
        seen = animator._look.copy()
        await perceiver._perceive(i420, 0.25)
        return seen, animator._look

    seen, gone = asyncio.run(run())
    assert np.allclose(seen, [(20 + 100) / 320 - 1, (40 + 140) / 240 - 1]) and gone is None
