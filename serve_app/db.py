"""Persistence through SQLAlchemy: personas, replicas, conversations and transcripts.

SQLite file by default; set DATABASE_URL (e.g. postgresql+psycopg://...) for PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from deployments.common import database_engine, default_database_url


class Base(DeclarativeBase):
    pass


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:12]


DEFAULT_OWNER = "default"  # the owner of the keys an operator configures (and of rows from before owners)


class PersonaRow(Base):
    __tablename__ = "personas"
    persona_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    persona_name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(64), default=DEFAULT_OWNER, index=True)
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class ConversationRow(Base):
    __tablename__ = "conversations"
    conversation_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversation_name: Mapped[str] = mapped_column(String(200), default="")
    owner: Mapped[str] = mapped_column(String(64), default=DEFAULT_OWNER, index=True)
    persona_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    replica_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    meeting_token: Mapped[str] = mapped_column(String(64))
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    data: Mapped[dict] = mapped_column(JSON)
    shutdown_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    joined_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # set once, atomically, by the one join
    host_seen_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the hosting replica's last heartbeat


class ReplicaRow(Base):
    __tablename__ = "replicas"
    replica_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica_name: Mapped[str] = mapped_column(String(200), default="")
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None: shared (the stock head)
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


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, when it is made."""

    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[list] = mapped_column(JSON)  # subset of keys.SCOPES
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebhookRow(Base):
    """One webhook delivery waiting or done: the persisted queue the ingress's WebhookQueue drains."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(String(40), unique=True)  # the `webhook-id` header; stable over retries
    url: Mapped[str] = mapped_column(Text)
    endpoint: Mapped[str] = mapped_column(String(300), index=True)  # scheme://host:port, for per-endpoint limits
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class DocumentRow(Base):
    """A knowledge-base document: `processing` until chunked and embedded, then `ready` (or `error`, with why)."""

    __tablename__ = "documents"
    document_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    document_name: Mapped[str] = mapped_column(String(200), default="")
    owner: Mapped[str] = mapped_column(String(64), default=DEFAULT_OWNER, index=True)
    status: Mapped[str] = mapped_column(String(16), default="processing")
    tags: Mapped[list] = mapped_column(JSON, default=list)
    data: Mapped[dict] = mapped_column(JSON, default=dict)  # kind, source_url, callback_url, chunks, chars, error
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class MemoryRow(Base):
    """One fact a user stated about themselves, kept in a memory store across conversations."""

    __tablename__ = "memories"
    memory_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default=DEFAULT_OWNER, index=True)
    store: Mapped[str] = mapped_column(String(100), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # name, allergy, ... (models.memory)
    fact: Mapped[str] = mapped_column(Text)  # as the LLM reads it: "The user's name is Maria."
    conversation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class SettingRow(Base):
    """Deployment-wide values every ingress replica shares (the webhook signing secret)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# Columns added after the first release; `create_all` does not add columns to existing tables.
_ADDED_COLUMNS = {
    "personas": [("owner", f"VARCHAR(64) DEFAULT '{DEFAULT_OWNER}'")],
    "conversations": [("owner", f"VARCHAR(64) DEFAULT '{DEFAULT_OWNER}'"), ("joined_at", "FLOAT"),
                      ("host_seen_at", "FLOAT")],
    "replicas": [("owner", "VARCHAR(64)")],
}


class Store:
    """Small repository over the tables; every call is its own transaction."""

    def __init__(self, url: str | None = None) -> None:
        self.engine = database_engine(url or default_database_url())
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def _add_missing_columns(self) -> None:
        have = inspect(self.engine)
        with self.engine.begin() as conn:
            for table, columns in _ADDED_COLUMNS.items():
                present = {c["name"] for c in have.get_columns(table)}
                for name, ddl in columns:
                    if name not in present:
                        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))

    # One row by key, a page of rows, deleting a row: the same for every table. `owner` scopes each
    # to one tenant: a row of another owner reads as absent (a 404, never a 403 that confirms it exists).
    @staticmethod
    def _visible(model: type[Base], owner: str | None):
        if owner is None:  # internal callers (the session's event consumer, reconciliation)
            return None
        if model is ReplicaRow:
            return or_(ReplicaRow.owner == owner, ReplicaRow.owner.is_(None))
        return model.owner == owner

    def _get(self, model: type[Base], key: str, owner: str | None = None):
        q = select(model).where(inspect(model).primary_key[0] == key)
        visible = self._visible(model, owner)
        with self.session() as s:
            return s.scalars(q if visible is None else q.where(visible)).first()

    def _page(self, model: type[Base], limit: int, offset: int, order, where=None, owner: str | None = None) -> tuple[list, int]:
        q, cq = select(model), select(func.count()).select_from(model)
        for cond in (where, self._visible(model, owner)):
            if cond is not None:
                q, cq = q.where(cond), cq.where(cond)
        with self.session() as s:
            rows = s.scalars(q.order_by(order).limit(limit).offset(offset)).all()
            return list(rows), int(s.scalar(cq) or 0)

    def _delete(self, model: type[Base], key: str, children=None, owner: str | None = None) -> bool:
        """Delete a row (and first `children`, a DELETE of its child rows); False when there is none."""
        with self.session() as s, s.begin():
            row = s.get(model, key)
            if row is None or (owner is not None and row.owner != owner):
                return False
            if children is not None:  # one DELETE, before the row's (PostgreSQL's cascade would beat the ORM's)
                s.execute(children)
            s.delete(row)
            return True

    def _set_status(self, model: type[Base], key: str, status: str, data: dict[str, Any]):
        """A row's new status, with `data` merged into its data; None when there is no such row."""
        with self.session() as s, s.begin():
            row = s.get(model, key)
            if row is None:
                return None
            row.status = status
            row.data = {**(row.data or {}), **data}
            row.updated_at = time.time()
            return row

    # personas
    def add_persona(self, data: dict, owner: str = DEFAULT_OWNER) -> PersonaRow:
        row = PersonaRow(persona_id=new_id("p"), persona_name=data.get("persona_name") or "", data=data, owner=owner)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_persona(self, persona_id: str, owner: str | None = None) -> PersonaRow | None:
        return self._get(PersonaRow, persona_id, owner)

    def list_personas(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[PersonaRow], int]:
        return self._page(PersonaRow, limit, offset, PersonaRow.created_at, owner=owner)

    def update_persona(self, persona_id: str, data: dict) -> PersonaRow | None:
        with self.session() as s, s.begin():
            row = s.get(PersonaRow, persona_id)
            if row is None:
                return None
            row.data = data
            row.persona_name = data.get("persona_name") or row.persona_name
            row.updated_at = time.time()
            return row

    def delete_persona(self, persona_id: str, owner: str | None = None) -> bool:
        return self._delete(PersonaRow, persona_id, owner=owner)

    # replicas
    def add_replica(self, name: str, status: str = "training", data: dict | None = None,
                    replica_id: str | None = None, owner: str | None = None) -> ReplicaRow:
        row = ReplicaRow(replica_id=replica_id or new_id("r"), replica_name=name, status=status, data=data or {},
                         owner=owner)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_replica(self, replica_id: str, owner: str | None = None) -> ReplicaRow | None:
        return self._get(ReplicaRow, replica_id, owner)

    def list_replicas(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[ReplicaRow], int]:
        return self._page(ReplicaRow, limit, offset, ReplicaRow.created_at, owner=owner)

    def update_replica(self, replica_id: str, status: str, **data: Any) -> ReplicaRow | None:
        return self._set_status(ReplicaRow, replica_id, status, data)

    def delete_replica(self, replica_id: str, owner: str | None = None) -> bool:
        return self._delete(ReplicaRow, replica_id, owner=owner)

    # conversations
    def add_conversation(self, **fields: Any) -> ConversationRow:
        row = ConversationRow(conversation_id=new_id("c"), **fields)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_conversation(self, conversation_id: str, owner: str | None = None) -> ConversationRow | None:
        return self._get(ConversationRow, conversation_id, owner)

    def conversation_by_token(self, token: str) -> ConversationRow | None:
        with self.session() as s:
            return s.scalars(select(ConversationRow).where(ConversationRow.meeting_token == token)).first()

    def list_conversations(self, limit: int, offset: int, status: str | None = None,
                           owner: str | None = None) -> tuple[list[ConversationRow], int]:
        return self._page(ConversationRow, limit, offset, ConversationRow.created_at.desc(),
                          where=(ConversationRow.status == status) if status else None, owner=owner)

    def claim_join(self, conversation_id: str) -> bool:
        """Mark the conversation joined; True for exactly one caller (one UPDATE ... WHERE joined_at IS NULL)."""
        with self.session() as s, s.begin():
            done = s.execute(update(ConversationRow)
                             .where(ConversationRow.conversation_id == conversation_id,
                                    ConversationRow.status == "active", ConversationRow.joined_at.is_(None))
                             .values(joined_at=time.time()))
            return done.rowcount == 1

    def heartbeat(self, conversation_ids: list[str], now: float) -> list[str]:
        """A SessionHost's live sessions are alive at `now`. Returns those whose row was ended meanwhile
        (POST /end on any ingress replica, or reconciliation): the host shuts them down."""
        if not conversation_ids:
            return []
        mine = ConversationRow.conversation_id.in_(conversation_ids)
        with self.session() as s, s.begin():
            s.execute(update(ConversationRow).where(mine).values(host_seen_at=now))
            status = dict(s.execute(select(ConversationRow.conversation_id, ConversationRow.status).where(mine)).all())
        return [cid for cid in conversation_ids if status.get(cid) != "active"]  # ended, or deleted

    def _holding(self, now: float, stale_s: float):
        """Active conversations a host holds (a fresh heartbeat, or joined so recently it has not beaten yet)."""
        return (ConversationRow.status == "active") & ConversationRow.joined_at.is_not(None) & (
            (ConversationRow.host_seen_at > now - stale_s) | (ConversationRow.joined_at > now - stale_s))

    def live_count(self, now: float, stale_s: float) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ConversationRow).where(self._holding(now, stale_s))) or 0)

    def slots_in_use(self, now: float, stale_s: float, join_window_s: float) -> int:
        """Live sessions plus conversations created within the join window that have not joined yet:
        the same count on every ingress replica, and after a restart."""
        waiting = ((ConversationRow.status == "active") & ConversationRow.joined_at.is_(None)
                   & (ConversationRow.created_at > now - join_window_s))
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(ConversationRow)
                                .where(self._holding(now, stale_s) | waiting)) or 0)

    def lost_conversations(self, now: float, stale_s: float) -> list[ConversationRow]:
        """Active conversations nobody holds: joined, with no heartbeat for `stale_s`; or never joined
        within their `participant_absent_timeout`."""
        with self.session() as s:
            rows = s.scalars(select(ConversationRow).where(ConversationRow.status == "active")).all()
        lost = []
        for row in rows:
            if row.joined_at is not None:
                if max(row.host_seen_at or 0, row.joined_at) < now - stale_s:
                    lost.append(row)
            elif row.created_at < now - float((row.data.get("properties") or {}).get("participant_absent_timeout", 300)):
                lost.append(row)
        return lost

    def release_join(self, conversation_id: str) -> None:
        """A join that did not start a session (no host answered): the conversation may be joined again."""
        with self.session() as s, s.begin():
            s.execute(update(ConversationRow).where(ConversationRow.conversation_id == conversation_id)
                      .values(joined_at=None, host_seen_at=None))

    def set_conversation_data(self, conversation_id: str, **fields: Any) -> None:
        with self.session() as s, s.begin():
            row = s.get(ConversationRow, conversation_id)
            if row is not None:
                row.data = {**(row.data or {}), **fields}

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
                            children=delete(TranscriptRow).where(TranscriptRow.conversation_id == conversation_id))

    # transcripts
    def add_utterance(self, conversation_id: str, role: str, content: str) -> None:
        with self.session() as s, s.begin():
            s.add(TranscriptRow(conversation_id=conversation_id, role=role, content=content))

    def transcript(self, conversation_id: str) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(select(TranscriptRow).where(TranscriptRow.conversation_id == conversation_id)
                             .order_by(TranscriptRow.id)).all()
            return [{"role": r.role, "content": r.content, "timestamp": r.created_at} for r in rows]

    # API keys
    def add_key(self, key_hash: str, owner: str, scopes: list[str], name: str = "",
                expires_at: float | None = None, key_id: str | None = None) -> ApiKeyRow:
        row = ApiKeyRow(key_id=key_id or new_id("k"), key_hash=key_hash, owner=owner, scopes=scopes, name=name,
                        expires_at=expires_at)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def key_by_hash(self, key_hash: str) -> ApiKeyRow | None:
        with self.session() as s:
            return s.scalars(select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash)).first()

    def get_key(self, key_id: str) -> ApiKeyRow | None:
        return self._get(ApiKeyRow, key_id)

    def list_keys(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[ApiKeyRow], int]:
        return self._page(ApiKeyRow, limit, offset, ApiKeyRow.created_at, owner=owner)

    def revoke_key(self, key_id: str) -> ApiKeyRow | None:
        with self.session() as s, s.begin():
            row = s.get(ApiKeyRow, key_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = time.time()
            return row

    # webhook queue
    def queue_webhook(self, webhook_id: str, url: str, endpoint: str, body: str) -> None:
        with self.session() as s, s.begin():
            s.add(WebhookRow(webhook_id=webhook_id, url=url, endpoint=endpoint, body=body))

    def due_webhooks(self, now: float, limit: int = 100) -> list[WebhookRow]:
        with self.session() as s:
            return list(s.scalars(select(WebhookRow).where(WebhookRow.status == "pending", WebhookRow.next_at <= now)
                                  .order_by(WebhookRow.id).limit(limit)).all())

    def claim_webhook(self, row_id: int, seen_next_at: float, lease_until: float) -> bool:
        """Lease a due delivery to this replica; True for exactly one claimant."""
        with self.session() as s, s.begin():
            done = s.execute(update(WebhookRow).where(WebhookRow.id == row_id, WebhookRow.status == "pending",
                                                      WebhookRow.next_at == seen_next_at)
                             .values(next_at=lease_until))
            return done.rowcount == 1

    def webhook_done(self, row_id: int, status: str, attempts: int, next_at: float, error: str | None = None) -> None:
        with self.session() as s, s.begin():
            row = s.get(WebhookRow, row_id)
            if row is not None:
                row.status, row.attempts, row.next_at, row.last_error = status, attempts, next_at, error

    def webhooks(self, status: str | None = None) -> list[WebhookRow]:
        with self.session() as s:
            q = select(WebhookRow).order_by(WebhookRow.id)
            return list(s.scalars(q.where(WebhookRow.status == status) if status else q).all())

    # knowledge-base documents
    def add_document(self, name: str, tags: list[str], data: dict, owner: str = DEFAULT_OWNER) -> DocumentRow:
        row = DocumentRow(document_id=new_id("d"), document_name=name, tags=tags, data=data, owner=owner)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def get_document(self, document_id: str, owner: str | None = None) -> DocumentRow | None:
        return self._get(DocumentRow, document_id, owner)

    def list_documents(self, limit: int, offset: int, owner: str | None = None) -> tuple[list[DocumentRow], int]:
        return self._page(DocumentRow, limit, offset, DocumentRow.created_at, owner=owner)

    def update_document(self, document_id: str, status: str, **data: Any) -> DocumentRow | None:
        return self._set_status(DocumentRow, document_id, status, data)

    def delete_document(self, document_id: str, owner: str | None = None) -> bool:
        return self._delete(DocumentRow, document_id, owner=owner)  # its chunks: deployments.knowledge.forget

    def stale_documents(self, before: float) -> list[str]:
        """Documents still `processing` since before `before`: their ingest was lost (an ingress restart)."""
        with self.session() as s:
            return list(s.scalars(select(DocumentRow.document_id).where(DocumentRow.status == "processing",
                                                                         DocumentRow.updated_at < before)).all())

    def documents_visible(self, ids: list[str], tags: list[str], owner: str | None) -> tuple[list[str], list[str]]:
        """(the ids among `ids` that exist for `owner`, plus the ids of its documents with any of `tags`;
        the ids that do not exist)."""
        with self.session() as s:
            q = select(DocumentRow.document_id, DocumentRow.tags)
            if owner is not None:
                q = q.where(DocumentRow.owner == owner)
            rows = s.execute(q.where(DocumentRow.document_id.in_(ids)) if not tags else q).all()
        have = {r[0] for r in rows}
        found = [i for i in ids if i in have]
        found += [r[0] for r in rows if r[0] not in found and set(r[1] or ()) & set(tags)]
        return found, [i for i in ids if i not in have]

    # memory stores
    def add_memories(self, owner: str, store: str, conversation_id: str | None, facts: list[tuple[str, str]]) -> None:
        """Facts (kind, text) into a store; a newer fact of a single-valued kind replaces the old one."""
        from models.memory import SINGLE_VALUED

        with self.session() as s, s.begin():
            for kind, fact in facts:
                mine = (MemoryRow.owner == owner) & (MemoryRow.store == store)
                if kind in SINGLE_VALUED:
                    s.execute(delete(MemoryRow).where(mine & (MemoryRow.kind == kind)))
                elif s.scalars(select(MemoryRow).where(mine & (MemoryRow.fact == fact))).first() is not None:
                    continue
                s.add(MemoryRow(memory_id=new_id("m"), owner=owner, store=store, kind=kind, fact=fact,
                                conversation_id=conversation_id))

    def memories(self, owner: str, store: str) -> list[MemoryRow]:
        with self.session() as s:
            return list(s.scalars(select(MemoryRow).where(MemoryRow.owner == owner, MemoryRow.store == store)
                                  .order_by(MemoryRow.created_at, MemoryRow.memory_id)).all())

    def memory_stores(self, owner: str) -> list[tuple[str, int]]:
        with self.session() as s:
            return [(r[0], int(r[1])) for r in s.execute(
                select(MemoryRow.store, func.count()).where(MemoryRow.owner == owner).group_by(MemoryRow.store)
                .order_by(MemoryRow.store)).all()]

    def delete_memories(self, owner: str, store: str, memory_id: str | None = None) -> int:
        """Delete a store's memories (or one of them); the number deleted."""
        cond = (MemoryRow.owner == owner) & (MemoryRow.store == store)
        if memory_id is not None:
            cond = cond & (MemoryRow.memory_id == memory_id)
        with self.session() as s, s.begin():
            return s.execute(delete(MemoryRow).where(cond)).rowcount or 0

    # settings
    def setting(self, key: str, make) -> str:
        """The shared value of `key`, made by `make()` and stored the first time (first writer wins)."""
        with self.session() as s:
            row = s.get(SettingRow, key)
        if row is not None:
            return row.value
        try:
            with self.session() as s, s.begin():
                s.add(SettingRow(key=key, value=make()))
        except Exception:  # another replica stored it first
            pass
        with self.session() as s:
            return s.get(SettingRow, key).value
