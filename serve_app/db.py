"""Persistence through SQLAlchemy: personas, replicas, conversations and transcripts.

SQLite file by default; set DATABASE_URL (e.g. postgresql+psycopg://...) for PostgreSQL.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:12]


class PersonaRow(Base):
    __tablename__ = "personas"
    persona_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    persona_name: Mapped[str] = mapped_column(String(200))
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class ConversationRow(Base):
    __tablename__ = "conversations"
    conversation_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversation_name: Mapped[str] = mapped_column(String(200), default="")
    persona_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    replica_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    meeting_token: Mapped[str] = mapped_column(String(64))
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[dict] = mapped_column(JSON)
    shutdown_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ReplicaRow(Base):
    __tablename__ = "replicas"
    replica_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica_name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="training")  # training | ready | error
    data: Mapped[dict] = mapped_column(JSON)  # head_path, psnr, frames, error, ...
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class TranscriptRow(Base):
    __tablename__ = "transcripts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.conversation_id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


def default_database_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PRESENCE_DB", os.path.join(root, "data", "presence.db"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


class Store:
    """Small repository over the tables; every call is its own transaction."""

    def __init__(self, url: str | None = None) -> None:
        url = url or default_database_url()
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    # One row by key, a page of rows, deleting a row: the same for every table.
    def _get(self, model: type[Base], key: str):
        with self.session() as s:
            return s.get(model, key)

    def _page(self, model: type[Base], limit: int, offset: int, order, where=None) -> tuple[list, int]:
        q, cq = select(model), select(func.count()).select_from(model)
        if where is not None:
            q, cq = q.where(where), cq.where(where)
        with self.session() as s:
            rows = s.scalars(q.order_by(order).limit(limit).offset(offset)).all()
            return list(rows), int(s.scalar(cq) or 0)

    def _delete(self, model: type[Base], key: str, children=None) -> bool:
        """Delete a row (and the rows of `children`, a select of them); False when there is none."""
        with self.session() as s, s.begin():
            row = s.get(model, key)
            if row is None:
                return False
            for child in s.scalars(children) if children is not None else ():
                s.delete(child)
            s.delete(row)
            return True

    # personas
    def add_persona(self, data: dict) -> PersonaRow:
        row = PersonaRow(persona_id=new_id("p"), persona_name=data.get("persona_name") or "", data=data)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_persona(self, persona_id: str) -> PersonaRow | None:
        return self._get(PersonaRow, persona_id)

    def list_personas(self, limit: int, offset: int) -> tuple[list[PersonaRow], int]:
        return self._page(PersonaRow, limit, offset, PersonaRow.created_at)

    def update_persona(self, persona_id: str, data: dict) -> PersonaRow | None:
        with self.session() as s, s.begin():
            row = s.get(PersonaRow, persona_id)
            if row is None:
                return None
            row.data = data
            row.persona_name = data.get("persona_name") or row.persona_name
            row.updated_at = time.time()
            return row

    def delete_persona(self, persona_id: str) -> bool:
        return self._delete(PersonaRow, persona_id)

    # replicas
    def add_replica(self, name: str, status: str = "training", data: dict | None = None,
                    replica_id: str | None = None) -> ReplicaRow:
        row = ReplicaRow(replica_id=replica_id or new_id("r"), replica_name=name, status=status, data=data or {})
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_replica(self, replica_id: str) -> ReplicaRow | None:
        return self._get(ReplicaRow, replica_id)

    def list_replicas(self, limit: int, offset: int) -> tuple[list[ReplicaRow], int]:
        return self._page(ReplicaRow, limit, offset, ReplicaRow.created_at)

    def update_replica(self, replica_id: str, status: str, **data: Any) -> ReplicaRow | None:
        with self.session() as s, s.begin():
            row = s.get(ReplicaRow, replica_id)
            if row is None:
                return None
            row.status = status
            row.data = {**(row.data or {}), **data}
            row.updated_at = time.time()
            return row

    def delete_replica(self, replica_id: str) -> bool:
        return self._delete(ReplicaRow, replica_id)

    # conversations
    def add_conversation(self, **fields: Any) -> ConversationRow:
        row = ConversationRow(conversation_id=new_id("c"), **fields)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_conversation(self, conversation_id: str) -> ConversationRow | None:
        return self._get(ConversationRow, conversation_id)

    def conversation_by_token(self, token: str) -> ConversationRow | None:
        with self.session() as s:
            return s.scalars(select(ConversationRow).where(ConversationRow.meeting_token == token)).first()

    def list_conversations(self, limit: int, offset: int, status: str | None = None) -> tuple[list[ConversationRow], int]:
        return self._page(ConversationRow, limit, offset, ConversationRow.created_at.desc(),
                          where=(ConversationRow.status == status) if status else None)

    def set_status(self, conversation_id: str, status: str, reason: str | None = None) -> None:
        with self.session() as s, s.begin():
            row = s.get(ConversationRow, conversation_id)
            if row is None:
                return
            row.status = status
            if reason and not row.shutdown_reason:
                row.shutdown_reason = reason
            if status == "ended" and row.ended_at is None:
                row.ended_at = time.time()

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._delete(ConversationRow, conversation_id,
                            children=select(TranscriptRow).where(TranscriptRow.conversation_id == conversation_id))

    # transcripts
    def add_utterance(self, conversation_id: str, role: str, content: str) -> None:
        with self.session() as s, s.begin():
            s.add(TranscriptRow(conversation_id=conversation_id, role=role, content=content))

    def transcript(self, conversation_id: str) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(TranscriptRow).where(TranscriptRow.conversation_id == conversation_id)
                             .order_by(TranscriptRow.id)).all()
            return [{"role": r.role, "content": r.content, "timestamp": r.created_at} for r in rows]
