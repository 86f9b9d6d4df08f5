"""LLM deployment: streams reply tokens from the configured backend or a persona's own endpoint."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

from ray import serve

from deployments import outbound
from deployments.common import PriorityLock, ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.llm import EmbeddedLlamaCpp, GenerationParams, OpenAICompatibleLLM, StreamEnd
from models.tools import ToolCall, split_tool_calls

# The embedded backend serves every session of the replica on one CPU thread. Left to llama.cpp, a
# reply waited for other sessions' whole replies and prefills in its first-come queue (one slot), or
# was decoded side by side with them, each step as slow as all of them together (several slots): at 3
# sessions on 2 cores, 1-8 s to a first token. So requests go to llama.cpp one at a time, each session's
# conversation keeps its own slot (llama.cpp sends a prompt to the slot whose cache matches it best; with
# one slot the sessions' shared persona prefix kept llama.cpp from saving the others' history), and a
# reply is generated in chunks, each continuing the text so far (llama.cpp continues an unfinished
# assistant message): a reply's first chunk, which holds its first clause, goes before other replies'
# later chunks and prefills, and a long prefill (a new session's persona) is processed in steps of
# ~24 tokens (models.llm.prompt_steps) that first chunks pass. Speech plays ~3 tokens a second and one thread generates ~60,
# so a later chunk that waits a little is never heard late.
FIRST_CHUNK_TOKENS = 16
NEXT_CHUNK_TOKENS = 16
REPLY_FIRST, REPLY_REST, PREFILL = 0, 1, 2  # a prefill (a new session's persona, a history) waits for replies


def make_backend(kind: str, **kw):
    """`llamacpp` (embedded GGUF), `openai` (base_url/api_key/model) or `vllm` (GPU, lazy import)."""
    if kind == "llamacpp":
        return EmbeddedLlamaCpp(**kw)
    if kind == "openai":
        return OpenAICompatibleLLM(**kw)
    if kind == "vllm":
        from models.llm import VLLMEngine

        return VLLMEngine(**kw)
    raise ValueError(f"unknown LLM backend {kind!r}")


@serve.deployment
class LLM:
    def __init__(self, backend: str = "llamacpp", backend_args: dict | None = None,
                 outbound_policy: dict | None = None) -> None:
        """`outbound_policy`: how a persona's own endpoint may be reached (deployments.outbound; the
        profile's `outbound` section). The profile's own backend is internal and not subject to it."""
        limit_threads()
        self.policy = outbound.OutboundPolicy.from_config(outbound_policy)
        self.gpu_metrics = start_gpu_metrics("LLM")
        self.backend = make_backend(backend, **(backend_args or {}))
        self._external: dict[tuple, OpenAICompatibleLLM] = {}
        self.ttft = ServiceTimes()
        # Sessions take turns on the embedded backend (None: the backend batches them itself).
        self.turns = PriorityLock() if isinstance(self.backend, EmbeddedLlamaCpp) else None
        if hasattr(self.backend, "warmup"):
            self.backend.warmup()

    def _backend_for(self, endpoint: dict | None):
        if not endpoint or not endpoint.get("base_url"):
            return self.backend
        key = (endpoint["base_url"], endpoint.get("api_key"), endpoint.get("model"))
        if key not in self._external:
            outbound.check_url(endpoint["base_url"], base_url=True)  # the address is checked when dialled
            if len(self._external) >= 64:  # bounded: one client per distinct endpoint in use
                self._external.pop(next(iter(self._external)))
            self._external[key] = OpenAICompatibleLLM(
                endpoint["base_url"], endpoint.get("api_key"), endpoint.get("model") or "default",
                http=outbound.client(self.policy), deadline_s=self.policy.deadline_s, max_bytes=self.policy.max_bytes)
        return self._external[key]

    async def stream(self, messages: list[dict], params: GenerationParams | None = None,
                     endpoint: dict | None = None, tools: list[dict] | None = None
                     ) -> AsyncIterator[str | ToolCall | StreamEnd]:
        """Yields text pieces as they are generated, the tool calls the model made (native, or written
        in the text tool format: models.tools), then a StreamEnd. Cancelling the call stops generation."""
        t0 = time.perf_counter()
        first = True
        self.ttft.in_flight += 1
        backend, params = self._backend_for(endpoint), params or GenerationParams()
        if backend is self.backend and self.turns is not None:
            stream = self._in_turns(messages, params, tools)
        else:
            stream = backend.stream(messages, params, tools)
        if tools:
            stream = split_tool_calls(stream, {t["function"]["name"] for t in tools})
        try:
            async for piece in stream:
                if first:
                    self.ttft.add((time.perf_counter() - t0) * 1000)
                    first = False
                yield piece
        finally:
            self.ttft.in_flight -= 1

    async def _in_turns(self, messages: list[dict], params: GenerationParams, tools: list[dict] | None
                        ) -> AsyncIterator[str | ToolCall | StreamEnd]:
        """The backend's reply in chunks, each taking its turn on the slot (see FIRST_CHUNK_TOKENS)."""
        text, budget, priority = "", params.max_tokens, REPLY_FIRST
        while True:
            size = min(budget, FIRST_CHUNK_TOKENS if priority == REPLY_FIRST else NEXT_CHUNK_TOKENS)
            chunk = dataclasses.replace(params, max_tokens=size, report_prompt=params.report_prompt and not text)
            sent = [*messages, {"role": "assistant", "content": text}] if text else messages
            end = StreamEnd("stop")
            async with self.turns.hold(priority):
                async for piece in self.backend.stream(sent, chunk, tools):
                    if isinstance(piece, StreamEnd):
                        end = piece
                        break
                    if isinstance(piece, str):
                        text += piece
                        budget -= 1  # llama.cpp streams a token per chunk
                    yield piece
            if end.finish_reason != "length" or budget <= 0 or not text:
                yield end
                return
            priority = REPLY_REST

    async def prefill(self, messages: list[dict], endpoint: dict | None = None,
                      tools: list[dict] | None = None, lead: str = "", conversation: str | None = None) -> int | None:
        """Warm the prompt cache with a conversation prefix (persona, context, history) while the user
        is still speaking; returns the tokens processed, None where the backend has no cache to warm.
        On the embedded backend it waits for the replies being generated."""
        backend = self._backend_for(endpoint)
        if backend is self.backend and self.turns is not None:
            # A step at a time: first clauses go in between. The steps keep the prefill's place, so one
            # session's prefill ends before the next one's starts, which is planned when its turn comes:
            # a persona another session has just read is then restored, not read again.
            order = self.turns.ticket()
            async with self.turns.hold(PREFILL, order):
                steps = await backend.prefill_steps(messages, tools, lead, conversation)
                done = await backend.process_step(steps[0])
            for step in steps[1:]:
                async with self.turns.hold(PREFILL, order):
                    done += await backend.process_step(step)
            return done
        return await backend.prefill(messages, tools, lead, conversation)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.ttft.stats()
