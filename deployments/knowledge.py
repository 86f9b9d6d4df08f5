"""Knowledge deployment: turns documents into embedded chunks, and finds the passages for a user's words.

`ingest` runs when a document is uploaded (or its URL fetched, under the outbound-HTTP policy), off the
replica's event loop; it returns the outcome, which the ingress records on the document. `search` is on
every turn's path (embed the words, one matrix product, ~15-20 ms on one CPU thread), so it never waits
behind an ingest. Vectors live in the database (deployments.chunk_store): pgvector on PostgreSQL, else
float32 bytes loaded into a local index per document on first use.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from deployments import outbound
from deployments.chunk_store import ChunkStore
from deployments.common import ServiceTimes, limit_threads
from models.documents import DocumentError, chunk_text, extract_text, kind_of
from models.embed import DIM, MiniLMEmbedder
from models.http_body import capped_chunks
from models.vector_index import Passage, VectorIndex

log = logging.getLogger("presence.knowledge")
MAX_DOCUMENT_BYTES = 20 << 20  # an upload (the ingress's body cap) or a fetched document_url
EMBED_BATCH = 32


@serve.deployment
class Knowledge:
    def __init__(self, database_url: str, outbound_policy: dict | None = None, chunk_words: int = 40) -> None:
        limit_threads()
        self.chunks = ChunkStore(database_url)
        self.policy = outbound.OutboundPolicy.from_config(outbound_policy)
        self.embedder = MiniLMEmbedder(threads=1)
        self.embedder.embed(["warm up"])
        self.index = VectorIndex()
        self.chunk_words = chunk_words
        self.search_ms = ServiceTimes()
        self._lock = asyncio.Lock()  # one embedding at a time: torch on one thread

    async def ingest(self, document_id: str, data: bytes | None = None, kind: str | None = None,
                     url: str | None = None) -> dict:
        """Extract, chunk, embed and store one document: {"status": "ready", chunks, chars} or
        {"status": "error", "error": why}."""
        try:
            if url is not None:
                data, kind = await self._fetch(url)
            text = extract_text(data or b"", kind or "txt")
            chunks = [c.text for c in chunk_text(text, self.chunk_words)]
            vectors = await self._embed(chunks)
            await asyncio.to_thread(self.chunks.put, document_id, chunks, vectors)
            self.index.put(document_id, vectors, chunks)
            return {"status": "ready", "chunks": len(chunks), "chars": len(text)}
        except (ValueError, TimeoutError) as exc:  # DocumentError, a refused URL, a cap passed, too slow
            return {"status": "error", "error": str(exc)[:300]}
        except Exception as exc:  # an unexpected failure must not leave the document `processing`
            log.warning("document %s: ingest failed: %s", document_id, type(exc).__name__)
            return {"status": "error", "error": "processing failed"}

    async def _fetch(self, url: str) -> tuple[bytes, str]:
        await outbound.check_destination(url, self.policy)
        async with outbound.client(self.policy) as http, asyncio.timeout(self.policy.deadline_s):
            async with http.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise DocumentError(f"fetching the document_url answered HTTP {resp.status_code}")
                limit = min(self.policy.max_bytes, MAX_DOCUMENT_BYTES)
                body = b"".join([c async for c in capped_chunks(resp, time.monotonic() + self.policy.deadline_s,
                                                                 limit)])
                return body, kind_of(resp.headers.get("content-type"), url, body)

    async def _embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), EMBED_BATCH):
            async with self._lock:
                out.append(await asyncio.to_thread(self.embedder.embed, texts[i:i + EMBED_BATCH]))
        return np.concatenate(out) if out else np.zeros((0, DIM), np.float32)

    async def forget(self, document_id: str) -> None:
        """A deleted document's chunks go, and it leaves the index at once (the ingress calls this on DELETE)."""
        self.index.drop(document_id)
        await asyncio.to_thread(self.chunks.delete, document_id)

    async def search(self, query: str, document_ids: list[str], k: int = 3, min_score: float = 0.25) -> list[Passage]:
        """The passages of `document_ids` nearest the words, best first (at most k, at least min_score)."""
        if not query.strip() or not document_ids:
            return []
        t0 = time.perf_counter()
        q = self.embedder.embed([query])[0]  # ~15 ms: inline, so a turn never queues behind an ingest's batches
        if self.chunks.pgvector:
            rows = await asyncio.to_thread(self.chunks.nearest, q, document_ids, k)
            found = [Passage(d, t, s) for d, t, s in rows]
        else:
            missing = [d for d in document_ids if d not in self.index]
            if missing:
                await asyncio.to_thread(self._load, missing)
            found = self.index.search(q, document_ids, k)
        self.search_ms.add((time.perf_counter() - t0) * 1000)
        return [p for p in found if p.score >= min_score]

    async def prepare(self, document_ids: list[str]) -> None:
        """A conversation over these documents starts: their index is loaded now, and the caller's handle
        knows this replica, instead of both at its first turn (whose passages wait at most ~0.5 s)."""
        missing = [d for d in document_ids if d not in self.index] if not self.chunks.pgvector else []
        if missing:
            await asyncio.to_thread(self._load, missing)

    def _load(self, document_ids: list[str]) -> None:
        for doc, (vectors, texts) in self.chunks.load(document_ids).items():
            self.index.put(doc, vectors, texts)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self.search_ms.stats()
