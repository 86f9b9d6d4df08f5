"""The local vector index: exact cosine search over unit vectors with numpy, grouped by document so a
conversation searches only the documents it names. At a knowledge base's size (thousands of chunks)
one matrix product is a fraction of a millisecond; PostgreSQL deployments use pgvector instead."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Passage:
    document_id: str
    text: str
    score: float  # cosine similarity to the query


class VectorIndex:
    def __init__(self) -> None:
        self._docs: dict[str, tuple[np.ndarray, list[str]]] = {}

    def __contains__(self, document_id: str) -> bool:
        return document_id in self._docs

    def put(self, document_id: str, vectors: np.ndarray, texts: list[str]) -> None:
        if len(vectors) != len(texts):
            raise ValueError("one vector per text")
        self._docs[document_id] = (np.ascontiguousarray(vectors, dtype=np.float32), list(texts))

    def drop(self, document_id: str) -> None:
        self._docs.pop(document_id, None)

    def search(self, query: np.ndarray, document_ids: list[str], k: int = 3) -> list[Passage]:
        """The `k` passages of `document_ids` most similar to `query` (a unit vector), best first."""
        found: list[Passage] = []
        for doc in document_ids:
            if doc not in self._docs:
                continue
            vectors, texts = self._docs[doc]
            scores = vectors @ query
            for i in np.argsort(-scores)[:k]:
                found.append(Passage(doc, texts[i], float(scores[i])))
        return sorted(found, key=lambda p: -p.score)[:k]
