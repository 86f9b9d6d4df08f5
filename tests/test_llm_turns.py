"""Sessions taking turns on one model: the priority lock, and the LLM deployment's chunked replies on
the embedded llama.cpp slot (real model, no Ray: the deployment's class on its own)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.common import PriorityLock


def test_priority_lock_serves_lowest_priority_first_then_in_arrival_order():
    async def run():
        lock, order = PriorityLock(), []

        async def job(name: str, priority: int) -> None:
            async with lock.hold(priority):
                order.append(name)
                await asyncio.sleep(0.01)

        await lock.acquire(0)  # held while the others arrive
        tasks = [asyncio.create_task(job(n, p)) for n, p in (("rest-a", 1), ("prefill", 2), ("rest-b", 1), ("first", 0))]
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(job("cancelled", 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a waiter that gives up is skipped, not handed the lock
        await asyncio.sleep(0.01)
        assert lock.waiting == 4
        lock.release()
        await asyncio.gather(*tasks)
        assert not lock.waiting
        async with lock.hold(5):  # free again: taken at once
            order.append("after")
        return order

    assert asyncio.run(run()) == ["first", "rest-a", "rest-b", "prefill", "after"]


@pytest.fixture(scope="module")
def llm_module():
    from deployments.llm import LLM

    return LLM.func_or_class(backend="llamacpp", backend_args={"model": "smollm2-135m", "n_parallel": 1, "threads": 1})


@pytest.fixture
def llm_deployment(llm_module):
    """The module's deployment with a new HTTP client: each test runs its own event loop, and a pooled
    connection of the last one's does not work in the next (the server ends with the process)."""
    import httpx

    llm_module.backend._client = httpx.AsyncClient(timeout=llm_module.backend._client.timeout)
    return llm_module


MESSAGES = [{"role": "system", "content": "You are Anna, the receptionist of the Riverside clinic. Answer briefly."},
            {"role": "user", "content": "What time do you open on Saturdays, and do I need an appointment?"}]


def test_a_reply_in_chunks_is_the_reply_in_one_go(llm_deployment):
    """Each chunk continues the text so far (an unfinished assistant message): at temperature 0 the
    chunked reply is word for word the one generated in one call, and its prompt is reported once."""
    from models.llm import GenerationParams, PromptStats, StreamEnd

    params = GenerationParams(max_tokens=48, temperature=0.0, report_prompt=True)

    async def run():
        whole = [p async for p in llm_deployment.backend.stream(MESSAGES, params)]
        chunked = [p async for p in llm_deployment.stream(MESSAGES, params)]
        return whole, chunked

    whole, chunked = asyncio.run(run())
    text = "".join(p for p in whole if isinstance(p, str))
    assert sum(isinstance(p, str) for p in whole) > 20  # longer than one chunk
    assert "".join(p for p in chunked if isinstance(p, str)) == text
    assert sum(isinstance(p, PromptStats) for p in chunked) == 1
    assert isinstance(chunked[-1], StreamEnd) and chunked[-1].finish_reason == whole[-1].finish_reason


def test_a_second_sessions_first_clause_goes_before_the_first_ones_rest(llm_deployment):
    """Two sessions' replies on the one thread: B's first chunk is generated before A's second one, and
    a prefill waits for the first chunks."""
    from models.llm import GenerationParams

    llm = llm_deployment
    calls: list[str] = []
    real_stream, real_prefill = llm.backend.stream, llm.backend.process_step

    def stream(messages, params, tools=None):  # the real backend, its calls recorded in order
        who = "A" if "Saturdays" in messages[1]["content"] else "B"
        calls.append(f"{who}-{'rest' if messages[-1]['role'] == 'assistant' else 'first'}")
        return real_stream(messages, params, tools)

    async def prefill(step):
        calls.append("prefill")
        return await real_prefill(step)

    other = [MESSAGES[0], {"role": "user", "content": "Where can I park my car?"}]
    params = GenerationParams(max_tokens=48, temperature=0.0)

    async def reply(messages, started: asyncio.Event | None = None) -> str:
        text = ""
        async for p in llm.stream(messages, params):
            if isinstance(p, str):
                text += p
                if started is not None:
                    started.set()
        return text

    async def run():
        started = asyncio.Event()
        a = asyncio.create_task(reply(MESSAGES, started))
        await started.wait()  # A is generating its first chunk
        b = asyncio.create_task(reply(other))
        warm = asyncio.create_task(llm.prefill(MESSAGES[:1]))
        return await asyncio.gather(a, b, warm)

    llm.backend.stream, llm.backend.process_step = stream, prefill
    try:
        text_a, text_b, warmed = asyncio.run(run())
    finally:
        llm.backend.stream, llm.backend.process_step = real_stream, real_prefill
    assert text_a.strip() and text_b.strip()
    assert calls[:2] == ["A-first", "B-first"] and "A-rest" in calls and "B-rest" in calls, calls
    assert calls.index("prefill") > calls.index("B-first") and warmed is not None


def test_each_conversation_keeps_its_own_slot():
    """Two conversations of one persona, turn about: each reply reads only its new message, as its
    slot still holds its own history (one slot, or slots picked by similarity, held the persona's)."""
    from models.llm import EmbeddedLlamaCpp, GenerationParams, PromptStats

    two = EmbeddedLlamaCpp(model="smollm2-135m", n_parallel=2, threads=1)
    history = {"a": [MESSAGES[0]], "b": [MESSAGES[0]]}
    questions = {"a": ["When do you open?", "And on Sundays?"], "b": ["Where do I park?", "Is it free?"]}

    async def turn(who: str, question: str) -> PromptStats:
        msgs = [*history[who], {"role": "user", "content": question}]
        stats, text = None, ""
        async for p in two.stream(msgs, GenerationParams(max_tokens=12, temperature=0.0, report_prompt=True,
                                                         conversation=who)):
            stats = p if isinstance(p, PromptStats) else stats
            text += p if isinstance(p, str) else ""
        history[who] = [*msgs, {"role": "assistant", "content": text}]
        return stats

    async def run():
        return [await turn(who, questions[who][i]) for i in range(2) for who in ("a", "b")]

    stats = asyncio.run(run())
    assert two.slot_for("a") != two.slot_for("b")
    # Second turns: the history (system, question, answer) came from the cache; only the new question
    # (and the template's few tokens around it) was read.
    assert all(s.processed <= 20 and s.cached > 40 for s in stats[2:]), stats


def test_prompts_may_be_read_on_more_threads_than_replies_are_written():
    """`batch_threads`: llama.cpp reads prompts on its own thread count (the CPU profile keeps one; see
    the README's "Prompt threads"); the model still reads the whole prompt and answers."""
    from models.llm import EmbeddedLlamaCpp, GenerationParams, PromptStats

    llm = EmbeddedLlamaCpp(model="smollm2-135m", threads=1, batch_threads=2)

    async def run():
        stats, text = None, ""
        async for p in llm.stream([MESSAGES[0], {"role": "user", "content": "When do you open?"}],
                                  GenerationParams(max_tokens=12, temperature=0.0, report_prompt=True)):
            stats = p if isinstance(p, PromptStats) else stats
            text += p if isinstance(p, str) else ""
        return stats, text

    stats, text = asyncio.run(run())
    assert stats is not None and stats.processed > 20 and text.strip()


def test_prompt_steps_cut_between_words_after_what_the_slot_holds():
    from models.llm import prompt_steps

    text = "<|im_start|>system\nYou are Anna.  " + " ".join(f"word{i}" for i in range(80)) + "\n<|im_start|>user\n"
    cached = text[:120] + "something else"
    steps = prompt_steps(text, cached, step=40)
    assert steps[-1] == text and all(text.startswith(s) for s in steps)
    assert len(steps[0]) >= 120 + 40 and len(steps) > 5
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        assert text[len(a)] == " " and not text[len(a) - 1].isspace() and not text[len(a) + 1].isspace()
        if b is not text:  # the last step takes the rest, which is shorter than a step past the last cut
            assert 40 <= len(b) - len(a) <= 40 + len("word00 ")
        else:
            assert len(b) - len(a) <= 2 * 40 + len("word00 ")
    assert prompt_steps(text, text, step=40) == [text]  # all cached: one request that reads nothing
    assert prompt_steps("short", "", step=40) == ["short"]


def test_a_long_prefill_goes_in_steps_that_a_first_clause_passes(llm_deployment):
    """A new session's persona (~300 tokens) is prefilled in ~24-token steps: another session's first
    chunk waits for one step, not the whole prefill; and the steps leave the slot's cache exactly as one
    request would (the reply then reads only its message)."""
    from models.llm import GenerationParams, PromptStats

    llm = llm_deployment
    facts = " ".join(f"Fact {i}: the clinic's room {i} is on floor {i % 4} and opens at {8 + i % 3} am." for i in range(20))
    persona = [{"role": "system", "content": "You are Anna, the receptionist. " + facts}]
    order: list[str] = []
    real = llm.backend.process_step

    async def process(step):
        order.append("step")
        return await real(step)

    async def run():
        warm = asyncio.create_task(llm.prefill(persona, None, None, "", "long"))
        while not order and not warm.done():
            await asyncio.sleep(0.005)
        first = None
        async for p in llm.stream(MESSAGES, GenerationParams(max_tokens=4, temperature=0.0)):
            if first is None and isinstance(p, str):
                first = len(order)
        n = await warm
        stats = None
        async for p in llm.stream([*persona, {"role": "user", "content": "Hello?"}],
                                  GenerationParams(max_tokens=2, temperature=0.0, report_prompt=True, conversation="long")):
            stats = p if isinstance(p, PromptStats) else stats
        return first, n, stats

    llm.backend.process_step = process
    try:
        first, n, stats = asyncio.run(run())
    finally:
        llm.backend.process_step = real
    assert n > 250 and len(order) >= 8
    assert first is not None and first <= 2, (first, len(order))  # in after the first step, not the whole prefill
    assert stats is not None and stats.processed <= 12, stats  # the stepped prefill is the reply's cache


def test_prefill_steps_a_reply_has_read_past_are_skipped(llm_deployment):
    """A reply that comes while its conversation's persona is half prefilled reads the rest itself; the
    prefill's later steps are then skipped (processing them would cut the reply from the slot's cache
    and read the persona again), and the next reply reads only its own message."""
    from models.llm import GenerationParams, PromptStats

    backend = llm_deployment.backend
    facts = " ".join(f"Note {i}: desk {i} of the lab is in hall {i % 5} and closes at {4 + i % 3} pm." for i in range(20))
    persona = [{"role": "system", "content": "You are Ben, the lab's assistant. " + facts}]
    asked = [*persona, {"role": "user", "content": "Where is desk 3?"}]

    async def reply(messages):
        stats, text = None, ""
        async for p in backend.stream(messages, GenerationParams(max_tokens=6, temperature=0.0, report_prompt=True,
                                                                 conversation="stale")):
            stats = p if isinstance(p, PromptStats) else stats
            text += p if isinstance(p, str) else ""
        return stats, text

    async def run():
        steps = await backend.prefill_steps(persona, conversation="stale")
        early = [await backend.process_step(s) for s in steps[:3]]
        first, text = await reply(asked)
        late = [await backend.process_step(s) for s in steps[3:]]
        history = [*asked, {"role": "assistant", "content": text}]
        after = sum([await backend.process_step(s) for s in await backend.prefill_steps(history, conversation="stale")])
        second, _ = await reply([*history, {"role": "user", "content": "Thanks!"}])
        return steps, early, first, late, after, second

    steps, early, first, late, after, second = asyncio.run(run())
    assert len(steps) >= 8 and all(n > 0 for n in early)
    assert first.processed > 150  # the reply read the persona's unprefilled rest
    assert late[:-1] == [0] * (len(late) - 1) and late[-1] <= 3, late  # skipped; the last read next to nothing
    assert after <= 30 and second.processed <= 12, (after, second)  # the first reply stayed in the cache


def test_a_new_conversation_with_a_known_persona_restores_its_saved_prompt_state():
    """The first conversation with a persona saves the slot's prompt state after its persona prefill; the
    next one, in another slot, restores it (llama.cpp's slot save/restore) instead of reading the
    persona again, and its reply reads only its own message. Another persona reads its own."""
    from models.llm import EmbeddedLlamaCpp, GenerationParams, PromptStats

    backend = EmbeddedLlamaCpp(n_parallel=2)
    facts = " ".join(f"Item {i}: shelf {i} of the shop holds size {i % 6} shoes at {20 + i} dollars." for i in range(20))
    persona = [{"role": "system", "content": "You are Cleo, the shop's assistant. " + facts}]
    other = [{"role": "system", "content": "You are Dan, the gym's coach. " + facts.replace("shoes", "weights")}]

    async def run():
        counts = {}
        for conversation, messages in (("first", persona), ("second", persona), ("third", other)):
            steps = await backend.prefill_steps(messages, conversation=conversation)
            counts[conversation] = (steps[0].restore, sum([await backend.process_step(s) for s in steps]))
        stats = None
        async for p in backend.stream([*persona, {"role": "user", "content": "Hi!"}],
                                      GenerationParams(max_tokens=2, temperature=0.0, report_prompt=True,
                                                       conversation="second")):
            stats = p if isinstance(p, PromptStats) else stats
        await backend.aclose()
        return counts, stats

    counts, stats = asyncio.run(run())
    assert counts["first"][0] is False and counts["first"][1] > 250, counts
    assert counts["second"][0] is True and counts["second"][1] <= 3, counts  # restored, not read
    assert counts["third"][1] > 250, counts  # (another persona: slot 0's state is the first's, evicted)
    assert stats is not None and stats.cached > 250 and stats.processed <= 12, stats


def test_asr_serves_a_waiting_final_transcript_before_waiting_interim_ones(tts):
    """Sessions share an ASR replica: while one transcription runs, a final transcript (a reply waits for
    it) that arrives after an interim one (nothing waits for it) is served first; an interim whose caller
    gave up is never run, and a caller that gives up on a running one does not let the next start beside it."""
    from deployments.asr import ASR
    from models.audio import float_to_pcm16, resample

    asr = ASR.func_or_class()
    s = tts.synthesize("How much does the espresso machine cost, and when can you deliver it to Berlin?")
    pcm = float_to_pcm16(resample(s.audio, s.sample_rate, 16000)).tobytes()

    async def run():
        done: list[str] = []

        async def call(name: str, interim: bool) -> None:
            result = await asr.transcribe(pcm, interim=interim)
            done.append(name)
            assert "espresso" in result.text.lower()

        first = asyncio.create_task(call("running", True))
        await asyncio.sleep(0.05)  # it holds the model now
        interim = asyncio.create_task(call("interim", True))
        given_up = asyncio.create_task(call("given up", True))
        await asyncio.sleep(0.01)
        final = asyncio.create_task(call("final", False))
        await asyncio.sleep(0.01)
        given_up.cancel()
        first.cancel()  # its transcription still runs to the end: the final waits for it, not beside it
        await asyncio.sleep(0.01)
        assert asr._turns.waiting == 2  # the interim and the final, neither handed the model yet
        await asyncio.gather(interim, final)
        assert asr.times.in_flight == 0
        return done

    assert asyncio.run(run()) == ["final", "interim"]


def test_tts_serves_a_first_clause_first_and_never_beside_a_dropped_one():
    """Sessions share a TTS replica: a reply's first clause passes other replies' later clauses, and a
    clause whose caller gave up (a barge-in) keeps the model until piper has finished it, so the next
    clause does not share the core with it."""
    import threading
    import time

    from deployments.tts import TTS

    tts_dep = TTS.func_or_class()
    runs: list[tuple[str, float, float]] = []
    synthesize = tts_dep.model.synthesize
    guard = threading.Lock()

    def recorded(text: str, speed: float = 1.0):
        start = time.monotonic()
        try:
            return synthesize(text, speed)
        finally:
            with guard:
                runs.append((text, start, time.monotonic()))

    tts_dep.model.synthesize = recorded
    dropped_text = "This clause is long enough that piper is still reading it when its caller gives up on it."

    async def run() -> None:
        dropped = asyncio.create_task(tts_dep.synthesize(dropped_text))
        await asyncio.sleep(0.05)  # it holds the model now
        later = asyncio.create_task(tts_dep.synthesize("The rest of another reply."))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(tts_dep.synthesize("Sure.", first=True))
        await asyncio.sleep(0.01)
        dropped.cancel()
        await asyncio.sleep(0.01)
        assert tts_dep._turns.waiting == 2  # neither started beside the dropped clause
        results = await asyncio.gather(later, first)
        assert all(r.pcm16 for r in results)
        with pytest.raises(asyncio.CancelledError):
            await dropped

    asyncio.run(run())
    assert [text for text, *_ in runs] == [dropped_text, "Sure.", "The rest of another reply."]
    assert all(runs[i][1] >= runs[i - 1][2] for i in range(1, len(runs)))  # one at a time
    assert tts_dep.times.in_flight == 0
