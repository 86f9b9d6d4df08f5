"""Reading an HTTP response body within a total deadline and a byte cap: a slow-drip or endless
answer from a user-chosen endpoint (an LLM stream, a webhook receiver) is cut off, never waited on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx


async def capped_chunks(resp: httpx.Response, deadline: float, max_bytes: int) -> AsyncIterator[bytes]:
    """`resp`'s body in chunks. Raises TimeoutError once `deadline` (time.monotonic()) passes, even
    mid-chunk, and ValueError once more than `max_bytes` came."""
    chunks, seen = resp.aiter_bytes(), 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the response passed its deadline")
        try:
            chunk = await asyncio.wait_for(anext(chunks), left)
        except StopAsyncIteration:
            return
        seen += len(chunk)
        if seen > max_bytes:
            raise ValueError(f"the response passed {max_bytes} bytes")
        yield chunk
