"""REST ingress (FastAPI on Serve): personas, conversations, WebRTC signalling, web client, metrics."""


import asyncio
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from pydantic import BaseModel, ValidationError
from ray import serve
from swagger_ui_bundle import swagger_ui_path

from deployments.knowledge import MAX_DOCUMENT_BYTES
from deployments.outbound import OutboundPolicy, check_destination
from models.documents import DocumentError, kind_of
from models.media import IMAGE_TYPES, VIDEO_TYPES
from serve_app import guard, ledger, metrics
from serve_app.db import ConversationRow, PersonaRow, ReplicaRow, Store
from serve_app.events import ShutdownReason
from serve_app.heads import HeadFiles
from serve_app.keys import KeyRing, Principal, ensure_configured_keys, hash_key, key_json, make_key
from serve_app.live import LiveSessions
from serve_app.schemas import (
    DEFAULT_PERSONA,
    OPERATOR_GRANTS,
    ConversationIn,
    ConversationProperties,
    DocumentFields,
    DocumentURLIn,
    KeyIn,
    OfferJSON,
    OperatorTokenIn,
    PersonaIn,
    PersonaPatch,
)
from serve_app.session import SessionSpec
from serve_app.views import conversation_json, document_json, memory_json, persona_json, replica_json
from serve_app.webhooks import WebhookQueue, new_secret, queue_webhook

log = logging.getLogger("presence.api")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # 1 MiB: no JSON body or SDP offer is anywhere near this
MAX_UPLOAD = 50 << 20  # replica training media (POST /v2/replicas)
MAX_PAGE = 100_000  # paging beyond this is a client bug (and once overflowed SQLite's integer: a 500)
STOCK_REPLICA = "r-stock"


class ErrorBody(BaseModel):
    detail: str | list | dict


_WHY = {400: "Malformed request", 401: "Missing or invalid credentials", 403: "The key's scope does not allow this",
        404: "Not found (or not this key's owner's)", 409: "Conflicts with the resource's state",
        413: "Body too large", 415: "Unsupported media type", 422: "Invalid body or parameters",
        503: "At capacity (Retry-After) or the stage is not deployed"}


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses a route returns (401 and 413 come from the guard, 400
    from FastAPI for a body it cannot decode at all)."""
    return {c: {"model": ErrorBody, "description": _WHY[c]} for c in sorted({400, 401, 413, 422, *codes})}


def linked(kind: str, id_field: str, *operations: str) -> dict:
    """An OpenAPI 200 response with links from the created row's id to the operations that take it
    (clients and stateful fuzzers follow them)."""
    return {200: {"description": f"The {kind}", "links": {
        op: {"operationId": op, "parameters": {id_field: f"$response.body#/{id_field}"}} for op in operations}}}


def _body_limit(method: str, path: str) -> int:
    if method == "POST" and path.rstrip("/") == "/v2/replicas":
        return MAX_UPLOAD
    if method == "POST" and path.rstrip("/") == "/v2/documents":
        return MAX_DOCUMENT_BYTES
    return MAX_BODY


app = FastAPI(title="Presence", version="0.1.0", docs_url=None, redoc_url=None,
              description="Real-time AI humans: conversations, personas and replicas over WebRTC. "
                          "Authenticate with the `x-api-key` header.")
app.mount("/static", StaticFiles(directory=STATIC), name="static")
app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger")  # no CDN
app.add_middleware(guard.RequestGuard, body_limit=_body_limit)

_api_key = APIKeyHeader(name="x-api-key", auto_error=False, description="An API key (`python -m serve_app.keys`)")


def key_holder(request: Request) -> Principal | None:
    """The API key's principal, set by the guard (which refused a bad key with 401); None on a
    token route called without a key."""
    return request.scope.get("state", {}).get("principal")


def principal(request: Request, _key: str | None = Depends(_api_key)) -> Principal:
    """Who is calling, on routes that take only an API key (every key may read)."""
    who = key_holder(request)
    if who is None:
        raise HTTPException(401, "missing or invalid x-api-key")
    return who


def operator(who: Principal = Depends(principal)) -> Principal:
    if not who.can("operator"):
        raise HTTPException(403, "this key is read-only")
    return who


def admin(who: Principal = Depends(principal)) -> Principal:
    if not who.can("admin"):
        raise HTTPException(403, "managing keys needs an admin key")
    return who


def _token_matches(token: str, expected: str | None) -> bool:
    # Bytes, not str: compare_digest raises on non-ASCII str (a 500 before).
    return bool(token and expected) and secrets.compare_digest(token.encode("utf-8", "surrogateescape"),
                                                               expected.encode())


def _bearer(authorization: str | None) -> str:
    return (authorization or "").removeprefix("Bearer ").strip()


async def read_training_upload(request: Request, trainer) -> tuple[bytes, str, str, dict]:
    """POST /v2/replicas' multipart body, checked: (data, media type, replica name, probe). The
    trainer probes the file (the ingress never decodes an upload); the guard capped the body."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise HTTPException(415, "send multipart/form-data with a train_video (video or photo) field")
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
    except HTTPException:
        raise
    except Exception as exc:  # a malformed multipart body
        raise HTTPException(400, "malformed multipart body") from exc
    upload = form.get("train_video") or form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "missing file field train_video")
    data = await upload.read()
    if len(data) > MAX_UPLOAD:
        raise HTTPException(413, f"file larger than {MAX_UPLOAD} bytes")
    media_type = (upload.content_type or "").lower()
    if media_type not in IMAGE_TYPES | VIDEO_TYPES:
        raise HTTPException(415, f"unsupported media type {media_type!r}: use one of "
                                 f"{sorted(IMAGE_TYPES | VIDEO_TYPES)}")
    probe = await trainer.probe.remote(data, media_type)
    if not probe.pop("ok"):
        raise HTTPException(422, probe["error"])
    return data, media_type, str(form.get("replica_name") or "")[:200], probe


async def record_fit(store: Store, replica_id: str, response) -> None:
    """Record the trainer's outcome; if the trainer itself dies, the replica must not stay
    `training` forever. A replica deleted meanwhile stays deleted."""
    try:
        result = dict(await response)
    except Exception as exc:
        log.warning("replica %s: training failed: %s", replica_id, type(exc).__name__)
        result = {"status": "error", "error": "training failed"}
    row = await asyncio.to_thread(store.get_replica, replica_id)
    if row is not None and row.status == "training":
        await asyncio.to_thread(lambda: store.update_replica(replica_id, result.pop("status"), **result))


def _db(fn, *args, **kwargs):
    """Database work off the ingress's event loop (SQLAlchemy here is synchronous)."""
    return asyncio.to_thread(fn, *args, **kwargs)


# Helpers the class calls are defined above it: Serve pickles the ingress class by value.
@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, session_host, trainer=None, knowledge=None, api_keys: list[str] | None = None, max_sessions: int = 2,
                 ice_servers: list[dict] | None = None, public_url: str | None = None,
                 database_url: str | None = None, answer_timeout_s: float = 30.0, join_window_s: float = 60.0,
                 head_gaussians: int = 20000, outbound_policy: dict | None = None, webhook_secret: str | None = None,
                 webhook_per_endpoint: int = 1) -> None:
        """`outbound_policy`: deployments.outbound (the profile's `outbound`); `webhook_secret`: the
        `whsec_...` deliveries are signed with (PRESENCE_WEBHOOK_SECRET; else one is made and kept
        in the database, GET /v2/webhooks/secret shows it to an admin key); `webhook_per_endpoint`:
        deliveries in flight per endpoint (1 keeps each endpoint's events in order)."""
        keys = api_keys or [k for k in os.environ.get("PRESENCE_API_KEYS", "").split(",") if k]
        if not keys:
            raise ValueError("no API keys configured: set PRESENCE_API_KEYS or the ingress's api_keys")
        self.ice_servers = ice_servers or []
        self.public_url = public_url
        self.store = Store(database_url)
        ensure_configured_keys(self.store, keys)
        self.keyring = KeyRing(self.store)
        guard.set_authenticator(self._authenticate)
        self.trainer = trainer
        self.knowledge = knowledge  # deployments.knowledge (None: no knowledge base deployed)
        self._training: set[asyncio.Task] = set()  # in-flight fits and ingests (referenced until they finish)
        self.heads = HeadFiles(head_gaussians)
        if self.store.get_replica(STOCK_REPLICA) is None:
            self.store.add_replica("Stock", status="ready", data={"stock": True}, replica_id=STOCK_REPLICA)
        self.policy = OutboundPolicy.from_config(outbound_policy)
        secret = webhook_secret or os.environ.get("PRESENCE_WEBHOOK_SECRET") or self.store.setting("webhook_secret", new_secret)
        self.webhooks = WebhookQueue(self.store, secret, self.policy, per_endpoint=webhook_per_endpoint)
        # Admission happens at POST /v2/conversations (a slot is reserved), not later at the offer.
        self.sessions = LiveSessions(session_host, self.store, max_sessions, join_window_s, answer_timeout_s,
                                     self.webhooks)
        # Conversations no host holds any more (this ingress died with them, or their host did) end now.
        ledger.end_lost(self.store)
        self._end_stale_documents()
        self._reconciled_at = time.monotonic()
        self._delivery: asyncio.Task | None = None  # the webhook queue's loop
        try:
            asyncio.get_running_loop()
            self._start_delivery()
        except RuntimeError:  # constructed off the loop: the first health check starts it
            pass

    def _start_delivery(self) -> None:
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.ensure_future(self.webhooks.run())

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it also (re)starts the webhook queue's loop and runs
        reconciliation (conversations whose host stopped beating end with a reason)."""
        self._start_delivery()
        if time.monotonic() - self._reconciled_at > ledger.STALE_S / 3:
            self._reconciled_at = time.monotonic()
            try:
                if await asyncio.to_thread(ledger.end_lost, self.store):
                    self.webhooks.wake()
            except Exception as exc:  # reconciliation retries at the next health check
                log.warning("reconciliation failed: %s", type(exc).__name__)

    def _end_stale_documents(self) -> None:
        """Documents whose ingest was lost with an earlier ingress (processing for over 10 minutes) end in error."""
        for document_id in self.store.stale_documents(time.time() - 600):
            self.store.update_document(document_id, "error", error="processing was interrupted; upload it again")

    async def _check_destination(self, url: object | None, what: str, base_url: bool = False) -> None:
        """422 with the reason if the outbound policy would refuse `url` (None: nothing to check)."""
        if url is None:
            return
        try:
            await check_destination(str(url), self.policy, base_url=base_url)
        except ValueError as exc:
            raise HTTPException(422, f"{what}: {exc}") from exc

    async def _documents(self, ids: list[str], tags: list[str], owner: str | None) -> list[str]:
        """The documents `ids` and `tags` name, for `owner`; 422 naming an unknown id."""
        if not ids and not tags:
            return []
        found, missing = await _db(self.store.documents_visible, ids, tags, owner)
        if missing:
            raise HTTPException(422, f"unknown document_id {missing[0]}")
        return found

    async def _check_persona_urls(self, persona: PersonaIn) -> None:
        """The persona's LLM endpoint and tool delivery URLs must pass the outbound policy."""
        await self._check_destination(persona.layers.llm.base_url, "layers.llm.base_url", base_url=True)
        for i, tool in enumerate(persona.layers.llm.tools):
            if tool.delivery is not None:
                await self._check_destination(tool.delivery.url, f"layers.llm.tools[{i}].delivery.url")

    async def _authenticate(self, key: str) -> Principal | None:
        return await _db(self.keyring.lookup, key)

    # --- helpers ---------------------------------------------------------------------------------------
    def _base(self, request: Request) -> str:
        return (self.public_url or str(request.base_url)).rstrip("/")

    @staticmethod
    def _found(row, kind: str, key: str):
        """`row`, or a 404 naming what was not found."""
        if row is None:
            raise HTTPException(404, f"{kind} {key} not found")
        return row

    async def _conversation(self, conversation_id: str, who: Principal | None) -> ConversationRow:
        row = await _db(self.store.get_conversation, conversation_id, who.owner if who else None)
        return self._found(row, "conversation", conversation_id)

    async def _persona(self, persona_id: str, who: Principal | None) -> PersonaRow:
        row = await _db(self.store.get_persona, persona_id, who.owner if who else None)
        return self._found(row, "persona", persona_id)

    async def _replica(self, replica_id: str, who: Principal | None) -> ReplicaRow:
        row = await _db(self.store.get_replica, replica_id, who.owner if who else None)
        return self._found(row, "replica", replica_id)

    async def _ready_replica(self, replica_id: str, who: Principal | None) -> ReplicaRow:
        row = await self._replica(replica_id, who)
        if row.status != "ready":
            raise HTTPException(409, f"replica {replica_id} is {row.status}, not ready")
        return row

    async def _persona_model(self, persona_id: str | None, who: Principal | None) -> PersonaIn:
        """The conversation's persona, typed (rows were validated when written)."""
        if persona_id is None:
            return DEFAULT_PERSONA
        return PersonaIn.model_validate((await self._persona(persona_id, who)).data)

    # --- web client ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @app.get("/c/{conversation_id}", include_in_schema=False)
    async def join_page(self, conversation_id: str):
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Presence API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/healthz", include_in_schema=False)
    async def healthz(self):
        return {"ok": True, "live_sessions": await self.sessions.live_count(), "max_sessions": self.sessions.max_sessions}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(self):
        return PlainTextResponse(generate_latest(metrics.REGISTRY).decode(), media_type="text/plain; version=0.0.4")

    # --- API keys --------------------------------------------------------------------------------------
    @app.post("/v2/keys", status_code=200, responses=errors(403))
    async def create_key(self, body: KeyIn, who: Principal = Depends(admin)):
        """Make a key for an owner (admin keys only). The key is in this response and nowhere else."""
        expires = time.time() + body.expires_in_days * 86400 if body.expires_in_days else None
        key, row = await _db(make_key, self.store, body.owner, list(body.scopes), body.name, expires)
        return {**key_json(row), "api_key": key}

    @app.get("/v2/keys", responses=errors(403))
    async def list_keys(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1, le=MAX_PAGE),
                        who: Principal = Depends(admin)):
        rows, total = await _db(self.store.list_keys, limit, (page - 1) * limit)
        return {"data": [key_json(r) for r in rows], "total_count": total}

    @app.delete("/v2/keys/{key_id}", status_code=204, responses=errors(403, 404))
    async def revoke_key(self, key_id: str, who: Principal = Depends(admin)):
        """Revoke a key: every ingress replica refuses it within a few seconds (its lookup cache)."""
        if await _db(self.store.revoke_key, key_id) is None:
            raise HTTPException(404, f"key {key_id} not found")
        self.keyring.forget()
        return Response(status_code=204)

    @app.get("/v2/webhooks/secret", responses=errors(403))
    async def webhook_secret(self, who: Principal = Depends(admin)):
        """The `whsec_...` secret webhooks are signed with (see serve_app/webhooks.py's `verify`)."""
        return {"secret": self.webhooks.secret, "scheme": "Standard Webhooks v1 (HMAC-SHA256 over id.timestamp.body)"}

    # --- personas -------------------------------------------------------------------------------------
    @app.post("/v2/personas", status_code=200, responses={
        **errors(403), **linked("persona", "persona_id", "get_persona", "patch_persona", "delete_persona")})
    async def create_persona(self, body: PersonaIn, who: Principal = Depends(operator)):
        """`layers.llm.base_url` must pass the outbound policy (no loopback or private address unless allowed)."""
        await self._check_persona_urls(body)
        await self._documents(body.document_ids, [], who.owner)
        row = await _db(self.store.add_persona, body.model_dump(mode="json"), who.owner)
        return persona_json(row)

    @app.get("/v2/personas", responses=errors())
    async def list_personas(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1, le=MAX_PAGE),
                            who: Principal = Depends(principal)):
        rows, total = await _db(self.store.list_personas, limit, (page - 1) * limit, who.owner)
        return {"data": [persona_json(r) for r in rows], "total_count": total}

    @app.get("/v2/personas/{persona_id}", responses=errors(404), operation_id="get_persona")
    async def get_persona(self, persona_id: str, who: Principal = Depends(principal)):
        return persona_json(await self._persona(persona_id, who))

    @app.patch("/v2/personas/{persona_id}", responses=errors(403, 404), operation_id="patch_persona")
    async def patch_persona(self, persona_id: str, body: PersonaPatch, who: Principal = Depends(operator)):
        """JSON merge patch: a member sets that field, `null` puts it back to its default."""
        row = await self._persona(persona_id, who)
        patch = body.model_dump(mode="json", exclude_unset=True)
        old_key = ((row.data.get("layers") or {}).get("llm") or {}).get("api_key")
        new_llm = (patch.get("layers") or {}).get("llm") or {}
        if new_llm.get("api_key") == "***":  # the masked value read back: keep the real key
            new_llm["api_key"] = old_key
        merged = {k: v for k, v in {**row.data, **patch}.items() if v is not None}
        try:
            model = PersonaIn(**merged)
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False, include_context=False)) from exc
        await self._check_persona_urls(model)
        await self._documents(model.document_ids, [], who.owner)
        data = model.model_dump(mode="json")
        return persona_json(await _db(self.store.update_persona, persona_id, data))

    @app.delete("/v2/personas/{persona_id}", status_code=204, responses=errors(403, 404), operation_id="delete_persona")
    async def delete_persona(self, persona_id: str, who: Principal = Depends(operator)):
        if not await _db(self.store.delete_persona, persona_id, who.owner):
            raise HTTPException(404, f"persona {persona_id} not found")
        return Response(status_code=204)

    # --- replicas --------------------------------------------------------------------------------------
    @app.post("/v2/replicas", status_code=200, responses={
        **errors(403, 415, 503), **linked("replica", "replica_id", "get_replica", "delete_replica", "replica_head")},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["train_video"], "properties": {
                "train_video": {"type": "string", "format": "binary", "description": "a video (mp4, webm, mov) or photo"},
                "replica_name": {"type": "string", "maxLength": 200}}}}}}})
    async def create_replica(self, request: Request, who: Principal = Depends(operator)):
        """Multipart upload: `train_video` (a short video or a photo) and `replica_name`. The replica is
        `training` until a ReplicaTrainer has fitted the head, then `ready` (or `error`, with why)."""
        if self.trainer is None:
            raise HTTPException(503, "replica training is not deployed in this profile")
        data, media_type, name, probe = await read_training_upload(request, self.trainer)
        row = await _db(self.store.add_replica, name, status="training", data={"media": probe}, owner=who.owner)
        # The fit outlives this request; record_fit stores its outcome.
        fit = self.trainer.fit.remote(row.replica_id, data, media_type)
        task = asyncio.ensure_future(record_fit(self.store, row.replica_id, fit))
        self._training.add(task)
        task.add_done_callback(self._training.discard)
        return replica_json(row)

    @app.get("/v2/replicas", responses=errors())
    async def list_replicas(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1, le=MAX_PAGE),
                            who: Principal = Depends(principal)):
        rows, total = await _db(self.store.list_replicas, limit, (page - 1) * limit, who.owner)
        return {"data": [replica_json(r) for r in rows], "total_count": total}

    @app.get("/v2/replicas/{replica_id}", responses=errors(404), operation_id="get_replica")
    async def get_replica(self, replica_id: str, who: Principal = Depends(principal)):
        return replica_json(await self._replica(replica_id, who))

    @app.delete("/v2/replicas/{replica_id}", status_code=204, responses=errors(403, 404, 409), operation_id="delete_replica")
    async def delete_replica(self, replica_id: str, who: Principal = Depends(operator)):
        if replica_id == STOCK_REPLICA:
            raise HTTPException(409, "the stock replica cannot be deleted")
        row = await self._replica(replica_id, who)
        if row.owner is None or not await _db(self.store.delete_replica, replica_id, who.owner):
            raise HTTPException(404, f"replica {replica_id} not found")
        head = (row.data or {}).get("head_path")
        if head:  # its files go too; live conversations keep the head they loaded
            for path in (Path(head), Path(head).with_name("head.rig.npz")):
                path.unlink(missing_ok=True)
        return Response(status_code=204)

    @app.get("/v2/replicas/{replica_id}/head", operation_id="replica_head", responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The head file"},
        304: {"description": "Not modified (If-None-Match)"}, **errors(403, 404, 409)})
    async def replica_head(self, replica_id: str, request: Request, v: str | None = None,
                           authorization: str | None = Header(None, description="Bearer <meeting_token>"),
                           _key: str | None = Depends(_api_key)):
        """The replica's head for the browser's renderer (client video mode; `encode_head`'s format).
        Authorised by an API key, or by the meeting token of a live conversation with this replica.
        `v` is the content hash the session announced: with it the response is cacheable for good."""
        who = key_holder(request)
        if who is None:
            token = _bearer(authorization)
            conv = await _db(self.store.conversation_by_token, token) if token and len(token) <= 200 else None
            if conv is None:
                raise HTTPException(401, "send x-api-key or Authorization: Bearer <meeting_token>")
            if conv.replica_id != replica_id or conv.status != "active":
                raise HTTPException(403, "this meeting token is not for a live conversation with that replica")
            who = Principal(conv.owner, frozenset(), "meeting-token")
        row = await self._ready_replica(replica_id, who)
        blob = await self._head_blob(row)
        etag = f'"{blob.version}"'
        headers = {"ETag": etag, "Vary": "Accept-Encoding",
                   "Cache-Control": "private, max-age=31536000, immutable" if v == blob.version else "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in (request.headers.get("accept-encoding") or ""):
            return Response(blob.gz, media_type="application/octet-stream", headers={**headers, "Content-Encoding": "gzip"})
        return Response(blob.raw, media_type="application/octet-stream", headers=headers)

    async def _head_blob(self, row: ReplicaRow):
        try:
            return await asyncio.to_thread(self.heads.get, row.replica_id, (row.data or {}).get("head_path"))
        except (OSError, ValueError) as exc:
            raise HTTPException(409, "the replica's head cannot be loaded") from exc

    # --- knowledge base ---------------------------------------------------------------------------------
    @app.post("/v2/documents", status_code=200, responses={
        **errors(403, 415, 503), **linked("document", "document_id", "get_document", "delete_document")},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary", "description": "txt, md, pdf or html"},
                "document_name": {"type": "string", "maxLength": 200},
                "tags": {"type": "string", "description": "comma-separated"},
                "callback_url": {"type": "string"}}}},
            "application/json": {"schema": DocumentURLIn.model_json_schema()}}}})
    async def create_document(self, request: Request, who: Principal = Depends(operator)):
        """An upload (multipart `file`: txt, md, pdf or html, at most 20 MB) or JSON {document_url} fetched
        under the outbound policy. `processing` until chunked and embedded, then `ready` or `error`;
        `callback_url` gets application.document_ready / document_error."""
        if self.knowledge is None:
            raise HTTPException(503, "no knowledge base is deployed")
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        data, kind, url = None, None, None
        if ctype == "application/json":
            try:
                body = DocumentURLIn.model_validate_json(await request.body())
            except ValidationError as exc:
                raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from exc
            url, fields = str(body.document_url), body
            await self._check_destination(url, "document_url")
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
            except Exception as exc:  # a malformed multipart body
                raise HTTPException(400, "malformed multipart body") from exc
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPException(400, "missing file field `file`")
            data = await upload.read()
            try:
                kind = kind_of(upload.content_type, upload.filename, data)
            except DocumentError as exc:
                raise HTTPException(415, str(exc)) from exc
            try:
                fields = DocumentFields(
                    document_name=str(form.get("document_name") or upload.filename or "")[:200],
                    tags=[t.strip() for t in str(form.get("tags") or "").split(",") if t.strip()],
                    callback_url=str(form.get("callback_url") or "") or None)
            except ValidationError as exc:
                raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from exc
        else:
            raise HTTPException(415, "send multipart/form-data with a `file`, or JSON {document_url}")
        callback = str(fields.callback_url) if fields.callback_url else None
        await self._check_destination(callback, "callback_url")
        row = await _db(self.store.add_document, fields.document_name, fields.tags, {
            "kind": kind, "source_url": url, "callback_url": callback,
            **({"bytes": len(data)} if data is not None else {})}, who.owner)
        task = asyncio.ensure_future(self._ingest(row.document_id, data, kind, url, callback))
        self._training.add(task)
        task.add_done_callback(self._training.discard)
        return document_json(row)

    async def _ingest(self, document_id: str, data: bytes | None, kind: str | None, url: str | None,
                      callback: str | None) -> None:
        try:
            result = dict(await self.knowledge.ingest.remote(document_id, data, kind, url))
        except Exception as exc:  # the Knowledge replica died: the document must not stay `processing`
            log.warning("document %s: ingest failed: %s", document_id, type(exc).__name__)
            result = {"status": "error", "error": "processing failed"}
        row = await _db(lambda: self.store.update_document(document_id, result.pop("status"), **result))
        if row is None:  # deleted while it was processed
            await self.knowledge.forget.remote(document_id)
            return
        if callback:
            await _db(queue_webhook, self.store, callback, {
                "message_type": "application", "event_type": f"application.document_{row.status}",
                "timestamp": time.time(), "properties": document_json(row)})
            self.webhooks.wake()

    @app.get("/v2/documents", responses=errors())
    async def list_documents(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1, le=MAX_PAGE),
                             who: Principal = Depends(principal)):
        rows, total = await _db(self.store.list_documents, limit, (page - 1) * limit, who.owner)
        return {"data": [document_json(r) for r in rows], "total_count": total}

    @app.get("/v2/documents/{document_id}", responses=errors(404), operation_id="get_document")
    async def get_document(self, document_id: str, who: Principal = Depends(principal)):
        row = await _db(self.store.get_document, document_id, who.owner)
        if row is None:
            raise HTTPException(404, f"document {document_id} not found")
        return document_json(row)

    @app.delete("/v2/documents/{document_id}", status_code=204, responses=errors(403, 404), operation_id="delete_document")
    async def delete_document(self, document_id: str, who: Principal = Depends(operator)):
        if not await _db(self.store.delete_document, document_id, who.owner):
            raise HTTPException(404, f"document {document_id} not found")
        if self.knowledge is not None:
            await self.knowledge.forget.remote(document_id)
        return Response(status_code=204)

    # --- memory stores -----------------------------------------------------------------------------------
    @app.get("/v2/memory_stores", responses=errors())
    async def list_memory_stores(self, who: Principal = Depends(principal)):
        stores = await _db(self.store.memory_stores, who.owner)
        return {"data": [{"memory_store": name, "memories": n} for name, n in stores], "total_count": len(stores)}

    @app.get("/v2/memory_stores/{store}", responses=errors(404))
    async def get_memory_store(self, store: str, who: Principal = Depends(principal)):
        rows = await _db(self.store.memories, who.owner, store)
        if not rows:
            raise HTTPException(404, f"memory store {store} not found")
        return {"memory_store": store, "data": [memory_json(r) for r in rows], "total_count": len(rows)}

    @app.delete("/v2/memory_stores/{store}", status_code=204, responses=errors(403, 404))
    async def delete_memory_store(self, store: str, who: Principal = Depends(operator)):
        """Deletes every memory in the store (the rows, not a flag)."""
        if not await _db(self.store.delete_memories, who.owner, store):
            raise HTTPException(404, f"memory store {store} not found")
        return Response(status_code=204)

    @app.delete("/v2/memory_stores/{store}/memories/{memory_id}", status_code=204, responses=errors(403, 404))
    async def delete_memory(self, store: str, memory_id: str, who: Principal = Depends(operator)):
        if not await _db(self.store.delete_memories, who.owner, store, memory_id):
            raise HTTPException(404, f"memory {memory_id} not found in {store}")
        return Response(status_code=204)

    # --- conversations -----------------------------------------------------------------------------------
    @app.post("/v2/conversations", responses={
        **errors(403, 404, 409, 503), **linked("conversation", "conversation_id", "get_conversation", "end_conversation",
                                               "delete_conversation", "operator_token", "webrtc_offer")})
    async def create_conversation(self, body: ConversationIn, request: Request, who: Principal = Depends(operator)):
        """The response is the only place the meeting token (and the joinable `conversation_url`) appears.
        `callback_url` must pass the outbound policy."""
        await self._check_destination(body.callback_url, "callback_url")
        await self._persona_model(body.persona_id, who)  # 404 on an unknown persona, before anything is created
        await self._documents(body.document_ids, [], who.owner)
        await self._ready_replica(body.replica_id or STOCK_REPLICA, who)
        if await self.sessions.full():
            return self.sessions.capacity_response()
        row = await _db(lambda: self.store.add_conversation(
            conversation_name=body.conversation_name, persona_id=body.persona_id, replica_id=body.replica_id or STOCK_REPLICA,
            meeting_token=secrets.token_urlsafe(24), callback_url=str(body.callback_url) if body.callback_url else None,
            data=body.model_dump(mode="json", exclude={"callback_url"}), status="active", owner=who.owner))
        return conversation_json(row, self._base(request), with_token=True)

    @app.get("/v2/conversations", responses=errors())
    async def list_conversations(self, request: Request, limit: int = Query(10, ge=1, le=100),
                                 page: int = Query(1, ge=1, le=MAX_PAGE),
                                 status: str | None = Query(None, pattern="^(active|ended)$"),
                                 who: Principal = Depends(principal)):
        rows, total = await _db(self.store.list_conversations, limit, (page - 1) * limit, status, who.owner)
        return {"data": [conversation_json(r, self._base(request)) for r in rows], "total_count": total}

    @app.get("/v2/conversations/{conversation_id}", responses=errors(404), operation_id="get_conversation")
    async def get_conversation(self, conversation_id: str, request: Request, verbose: bool = False,
                               who: Principal = Depends(principal)):
        out = conversation_json(await self._conversation(conversation_id, who), self._base(request))
        out["transcript"] = await _db(self.store.transcript, conversation_id)
        if conversation_id in self.sessions.live:
            out["session_host_replica"] = self.sessions.live[conversation_id].replica
            out["session_host_node"] = self.sessions.live[conversation_id].node
        return out

    @app.post("/v2/conversations/{conversation_id}/end", responses=errors(403, 404), operation_id="end_conversation")
    async def end_conversation(self, conversation_id: str, who: Principal = Depends(operator)):
        row = await self._conversation(conversation_id, who)
        if row.status == "ended":
            return {"conversation_id": conversation_id, "status": "ended"}
        await self.sessions.end(conversation_id, ShutdownReason.ENDPOINT_HIT)
        return {"conversation_id": conversation_id, "status": "ended"}

    @app.delete("/v2/conversations/{conversation_id}", status_code=204, responses=errors(403, 404),
                operation_id="delete_conversation")
    async def delete_conversation(self, conversation_id: str, who: Principal = Depends(operator)):
        await self._conversation(conversation_id, who)
        await self.sessions.end(conversation_id, ShutdownReason.ENDPOINT_HIT)
        await _db(self.store.delete_conversation, conversation_id)
        return Response(status_code=204)

    @app.post("/v2/conversations/{conversation_id}/tokens", responses=errors(403, 404, 409), operation_id="operator_token")
    async def operator_token(self, conversation_id: str, body: OperatorTokenIn, who: Principal = Depends(operator)):
        """A join token with the operator grant: a client that joins with it may also send `echo` and
        context changes on the data channel. Shown once; minting another replaces it."""
        row = await self._conversation(conversation_id, who)
        if row.status != "active":
            raise HTTPException(409, f"conversation is {row.status}")
        token = "op_" + secrets.token_urlsafe(24)
        await _db(self.store.set_conversation_data, conversation_id, operator_token=hash_key(token))
        return {"conversation_id": conversation_id, "token": token, "grants": sorted(body.grants())}

    # --- WebRTC signalling (WHIP-style: POST the offer, 201 with the answer) -----------------------------------
    @app.post("/v2/conversations/{conversation_id}/webrtc", status_code=201, operation_id="webrtc_offer", responses={
        201: {"content": {"application/sdp": {}}, "description": "The SDP answer"},
        **errors(400, 403, 404, 409, 415, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/sdp": {"schema": {"type": "string"}},
            "application/json": {"schema": OfferJSON.model_json_schema()}}}})
    async def webrtc_offer(self, conversation_id: str, request: Request,
                           authorization: str | None = Header(None, description="Bearer <meeting_token or operator token>"),
                           _key: str | None = Depends(_api_key)):
        holder = key_holder(request)
        token = _bearer(authorization)
        if holder is None and not token:
            raise HTTPException(401, "missing join token (Authorization: Bearer <meeting_token>)")
        row = await self._conversation(conversation_id, holder)  # a key sees only its own conversations
        persona = await self._persona_model(row.persona_id, None)
        if holder is not None:
            if not holder.can("operator"):
                raise HTTPException(403, "joining with an API key needs an operator key")
            grants = OPERATOR_GRANTS
        elif _token_matches(token, row.meeting_token):
            grants = set(persona.participant_grants)
        elif token.startswith("op_") and _token_matches(hash_key(token), (row.data or {}).get("operator_token")):
            grants = OPERATOR_GRANTS
        else:
            raise HTTPException(401, "missing or invalid join token (Authorization: Bearer <meeting_token>)")
        if row.status != "active":
            raise HTTPException(409, f"conversation is {row.status}")
        if row.joined_at is not None or conversation_id in self.sessions.live:
            raise HTTPException(409, "conversation already has a live media session")
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in ("application/sdp", "application/json"):
            raise HTTPException(415, "send the SDP offer as application/sdp (or JSON {type: offer, sdp})")
        raw = await request.body()
        if ctype == "application/sdp":
            sdp = raw.decode("utf-8", errors="replace")
        else:
            try:
                sdp = OfferJSON.model_validate_json(raw).sdp
            except ValidationError as exc:
                raise HTTPException(400, f"bad offer JSON: {exc.errors(include_url=False, include_context=False)}") from exc
        data = row.data
        replica = await self._available_replica(row.replica_id)
        head = await self._head_blob(replica)
        stores = list(data.get("memory_stores") or [])
        documents, _ = await _db(self.store.documents_visible,
                                 [*persona.document_ids, *(data.get("document_ids") or [])],
                                 [*persona.document_tags, *(data.get("document_tags") or [])], row.owner)
        remembered = [m for store in stores for m in await _db(self.store.memories, row.owner, store)]
        spec = SessionSpec(
            conversation_id=conversation_id, offer_sdp=sdp, persona=persona,
            properties=ConversationProperties.model_validate(data.get("properties", {})),
            conversational_context=data.get("conversational_context", ""), custom_greeting=data.get("custom_greeting"),
            ice_servers=self.ice_servers, replica_head=(replica.data or {}).get("head_path"),
            video_mode=data.get("video_mode") or persona.video_mode, replica_id=replica.replica_id,
            head_version=head.version, grants=frozenset(grants), callback_url=row.callback_url,
            owner=row.owner, document_ids=documents, memory_stores=stores,
            memories=[(m.kind, m.fact) for m in remembered])
        if not await _db(self.store.claim_join, conversation_id):  # the one join: a racing second gets 409
            raise HTTPException(409, "conversation already has a live media session")
        try:
            first = await self.sessions.start(spec)
        except BaseException:
            await _db(self.store.release_join, conversation_id)
            raise
        if isinstance(first, Response) or first["type"] == "error":
            await _db(self.store.release_join, conversation_id)
        if isinstance(first, Response):
            return first
        if first["type"] == "error":
            raise HTTPException(first.get("status", 400), first["detail"])
        return Response(first["sdp"], status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v2/conversations/{conversation_id}/webrtc"})

    async def _available_replica(self, replica_id: str | None) -> ReplicaRow:
        """The conversation's replica at join time (409: deleted or no longer ready since creation)."""
        replica = await _db(self.store.get_replica, replica_id or STOCK_REPLICA)
        if replica is None or replica.status != "ready":
            raise HTTPException(409, f"replica {replica_id} is no longer available")
        return replica
