"""Grounded evaluation of the embedded LLM candidates, as the CPU profile runs them: llama.cpp through
xllamacpp, one slot, one thread, the clinic persona's system prompt and facts, replies cut by the
session's ReplyShaper (at most two sentences, never an unfinished one) with the session's grounding
check (models.grounding: an answer about what the facts do not mention is replaced by the fallback).

- 43 single questions (benchmarks/clinic.py): facts a right answer must contain, questions whose
  answer is not in the facts (it must decline, not invent), small talk. Any number or "Dr. Name" in
  a reply that is not in the facts or the question counts as invented and fails the answer.
- One 12-turn conversation (the realistic turn benchmark's script) built by the session's own
  LLMContext (grounded facts, history window), the prefix prefilled after each reply as the
  session does: no sentence may repeat across replies.
- The same questions with no grounding check (`unchecked`): what the model does alone.
- Two held-out personas (benchmarks/bike_shop.py, hotel.py) written apart from the clinic the prompt
  rules and the check were tuned on: whether they generalise.
- ttft_ms (request -> first token, prompt prefix cached as in a conversation) and tokens_per_s.

No camera note: a session adds one only when the user's look or voice is notable (serve_app.session.perceiver),
and a patient asking the receptionist a question looks calm and attentive.

Writes benchmarks/results/llm_eval.json.    python -m benchmarks.llm_eval [--models smollm2-135m ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from contextlib import aclosing
from pathlib import Path

import numpy as np

from benchmarks import bike_shop, hotel
from benchmarks.clinic import PERSONA, QUESTIONS, Question
from benchmarks.local_app import cpu_llm_model
from models.grounding import Unmentioned
from models.llm import EmbeddedLlamaCpp, GenerationParams, ReplyShaper, StreamEnd, split_sentences
from serve_app.session.context import LLMContext

ROOT = Path(__file__).resolve().parent.parent
DECLINE = re.compile(r"\b(don't|do not|not sure|no|not|sorry|unfortunately|can't|cannot|unable|call (you )?back|"
                     r"check(?!-)|ask)\b", re.I)  # not "check-up"
MAX_WORDS = 30
# Personas kept out of tuning the prompt rules and models.grounding: their scores say whether a change
# generalises beyond the clinic's questions.
HELD_OUT = {"bike_shop": (bike_shop.PERSONA, bike_shop.QUESTIONS), "hotel": (hotel.PERSONA, hotel.QUESTIONS)}


def model_path(name: str) -> Path:
    from models.assets import embedded_llm

    return embedded_llm(name)


def _numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+", text))


def _doctors(text: str) -> set[str]:
    return {m.lower() for m in re.findall(r"\bDr\.?\s+([A-Z][a-z]+)", text)}


def invented(reply: str, question: str, persona: dict = PERSONA) -> list[str]:
    """Numbers and doctors' names in `reply` that neither the facts nor the question contain."""
    facts = persona["context"] + " " + persona["system_prompt"] + " " + question
    known_names = {w.lower() for w in re.findall(r"[A-Z][a-z]+", facts)}
    out = sorted(_numbers(reply) - _numbers(facts) - {"1", "2"})
    out += sorted(n for n in _doctors(reply) if n not in known_names)
    return out


def score(q: Question, reply: str, persona: dict = PERSONA) -> dict:
    words = len(reply.split())
    made_up = invented(reply, q.text, persona)
    low = reply.lower()
    if q.kind == "fact":
        ok = all(any(re.search(rf"\b{re.escape(w.lower())}\b", low) for w in group) for group in q.expect)
    elif q.kind == "decline":
        ok = bool(DECLINE.search(reply))
    else:
        ok = bool(reply.strip())
    return {"right": bool(ok and not made_up and words <= MAX_WORDS), "words": words, "invented": made_up}


async def reply_to(llm: EmbeddedLlamaCpp, messages: list[dict], params: GenerationParams,
                   said_before: list[str] | None = None, unmentioned: Unmentioned = Unmentioned()) -> dict:
    """One reply as a session speaks it, with its first-token time and generation rate. `unmentioned`:
    what of the question the facts do not mention (LLMContext.unmentioned), as the session checks it."""
    shaper = ReplyShaper(said_before=said_before or [], unmentioned=unmentioned)
    t0 = time.perf_counter()
    first, pieces, cut = None, 0, False
    clauses: list[str] = []
    async with aclosing(llm.stream(messages, params)) as stream:  # closed here when cut short
        async for piece in stream:
            if isinstance(piece, StreamEnd):
                cut = piece.finish_reason == "length"
                break
            first = first or time.perf_counter()
            pieces += 1
            clauses += [c.text for c in shaper.feed(piece)]
            if shaper.done:
                break
        end = time.perf_counter()
    clauses += [c.text for c in shaper.flush(cut=cut)]
    return {"text": " ".join(clauses), "declined": shaper.declined, "ttft_ms": round(((first or end) - t0) * 1000, 1),
            "tokens_per_s": round((pieces - 1) / (end - first), 1) if first and pieces > 1 and end > first else None}


def _sentences(text: str) -> list[str]:
    return [" ".join(re.findall(r"[a-z0-9']+", s.lower())) for s in split_sentences(text)]


async def evaluate(name: str, threads: int = 1, temperature: float | None = None) -> dict:
    llm = EmbeddedLlamaCpp(n_parallel=1, threads=threads, model=name)
    llm.warmup()
    params = GenerationParams() if temperature is None else GenerationParams(temperature=temperature)
    answers = await answer_all(llm, params, PERSONA, QUESTIONS)
    # The same questions with no reply check (models.grounding): what the check adds, and what it costs.
    unchecked = await answer_all(llm, params, PERSONA, QUESTIONS, check=False)
    held_out = {}
    for set_name, (persona, questions) in HELD_OUT.items():
        got = await answer_all(llm, params, persona, questions)
        raw = await answer_all(llm, params, persona, questions, check=False)
        held_out[set_name] = {"accuracy": _mean(got, "right"), "by_kind": _by_kind(got),
                              "unchecked": {"accuracy": _mean(raw, "right"), "by_kind": _by_kind(raw)},
                              "declined": sum(a["declined"] for a in got),
                              "mean_words": round(float(np.mean([a["words"] for a in got])), 1), "answers": got}
    # One conversation as a session holds it: its LLMContext, and the prefix prefilled after each reply.
    from benchmarks.turn_latency import SCRIPT

    ctx = LLMContext(PERSONA["system_prompt"], PERSONA["context"])
    convo = []
    for turn in SCRIPT:
        t0 = time.perf_counter()
        prefilled = await llm.prefill(ctx.prefix())
        prefill_ms = round((time.perf_counter() - t0) * 1000, 1)
        messages = ctx.messages(turn.text)
        r = await reply_to(llm, messages, params, ctx.said(), ctx.unmentioned(turn.text))
        convo.append({"user": turn.text, "prefill_tokens": prefilled, "prefill_ms": prefill_ms, **r})
        ctx.add_user(turn.text)
        ctx.add_assistant(r["text"])
    await llm.aclose()
    seen: dict[str, int] = {}
    for c in convo:
        for s in set(_sentences(c["text"])):
            seen[s] = seen.get(s, 0) + 1
    repeats = sum(n - 1 for s, n in seen.items() if n > 1 and len(s.split()) >= 3)
    ttft = [a["ttft_ms"] for a in answers[1:]] + [c["ttft_ms"] for c in convo]
    tps = [a["tokens_per_s"] for a in answers + convo if a["tokens_per_s"]]
    return {
        "model": name, "gguf": model_path(name).name, "threads": threads, "temperature": params.temperature,
        "accuracy": _mean(answers, "right"), "by_kind": _by_kind(answers),
        "unchecked": {"accuracy": _mean(unchecked, "right"), "by_kind": _by_kind(unchecked)},
        "declined": sum(a["declined"] for a in answers),
        "mean_words": round(float(np.mean([a["words"] for a in answers])), 1),
        "invented_answers": sum(bool(a["invented"]) for a in answers),
        "repeats": repeats, "ttft_ms": round(float(np.median(ttft)), 1),
        "ttft_p95_ms": round(float(np.percentile(ttft, 95)), 1),
        "conversation_ttft_ms": [c["ttft_ms"] for c in convo],
        "tokens_per_s": round(float(np.median(tps)), 1) if tps else None,
        "answers": answers, "conversation": convo, "held_out": held_out,
    }


async def answer_all(llm: EmbeddedLlamaCpp, params: GenerationParams, persona: dict,
                     questions: list[Question], check: bool = True) -> list[dict]:
    """Each question alone, as the first turn of a conversation with `persona` (the session's LLMContext
    builds the chat and, with `check`, the words the facts do not mention)."""
    answers = []
    for q in questions:
        ctx = LLMContext(persona["system_prompt"], persona["context"])
        unmentioned = ctx.unmentioned(q.text) if check else Unmentioned()
        r = await reply_to(llm, ctx.messages(q.text), params, unmentioned=unmentioned)
        answers.append({"question": q.text, "kind": q.kind, "unmentioned": list(unmentioned.words),
                        "topic_unmentioned": unmentioned.topic, **r,
                        **score(q, r["text"], persona)})
    return answers


def _mean(answers: list[dict], key: str) -> float:
    return round(float(np.mean([a[key] for a in answers])), 3)


def _by_kind(answers: list[dict]) -> dict[str, float]:
    return {k: _mean([a for a in answers if a["kind"] == k], "right") for k in ("fact", "decline", "small_talk")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, help="default: the persona default (GenerationParams)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_eval.json"))
    a = ap.parse_args()
    results = {}
    for name in a.models:
        results[name] = asyncio.run(evaluate(name, a.threads, a.temperature))
        r = results[name]
        print(json.dumps({**{k: r[k] for k in ("model", "accuracy", "by_kind", "mean_words", "invented_answers",
                                               "repeats", "ttft_ms", "tokens_per_s")},
                          "unchecked": r["unchecked"]["accuracy"],
                          "held_out": {k: [v["accuracy"], v["unchecked"]["accuracy"]] for k, v in r["held_out"].items()}}))
    out = Path(a.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    old.setdefault("models", {}).update(results)
    old["questions"] = len(QUESTIONS)
    old["cpu_default"] = cpu_llm_model()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(old, indent=2))


if __name__ == "__main__":
    main()
