"""LLM deployment: streams reply tokens from the configured backend or a persona's own endpoint."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ray import serve

from deployments import outbound
from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.llm import EmbeddedLlamaCpp, GenerationParams, OpenAICompatibleLLM, StreamEnd
from models.tools import ToolCall, split_tool_calls


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
        stream = self._backend_for(endpoint).stream(messages, params or GenerationParams(), tools)
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

    async def prefill(self, messages: list[dict], endpoint: dict | None = None,
                      tools: list[dict] | None = None, lead: str = "") -> int | None:
        """Warm the prompt cache with a conversation prefix (persona, context, history) while the user
        is still speaking; returns the tokens processed, None where the backend has no cache to warm."""
        return await self._backend_for(endpoint).prefill(messages, tools, lead)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.ttft.stats()
