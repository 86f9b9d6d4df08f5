"""SessionHost deployment: each conversation is one long-lived streaming call to a replica.

`max_ongoing_requests` is the replica's session capacity, so Serve's router places sessions,
counts them for autoscaling and drains them on scale-down. The first item of the stream is the
SDP answer; the rest are the session's events, ending with system.shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ray import serve

from autoscaling import stats
from deployments import outbound
from deployments.common import ServiceTimes, limit_threads, node_id
from deployments.gpu_metrics import start_gpu_metrics
from models.assets import onnx_session, silero_vad_onnx
from models.avatar.head import Head, build_head
from models.avatar.headfile import HeadFileError, load_head
from models.avatar.render import CPUAvatarRenderer, Pose
from models.llm import GenerationParams
from models.memory import extract_stated_facts, llm_extraction_messages, parse_llm_facts
from models.vad import SileroVAD
from serve_app import ledger
from serve_app.db import Store
from serve_app.events import Event, ShutdownReason
from serve_app.ice import apply_policy
from serve_app.session import BadOffer, Handles, Session, SessionSpec
from serve_app.stage_health import ServeStageHealth

log = logging.getLogger("presence.host")


@serve.deployment  # options (session capacity, drain time, resources): configs/*.yaml
class SessionHost:
    def __init__(self, turn, asr, llm, tts, video: dict | None = None, perception=None,
                 database_url: str | None = None, outbound_policy: dict | None = None, knowledge=None,
                 memory_extractor: str = "patterns") -> None:
        """`database_url`: the ingress's database (shared storage on a cluster). The host writes its
        sessions' transcripts, webhooks and end there itself (serve_app.ledger). `outbound_policy`: what
        LLM tool deliveries may reach (deployments.outbound, the profile's `outbound`). `knowledge`: the
        Knowledge deployment (document passages per turn). `memory_extractor`: how a call's stated facts are
        found for its memory stores, `patterns` (models.memory, the CPU profile) or `llm` (the LLM lists them)."""
        if memory_extractor not in ("patterns", "llm"):
            raise ValueError(f"memory_extractor {memory_extractor!r}: expected 'patterns' or 'llm'")
        self.memory_extractor = memory_extractor
        limit_threads()
        self.store = Store(database_url)
        self._heartbeat: asyncio.Task | None = None
        self.gpu_metrics = start_gpu_metrics("SessionHost")
        apply_policy()
        video = video or {}
        self.stage_health = ServeStageHealth()
        self.handles = Handles(turn=turn, asr=asr, llm=llm, tts=tts, perception=perception, knowledge=knowledge,
                               health=self.stage_health.health(), post_json=self._post_json)
        self.policy = outbound.OutboundPolicy.from_config(outbound_policy)
        self._http = None  # the outbound-policy client for tool deliveries, made on first use
        self.width = int(video.get("width", 256))
        self.height = int(video.get("height", 256))
        self.fps = float(video.get("fps", 15))
        self.video_mode = video.get("mode", "server")  # a conversation's or persona's video_mode overrides it
        if self.video_mode not in ("client", "server"):
            raise ValueError(f"video mode {self.video_mode!r}: expected 'client' or 'server'")
        self.head = build_head(int(video.get("gaussians", 20000)))
        self.vad_session = onnx_session(silero_vad_onnx())
        self.backend = video.get("backend", "cpu")
        self.batcher = None
        if self.backend == "gsplat":
            # One gsplat call renders every live session's frame (models/avatar/batching.py).
            from models.avatar.batching import FrameBatcher
            from models.avatar.render_gsplat import GsplatBatchRenderer

            self.gpu = GsplatBatchRenderer({"stock": self.head}, self.width, self.height, device="cuda")
            self.batcher = FrameBatcher(self.gpu.render_batch, max_batch=int(video.get("max_batch", 16)))
            self.gpu.render_batch([("stock", Pose())])  # compile gsplat's kernels now, not in the first session
        elif self.backend == "cpu":
            CPUAvatarRenderer(self.head, self.width, self.height).render(Pose())  # compile numba kernels now
        else:
            raise ValueError(f"video backend {self.backend!r}: expected 'cpu' or 'gsplat'")
        self.sessions: dict[str, Session] = {}
        self._heads: dict[str, Head] = {}
        self.started_at = time.time()
        self.reply_times = ServiceTimes(window_s=60.0)  # speech end -> first reply audio sent, per turn
        self.frame_times = ServiceTimes(window_s=10.0)  # avatar render time per frame
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (never in production)
            self.replica_id = "local"
        self.node_id = node_id()

    async def _post_json(self, url: str, body: dict) -> tuple[int, bytes]:
        if self._http is None:
            self._http = outbound.client(self.policy)
        return await outbound.post(self._http, url, self.policy, json=body)

    async def run(self, spec: SessionSpec):
        """Host one conversation. Yields {"type": "answer"} or {"type": "error"}, then events."""
        spec = dataclasses.replace(spec, video_mode=spec.video_mode or self.video_mode)
        renderer = None
        if spec.video_mode == "server":
            try:
                renderer = self._renderer(spec.replica_head)
            except (OSError, HeadFileError) as exc:
                yield {"type": "error", "status": 409, "detail": f"the replica's head cannot be loaded: {exc}"}
                return
        session = Session(spec, self.handles, renderer, SileroVAD(self.vad_session), self.fps)
        try:
            answer = await session.start()
        except BadOffer as exc:
            yield {"type": "error", "status": 400, "detail": str(exc)}
            return
        self.sessions[session.cid] = session
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._beat())
        if session.video_out is not None:
            session.video_out.on_render = self.frame_times.add
        yield {"type": "answer", "sdp": answer, "replica": self.replica_id, "node": self.node_id}
        runner = asyncio.ensure_future(session.run())
        h = self.handles
        learning = asyncio.ensure_future(self.stage_health.learn([h.asr, h.turn, h.llm, h.tts]))  # while they are up
        shutdown_sent = False
        try:
            while True:
                ev = await session.events.get()
                if ev["event_type"] == Event.TURN_TIMINGS:
                    sent = ev["properties"]["ms_from_speech_end"].get("first_audio_sent")
                    if sent is not None:
                        self.reply_times.add(sent)
                # Kept before it is passed on: the ingress reading this stream may die at any moment.
                await self._keep(spec, ev)
                shutdown_sent = shutdown_sent or ev["event_type"] == Event.SHUTDOWN
                yield {"type": "event", "event": ev}
                if ev["event_type"] == Event.SHUTDOWN:
                    break
            await runner
        except asyncio.CancelledError:
            # The ingress ended the call (POST /end, DELETE): close cleanly.
            runner.cancel()
            await asyncio.shield(session.shutdown(ShutdownReason.ENDPOINT_HIT))
            raise
        finally:
            learning.cancel()
            self.sessions.pop(session.cid, None)
            await asyncio.shield(self._finish(session, spec, shutdown_sent))

    async def _keep(self, spec: SessionSpec, ev: dict) -> None:
        """Store one event (one retry). A session whose events cannot be stored ends with reason
        `error` rather than talking on with nothing kept: the transcript so far stays."""
        for attempt in range(2):
            try:
                await asyncio.to_thread(ledger.keep_event, self.store, spec.callback_url, ev)
                return
            except Exception as exc:
                log.warning("session %s: could not store %s: %s", spec.conversation_id, ev["event_type"],
                            type(exc).__name__)
                if attempt == 0:
                    await asyncio.sleep(0.5)
        session = self.sessions.get(spec.conversation_id)
        if session is not None:
            await session.shutdown(ShutdownReason.ERROR)

    async def _finish(self, session: Session, spec: SessionSpec, shutdown_sent: bool) -> None:
        await session.close()
        if spec.memory_stores:
            await self._remember(session, spec)
        while not session.events.empty():  # emitted after the stream stopped (the shutdown on a cancel)
            ev = session.events.get_nowait()
            await self._keep(spec, ev)
            shutdown_sent = shutdown_sent or ev["event_type"] == Event.SHUTDOWN
        reason = str(session.shutdown_reason or ShutdownReason.ERROR)
        try:
            await asyncio.to_thread(ledger.finish, self.store, spec.conversation_id, reason, spec.callback_url,
                                    shutdown_sent)
        except Exception as exc:
            log.warning("session %s: could not record its end: %s", spec.conversation_id, type(exc).__name__)

    async def _remember(self, session: Session, spec: SessionSpec) -> None:
        """What the user stated about themselves goes into the conversation's memory stores."""
        said = session.user_said()
        try:
            facts = await self._extract(said) if said else []
            for store in spec.memory_stores:
                await asyncio.to_thread(self.store.add_memories, spec.owner, store, spec.conversation_id, facts)
        except Exception as exc:
            log.warning("session %s: could not keep its memories: %s", spec.conversation_id, type(exc).__name__)

    async def _extract(self, said: list[str]) -> list[tuple[str, str]]:
        if self.memory_extractor == "patterns":
            return extract_stated_facts(said)
        text = []
        async for piece in self.handles.llm.options(stream=True).stream.remote(
                llm_extraction_messages(said), GenerationParams(max_tokens=200, temperature=0.0, stop=[])):
            if isinstance(piece, str):
                text.append(piece)
        return parse_llm_facts("".join(text))

    async def _beat(self) -> None:
        """Tell the database which sessions this replica holds, and shut down those ended elsewhere
        (POST /end on another ingress replica, or after an ingress restart)."""
        while self.sessions:
            try:
                ended = await asyncio.to_thread(self.store.heartbeat, list(self.sessions), time.time())
            except Exception as exc:
                log.warning("heartbeat failed: %s", type(exc).__name__)
                ended = []
            for cid in ended:
                session = self.sessions.get(cid)
                if session is not None:
                    await session.shutdown(ShutdownReason.ENDPOINT_HIT)
            await asyncio.sleep(ledger.HEARTBEAT_S)

    def _renderer(self, head_path: str | None):
        head_key, head = self._head(head_path)
        if self.batcher is not None:
            from models.avatar.batching import BatchedRenderer

            if head_key not in self.gpu.keys:
                self.gpu.add_head(head_key, head)
            return BatchedRenderer(self.batcher, head=head_key)
        return CPUAvatarRenderer(head, self.width, self.height)

    def _head(self, path: str | None) -> tuple[str, Head]:
        """The stock head, or a fitted replica's head file (loaded once per replica process)."""
        if not path:
            return "stock", self.head
        if path not in self._heads:
            if len(self._heads) >= 32:  # bounded: drop the oldest loaded replica head
                self._heads.pop(next(iter(self._heads)))
            self._heads[path] = load_head(path)
        return path, self._heads[path]

    async def sessions_info(self) -> dict:
        return {cid: {"turns": s.turns, "video_mode": s.video_mode,
                      "frames_sent": s.video_out.frames_sent if s.video_out else 0,
                      "poses_sent": s.poses.sent if s.poses else 0, "replica": self.replica_id}
                for cid, s in self.sessions.items()}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What autoscaling.policy.SessionHostPolicy scales on."""
        return {stats.SESSIONS: float(len(self.sessions)), stats.REPLY_P95_MS: self.reply_times.p95(),
                stats.FRAME_P95_MS: self.frame_times.p95()}
