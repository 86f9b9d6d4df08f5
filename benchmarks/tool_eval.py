"""How reliably the embedded LLMs call a tool in the text tool format (models/tools.py), as the CPU profile
runs them (llama.cpp, one slot, one thread, the clinic persona with a `check_availability` tool).

- `call_rate`: of requests that need the tool ("Is there a slot on Tuesday?"), the share answered with a
  call to it whose arguments fit its JSON Schema; `day_right`: with the day the user named.
- `false_call_rate`: of questions the facts answer ("Where are you?"), the share answered with a call.
- `uses_result`: after the tool result is given back, the share of replies that say it (router mode reads
  the result out itself: 1.0 by construction, not the model's doing).

Writes benchmarks/results/tool_eval.json.    python -m benchmarks.tool_eval [--models ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.clinic import PERSONA, QUESTIONS
from models.llm import EmbeddedLlamaCpp, GenerationParams, ReplyShaper, StreamEnd, build_messages
from models.tools import ToolCall, arguments_error, split_tool_calls

ROOT = Path(__file__).resolve().parent.parent
TOOL = {"type": "function", "function": {
    "name": "check_availability", "description": "Find free appointment slots on a given day.",
    "parameters": {"type": "object", "properties": {"day": {"type": "string", "description": "the weekday"}},
                   "required": ["day"]}}}
NEEDS_TOOL = [
    ("Do you have a free slot on Tuesday?", "tuesday"), ("Can I book an appointment for Friday?", "friday"),
    ("Is there anything open on Monday?", "monday"), ("I'd like to come in on Thursday, is that possible?", "thursday"),
    ("Could you check if Wednesday works for a cleaning?", "wednesday"), ("Any appointments left this Saturday?", "saturday"),
    ("Can you see me on Monday afternoon?", "monday"), ("I need a checkup, is Friday free?", "friday"),
    ("Book me in for Tuesday please.", "tuesday"), ("What slots do you have on Wednesday?", "wednesday"),
    ("Is Thursday morning available?", "thursday"), ("When can I come in on Monday?", "monday"),
    ("Do you have time for me on Friday?", "friday"), ("I want an appointment on Tuesday.", "tuesday"),
    ("Are there openings on Thursday?", "thursday"), ("Can I get a slot on Saturday morning?", "saturday"),
]
RESULT = "Tuesday at 10:30 or 15:00"


async def one(llm: EmbeddedLlamaCpp, messages: list[dict], tools: list[dict]) -> tuple[list[ToolCall], str, float]:
    t0 = time.perf_counter()
    calls, text, shaper = [], [], ReplyShaper()
    stream = split_tool_calls(llm.stream(messages, GenerationParams(), tools), {TOOL["function"]["name"]})
    async for piece in stream:
        if isinstance(piece, ToolCall):
            calls.append(piece)
        elif isinstance(piece, StreamEnd):
            break
        else:
            text += [c.text for c in shaper.feed(piece)]
            if shaper.done:
                break
    await stream.aclose()
    text += [c.text for c in shaper.flush()]
    return calls, " ".join(text), (time.perf_counter() - t0) * 1000


async def evaluate(name: str, tool_mode: str = "text", threads: int = 1) -> dict:
    llm = EmbeddedLlamaCpp(n_parallel=1, threads=threads, model=name, tool_mode=tool_mode)
    llm.warmup()
    system = PERSONA["system_prompt"] + " Use the check_availability tool to find free appointment slots."

    def chat(*turns: dict) -> list[dict]:
        return build_messages(system, PERSONA["context"], list(turns))

    needed, uses, ms = [], [], []
    for text, day in NEEDS_TOOL:
        calls, said, t = await one(llm, chat({"role": "user", "content": text}), [TOOL])
        ok = bool(calls) and arguments_error(calls[0].arguments, TOOL["function"]["parameters"]) is None
        day_right = ok and day in calls[0].arguments.lower()
        ms.append(t)
        entry = {"question": text, "called": ok, "day_right": day_right, "arguments": calls[0].arguments if calls else None,
                 "said": said, "ms": round(t, 1)}
        if ok:  # the result goes back as the session sends it
            follow = chat({"role": "user", "content": text},
                          {"role": "assistant", "content": "", "tool_calls": [calls[0].openai()]},
                          {"role": "tool", "tool_call_id": calls[0].id, "name": "check_availability", "content": RESULT})
            _, answer, _ = await one(llm, follow, [TOOL])
            entry["answer"] = answer
            uses.append("10:30" in answer or "15:00" in answer or "10.30" in answer)
        needed.append(entry)
    facts = [q for q in QUESTIONS if q.kind == "fact"][:16]
    false_calls = []
    for q in facts:
        calls, said, _ = await one(llm, chat({"role": "user", "content": q.text}), [TOOL])
        false_calls.append({"question": q.text, "called": bool(calls), "said": said})
    await llm.aclose()
    return {
        "model": name, "threads": threads, "tool_mode": tool_mode,
        "format": {"text": "text tool format, the model decides (models/tools.py)",
                   "router": "ToolRouter decides, arguments under the JSON Schema as a grammar"}[tool_mode],
        "call_rate": round(float(np.mean([e["called"] for e in needed])), 3),
        "day_right": round(float(np.mean([e["day_right"] for e in needed])), 3),
        "false_call_rate": round(float(np.mean([e["called"] for e in false_calls])), 3),
        "uses_result": round(float(np.mean(uses)), 3) if uses else None,
        "call_ms_p50": round(float(np.median(ms)), 1),
        "needs_tool": needed, "no_tool": false_calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["smollm2-135m:text", "smollm2-135m:router", "qwen2.5-0.5b:text",
                                                  "qwen2.5-0.5b:router"], help="model:tool_mode")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tool_eval.json"))
    a = ap.parse_args()
    results = {}
    for run in a.runs:
        name, mode = run.split(":")
        r = results[run] = asyncio.run(evaluate(name, mode))
        print(json.dumps({k: r[k] for k in ("model", "tool_mode", "call_rate", "day_right", "false_call_rate",
                                            "uses_result", "call_ms_p50")}))
    Path(a.out).write_text(json.dumps({"requests_needing_tool": len(NEEDS_TOOL), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
