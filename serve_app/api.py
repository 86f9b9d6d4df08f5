"""REST ingress (FastAPI on Serve): personas, conversations, WebRTC signalling, web client, metrics."""


import asyncio
import logging
import os
import secrets
from pathlib import Path

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from pydantic import ValidationError
from ray import serve

from models.media import IMAGE_TYPES, VIDEO_TYPES, MediaError, probe_media
from serve_app import metrics
from serve_app.db import ConversationRow, PersonaRow, ReplicaRow, Store
from serve_app.events import ShutdownReason
from serve_app.heads import HeadFiles
from serve_app.live import LiveSessions
from serve_app.schemas import DEFAULT_PERSONA, ConversationIn, ConversationProperties, OfferJSON, PersonaIn, PersonaPatch
from serve_app.session import SessionSpec
from serve_app.views import conversation_json, persona_json, replica_json

log = logging.getLogger("presence.api")
STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # 1 MiB: no JSON body or SDP offer is anywhere near this
MAX_UPLOAD = 50 << 20  # replica training media (POST /v2/replicas)
STOCK_REPLICA = "r-stock"

app = FastAPI(title="Presence", version="0.1.0",
              description="Real-time AI humans: conversations, personas and replicas over WebRTC.")
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.middleware("http")
async def limit_body(request: Request, call_next):
    length = request.headers.get("content-length")
    limit = MAX_UPLOAD if request.url.path.rstrip("/") == "/v2/replicas" else MAX_BODY
    if length is not None and (not length.isdigit() or int(length) > limit):
        return JSONResponse({"detail": f"body larger than {limit} bytes"}, status_code=413)
    return await call_next(request)


async def read_training_upload(request: Request) -> tuple[bytes, str, str, dict]:
    """POST /v2/replicas' multipart body, checked: (data, media type, replica name, probe)."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise HTTPException(415, "send multipart/form-data with a train_video (video or photo) field")
    form = await request.form(max_files=1, max_fields=8, max_part_size=MAX_UPLOAD)
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
    try:
        probe = await asyncio.to_thread(probe_media, data, media_type)
    except MediaError as exc:
        raise HTTPException(422, str(exc)) from exc
    return data, media_type, str(form.get("replica_name") or "")[:200], probe


async def record_fit(store: Store, replica_id: str, response) -> None:
    """Record the trainer's outcome; if the trainer itself dies, the replica must not stay
    `training` forever. A replica deleted meanwhile stays deleted."""
    try:
        result = dict(await response)
    except Exception as exc:
        log.warning("replica %s: training failed: %r", replica_id, exc)
        result = {"status": "error", "error": f"training failed: {exc}"}
    row = store.get_replica(replica_id)
    if row is not None and row.status == "training":
        store.update_replica(replica_id, result.pop("status"), **result)


# Helpers the class calls are defined above it: Serve pickles the ingress class by value.
@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, session_host, trainer=None, api_keys: list[str] | None = None, max_sessions: int = 2,
                 ice_servers: list[dict] | None = None, public_url: str | None = None,
                 database_url: str | None = None, answer_timeout_s: float = 30.0, join_window_s: float = 60.0,
                 head_gaussians: int = 20000) -> None:
        keys = api_keys or [k for k in os.environ.get("PRESENCE_API_KEYS", "").split(",") if k]
        if not keys:
            raise ValueError("no API keys configured: set PRESENCE_API_KEYS or the ingress's api_keys")
        self.api_keys = set(keys)
        self.ice_servers = ice_servers or []
        self.public_url = public_url
        self.store = Store(database_url)
        self.trainer = trainer
        self._training: set[asyncio.Task] = set()  # in-flight fits (referenced until they finish)
        self.heads = HeadFiles(head_gaussians)
        if self.store.get_replica(STOCK_REPLICA) is None:
            self.store.add_replica("Stock", status="ready", data={"stock": True}, replica_id=STOCK_REPLICA)
        # Admission happens at POST /v2/conversations (a slot is reserved), not later at the offer.
        self.sessions = LiveSessions(session_host, self.store, max_sessions, join_window_s, answer_timeout_s)

    # --- helpers ---------------------------------------------------------------------------------------
    def _base(self, request: Request) -> str:
        return (self.public_url or str(request.base_url)).rstrip("/")

    def _auth(self, key: str | None) -> None:
        if not key or key not in self.api_keys:
            raise HTTPException(401, "missing or invalid x-api-key")

    @staticmethod
    def _found(row, kind: str, key: str):
        """`row`, or a 404 naming what was not found."""
        if row is None:
            raise HTTPException(404, f"{kind} {key} not found")
        return row

    def _conversation(self, conversation_id: str) -> ConversationRow:
        return self._found(self.store.get_conversation(conversation_id), "conversation", conversation_id)

    def _persona(self, persona_id: str) -> PersonaRow:
        return self._found(self.store.get_persona(persona_id), "persona", persona_id)

    def _replica(self, replica_id: str) -> ReplicaRow:
        return self._found(self.store.get_replica(replica_id), "replica", replica_id)

    def _ready_replica(self, replica_id: str) -> ReplicaRow:
        row = self._replica(replica_id)
        if row.status != "ready":
            raise HTTPException(409, f"replica {replica_id} is {row.status}, not ready")
        return row

    def _persona_model(self, persona_id: str | None) -> PersonaIn:
        """The conversation's persona, typed (rows were validated when written)."""
        if persona_id is None:
            return DEFAULT_PERSONA
        return PersonaIn.model_validate(self._persona(persona_id).data)

    # --- web client ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index(self):
        return FileResponse(STATIC / "index.html")

    @app.get("/c/{conversation_id}", include_in_schema=False)
    async def join_page(self, conversation_id: str):
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", include_in_schema=False)
    async def healthz(self):
        return {"ok": True, "live_sessions": len(self.sessions.live), "max_sessions": self.sessions.max_sessions}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(self):
        return PlainTextResponse(generate_latest(metrics.REGISTRY).decode(), media_type="text/plain; version=0.0.4")

    # --- personas -------------------------------------------------------------------------------------
    @app.post("/v2/personas", status_code=200)
    async def create_persona(self, body: PersonaIn, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        row = self.store.add_persona(body.model_dump(mode="json"))
        return persona_json(row)

    @app.get("/v2/personas")
    async def list_personas(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1),
                            x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        rows, total = self.store.list_personas(limit, (page - 1) * limit)
        return {"data": [persona_json(r) for r in rows], "total_count": total}

    @app.get("/v2/personas/{persona_id}")
    async def get_persona(self, persona_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        return persona_json(self._persona(persona_id))

    @app.patch("/v2/personas/{persona_id}")
    async def patch_persona(self, persona_id: str, body: PersonaPatch, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        row = self._persona(persona_id)
        merged = {**row.data, **body.model_dump(mode="json", exclude_unset=True)}
        try:
            data = PersonaIn(**merged).model_dump(mode="json")
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False)) from exc
        return persona_json(self.store.update_persona(persona_id, data))

    @app.delete("/v2/personas/{persona_id}", status_code=204)
    async def delete_persona(self, persona_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        if not self.store.delete_persona(persona_id):
            raise HTTPException(404, f"persona {persona_id} not found")
        return Response(status_code=204)

    def _available_replica(self, replica_id: str | None) -> ReplicaRow:
        """The conversation's replica at join time (409: deleted or no longer ready since creation)."""
        replica = self.store.get_replica(replica_id or STOCK_REPLICA)
        if replica is None or replica.status != "ready":
            raise HTTPException(409, f"replica {replica_id} is no longer available")
        return replica

    # --- replicas --------------------------------------------------------------------------------------
    @app.post("/v2/replicas", status_code=200)
    async def create_replica(self, request: Request, x_api_key: str | None = Header(None)):
        """Multipart upload: `train_video` (a short video or a photo) and `replica_name`. The replica is
        `training` until a ReplicaTrainer has fitted the head, then `ready` (or `error`, with why)."""
        self._auth(x_api_key)
        if self.trainer is None:
            raise HTTPException(503, "replica training is not deployed in this profile")
        data, media_type, name, probe = await read_training_upload(request)
        row = self.store.add_replica(name, status="training", data={"media": probe})
        # The fit outlives this request; record_fit stores its outcome.
        fit = self.trainer.fit.remote(row.replica_id, data, media_type)
        task = asyncio.ensure_future(record_fit(self.store, row.replica_id, fit))
        self._training.add(task)
        task.add_done_callback(self._training.discard)
        return replica_json(row)

    @app.get("/v2/replicas")
    async def list_replicas(self, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1),
                            x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        rows, total = self.store.list_replicas(limit, (page - 1) * limit)
        return {"data": [replica_json(r) for r in rows], "total_count": total}

    @app.get("/v2/replicas/{replica_id}")
    async def get_replica(self, replica_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        return replica_json(self._replica(replica_id))

    @app.delete("/v2/replicas/{replica_id}", status_code=204)
    async def delete_replica(self, replica_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        if replica_id == STOCK_REPLICA:
            raise HTTPException(409, "the stock replica cannot be deleted")
        row = self._replica(replica_id)
        if not self.store.delete_replica(replica_id):  # deleted meanwhile
            raise HTTPException(404, f"replica {replica_id} not found")
        head = (row.data or {}).get("head_path")
        if head:  # its files go too; live conversations keep the head they loaded
            for path in (Path(head), Path(head).with_name("head.rig.npz")):
                path.unlink(missing_ok=True)
        return Response(status_code=204)

    @app.get("/v2/replicas/{replica_id}/head")
    async def replica_head(self, replica_id: str, request: Request, v: str | None = None,
                           x_api_key: str | None = Header(None), authorization: str | None = Header(None)):
        """The replica's head for the browser's renderer (client video mode; `encode_head`'s format).
        Authorised by an API key, or by the meeting token of a live conversation with this replica.
        `v` is the content hash the session announced: with it the response is cacheable for good."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        if x_api_key is not None:
            self._auth(x_api_key)
        else:
            conv = self.store.conversation_by_token(token) if token else None
            if conv is None:
                raise HTTPException(401, "send x-api-key or Authorization: Bearer <meeting_token>")
            if conv.replica_id != replica_id or conv.status != "active":
                raise HTTPException(403, "this meeting token is not for a live conversation with that replica")
        row = self._ready_replica(replica_id)
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
            raise HTTPException(409, f"the replica's head cannot be loaded: {exc}") from exc

    # --- conversations -----------------------------------------------------------------------------------
    @app.post("/v2/conversations")
    async def create_conversation(self, body: ConversationIn, request: Request, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        self._persona_model(body.persona_id)  # 404 on an unknown persona, before anything is created
        self._ready_replica(body.replica_id or STOCK_REPLICA)
        if self.sessions.full():
            return self.sessions.capacity_response()
        row = self.store.add_conversation(
            conversation_name=body.conversation_name, persona_id=body.persona_id, replica_id=body.replica_id or STOCK_REPLICA,
            meeting_token=secrets.token_urlsafe(24), callback_url=str(body.callback_url) if body.callback_url else None,
            data=body.model_dump(mode="json", exclude={"callback_url"}), status="active")
        self.sessions.reserve(row.conversation_id)
        return conversation_json(row, self._base(request), with_token=True)

    @app.get("/v2/conversations")
    async def list_conversations(self, request: Request, limit: int = Query(10, ge=1, le=100), page: int = Query(1, ge=1),
                                 status: str | None = Query(None, pattern="^(active|ended)$"),
                                 x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        rows, total = self.store.list_conversations(limit, (page - 1) * limit, status)
        return {"data": [conversation_json(r, self._base(request)) for r in rows], "total_count": total}

    @app.get("/v2/conversations/{conversation_id}")
    async def get_conversation(self, conversation_id: str, request: Request, verbose: bool = False,
                               x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        out = conversation_json(self._conversation(conversation_id), self._base(request))
        out["transcript"] = self.store.transcript(conversation_id)
        if conversation_id in self.sessions.live:
            out["session_host_replica"] = self.sessions.live[conversation_id].replica
        return out

    @app.post("/v2/conversations/{conversation_id}/end")
    async def end_conversation(self, conversation_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        row = self._conversation(conversation_id)
        if row.status == "ended":
            return {"conversation_id": conversation_id, "status": "ended"}
        await self.sessions.end(conversation_id, ShutdownReason.ENDPOINT_HIT)
        return {"conversation_id": conversation_id, "status": "ended"}

    @app.delete("/v2/conversations/{conversation_id}", status_code=204)
    async def delete_conversation(self, conversation_id: str, x_api_key: str | None = Header(None)):
        self._auth(x_api_key)
        self._conversation(conversation_id)
        await self.sessions.end(conversation_id, ShutdownReason.ENDPOINT_HIT)
        self.store.delete_conversation(conversation_id)
        return Response(status_code=204)

    # --- WebRTC signalling (WHIP-style: POST the offer, 201 with the answer) -----------------------------------
    @app.post("/v2/conversations/{conversation_id}/webrtc", status_code=201)
    async def webrtc_offer(self, conversation_id: str, request: Request, authorization: str | None = Header(None)):
        row = self._conversation(conversation_id)
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token or not secrets.compare_digest(token, row.meeting_token):
            raise HTTPException(401, "missing or invalid join token (Authorization: Bearer <meeting_token>)")
        if row.status != "active":
            raise HTTPException(409, f"conversation is {row.status}")
        if conversation_id in self.sessions.live:
            raise HTTPException(409, "conversation already has a live media session")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPException(413, "offer too large")
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype == "application/sdp":
            sdp = raw.decode("utf-8", errors="replace")
        elif ctype == "application/json":
            try:
                sdp = OfferJSON.model_validate_json(raw).sdp
            except ValidationError as exc:
                raise HTTPException(400, f"bad offer JSON: {exc.errors(include_url=False)}") from exc
        else:
            raise HTTPException(415, "send the SDP offer as application/sdp (or JSON {type: offer, sdp})")
        data = row.data
        persona = self._persona_model(row.persona_id)
        replica = self._available_replica(row.replica_id)
        head = await self._head_blob(replica)
        spec = SessionSpec(
            conversation_id=conversation_id, offer_sdp=sdp, persona=persona,
            properties=ConversationProperties.model_validate(data.get("properties", {})),
            conversational_context=data.get("conversational_context", ""), custom_greeting=data.get("custom_greeting"),
            ice_servers=self.ice_servers, replica_head=(replica.data or {}).get("head_path"),
            video_mode=data.get("video_mode") or persona.video_mode, replica_id=replica.replica_id,
            head_version=head.version)
        first = await self.sessions.start(spec, row.callback_url)
        if isinstance(first, Response):
            return first
        if first["type"] == "error":
            raise HTTPException(first.get("status", 400), first["detail"])
        return Response(first["sdp"], status_code=201, media_type="application/sdp",
                        headers={"Location": f"/v2/conversations/{conversation_id}/webrtc"})
