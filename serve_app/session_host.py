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
from deployments.common import ServiceTimes, limit_threads
from deployments.gpu_metrics import start_gpu_metrics
from models.assets import onnx_session, silero_vad_onnx
from models.avatar.head import Head, build_head
from models.avatar.headfile import HeadFileError, load_head
from models.avatar.render import CPUAvatarRenderer, Pose
from models.vad import SileroVAD
from serve_app.events import Event, ShutdownReason
from serve_app.ice import apply_policy
from serve_app.session import BadOffer, Handles, Session, SessionSpec
from serve_app.stage_health import ServeStageHealth

log = logging.getLogger("presence.host")


@serve.deployment  # options (session capacity, drain time, resources): configs/*.yaml
class SessionHost:
    def __init__(self, turn, asr, llm, tts, video: dict | None = None, perception=None) -> None:
        limit_threads()
        self.gpu_metrics = start_gpu_metrics("SessionHost")
        apply_policy()
        video = video or {}
        self.stage_health = ServeStageHealth()
        self.handles = Handles(turn=turn, asr=asr, llm=llm, tts=tts, perception=perception,
                               health=self.stage_health.health())
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
        if session.video_out is not None:
            session.video_out.on_render = self.frame_times.add
        yield {"type": "answer", "sdp": answer, "replica": self.replica_id}
        runner = asyncio.ensure_future(session.run())
        h = self.handles
        learning = asyncio.ensure_future(self.stage_health.learn([h.asr, h.turn, h.llm, h.tts]))  # while they are up
        try:
            while True:
                ev = await session.events.get()
                if ev["event_type"] == Event.TURN_TIMINGS:
                    sent = ev["properties"]["ms_from_speech_end"].get("first_audio_sent")
                    if sent is not None:
                        self.reply_times.add(sent)
                yield {"type": "event", "event": ev}
                if ev["event_type"] == Event.SHUTDOWN:
                    break
            await runner
        except asyncio.CancelledError:
            # The ingress ended the call (POST /end, DELETE) or went away: close cleanly.
            runner.cancel()
            await asyncio.shield(session.shutdown(ShutdownReason.ENDPOINT_HIT))
            raise
        finally:
            learning.cancel()
            self.sessions.pop(session.cid, None)
            await session.close()

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
