"""How the note on the user's voice costs and changes the CPU default's replies.

A reply reads the note after the user's words (it needs the whole utterance, so it cannot be in the
prompt cache before the user has finished): every token of it is time to first token. The session used
to write it as the sentence an event carries ("The user spoke quickly in a flat, monotone voice, and
their pitch rose at the end."); it now writes a few words (models.perception.prosody.brief). This runs
the 43 clinic questions (benchmarks/clinic.py, as llm_eval: one slot, one thread, the session's reply
check, the prefix prefilled; each 3 times, as replies are sampled) three ways: no note, the sentence,
the brief note, with three voices taken in turn; and reports per variant the accuracy, the reply length,
the replies that talk about the voice instead of answering, and the time to first token.

Writes benchmarks/results/voice_note_eval.json.    python -m benchmarks.voice_note_eval
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import numpy as np

from benchmarks.clinic import PERSONA, QUESTIONS
from benchmarks.llm_eval import reply_to, score
from benchmarks.local_app import cpu_llm_model
from models.llm import EmbeddedLlamaCpp, GenerationParams
from models.perception.prosody import Prosody, brief, describe
from serve_app.session.context import LLMContext

ROOT = Path(__file__).resolve().parent.parent
# Three remarkable voices (piper's clips read as the first one): fast, flat, rising; slow, quiet, hesitant;
# loud and lively.
VOICES = [Prosody(2.5, 180.0, 3.0, 3.0, -24.0, 7.2, 0, 0.05, 0),
          Prosody(3.0, 110.0, 5.0, 0.0, -40.0, 3.6, 2, 0.35, 2),
          Prosody(2.0, 200.0, 12.0, 0.0, -10.0, 5.5, 0, 0.05, 0)]
SENTENCE_NOTE = "\n\n(As they spoke: "  # the note as the session wrote it before (models.llm._HEARD_NOTE now)
ABOUT_VOICE = re.compile(r"\b(voice|pitch|monotone|tone|quickly|slowly|loud(ly)?|quiet(ly)?|hesitant|fast|"
                         r"speak(ing)? (up|slow|fast))\b", re.I)


def _messages(ctx: LLMContext, question: str, voice: Prosody | None, variant: str) -> list[dict]:
    if variant == "brief" and voice is not None:
        return ctx.messages(question, heard=brief(voice))
    messages = ctx.messages(question)
    if variant == "sentence" and voice is not None:
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + SENTENCE_NOTE + describe(voice) + ")"}
    return messages


async def evaluate(name: str, repeats: int) -> dict:
    llm = EmbeddedLlamaCpp(n_parallel=1, threads=1, model=name)
    llm.warmup()
    params = GenerationParams()
    out: dict[str, dict] = {}
    n = len(QUESTIONS)
    try:
        for variant in ("none", "sentence", "brief"):
            answers = []
            for i, q in [(i, q) for _ in range(repeats) for i, q in enumerate(QUESTIONS)]:
                voice = VOICES[i % len(VOICES)] if variant != "none" else None
                ctx = LLMContext(PERSONA["system_prompt"], PERSONA["context"])
                await llm.prefill(ctx.prefix())  # as a session has it: only the user's message is read
                messages = _messages(ctx, q.text, voice, variant)
                r = await reply_to(llm, messages, params, unmentioned=ctx.unmentioned(q.text))
                answers.append({"question": q.text, "kind": q.kind, "note": messages[-1]["content"][len(q.text):],
                                **r, **score(q, r["text"], PERSONA),
                                "about_voice": bool(ABOUT_VOICE.search(r["text"])) and voice is not None})
            out[variant] = {
                "accuracy": round(float(np.mean([a["right"] for a in answers])), 3),
                "accuracy_by_run": [round(float(np.mean([a["right"] for a in answers[k * n:(k + 1) * n]])), 3)
                                    for k in range(repeats)],
                "mean_words": round(float(np.mean([a["words"] for a in answers])), 1),
                "about_voice": sum(a["about_voice"] for a in answers),
                "ttft_ms_p50": round(float(np.median([a["ttft_ms"] for a in answers[1:]])), 1),
                "note_chars": round(float(np.mean([len(a["note"]) for a in answers])), 1),
                "answers": answers,
            }
            print(variant, {k: v for k, v in out[variant].items() if k != "answers"}, flush=True)
    finally:
        await llm.aclose()
    return {"model": name, "questions": len(QUESTIONS), "repeats": repeats, "temperature": params.temperature,
            "variants": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the CPU profile's")
    ap.add_argument("--repeats", type=int, default=3, help="each question this many times (replies are sampled)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "voice_note_eval.json"))
    a = ap.parse_args()
    result = asyncio.run(evaluate(a.model or cpu_llm_model(), a.repeats))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
