"""JSON shapes of the API's rows (secrets masked, internal fields left out)."""

from __future__ import annotations

from serve_app.db import ConversationRow, DocumentRow, MemoryRow, PersonaRow, ReplicaRow


def persona_json(row: PersonaRow) -> dict:
    data = dict(row.data)
    layers = data.get("layers") or {}
    if (layers.get("llm") or {}).get("api_key"):
        layers = {**layers, "llm": {**layers["llm"], "api_key": "***"}}  # never echo secrets
    return {"persona_id": row.persona_id, **data, "layers": layers,
            "created_at": row.created_at, "updated_at": row.updated_at}


def replica_json(row: ReplicaRow) -> dict:
    data = {k: v for k, v in (row.data or {}).items() if k != "head_path"}
    return {"replica_id": row.replica_id, "replica_name": row.replica_name, "status": row.status,
            "created_at": row.created_at, "updated_at": row.updated_at, **data}


def conversation_json(row: ConversationRow, base_url: str, with_token: bool = False) -> dict:
    out = {
        "conversation_id": row.conversation_id, "conversation_name": row.conversation_name,
        "status": row.status, "conversation_url": f"{base_url}/c/{row.conversation_id}",
        "replica_id": row.replica_id, "persona_id": row.persona_id, "callback_url": row.callback_url,
        "created_at": row.created_at, "ended_at": row.ended_at, "shutdown_reason": row.shutdown_reason,
        "properties": row.data.get("properties", {}),
    }
    if with_token:  # only the create response carries the join token
        out["meeting_token"] = row.meeting_token
        out["conversation_url"] += f"#t={row.meeting_token}"
    return out


def document_json(row: DocumentRow) -> dict:
    data = row.data or {}
    return {"document_id": row.document_id, "document_name": row.document_name, "status": row.status,
            "tags": row.tags or [], "document_url": data.get("source_url"), "callback_url": data.get("callback_url"),
            "kind": data.get("kind"), "chunks": data.get("chunks"), "error": data.get("error"),
            "created_at": row.created_at, "updated_at": row.updated_at}


def memory_json(row: MemoryRow) -> dict:
    return {"memory_id": row.memory_id, "kind": row.kind, "memory": row.fact, "conversation_id": row.conversation_id,
            "created_at": row.created_at}
