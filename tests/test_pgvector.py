"""The knowledge base on PostgreSQL with pgvector (#15): a real server (PostgreSQL 16 with the pgvector
extension, from the `pgserver` wheel, started in a temporary directory) under the Knowledge deployment's
own class, run without Ray. The documents, the questions and the embedding model are the real ones of
`benchmarks/knowledge_eval.py`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sqlalchemy import text

from benchmarks.knowledge_docs import QUESTIONS, documents


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="delete")
    yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    server.cleanup()


def test_documents_are_searched_by_pgvector_as_by_the_local_index(postgres_url):
    from deployments.knowledge import Knowledge
    from models.documents import kind_of
    from models.vector_index import VectorIndex

    kb = Knowledge.func_or_class(postgres_url)
    assert kb.chunks.pgvector
    docs = {f"d-{source}": source for source in documents()}
    for doc, source in docs.items():
        name, data, content_type = documents()[source]
        out = asyncio.run(kb.ingest(doc, data, kind_of(content_type, name, data)))
        assert out["status"] == "ready" and out["chunks"] > 3, out
    with kb.chunks.engine.connect() as conn:
        assert conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
        index = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'document_chunks_embedding'")).scalar()
        assert "hnsw" in index and "vector_cosine_ops" in index
        stored = conn.execute(text("SELECT count(*), count(embedding) FROM document_chunks")).one()
    assert stored[0] == stored[1] > 10  # every chunk has its vector column

    # The database's cosine search ranks as the numpy index over the same stored bytes.
    local = VectorIndex()
    for doc, (vectors, texts) in kb.chunks.load(list(docs)).items():
        local.put(doc, vectors, texts)
    right = 0
    for q in QUESTIONS:
        found = asyncio.run(kb.search(q.text, list(docs), k=3, min_score=-1.0))
        expected = local.search(kb.embedder.embed([q.text])[0], list(docs), 3)
        assert [p.text for p in found] == [p.text for p in expected], q.text
        assert np.allclose([p.score for p in found], [p.score for p in expected], atol=1e-4)
        right += any(docs[p.document_id] == q.source for p in found)
    assert right >= 0.9 * len(QUESTIONS)

    # A deleted document is gone from the table and from every search.
    asyncio.run(kb.forget("d-prices"))
    with kb.chunks.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM document_chunks WHERE document_id = 'd-prices'")).scalar() == 0
    for q in QUESTIONS[:10]:
        found = asyncio.run(kb.search(q.text, list(docs), k=3, min_score=-1.0))
        assert found and all(p.document_id != "d-prices" for p in found)


def test_the_platform_store_runs_on_postgresql(postgres_url):
    """DATABASE_URL=postgresql+psycopg://...: the ingress's tables and the queries the API, the session
    host's heartbeat, the webhook queue and memory stores make, on the same real server."""
    import time

    from serve_app.db import Store

    store = Store(postgres_url)
    persona = store.add_persona({"persona_name": "Maya", "system_prompt": "Be brief."}, owner="o1")
    assert store.get_persona(persona.persona_id, owner="o1").data["system_prompt"] == "Be brief."
    assert store.get_persona(persona.persona_id, owner="o2") is None
    conv = store.add_conversation(persona_id=persona.persona_id, meeting_token="tok", data={"properties": {}},
                                  owner="o1")
    assert store.conversation_by_token("tok").conversation_id == conv.conversation_id
    assert store.claim_join(conv.conversation_id) and not store.claim_join(conv.conversation_id)
    now = time.time()
    assert store.heartbeat([conv.conversation_id], now) == []
    assert store.live_count(now, 10.0) == 1 and store.slots_in_use(now, 10.0, 30.0) == 1
    store.add_utterance(conv.conversation_id, "user", "Hello?")
    store.add_utterance(conv.conversation_id, "replica", "Hi, how can I help?")
    assert [u["role"] for u in store.transcript(conv.conversation_id)] == ["user", "replica"]
    store.set_status(conv.conversation_id, "ended", "participant_left")
    assert store.heartbeat([conv.conversation_id], now) == [conv.conversation_id]
    rows, total = store.list_conversations(10, 0, owner="o1")
    assert total == 1 and rows[0].shutdown_reason == "participant_left" and rows[0].ended_at

    doc = store.add_document("prices.md", ["pricing"], {"status": "processing"}, owner="o1")
    store.update_document(doc.document_id, "ready", chunks=7)
    assert store.get_document(doc.document_id, owner="o1").data["chunks"] == 7
    assert store.documents_visible(["d-nope"], ["pricing"], "o1") == ([doc.document_id], ["d-nope"])

    store.add_memories("o1", "maria", conv.conversation_id, [("name", "My name is Maria."),
                                                             ("allergy", "I am allergic to penicillin.")])
    store.add_memories("o1", "maria", None, [("name", "My name is Maria Lopez.")])  # a newer name replaces
    assert sorted(m.fact for m in store.memories("o1", "maria")) == ["I am allergic to penicillin.",
                                                                     "My name is Maria Lopez."]
    assert store.memory_stores("o1") == [("maria", 2)] and store.memory_stores("o2") == []
    assert store.delete_memories("o1", "maria") == 2 and store.memories("o1", "maria") == []

    store.queue_webhook("w1", "https://example.invalid/hook", "example.invalid", '{"event": "x"}')
    due = store.due_webhooks(time.time() + 1)
    assert len(due) == 1 and store.claim_webhook(due[0].id, due[0].next_at, time.time() + 30)
    store.webhook_done(due[0].id, "delivered", 1, 0.0)
    assert [w.status for w in store.webhooks()] == ["delivered"]
    assert store.delete_conversation(conv.conversation_id) and store.transcript(conv.conversation_id) == []
