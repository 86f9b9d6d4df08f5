"""Delivery of system.* and application.* events to a conversation's callback_url."""

from __future__ import annotations

import asyncio
import logging

import httpx

log = logging.getLogger("presence.webhooks")


class WebhookSender:
    """POSTs events as JSON, in order per conversation, with a few retries on failure."""

    def __init__(self, timeout_s: float = 5.0, attempts: int = 3) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self.attempts = attempts

    async def send(self, url: str, payload: dict) -> bool:
        for attempt in range(self.attempts):
            try:
                resp = await self._client.post(url, json=payload)
                if resp.status_code < 500:
                    return resp.status_code < 400
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s", url, exc)
            await asyncio.sleep(0.5 * (attempt + 1))
        return False
