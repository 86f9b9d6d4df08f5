"""Prometheus metrics of the ingress: sessions and per-turn stage latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
BUCKETS_MS = (50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 2000, 2500, 3000, 4000, 6000, 10000)

LIVE_SESSIONS = Gauge("presence_live_sessions", "Conversations with a live media session", registry=REGISTRY)
SESSIONS_TOTAL = Counter("presence_sessions_total", "Media sessions started", registry=REGISTRY)
SHUTDOWNS = Counter("presence_shutdowns_total", "Sessions ended, by reason", ["reason"], registry=REGISTRY)
REJECTED = Counter("presence_sessions_rejected_total", "Sessions refused for lack of capacity", registry=REGISTRY)
STAGE_MS = Histogram("presence_turn_stage_ms", "Time from the user's speech end to each stage of a turn (ms)",
                     ["stage"], buckets=BUCKETS_MS, registry=REGISTRY)


def observe_turn(ms_from_speech_end: dict[str, float]) -> None:
    for stage, ms in ms_from_speech_end.items():
        STAGE_MS.labels(stage=stage).observe(ms)
