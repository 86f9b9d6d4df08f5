"""Builds the Presence application graph from a profile's arguments (used by configs/*.yaml)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.asr import ASR
from deployments.common import default_database_url
from deployments.knowledge import Knowledge
from deployments.llm import LLM
from deployments.perception import Perception
from deployments.replica_trainer import ReplicaTrainer
from deployments.tts import TTS
from deployments.turn_taking import TurnTaking
from serve_app.api import Ingress
from serve_app.session_host import SessionHost


def build_app(args: dict[str, Any]) -> Application:
    """args: asr, llm, tts, turn, perception, knowledge (init kwargs for each model deployment), memory
    (SessionHost memory_extractor), video, replicas, ingress,
    outbound (deployments.outbound.OutboundPolicy: allow, deadline_s, max_bytes)."""
    turn = TurnTaking.bind(**args.get("turn", {}))
    asr = ASR.bind(**args.get("asr", {}))
    policy = args.get("outbound", {})  # deployments.outbound: one policy for the LLM, tool deliveries and webhooks
    llm = LLM.bind(**args.get("llm", {}), outbound_policy=policy)
    tts = TTS.bind(**args.get("tts", {}))
    perception = Perception.bind(**args.get("perception", {}))
    database_url = args.get("ingress", {}).get("database_url")
    knowledge = Knowledge.bind(database_url or default_database_url(), outbound_policy=policy,
                               **args.get("knowledge", {}))
    host = SessionHost.bind(turn, asr, llm, tts, video=args.get("video", {}), perception=perception,
                            database_url=database_url, outbound_policy=policy, knowledge=knowledge,
                            **args.get("memory", {}))
    video = args.get("video", {})
    trainer = ReplicaTrainer.bind(gaussians=int(video.get("gaussians", 20000)), **args.get("replicas", {}))
    return Ingress.bind(host, trainer, knowledge, head_gaussians=int(video.get("gaussians", 20000)), outbound_policy=policy,
                        **args.get("ingress", {}))
