"""Where the knowledge base's embedded chunks live: a `document_chunks` table in the platform's database
(the ingress's DATABASE_URL). On PostgreSQL with the pgvector extension the vectors are also a
`vector(384)` column with an HNSW index, and search is `ORDER BY embedding <=> query`; elsewhere
(SQLite) the float32 bytes are loaded into the local index (models.vector_index)."""

from __future__ import annotations

import numpy as np
from sqlalchemy import Integer, LargeBinary, String, Text, delete, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from deployments.common import database_engine
from models.embed import DIM


class _Base(DeclarativeBase):
    pass


class ChunkRow(_Base):
    __tablename__ = "document_chunks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[str] = mapped_column(String(32), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, DIM values, unit length


def pg_vector(v: np.ndarray) -> str:
    """A vector in pgvector's text form, '[0.1,0.2,...]'."""
    return "[" + ",".join(f"{x:.7g}" for x in v) + "]"


class ChunkStore:
    def __init__(self, database_url: str) -> None:
        self.engine = database_engine(database_url)
        _Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.pgvector = self.engine.dialect.name == "postgresql" and self._enable_pgvector()

    def _enable_pgvector(self) -> bool:
        try:
            with self.engine.begin() as conn:
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
                conn.execute(text(f"ALTER TABLE document_chunks ADD COLUMN IF NOT EXISTS embedding vector({DIM})"))
                conn.execute(text("CREATE INDEX IF NOT EXISTS document_chunks_embedding ON document_chunks "
                                  "USING hnsw (embedding vector_cosine_ops)"))
            return True
        except Exception:  # the server has no pgvector: the local index over the stored bytes
            return False

    def put(self, document_id: str, texts: list[str], vectors: np.ndarray) -> None:
        """Replace a document's chunks."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._session() as s, s.begin():
            s.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
            s.add_all(ChunkRow(document_id=document_id, idx=i, text=t, vector=vectors[i].tobytes())
                      for i, t in enumerate(texts))
        if self.pgvector:
            with self.engine.begin() as conn:
                conn.execute(text("UPDATE document_chunks SET embedding = CAST(:v AS vector) "
                                  "WHERE document_id = :d AND idx = :i"),
                             [{"d": document_id, "i": i, "v": pg_vector(v)} for i, v in enumerate(vectors)])

    def load(self, document_ids: list[str]) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Each document's (vectors, texts), in chunk order."""
        out: dict[str, tuple[list, list]] = {}
        with self._session() as s:
            rows = s.scalars(select(ChunkRow).where(ChunkRow.document_id.in_(document_ids))
                             .order_by(ChunkRow.document_id, ChunkRow.idx)).all()
        for r in rows:
            vecs, texts = out.setdefault(r.document_id, ([], []))
            vecs.append(np.frombuffer(r.vector, dtype=np.float32))
            texts.append(r.text)
        return {d: (np.stack(v), t) for d, (v, t) in out.items()}

    def nearest(self, query: np.ndarray, document_ids: list[str], k: int) -> list[tuple[str, str, float]]:
        """pgvector: the k chunks nearest `query` by cosine, as (document_id, text, similarity)."""
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT document_id, text, 1 - (embedding <=> CAST(:q AS vector)) FROM document_chunks "
                "WHERE document_id = ANY(:ids) ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k"),
                {"q": pg_vector(query), "ids": list(document_ids), "k": k}).all()
        return [(r[0], r[1], float(r[2])) for r in rows]

    def delete(self, document_id: str) -> None:
        with self._session() as s, s.begin():
            s.execute(delete(ChunkRow).where(ChunkRow.document_id == document_id))
