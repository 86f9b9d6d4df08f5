"""The embedded models on their own: real weights, real audio (no Ray)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.audio import resample, whisper_log_mel
from models.llm import ReplyShaper, build_messages
from models.turn import SmartTurn, fuse, is_backchannel, transcript_gate
from models.vad import CHUNK, SileroVAD, SpeechSegmenter


def speech16k(tts, text: str) -> np.ndarray:
    s = tts.synthesize(text)
    return resample(s.audio, s.sample_rate, 16000)


def test_log_mel_shape_and_range():
    x = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    feats = whisper_log_mel(np.concatenate([np.zeros(16000 * 7, np.float32), x]))
    assert feats.shape == (80, 800)
    assert feats.dtype == np.float32
    assert -1.5 <= feats.min() and feats.max() <= 2.0
    # The tone is at the end (last second = last 100 frames), not at the start.
    assert feats[:, -100:].max() > feats[:, :100].max() + 0.5


def test_vad_finds_speech_and_pause(tts):
    audio = np.concatenate([np.zeros(8000, np.float32), speech16k(tts, "Hello, how are you doing today?"),
                            np.zeros(16000, np.float32)])
    vad, seg = SileroVAD(), SpeechSegmenter()
    events = []
    for i in range(audio.size // CHUNK):
        ev = seg.update(vad(audio[i * CHUNK:(i + 1) * CHUNK]), i * CHUNK / 16000)
        if ev:
            events.append((ev.kind, ev.t))
    kinds = [k for k, _ in events]
    assert kinds[0] == "speech_start" and "pause" in kinds
    assert 0.4 <= events[0][1] <= 0.8  # speech starts after the 0.5 s of silence
    with pytest.raises(ValueError):
        vad(np.zeros(100, np.float32))


def test_smart_turn_prefers_finished_sentences(tts):
    model = SmartTurn()
    done = model.probability(speech16k(tts, "Can you tell me what the weather will be like tomorrow?"))
    cut = model.probability(speech16k(tts, "I would like to go to the, um"))
    assert 0 <= cut < done <= 1
    assert fuse(0.9, "I want to go to the").complete is False
    assert fuse(0.45, "What time is it?").complete is True
    assert transcript_gate("") is None


def test_an_opener_alone_is_not_a_finished_turn():
    """"Wait." or "Sorry, one more thing." before a comma-length pause: the user goes on (the turn is
    taken after the persona's patience if they do not)."""
    for opener in ("Wait.", "Sorry, one more thing.", "Hi.", "Great."):
        assert fuse(0.9, opener).complete is False, opener
    assert fuse(0.9, "Great, see you on Monday.").complete is True
    assert fuse(0.9, "Thanks.").complete is True


def test_backchannels():
    assert is_backchannel("Mhm.") and is_backchannel("yeah, okay") and is_backchannel("")
    assert not is_backchannel("Wait, that's not what I asked")


def test_asr_transcribes_speech(tts):
    from models.asr import WhisperASR

    asr = WhisperASR()
    said = "the quick brown fox jumps over the lazy dog".split()
    heard = set(re.findall(r"[a-z]+", asr.transcribe(speech16k(tts, " ".join(said) + ".")).text.lower()))
    # tiny.en hears "quick" as "quit" now and then, depending on float rounding: ask for 8 of 9 words.
    assert sum(w in heard for w in said) >= 8, heard
    assert asr.transcribe(np.zeros(800, np.float32)).text == ""


def test_short_window_asr_matches_the_full_window(tts):
    """The CPU profile's shortened encoder window gives the full 30 s window's words, with silence
    around the speech and on a one-word answer (where shortened windows tend to repeat)."""
    from models.asr import WhisperASR

    short, full = WhisperASR(), WhisperASR(short_window=False)
    assert short.short_window and not full.short_window
    rng = np.random.default_rng(1)
    for sentence in ("Yes.", "Is it going to rain tomorrow in London?",
                     "I was wondering whether you could explain how photosynthesis works in simple terms."):
        speech = speech16k(tts, sentence)
        audio = np.concatenate([np.zeros(3200, np.float32), speech, np.zeros(4000, np.float32)])
        audio += rng.normal(0, 0.003, audio.size).astype(np.float32)
        a, b = short.transcribe(audio), full.transcribe(audio)
        # Same words; punctuation may differ ("Yes?" / "Yes.") with float rounding.
        assert a.short_window and re.findall(r"[a-z0-9']+", a.text.lower()) == re.findall(r"[a-z0-9']+", b.text.lower()), (
            a.text, b.text)
    silence = short.transcribe(rng.normal(0, 0.003, 32000).astype(np.float32))
    assert silence.text == ""
    assert short.fallbacks == 0


def test_collapse_repeats():
    from models.asr import collapse_repeats, max_tokens_for

    assert collapse_repeats("Yes. Yes. Yes. Yes. Yes") == "Yes."
    assert collapse_repeats("What is the capital of France? What is the capital France?") == "What is the capital of France?"
    assert collapse_repeats("How are you feeling today? How are you feeling") == "How are you feeling today?"
    assert collapse_repeats("Hi. How are you? I am fine.") == "Hi. How are you? I am fine."
    assert collapse_repeats("No, no, no.") == "No, no, no."
    assert max_tokens_for(1.0) < max_tokens_for(5.0)


def test_tts_speed_changes_duration_not_words(tts):
    normal, fast = tts.synthesize("Paris is lovely in the spring."), tts.synthesize("Paris is lovely in the spring.", speed=1.5)
    assert 0.55 < fast.duration_s / normal.duration_s < 0.8
    assert [w for w, _, _ in fast.words] == [w for w, _, _ in normal.words]


def test_tts_gives_word_timings(tts):
    speech = tts.synthesize("Paris is lovely in the spring.")
    assert speech.sample_rate == 22050 and 1.0 < speech.duration_s < 4.0
    words = [w for w, _, _ in speech.words]
    assert words == ["Paris", "is", "lovely", "in", "the", "spring."]
    ends = [e for _, _, e in speech.words]
    assert ends == sorted(ends) and ends[-1] <= speech.duration_s + 1e-6
    assert speech.phonemes and speech.phonemes[0][1] == 0.0


def test_reply_shaper_splits_bounds_and_stops_loops():
    shaper = ReplyShaper(max_sentences=2)
    clauses = []
    for piece in ["Sure", "! Paris is", " the capital of France.", " It is lovely.", " More text."]:
        clauses += [c.text for c in shaper.feed(piece)]
    clauses += [c.text for c in shaper.flush()]
    assert clauses == ["Sure!", "Paris is the capital of France."]
    loop = ReplyShaper(max_sentences=10)
    out = []
    for _ in range(6):
        out += loop.feed("It is a very special story. ")
    assert len(out) == 1 and loop.done
    tagged = ReplyShaper()
    assert [c.text for c in tagged.feed("[joy] Great to see you *again*. ")] == ["Great to see you again."]
    rambling = ReplyShaper()  # no punctuation for a long stretch: cut at a word boundary, before "and"
    out = []
    for word in "I am sorry for the trouble and I will make sure it gets fixed today. ".split(" "):
        out += [c.text for c in rambling.feed(word + " ")]
    assert out == ["I am sorry for the trouble", "and I will make sure it gets fixed today."]
    dashed = ReplyShaper()  # a spaced dash is a pause like a comma: the first clause reaches TTS sooner
    assert [c.text for c in dashed.feed("I'm not sure - but Dr. Chen will know. ")] == [
        "I'm not sure -", "but Dr. Chen will know."]
    assert tagged.emotion == "joy"


def test_replies_are_short_and_end_at_a_sentence_boundary():
    """Two sentences by default; a sentence the token budget cut off is never spoken, while a reply
    that simply ended without punctuation is."""
    two = ReplyShaper()
    said = [c.text for c in two.feed("We open at nine. Dr. Chen is in today. She also works Monday. ")]
    assert said == ["We open at nine.", "Dr. Chen is in today."] and two.done
    cut = ReplyShaper()
    said = [c.text for c in cut.feed("Yes, we do. You can call the front desk and ask them ")]
    assert said == ["Yes, we do."]
    assert cut.flush(cut=True) == [] and cut.done
    natural = ReplyShaper()
    natural.feed("Sure thing")
    assert [c.text for c in natural.flush(cut=False)] == ["Sure thing"]
    finished = ReplyShaper()  # the budget ran out right at a sentence end: nothing is lost
    assert [c.text for c in finished.feed("See you then.")] == ["See you then."] and finished.flush(cut=True) == []


def test_a_reply_does_not_end_on_what_was_said_before():
    """Past its first sentence, a reply stops at a sentence (or most of a clause) the avatar already
    said in the conversation; its first sentence may repeat (the user may ask again)."""
    earlier = ["Dr. Novak sees children. If you need any further information, please ask me anytime."]

    def spoken(text: str) -> list[str]:
        shaper = ReplyShaper(max_sentences=3, said_before=earlier)
        return [c.text for c in shaper.feed(text) + shaper.flush()]

    assert spoken("An emergency visit is 120 dollars. If you need any further information, please ask me "
                  "anytime.") == ["An emergency visit is 120 dollars."]
    assert spoken("Dr. Novak sees children. She works on Saturday.") == ["Dr. Novak sees children.",
                                                                        "She works on Saturday."]
    assert spoken("It is 95 dollars. If you need any further help, call us.") == ["It is 95 dollars."]
    assert spoken("It is 95 dollars. If you need braces, ask Dr. Haddad.") == [
        "It is 95 dollars.", "If you need braces, ask Dr. Haddad."]


def test_grounded_system_message_lists_the_facts_and_the_rule():
    from models.llm import GROUNDING_RULES, grounded_system

    text = grounded_system("You are Maya.", "Open 8 to 6.\n\n- Parking behind.\n")
    assert text == f"You are Maya.\n\nFacts:\n- Open 8 to 6.\n- Parking behind.\n\n{GROUNDING_RULES}"
    assert grounded_system("You are Maya.", "  ") == "You are Maya."
    assert grounded_system("You are Maya.", "Open 8 to 6.", grounded=False) == "You are Maya.\n\nOpen 8 to 6."


def test_build_messages_keeps_short_history():
    history = [{"role": "user", "content": str(i)} for i in range(20)]
    msgs = build_messages("You are Anna.", "Context here.", history, max_history=4)
    assert msgs[0]["role"] == "system" and "Context here." in msgs[0]["content"]
    assert [m["content"] for m in msgs[1:]] == ["16", "17", "18", "19"]


def test_embedded_llm_streams_a_reply():
    import asyncio

    from models.llm import EmbeddedLlamaCpp, GenerationParams

    llm = EmbeddedLlamaCpp(n_parallel=1)

    async def run():
        pieces = []
        async for p in llm.stream([{"role": "user", "content": "Say hello."}], GenerationParams(max_tokens=12)):
            pieces.append(p)
        await llm.aclose()
        return pieces

    from models.llm import StreamEnd

    pieces = asyncio.run(run())
    text, end = pieces[:-1], pieces[-1]
    assert len(text) >= 2 and "".join(text).strip() and all(isinstance(p, str) for p in text)
    assert isinstance(end, StreamEnd) and end.finish_reason in ("length", "stop")


def test_embedded_llm_prefill_warms_the_prompt_cache():
    """LLM.prefill on llama.cpp: the conversation prefix is processed once (n_predict 0); the same prefix
    again costs ~nothing, and the reply after it reads only the new user message."""
    import asyncio

    from models.llm import EmbeddedLlamaCpp, GenerationParams, prefix_text, with_next_user
    from models.llm_stream import PromptStats

    llm = EmbeddedLlamaCpp(n_parallel=1)
    prefix = build_messages("You are Maya, a receptionist.", "Open 8 am to 6 pm.\nParking behind the building.",
                            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}])

    async def run():
        first = await llm.prefill(prefix)
        again = await llm.prefill(prefix)
        pieces = [p async for p in llm.stream(prefix + [{"role": "user", "content": "When do you open?"}],
                                              GenerationParams(max_tokens=4, report_prompt=True))]
        await llm.aclose()
        return first, again, pieces

    first, again, pieces = asyncio.run(run())
    assert first > 40 and again <= 2
    assert any(isinstance(p, str) and p.strip() for p in pieces)
    # llama.cpp's own account of the reply's prompt (its first chunk's timings), before any text.
    stats = pieces[0]
    assert isinstance(stats, PromptStats) and not any(isinstance(p, PromptStats) for p in pieces[1:])
    assert stats.cached >= first - 2 and 3 <= stats.processed <= 20 and stats.ms > 0
    rendered = "<|im_start|>user\n" + with_next_user([])[0]["content"] + "<|im_end|>"
    assert prefix_text(rendered) == "<|im_start|>user\n"
    with pytest.raises(ValueError):
        prefix_text("a template that dropped the message")


def test_context_window_jumps_instead_of_sliding():
    from models.llm import context_start

    history = []
    starts = []
    start = 0
    for i in range(12):
        history += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
        start = context_start(history, start, max_messages=10, keep=4)
        starts.append(start)
        assert len(history) - start <= 10 and history[start]["role"] == "user"
    # The window start changes rarely (prompt-cache friendly), not on every turn.
    assert len(set(starts)) <= 5 and starts[:5] == [0] * 5


def test_generic_endpoint_gets_only_standard_fields():
    from models.llm import GenerationParams, OpenAICompatibleLLM

    assert OpenAICompatibleLLM("http://127.0.0.1:9/v1").extra_body(GenerationParams()) == {}


def test_first_clause_is_short_for_a_fast_start():
    shaper = ReplyShaper()
    out = [c.text for c in shaper.feed("Oh well, I think Paris is the capital, and it is lovely. ")]
    assert out == ["Oh well,", "I think Paris is the capital,", "and it is lovely."]


def test_the_words_of_a_question_the_facts_do_not_mention():
    from models.grounding import FactCoverage

    facts = FactCoverage.of("Open 8 to 6 on weekdays. Parking behind the building. Dr. Ortiz does cleanings "
                            "for 95 dollars. Teeth whitening costs 250 dollars.")
    assert facts.unmentioned("Do you do laser eye surgery?").words == ("laser", "eye", "surgery")
    # The question's frame (what time, how much, open, cost) and words the facts hold, in any form.
    assert facts.unmentioned("What time do you open on weekdays?").words == ()
    assert facts.unmentioned("How much is a cleaning?").words == ()
    assert facts.unmentioned("Is there parking?").words == ()
    assert facts.unmentioned("How much does whitening cost?").words == ()
    # The user's own things are their situation, not what they ask about; punctuation ends the phrase.
    assert facts.unmentioned("Can I park my car, or take the tram?").words == ("tram",)
    assert facts.unmentioned("Can I bring my dog?").words == ()
    # Statements and small talk need no facts.
    assert facts.unmentioned("I love dogs.").words == () and facts.unmentioned("Thanks, that is great.").words == ()
    assert FactCoverage.of("").unmentioned("Do you do surgery?").words == ()


def test_a_reply_that_answers_what_the_facts_do_not_mention_is_declined():
    from models.grounding import DECLINE, FactCoverage, Unmentioned, unsupported

    facts = FactCoverage.of("Cleanings are 95 dollars. Whitening is 350 dollars.")
    surgery, canal = facts.unmentioned("Do you do laser surgery?"), facts.unmentioned("How much is a root canal?")
    assert surgery == Unmentioned(("laser", "surgery"), topic=True)
    assert facts.unmentioned("What does teeth whitening cost?") == Unmentioned(("teeth",), topic=False)
    assert unsupported("Yes, we do.", surgery, first=True)
    assert not unsupported("Yes, we do.", surgery, first=False)  # a later yes is about something else
    assert unsupported("Our laser surgery is with Dr. Lee.", surgery, first=False)
    assert not unsupported("Yes, we do.", Unmentioned(), first=True)  # nothing unmentioned: nothing to check
    # A price for what the facts do not mention; a price for what they do, asked with a word they lack.
    assert unsupported("95 dollars.", canal, first=True)
    assert not unsupported("350 dollars.", facts.unmentioned("What does teeth whitening cost?"), first=True)

    def said(reply: str, unmentioned: Unmentioned) -> tuple[list[str], bool]:
        shaper = ReplyShaper(max_sentences=3, unmentioned=unmentioned)
        out = [c.text for c in shaper.feed(reply)] + [c.text for c in shaper.flush()]
        return [" ".join(out)], shaper.declined

    assert said("Yes, we do laser eye surgery on Mondays.", surgery) == ([DECLINE], True)
    assert said("95 dollars, like a cleaning.", canal) == ([DECLINE], True)
    # A right start stands; the reply ends before the clause about what the facts lack.
    assert said("We do cleanings. Laser surgery is with Dr. Lee.", surgery) == (["We do cleanings."], False)
    assert said(f"{DECLINE} Anything else?", surgery) == ([f"{DECLINE} Anything else?"], False)
    assert said("Yes, we do laser surgery.", Unmentioned()) == (["Yes, we do laser surgery."], False)


def test_the_unmentioned_words_come_from_the_persona_the_context_and_the_passages():
    from serve_app.session.context import LLMContext

    ctx = LLMContext("You are Maya at the Ortiz clinic.", "Open 8 to 6. Cleanings are 95 dollars.")
    assert ctx.unmentioned("Do you do laser surgery?").words == ("laser", "surgery")
    assert not ctx.unmentioned("How much is a cleaning at the Ortiz clinic?")
    assert not ctx.unmentioned("Do you do laser surgery?", knowledge="Laser surgery: Dr. Lee, Mondays.")
    assert not LLMContext("You are Maya.", "Open 8 to 6.", grounded=False).unmentioned("Do you do surgery?")
    assert not LLMContext("You are Maya.", "").unmentioned("Do you do surgery?")
