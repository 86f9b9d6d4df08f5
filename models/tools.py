"""LLM tool calls: one `ToolCall` shape for every backend, and the text format small models use.

Endpoints that support tools (OpenAI, vLLM's OpenAI server with a tool parser) stream native
`delta.tool_calls`. A small embedded model does not; asked in its system message, it answers a request
that needs a tool with one JSON object and nothing else (the *text tool format*, documented in the
README):

    {"name": "check_availability", "arguments": {"day": "Tuesday"}}

Hermes-style `<tool_call>{...}</tool_call>` (what Qwen and Hermes chat templates ask for) and a fenced
```json block are read the same way. `split_tool_calls` turns such a reply into `ToolCall`s before any of
it reaches the shaper, so a voice never speaks JSON.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from models.llm_stream import PromptStats

MAX_TOOL_ROUNDS = 3  # LLM -> tool -> LLM rounds in one reply


@dataclass(frozen=True)
class ToolCall:
    """One function call the LLM asked for. `arguments` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def check_parameters_schema(schema: dict) -> None:
    """Raises ValueError unless `schema` is a JSON Schema for an object (a function's parameters)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    if schema.get("type", "object") != "object":
        raise ValueError("a function's parameters schema must describe an object (type: object)")


def arguments_error(arguments: str, schema: dict) -> str | None:
    """Why `arguments` (the model's JSON text) do not fit the function's `schema`; None when they do."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return "arguments are not JSON"
    if not isinstance(value, dict):
        return "arguments are not a JSON object"
    err = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
    return None if err is None else err.message


# --- the text tool format ---------------------------------------------------------------------------

def tool_prompt(tools: list[dict]) -> str:
    """The system-message section that teaches a model without native tool support the text format."""
    lines = []
    for t in tools:
        fn = t["function"]
        props = (fn.get("parameters") or {}).get("properties") or {}
        args = ", ".join(f"{k}: {(v or {}).get('type', 'any')}" for k, v in props.items())
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '')}".rstrip(": "))
    example = tools[0]["function"]
    example_args = {k: "..." for k in ((example.get("parameters") or {}).get("properties") or {})}
    return ("Tools you can use:\n" + "\n".join(lines) + "\n\nYou do not know what a tool would tell you: never guess "
            "it. When the user asks for something a tool does, reply with only a JSON object naming the tool, and "
            "nothing else, for example:\n" + json.dumps({"name": example["name"], "arguments": example_args})
            + "\nOtherwise answer normally. When a tool result arrives, answer the user with it.")


def as_text_format(messages: list[dict], tools: list[dict], teach: bool = True) -> list[dict]:
    """The chat for a backend without native tools: the tool section appended to the system message
    (so the prefix stays byte-identical turn to turn; `teach` False: no section, the router decides),
    earlier calls as the JSON the model wrote, and each result as a message after them that asks for
    the answer (of three layouts tried on Qwen 0.5B, the one it used the result in most: 5 of 8)."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "system" and not out:
            out.append({"role": "system", "content": f"{m['content']}\n\n{tool_prompt(tools)}" if teach else m["content"]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _json_or_text(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Tool result ({m.get('name', 'tool')}): {m['content']}\n"
                                                   "Answer my question with it, in one short sentence."})
        else:
            out.append(m)
    if teach and (not out or out[0]["role"] != "system"):
        out.insert(0, {"role": "system", "content": tool_prompt(tools)})
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_out(messages: list[dict]) -> str:
    """The trailing tool results of a chat as a sentence to speak (the router mode's answer: a model too
    small to phrase a result is not asked to)."""
    results = []
    for m in reversed(messages):
        if m["role"] != "tool":
            break
        results.insert(0, _spoken(_json_or_text(m["content"])))
    return "Here is what I found: " + "; ".join(r for r in results if r).rstrip(".") + "."


def _spoken(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_spoken(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_spoken(v) for v in value)
    return str(value).strip()


class ToolRouter:
    """Decides for a model too small to decide itself (SmolLM2 called 0 of 16 in benchmarks/tool_eval.py)
    whether the user's words ask for a tool: embedding similarity to each tool's name and description,
    against the persona's facts. A request nearer a fact than any tool is a question the facts answer;
    one at least `threshold` from a tool and nearer it than every fact is that tool's. The arguments are
    then written by the model under the tool's JSON Schema as a grammar (llama.cpp `response_format`)."""

    def __init__(self, embed, threshold: float = 0.25) -> None:
        self.embed = embed  # list[str] -> unit vectors (models.embed.MiniLMEmbedder.embed)
        self.threshold = threshold
        self._cache: dict[str, Any] = {}

    def _vectors(self, texts: list[str]):
        key = "\x1f".join(texts)
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self.embed(texts) if texts else None
        return self._cache[key]

    def route(self, words: str, tools: list[dict], facts: list[str]) -> dict | None:
        """The tool `words` ask for, or None."""
        described = [f"{t['function']['name'].replace('_', ' ')}: {t['function'].get('description', '')}" for t in tools]
        tool_vecs = self._vectors(described)
        fact_vecs = self._vectors(facts)
        q = self.embed([words])[0]
        scores = tool_vecs @ q
        best = int(np.argmax(scores))
        nearest_fact = float((fact_vecs @ q).max()) if fact_vecs is not None else -1.0
        return tools[best] if scores[best] >= self.threshold and scores[best] > nearest_fact else None


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse_tool_text(text: str, names: set[str]) -> list[ToolCall]:
    """The calls in a reply written in the text tool format (bare JSON, a JSON list, Hermes tags or a
    fenced block) to functions in `names`; [] when the reply is not a call."""
    text = text.strip()
    bodies = _TAGGED.findall(text) if "<tool_call>" in text else [_FENCE.sub("", text)]
    calls: list[ToolCall] = []
    for body in bodies:
        value = _first_value(body)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                continue
            args = item.get("arguments", item.get("parameters", {}))
            calls.append(ToolCall(new_call_id(), item["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls


def _first_value(text: str) -> Any:
    """The JSON value at the start of `text` (a model may add words after its JSON); None if there is none."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
        return value
    except ValueError:
        return None


_CALL_STARTS = ("{", "[{", "<tool_call", "```")


def call_start(head: str) -> bool | None:
    """Whether a reply that starts with `head` is a call in the text format: True, False, or None while
    its first characters could still go either way."""
    head = head.lstrip()
    if not head:
        return None
    if head.startswith(_CALL_STARTS):
        return True
    if any(c.startswith(head) for c in _CALL_STARTS):
        return None
    return False


async def split_tool_calls(stream: AsyncIterator, names: set[str]) -> AsyncIterator:
    """Pass a backend's stream (text pieces, native `ToolCall`s, a final `StreamEnd`) on, turning a reply
    written in the text tool format into `ToolCall`s. Text is held only while the reply's first characters
    are undecided, or once they show a call; a held reply that is no call to a known tool (a made-up
    result, an unknown name) is dropped, not spoken."""
    held: list[str] = []
    state: bool | None = None  # None: undecided; True: a call (held to the end); False: speech

    def release():
        text = "".join(held)
        held.clear()
        if state is not True:
            return [text] if text.strip() else []
        # JSON that names no known tool is never spoken: the caller sees a reply with no words and no call.
        return parse_tool_text(text, names)

    async for item in stream:
        if isinstance(item, PromptStats):  # comes before the text: nothing held yet
            yield item
            continue
        if isinstance(item, str):
            if state is False:
                yield item
                continue
            held.append(item)
            if state is None:
                state = call_start("".join(held))
                if state is False:
                    for out in release():
                        yield out
            continue
        if not isinstance(item, ToolCall):  # the StreamEnd
            for out in release():
                yield out
        yield item
    for out in release():  # a stream that ended without a StreamEnd
        yield out

