"""LLM backends behind one streaming interface, and the reply shaping a voice agent needs.

Backends: any OpenAI-compatible endpoint (httpx + SSE), the embedded llama.cpp server (xllamacpp
with the SmolLM2 GGUF shipped on PyPI, reached through the same OpenAI protocol), and vLLM's async
engine on GPU (lazy import).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from models.assets import embedded_llm
from models.grounding import DECLINE, Unmentioned, unsupported
from models.http_body import capped_chunks
from models.llm_stream import PromptStats, StreamEnd
from models.tools import ToolCall, ToolRouter, as_text_format, new_call_id, read_out

log = logging.getLogger("presence.llm")

Message = dict  # an OpenAI chat message: role, content (and tool_calls / tool_call_id for tool turns)


@dataclass
class GenerationParams:
    max_tokens: int = 80
    temperature: float = 0.4
    top_p: float = 0.9
    repetition_penalty: float = 1.25
    stop: list[str] = field(default_factory=lambda: ["\nUser:", "<|im_end|>", "\n\n"])
    report_prompt: bool = False  # yield a PromptStats before the first token, where the backend reports one
    # Whose conversation this is: a backend with a prompt cache per conversation (llama.cpp's slots)
    # keeps each in its own.
    conversation: str | None = None


class LLMBackend(Protocol):
    def stream(self, messages: list[Message], params: GenerationParams,
               tools: list[dict] | None = None) -> AsyncIterator[str | ToolCall | PromptStats | StreamEnd]:
        """Text pieces, the native tool calls the model made (if any), then a StreamEnd; with
        `params.report_prompt`, a PromptStats before the first piece where the backend reports one.
        `tools`: OpenAI function definitions the model may call."""
        ...

    async def prefill(self, messages: list[Message], tools: list[dict] | None = None, lead: str = "",
                      conversation: str | None = None) -> int | None:
        """Process `messages` (a conversation up to, not including, the next user message) into the
        prompt cache, so the next reply pays only for its own user message. Returns the tokens
        processed, or None where the backend keeps no cache we can warm. `conversation`: whose, as in
        GenerationParams."""
        ...


# Marks where the next user message would start in a rendered prompt (never said by anyone).
_NEXT_USER = "\u2063next-user\u2063"


def prefix_text(rendered: str) -> str:
    """The part of a prompt rendered with a `_NEXT_USER` placeholder message before that message's
    text: the exact prompt prefix every next turn shares."""
    cut = rendered.find(_NEXT_USER)
    if cut < 0:
        raise ValueError("the chat template dropped the placeholder user message")
    return rendered[:cut]


PREFILL_STEP_CHARS = 96  # ~24 tokens, ~0.25 s on one CPU thread: the longest a first clause waits for a prefill


def prompt_steps(text: str, cached: str, step: int = PREFILL_STEP_CHARS) -> list[str]:
    """Prefixes of `text` to process one after another: from where it stops sharing `cached` (what the
    slot is known to hold), about `step` characters more each, then all of it. Each ends before a
    space between two words, where the tokenizer splits anyway, so its tokens begin the next one's and
    every step processes only its own new tokens."""
    steps, at = [], len(os.path.commonprefix([text, cached])) + step
    while at < len(text):
        cut = text.find(" ", at)
        while 0 < cut < len(text) - 1 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.find(" ", cut + 1)
        if cut <= 0 or cut >= len(text) - 1:
            break
        steps.append(text[:cut])
        at = cut + step
    return [*steps, text]


@dataclass
class PrefillStep:
    """One request of a stepped prefill (EmbeddedLlamaCpp.prefill_steps)."""

    text: str
    slot: int
    chats: int  # the slot's chat requests when the step was planned
    last: bool
    key: str = ""  # the persona's (persona_key)
    restore: bool = False  # first restore the persona's saved prompt state into the slot
    save: bool = False  # then save the slot's state as the persona's


STATE_MIN_GAIN_CHARS = 200  # a saved state is restored only when it holds this much more of the prompt
MAX_SAVED_STATES = 16


def persona_key(messages: list[Message], tools: list[dict] | None) -> str:
    """What the conversations of one persona share at the start of their prompt (a file name)."""
    system = messages[0] if messages and messages[0]["role"] == "system" else None
    return hashlib.sha1(json.dumps([system, tools], sort_keys=True).encode()).hexdigest()


def with_next_user(messages: list[Message], lead: str = "") -> list[Message]:
    """`lead`: what the next user message will start with (its knowledge block), part of the prefix."""
    return [*messages, {"role": "user", "content": lead + _NEXT_USER}]


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint failed. Carries the status only: an upstream's body never
    travels on (to a participant, a webhook or a log), it may hold anything."""


class OpenAICompatibleLLM:
    """Streams chat completions from any OpenAI-compatible server (`base_url` ends in /v1).
    `http`: the client to send with (for a user's endpoint, one bound to the outbound policy);
    a reply stops at `deadline_s` in total and `max_bytes` of stream."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str = "default",
                 timeout_s: float = 30.0, http: httpx.AsyncClient | None = None,
                 deadline_s: float = 120.0, max_bytes: int = 4 << 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.deadline_s, self.max_bytes = deadline_s, max_bytes
        self._client = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    native_tools = True  # tools travel in the request; calls come back as `delta.tool_calls`

    tool_mode = "text"  # without native tools: the text tool format taught in the system message

    def chat(self, messages: list[Message], tools: list[dict] | None) -> list[Message]:
        """The messages as this backend is sent them (without native tools: the text tool format)."""
        if not tools or self.native_tools:
            return messages
        return as_text_format(messages, tools, teach=self.tool_mode == "text")

    async def stream(self, messages: list[Message], params: GenerationParams,
                     tools: list[dict] | None = None) -> AsyncIterator[str | ToolCall | PromptStats | StreamEnd]:
        body = {
            "model": self.model, "messages": self.chat(messages, tools), "stream": True,
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "stop": params.stop, **self.extra_body(params),
        }
        if tools and self.native_tools:
            body["tools"] = tools
        calls: dict[int, dict] = {}  # streamed tool calls by index: id, name, argument pieces
        deadline = time.monotonic() + self.deadline_s
        reported = False
        async with self._client.stream("POST", f"{self.base_url}/chat/completions", json=body,
                                       headers=self._headers) as resp:
            if resp.status_code != 200:
                raise EndpointError(f"LLM endpoint answered HTTP {resp.status_code}")
            finish = None
            async for data in _sse_data(resp, deadline, self.max_bytes):
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                    choices = chunk.get("choices") or []
                except (ValueError, AttributeError) as exc:
                    raise EndpointError("LLM endpoint sent a malformed stream") from exc
                if params.report_prompt and not reported and isinstance(chunk.get("timings"), dict):
                    reported = True
                    yield prompt_stats(chunk["timings"])
                if choices:
                    delta = choices[0].get("delta") or {}
                    finish = choices[0].get("finish_reason") or finish
                    for tc in delta.get("tool_calls") or []:
                        _add_call_delta(calls, tc)
                    if delta.get("content"):
                        yield delta["content"]
        for c in calls.values():
            if c["name"]:
                yield ToolCall(c["id"] or new_call_id(), c["name"], "".join(c["args"]) or "{}")
        yield StreamEnd(finish)

    def extra_body(self, params: GenerationParams) -> dict:
        """Non-standard request fields; none for a generic endpoint (OpenAI rejects unknown ones)."""
        return {}

    async def prefill(self, messages: list[Message], tools: list[dict] | None = None, lead: str = "",
                      conversation: str | None = None) -> int | None:
        """A remote endpoint caches prompts its own way (OpenAI, vLLM: automatic prefix caching); a
        request sent only to warm it would be billed, so nothing is sent."""
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def prompt_stats(timings: dict) -> PromptStats:
    """llama.cpp's `timings` object (its server sends one per chunk with `timings_per_token`)."""
    ms = timings.get("prompt_ms")
    return PromptStats(int(timings.get("cache_n") or 0), int(timings.get("prompt_n") or 0),
                       None if ms is None else float(ms))


def _add_call_delta(calls: dict[int, dict], tc: dict) -> None:
    """One streamed `delta.tool_calls` item: the first carries the id and name, later ones argument text."""
    if not isinstance(tc, dict):
        raise EndpointError("LLM endpoint sent a malformed tool call")
    c = calls.setdefault(int(tc.get("index", len(calls))), {"id": None, "name": "", "args": []})
    fn = tc.get("function") or {}
    c["id"] = tc.get("id") or c["id"]
    c["name"] = fn.get("name") or c["name"]
    if isinstance(fn.get("arguments"), str):
        c["args"].append(fn["arguments"])


async def _sse_data(resp: httpx.Response, deadline: float, max_bytes: int) -> AsyncIterator[str]:
    """The `data:` fields of a server-sent event stream, within a total deadline and byte cap."""
    buf = b""
    try:
        async for chunk in capped_chunks(resp, deadline, max_bytes):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip().decode("utf-8", "replace")
    except TimeoutError as exc:
        raise EndpointError("LLM endpoint passed its total deadline") from exc
    except ValueError as exc:
        raise EndpointError("LLM endpoint passed its response size cap") from exc


class EmbeddedLlamaCpp(OpenAICompatibleLLM):
    """An embedded GGUF (`model`: a name in models.assets.EMBEDDED_LLMS, or `gguf_path`) served
    in-process by llama.cpp's own server via xllamacpp."""

    def __init__(self, gguf_path: str | None = None, n_ctx: int = 2048, n_parallel: int = 1,
                 threads: int = 1, model: str = "smollm2-135m", tool_mode: str = "text", recall: bool = False,
                 batch_threads: int | None = None) -> None:
        """`tool_mode`: `text` (the model is taught the text tool format and decides itself) or `router`
        (models.tools.ToolRouter decides, the model writes the arguments under the schema as a grammar).
        `recall`: a question about the user that a remembered fact answers is answered from it
        (models.memory.MemoryRecall), for a model too small to. `n_parallel`: llama.cpp slots, each
        keeping one conversation's prompt cache (a request goes to the slot whose cache matches it
        best); the LLM deployment sends them one request at a time (deployments/llm.py)."""
        import xllamacpp

        if tool_mode not in ("text", "router"):
            raise ValueError(f"tool_mode {tool_mode!r}: expected 'text' or 'router'")
        self.tool_mode = tool_mode
        self.n_parallel = n_parallel  # llama.cpp slots, each keeping one conversation's prompt cache
        self._slots: OrderedDict[str, int] = OrderedDict()  # conversation -> its slot, least recent first
        self._prefilled: dict[int, str] = {}  # slot -> the last prefix a prefill processed into it
        self._chats: dict[int, int] = {}  # slot -> chat requests sent to it (PrefillStep.chats)
        # A persona's prompt state, saved once and restored into the slot of each new conversation with
        # it: key (its system message and tools) -> the prompt text saved under `<key>.bin`.
        self._states: OrderedDict[str, str] = OrderedDict()
        self._slot_key: dict[int, str] = {}  # slot -> the persona whose prompt it holds
        self._state_dir = tempfile.mkdtemp(prefix="presence-llm-states-")
        atexit.register(shutil.rmtree, self._state_dir, True)
        self._router: ToolRouter | None = None
        self._recall = None
        self.recall = recall
        self._embedder = None

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf_path or embedded_llm(model))
        # `n_ctx` is each slot's: llama.cpp splits its context among the slots.
        params.n_ctx = n_ctx * n_parallel
        params.n_parallel = n_parallel
        params.cpuparams.n_threads = threads
        # Prompt processing (a reply's new message, a prefill) may use more threads than generation: at a
        # reply's start the session has paused rendering and perception, so the other core is free.
        params.cpuparams_batch.n_threads = batch_threads or threads
        params.verbosity = 0
        params.slot_save_path = self._state_dir + "/"  # (llama.cpp appends the file name to it)
        self._server = xllamacpp.Server(params)  # keeps llama.cpp's HTTP server alive
        super().__init__(self._server.listening_address + "/v1", model=model)

    native_tools = False  # small embedded models: the text tool format (models.tools) in the system message

    async def stream(self, messages: list[Message], params: GenerationParams,
                     tools: list[dict] | None = None) -> AsyncIterator[str | ToolCall | PromptStats | StreamEnd]:
        last = messages[-1]["role"] if messages else None
        if last == "user" and (self.recall or (tools and self.tool_mode == "router")):
            # What the small-model helpers read: the user's own words and the persona's facts.
            words = user_words(messages[-1]["content"])
            facts = system_facts(messages[0]["content"]) if messages[0]["role"] == "system" else []
            known = self._recalled(words, facts) if self.recall else None
            if known is not None:
                yield known
                yield StreamEnd("stop")
                return
            call = await self._routed_call(words, facts, tools) if tools and self.tool_mode == "router" else None
            if call is not None:
                yield call
                yield StreamEnd("tool_calls")
                return
        if tools and self.tool_mode == "router" and last == "tool":
            # SmolLM2 used a given result in 0 of 8 replies (Qwen 0.5B: 5 of 8): the result is read out.
            yield read_out(messages)
            yield StreamEnd("stop")
            return
        slot = self.slot_for(params.conversation)
        if slot >= 0:
            key = persona_key(messages, tools)
            if self._slot_key.get(slot) != key:  # a reply before its conversation's first prefill
                await self._restore_state(key, slot)
            self._slot_key[slot] = key
        async for piece in super().stream(messages, params, tools):
            yield piece

    def _embed(self, texts: list[str]):
        """all-MiniLM-L6-v2 for the router and recall (loaded on first use: ~90 MB)."""
        if self._embedder is None:
            from models.embed import MiniLMEmbedder

            self._embedder = MiniLMEmbedder(threads=1)
        return self._embedder.embed(texts)

    def _recalled(self, words: str, facts: list[str]) -> str | None:
        if self._recall is None:
            from models.memory import MemoryRecall

            self._recall = MemoryRecall(self._embed)
        return self._recall.answer(words, facts)

    async def _routed_call(self, words: str, facts: list[str], tools: list[dict]) -> ToolCall | None:
        if self._router is None:
            self._router = ToolRouter(self._embed)
        tool = self._router.route(words, tools, facts)
        if tool is None:
            return None
        fn = tool["function"]
        r = await self._client.post(f"{self.base_url}/chat/completions", json={
            "messages": [{"role": "system", "content": f"Write the arguments of {fn['name']} ({fn.get('description', '')}) "
                                                       "as JSON, from what the user said."},
                         {"role": "user", "content": words}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": fn.get("parameters") or {}}},
            "max_tokens": 80, "temperature": 0.0, "cache_prompt": False})
        if r.status_code != 200:
            return None
        text = (r.json()["choices"][0]["message"].get("content") or "").strip()
        try:
            json.loads(text)
        except ValueError:
            return None
        return ToolCall(new_call_id(), fn["name"], text)

    def slot_for(self, conversation: str | None) -> int:
        """The slot that keeps `conversation`'s prompt cache (-1: llama.cpp picks one). A new
        conversation takes a free slot, or the one used least recently. (Left to pick by prompt
        similarity, llama.cpp sent every conversation of a persona to the slot holding the persona's
        prefix, each overwriting the others' history.)"""
        if conversation is None:
            return -1
        if conversation in self._slots:
            self._slots.move_to_end(conversation)
            return self._slots[conversation]
        if len(self._slots) < self.n_parallel:
            slot = len(self._slots)
        else:
            slot = self._slots.popitem(last=False)[1]  # its cache keeps what the two share (a persona)
        self._slots[conversation] = slot
        return slot

    def extra_body(self, params: GenerationParams) -> dict:
        # llama.cpp's own sampling knob, and its per-slot prompt cache (the conversation prefix is reused);
        # `timings_per_token` puts the prompt's timings (cache_n, prompt_n, prompt_ms) in the first chunk.
        slot = self.slot_for(params.conversation)
        self._chats[slot] = self._chats.get(slot, 0) + 1
        return {"repeat_penalty": params.repetition_penalty, "cache_prompt": True, "id_slot": slot,
                **({"timings_per_token": True} if params.report_prompt else {})}

    async def prefill(self, messages: list[Message], tools: list[dict] | None = None, lead: str = "",
                      conversation: str | None = None) -> int | None:
        """llama.cpp's own endpoints: the server's chat template renders the conversation with a
        placeholder next user message, the text before the placeholder is processed with no token
        generated (`n_predict: 0`) into the slot's cache, which the next chat request then reuses."""
        return sum([await self.process_step(step)
                    for step in await self.prefill_steps(messages, tools, lead, conversation)])

    async def prefill_steps(self, messages: list[Message], tools: list[dict] | None = None, lead: str = "",
                            conversation: str | None = None) -> list[PrefillStep]:
        """The prefill as `prompt_steps` (`process_step` each in turn): a caller that serves several
        sessions lets a reply go between two steps of a long prefill (a new session's persona)."""
        root = self.base_url.removesuffix("/v1")
        chat = with_next_user(self.chat(messages, tools), lead)
        rendered = await self._client.post(f"{root}/apply-template", json={"messages": chat})
        rendered.raise_for_status()
        text = prefix_text(rendered.json()["prompt"])
        slot = self.slot_for(conversation)
        if slot < 0:  # llama.cpp picks the slot: what it holds is not known
            return [PrefillStep(text, slot, 0, last=True)]
        # A step shorter than what the slot holds of `text` would drop the rest from its cache, to be read
        # again: the steps start after what it is known to hold, and after the last reply, which the
        # chat request that generated it left in the cache.
        held = os.path.commonprefix([text, self._prefilled.get(slot, "")])
        replies = [m["content"] for m in messages if m["role"] == "assistant" and m.get("content")]
        if replies and (at := text.rfind(replies[-1])) >= 0:
            held = max(held, text[:at + len(replies[-1])], key=len)
        # A new conversation with a persona another one already has: its saved state is restored into
        # the slot (~2 ms for SmolLM2's ~320-token persona, instead of ~3 s of prompt processing).
        key = persona_key(messages, tools)
        saved = self._states.get(key)
        restore = saved is not None and len(os.path.commonprefix([text, saved])) > len(held) + STATE_MIN_GAIN_CHARS
        if restore:
            held = os.path.commonprefix([text, saved])
        save = saved is None and not replies  # a persona's first conversation, before its first reply
        steps = prompt_steps(text, held)
        chats = self._chats.get(slot, 0)
        return [PrefillStep(t, slot, chats, last=i == len(steps) - 1, key=key, restore=restore and i == 0,
                            save=save and i == len(steps) - 1) for i, t in enumerate(steps)]

    async def process_step(self, step: PrefillStep) -> int:
        """Process a step's text into its slot with no token generated; returns the tokens read (what the
        slot's cache did not hold). A step before the last is skipped once a chat request has used the
        slot since it was planned: that reply's prompt read past it (processing it would cut the reply
        from the cache), and the last step reads only what the slot lacks."""
        if not step.last and self._chats.get(step.slot, 0) != step.chats:
            return 0
        if step.restore and self._chats.get(step.slot, 0) == step.chats:
            await self._restore_state(step.key, step.slot)  # (if it fails, the step reads the prompt itself)
        done = await self._client.post(f"{self.base_url.removesuffix('/v1')}/completion", json={
            "prompt": step.text, "n_predict": 0, "cache_prompt": True, "id_slot": step.slot})
        done.raise_for_status()
        if step.slot >= 0:
            self._prefilled[step.slot], self._slot_key[step.slot] = step.text, step.key
        if step.save and step.key not in self._states:
            await self._save_state(step.key, step.slot, step.text)
        return int(done.json().get("timings", {}).get("prompt_n", 0))

    async def _restore_state(self, key: str, slot: int) -> bool:
        if key not in self._states:
            return False
        restored = await self._client.post(f"{self.base_url.removesuffix('/v1')}/slots/{slot}?action=restore",
                                           json={"filename": f"{key}.bin"})
        if not restored.is_success:
            log.info("prompt state restore failed: %s", restored.text[:200])
            return False
        self._prefilled[slot], self._slot_key[slot] = self._states[key], key
        self._states.move_to_end(key)
        return True

    async def _save_state(self, key: str, slot: int, text: str) -> None:
        saved = await self._client.post(f"{self.base_url.removesuffix('/v1')}/slots/{slot}?action=save",
                                        json={"filename": f"{key}.bin"})
        if not saved.is_success:
            log.info("prompt state save failed: %s", saved.text[:200])
            return
        self._states[key] = text
        while len(self._states) > MAX_SAVED_STATES:  # each is ~23 kB a token for SmolLM2
            old, _ = self._states.popitem(last=False)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self._state_dir, f"{old}.bin"))

    def warmup(self) -> None:
        """One tiny generation so the first user turn does not pay for cold caches."""
        httpx.post(f"{self.base_url}/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


class VLLMEngine:
    """vLLM's async engine in-process (GPU profile). Imported lazily; never needed on CPU."""

    def __init__(self, model: str, gpu_memory_utilization: float = 0.5, max_model_len: int = 4096) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self._engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(model=model, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enable_prefix_caching=True)
        )
        self._tokenizer = None

    async def _prompt(self, messages: list[Message], next_user: bool = False, tools: list[dict] | None = None,
                      lead: str = "") -> str:
        """The model's own chat template renders the tools (Qwen, Llama 3.1, Hermes templates take
        `tools`); the model answers with `<tool_call>` JSON, which models.tools.split_tool_calls reads."""
        if self._tokenizer is None:
            self._tokenizer = await self._engine.get_tokenizer()
        extra = {"tools": tools} if tools else {}
        if next_user:
            rendered = self._tokenizer.apply_chat_template(with_next_user(messages, lead), tokenize=False,
                                                           add_generation_prompt=False, **extra)
            return prefix_text(rendered)
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    async def prefill(self, messages: list[Message], tools: list[dict] | None = None, lead: str = "",
                      conversation: str | None = None) -> int | None:
        """One generated token over the conversation prefix: vLLM's automatic prefix caching keeps
        its KV blocks for the next turn."""
        from vllm import SamplingParams

        prompt = await self._prompt(messages, next_user=True, tools=tools, lead=lead)
        n = None
        async for out in self._engine.generate(prompt, SamplingParams(max_tokens=1), request_id=uuid.uuid4().hex):
            n = len(out.prompt_token_ids or [])
        return n

    async def stream(self, messages: list[Message], params: GenerationParams,
                     tools: list[dict] | None = None) -> AsyncIterator[str | PromptStats | StreamEnd]:
        from vllm import SamplingParams

        prompt = await self._prompt(messages, tools=tools)
        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                  top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                                  stop=params.stop)
        sent = 0
        finish = None
        t0 = time.perf_counter()
        async for out in self._engine.generate(prompt, sampling, request_id=uuid.uuid4().hex):
            if params.report_prompt and t0 is not None:
                # vLLM reports the prefix-cache hit (RequestOutput.num_cached_tokens); the time is to the
                # first output, which includes the first token.
                cached = int(getattr(out, "num_cached_tokens", None) or 0)
                yield PromptStats(cached, len(out.prompt_token_ids or []) - cached, (time.perf_counter() - t0) * 1000)
                t0 = None
            text = out.outputs[0].text
            finish = out.outputs[0].finish_reason
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        yield StreamEnd(finish)


# --- reply shaping -------------------------------------------------------------------------------

_EMOTION_TAG = re.compile(r"\[(neutral|joy|happy|sadness|sad|anger|angry|surprise|surprised)\]", re.I)
# A sentence end, or a pause inside one: a comma or a spaced dash ("I'm not sure - but ...").
_CLAUSE_END = re.compile(r"([.!?;:]+[\"')\]]?)(\s|$)|(,|\s[-\u2013\u2014])(\s)")
_SENTENCE_END = re.compile(r"[.!?]$")
# A full stop after these is not the end of a sentence ("Dr. Chen", "9 a.m. to 6").
_ABBREVIATION = re.compile(r"(?:^|\s)(?:dr|mr|mrs|ms|prof|st|mt|no|vs|etc|e\.g|i\.e|a\.m|p\.m|[a-z])\.$", re.I)
_WHOLE_WORD = re.compile(r"\S+\s+")  # a word the stream has finished (whitespace after it)
_BREAK_BEFORE = {"and", "but", "or", "so", "because", "when", "while", "if", "that", "which", "who", "to", "for",
                 "with", "in", "on", "at", "from", "about", "after", "before", "until", "since", "as", "than"}
EMOTION_ALIASES = {"happy": "joy", "sad": "sadness", "angry": "anger", "surprised": "surprise"}


def _normalized(sentence: str) -> str:
    return " ".join(re.findall(r"[a-z']+", sentence.lower()))


def _four_grams(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + 4]) for i in range(len(words) - 3)}


def split_sentences(text: str) -> list[str]:
    return [x for x in re.split(r"(?<=[.!?])\s+", text) if x.strip()]


@dataclass
class Clause:
    text: str
    index: int
    emotion: str | None = None


class ReplyShaper:
    """Turns an LLM token stream into speakable clauses, and bounds the reply.

    Small local models ramble and loop; a voice reply must be short. The shaper emits a clause at
    sentence punctuation (or at a comma once the clause has `min_comma_words`), stops after
    `max_sentences`, and stops when a sentence repeats an earlier one or a 4-gram loops. After its first
    sentence a reply also stops at a sentence the avatar already said in the conversation
    (`said_before`): small models end every reply with the same boilerplate ("If you need any further
    information...").

    `unmentioned`: what of the question the grounded facts do not mention (models.grounding). A reply
    that says yes to it, prices it or talks about it is replaced by the grounding rule's fallback
    sentence (DECLINE) if that is its first clause, and ends before the clause otherwise.
    """

    def __init__(self, max_sentences: int = 2, min_comma_words: int = 5, max_chars: int = 240,
                 first_comma_words: int = 2, said_before: Iterable[str] = (), first_clause_words: int = 8,
                 max_clause_words: int = 16, unmentioned: Unmentioned = Unmentioned()) -> None:
        self.first_comma_words = first_comma_words
        self.first_clause_words = first_clause_words
        self.max_clause_words = max_clause_words
        self.max_sentences = max_sentences
        self.min_comma_words = min_comma_words
        self.max_chars = max_chars
        self.unmentioned = unmentioned
        self.declined = False  # the reply was replaced by the fallback (models.grounding.DECLINE)
        self._buf = ""
        self._sentences: list[str] = []
        earlier = [_normalized(x) for text in said_before for x in split_sentences(text)]
        self._said_before = set(earlier)
        self._said_grams = {g for x in earlier for g in _four_grams(x.split())}
        self._ngrams: set[tuple[str, ...]] = set()
        self._emitted = 0
        self._chars = 0
        self.emotion: str | None = None
        self.done = False

    def _clean(self, text: str) -> str:
        m = _EMOTION_TAG.search(text)
        if m:
            tag = m.group(1).lower()
            self.emotion = EMOTION_ALIASES.get(tag, tag)
        text = _EMOTION_TAG.sub("", text)
        text = re.sub(r"[*_#`]+", "", text)  # markdown is not speakable
        text = re.sub(r"\([^)]{0,40}\)", "", text)  # stage directions such as "(smiling)"
        return re.sub(r"\s+", " ", text)

    def _loops(self, clause: str) -> bool:
        words = re.findall(r"[a-z']+", clause.lower())
        grams = _four_grams(words)
        half = max(1, len(grams) // 2)
        looped = bool(grams) and len(grams & self._ngrams) >= half
        self._ngrams |= grams
        norm = " ".join(words)
        if self._sentences:  # past the first sentence: nothing the avatar said before
            looped = looped or norm in self._said_before or (bool(grams) and len(grams & self._said_grams) >= half)
        return looped or (bool(norm) and norm in self._sentences)

    def _accept(self, text: str) -> Clause | None:
        text = text.strip()
        if not text or self.done:
            return None
        if unsupported(text, self.unmentioned, first=self._emitted == 0):
            self.done = True
            if self._emitted:
                return None
            self.declined = True
            text = DECLINE
        if self._loops(text):
            self.done = True
            return None
        if _SENTENCE_END.search(text):
            self._sentences.append(_normalized(text))
            if len(self._sentences) >= self.max_sentences:
                self.done = True
        self._chars += len(text)
        if self._chars >= self.max_chars:
            self.done = True
        clause = Clause(text, self._emitted, self.emotion)
        self._emitted += 1
        return clause

    def feed(self, piece: str) -> list[Clause]:
        """Add streamed text; return the clauses that are now complete."""
        if self.done:
            return []
        self._buf = self._clean(self._buf + piece)
        out: list[Clause] = []
        while not self.done:
            cut = None
            for m in _CLAUSE_END.finditer(self._buf):
                if m.group(1) == "." and _ABBREVIATION.search(self._buf[:m.end(1)]):
                    continue
                if m.group(1) in (".", ":") and m.end() == len(self._buf) and self._buf[m.start() - 1:m.start()].isdigit():
                    continue  # "10:" or "9." at the end of the stream so far: "10:30" and "9.50" may follow
                if m.group(3):  # a comma or dash: only worth a TTS call if the clause is long enough
                    # The first clause may be short: it is what the user waits for.
                    need = self.first_comma_words if self._emitted == 0 else self.min_comma_words
                    if len(self._buf[: m.start()].split()) < need:
                        continue
                cut = m.end()
                break
            if cut is None:
                cut = self._word_bound_cut()
            if cut is None:
                break
            clause = self._accept(self._buf[:cut])
            self._buf = self._buf[cut:]
            if clause:
                out.append(clause)
        return out

    def _word_bound_cut(self) -> int | None:
        """A run of words with no punctuation is cut at a word boundary once it is `first_clause_words`
        long (the first clause: what the user waits for) or `max_clause_words` (later ones), before a
        conjunction or preposition where one falls in the second half, so TTS need not wait for the
        model to end a rambling sentence."""
        limit = self.first_clause_words if self._emitted == 0 else self.max_clause_words
        words = list(_WHOLE_WORD.finditer(self._buf))
        if len(words) < limit:
            return None
        n = limit
        for i in range(limit - 1, limit // 2, -1):
            if words[i].group().strip().lower() in _BREAK_BEFORE:
                n = i
                break
        return words[n - 1].end()

    def flush(self, cut: bool = False) -> list[Clause]:
        """The rest of the text when the stream ends. `cut`: the token budget ended the stream, so an
        unfinished last sentence is dropped (a voice never says "please contact them now to")."""
        rest, self._buf = self._buf, ""
        if cut and not _SENTENCE_END.search(rest.strip()):
            self.done = True
            return []
        clause = self._accept(rest)
        return [clause] if clause else []


def context_start(history: list[Message], start: int, max_messages: int = 16, keep: int = 2) -> int:
    """Index of the first history message the LLM sees.

    The window jumps forward (to the last `keep` messages, starting at a user turn) only when it
    exceeds `max_messages`, instead of sliding every turn: an unchanged prefix lets the server reuse
    its prompt cache, so time to first token does not grow with the conversation. A jump makes the
    server process the kept messages again (on a CPU, ~10 ms a token for SmolLM2 and ~25 ms for a
    0.5B model), so jumps are rare and keep only the last exchange.
    """
    if len(history) - start <= max_messages:
        return start
    start = max(0, len(history) - keep)
    while start < len(history) and history[start].get("role") != "user":
        start += 1
    return start


# The fallback spelled out word for word: Qwen 0.5B then answers more facts right (clinic 0.72 -> 0.77,
# held-out bike shop 0.64 -> 0.71 at temperature 0) than with "say you do not know".
GROUNDING_RULES = (f"Answer only from these facts. If the facts do not say, answer: \"{DECLINE}\" Never make up "
                   "names, numbers, prices, dates or services.")


def grounded_system(system_prompt: str, context: str, grounded: bool = True) -> str:
    """The system message: the persona, then its context. `grounded`: the context as a list of facts
    with the rule a small model needs spelled out (only these facts; otherwise say so; invent
    nothing); else the context as given, after the persona."""
    system = system_prompt.strip()
    lines = [ln.strip() for ln in context.splitlines() if ln.strip()]
    if not lines:
        return system
    if not grounded:
        return f"{system}\n\n{context.strip()}"
    facts = "\n".join(ln if ln[:1] in "-*\u2022" else f"- {ln}" for ln in lines)
    return f"{system}\n\nFacts:\n{facts}\n\n{GROUNDING_RULES}"


_SEEN_OPEN, _NOTE_CLOSE = "(Seen on camera: ", ")\n\n"  # how the user looks: the start of their message
_HEARD_NOTE = "\n\n(Their voice: "  # how they said it (prosody.brief): after their words
_PASSAGES_OPEN, _PASSAGES_CLOSE = "(From the documents:\n", ")\n\n"  # passages are one line each


def seen_lead(seen: str | None) -> str:
    """How a user message opens with what the camera shows ("" for nothing to tell): before the knowledge
    block and the words, so that it is in the prompt cache before the user has finished speaking."""
    return f"{_SEEN_OPEN}{seen}{_NOTE_CLOSE}" if seen else ""


def user_words(content: str) -> str:
    """The user's own words in a user message built by `build_messages` (no camera note, no passages,
    no note on their voice)."""
    if content.startswith(_SEEN_OPEN):
        content = content.split(_NOTE_CLOSE, 1)[-1]
    if content.startswith(_PASSAGES_OPEN):
        content = content.split(_PASSAGES_CLOSE, 1)[-1]
    return content.split(_HEARD_NOTE, 1)[0]


def system_facts(system: str) -> list[str]:
    """The facts `grounded_system` listed in a system message."""
    if "\nFacts:\n" not in system:
        return []
    block = system.split("\nFacts:\n", 1)[1].split("\n\n", 1)[0]
    return [ln[2:] for ln in block.splitlines() if ln.startswith("- ")]


def knowledge_block(passages: list[str], closed: bool = True) -> str:
    """How retrieved passages open the user's message: before the words, so that it can be in the prompt
    cache (prefilled from a partial transcript) before the user has finished. `closed=False`: the block
    without its end, a prefix of the block of these passages and any that follow them (prefilled one
    passage at a time)."""
    if not passages:
        return ""
    body = _PASSAGES_OPEN + "".join(f"- {p}\n" for p in passages)
    return body + _PASSAGES_CLOSE if closed else body


def build_messages(system_prompt: str, context: str, history: list[Message], seen: str | None = None,
                   heard: str | None = None, max_history: int | None = None, grounded: bool = True,
                   knowledge: str = "") -> list[Message]:
    """The chat the LLM sees: persona + conversational context as grounded facts, then the given turns
    (callers choose the window with `context_start`; `max_history` only bounds it).

    The prompt has a stable prefix and a volatile tail: what changes every turn is in the last user
    message, after the history, never in the system message, so the server's prompt cache keeps
    everything before it. That message is `seen` (what the camera shows: `seen_lead`), `knowledge`
    (retrieved passages: `knowledge_block`), the words, then `heard` (how they were said). What comes
    before the words can be prefilled while the user speaks; only the words and `heard` are read after."""
    turns = history if max_history is None else history[-max_history:]
    messages = [{"role": "system", "content": grounded_system(system_prompt, context, grounded)}, *turns]
    if messages[-1]["role"] == "user" and (seen or knowledge or heard):
        note = f"{_HEARD_NOTE}{heard})" if heard else ""
        messages[-1] = {"role": "user", "content": seen_lead(seen) + knowledge + messages[-1]["content"] + note}
    return messages
