"""Custom Ray Serve autoscaling policies: SessionHost on live sessions and reply p95, model
deployments on queue depth and p95 service time.

Serve 2.60 calls a policy once per control-loop tick with an `AutoscalingContext` and takes back
`(desired_replicas, policy_state)`; it then applies `upscale_delay_s` / `downscale_delay_s`, the
up/down-scaling factors and `min_replicas` / `max_replicas` itself. Policies are classes because
Serve passes `policy_kwargs` only to a class constructor (a plain function gets none).

The decisions are pure functions (`session_host_replicas`, `model_replicas`) so they can be tested
without Ray; the classes only read the context.

    autoscaling_config:
      metrics_interval_s: 0.5          # replicas push every 0.5 s (the default 10 s reacts in ~40 s)
      look_back_period_s: 5
      upscale_delay_s: 1
      downscale_delay_s: 10
      policy:
        policy_function: autoscaling.policy:SessionHostPolicy
        policy_kwargs: {target_sessions_per_replica: 1, reply_p95_slo_ms: 2500}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoscaling import stats

log = logging.getLogger("ray.serve")


# Window means of session counts carry short calls (a status query for 0.1 s adds 0.02 over a 5 s
# window): a session is counted from 0.05 of one, so noise never asks for a replica.
SESSION_TOLERANCE = 0.05


@dataclass(frozen=True)
class Decision:
    """A policy's answer and the reason it gives (logged in the policy state, shown in tests)."""

    replicas: int
    reason: str


def session_host_replicas(
    current: int,
    sessions: float,
    target_sessions_per_replica: float,
    reply_p95_ms: float | None = None,
    reply_p95_slo_ms: float | None = None,
    frame_p95_ms: float | None = None,
    frame_p95_slo_ms: float | None = None,
    headroom_sessions: float = 0.0,
) -> Decision:
    """Replicas for `sessions` live (or waiting) conversations.

    Base: ceil((sessions + headroom) / target). When a latency p95 over the look-back window exceeds
    its SLO while sessions are live, the replicas are too loaded for their share: ask for one more
    than now (never fewer than the base). Scale-down below the base is never proposed while an SLO
    is broken, and a replica with live sessions is drained, not cut, by Serve's graceful shutdown.
    """
    if target_sessions_per_replica <= 0:
        raise ValueError("target_sessions_per_replica must be positive")
    demand = max(0.0, sessions - SESSION_TOLERANCE) + max(0.0, headroom_sessions)
    base = math.ceil(demand / target_sessions_per_replica - 1e-9)
    breaches = []
    if sessions > 0 and reply_p95_slo_ms and reply_p95_ms is not None and reply_p95_ms > reply_p95_slo_ms:
        breaches.append(f"reply p95 {reply_p95_ms:.0f} ms > {reply_p95_slo_ms:.0f} ms")
    if sessions > 0 and frame_p95_slo_ms and frame_p95_ms is not None and frame_p95_ms > frame_p95_slo_ms:
        breaches.append(f"frame p95 {frame_p95_ms:.0f} ms > {frame_p95_slo_ms:.0f} ms")
    if breaches:
        return Decision(max(base, current + 1), "; ".join(breaches))
    return Decision(base, f"{sessions:g} sessions / {target_sessions_per_replica:g} per replica")


def model_replicas(
    current: int,
    in_flight: float,
    queued: float,
    target_in_flight_per_replica: float,
    service_p95_ms: float | None = None,
    service_p95_slo_ms: float | None = None,
    min_replicas: int = 1,
) -> Decision:
    """Replicas for a shared model deployment (ASR, LLM, TTS, TurnTaking, Perception).

    Base: ceil((in_flight + queued) / target). A p95 service time over its SLO while there is work
    asks for one more replica than now; an idle deployment keeps `min_replicas`.
    """
    if target_in_flight_per_replica <= 0:
        raise ValueError("target_in_flight_per_replica must be positive")
    load = max(0.0, in_flight) + max(0.0, queued)
    base = max(min_replicas, math.ceil(load / target_in_flight_per_replica - 1e-9))
    if load > 0 and service_p95_slo_ms and service_p95_ms is not None and service_p95_ms > service_p95_slo_ms:
        return Decision(max(base, current + 1), f"service p95 {service_p95_ms:.0f} ms > {service_p95_slo_ms:.0f} ms")
    return Decision(base, f"load {load:g} / {target_in_flight_per_replica:g} per replica")


def _per_replica(ctx: Any, name: str) -> Mapping[Any, float]:
    metrics = ctx.aggregated_metrics or {}
    return metrics.get(name) or {}


def _worst(values: Mapping[Any, float]) -> float | None:
    return max(values.values()) if values else None


class SessionHostPolicy:
    """Serve policy for SessionHost: live sessions per replica against a target, raised on a broken
    reply-latency or frame-time SLO. Reads the `sessions`, `reply_p95_ms` and `frame_p95_ms` stats
    that SessionHost reports through `record_autoscaling_stats`, plus requests waiting at handles."""

    def __init__(self, target_sessions_per_replica: float = 1.0, reply_p95_slo_ms: float | None = None,
                 frame_p95_slo_ms: float | None = None, headroom_sessions: float = 0.0) -> None:
        self.target = float(target_sessions_per_replica)
        self.reply_slo = reply_p95_slo_ms
        self.frame_slo = frame_p95_slo_ms
        self.headroom = float(headroom_sessions)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        sessions = sum(_per_replica(ctx, stats.SESSIONS).values())
        # Serve's own count of the deployment's ongoing calls (running + queued at handles, one
        # merged series) is live plus waiting sessions. Summing the replicas' `sessions` with the
        # handles' queue instead mixes two window means that move at different times when a waiting
        # session lands on a new replica: measured in a 3-session ramp, the sum swung 1.98..2.29 around
        # a true 2 and started, then stopped, a replica. The replicas' own count is the floor for a
        # handle whose reports stop (its ingress replica died).
        waiting = float(ctx.total_queued_requests or 0.0)
        ongoing = float(ctx.total_num_requests or 0.0)
        demand = max(ongoing, sessions)
        decision = session_host_replicas(
            ctx.current_num_replicas, demand, self.target,
            _worst(_per_replica(ctx, stats.REPLY_P95_MS)), self.reply_slo,
            _worst(_per_replica(ctx, stats.FRAME_P95_MS)), self.frame_slo, self.headroom,
        )
        state = dict(ctx.policy_state or {})
        state["presence"] = {"replicas": decision.replicas, "reason": decision.reason, "sessions": sessions,
                             "waiting": waiting, "ongoing": ongoing}
        seen = [decision.replicas, ctx.current_num_replicas]
        if (ctx.policy_state or {}).get("presence_seen") != seen:  # one log line per change, not per tick
            log.info("SessionHostPolicy: %d replicas wanted, %d running: live sessions %s, waiting %.2f, "
                     "ongoing %.2f (%s)", decision.replicas, ctx.current_num_replicas,
                     {str(r.unique_id): round(v, 2) for r, v in _per_replica(ctx, stats.SESSIONS).items()},
                     waiting, ongoing, decision.reason)
        state["presence_seen"] = seen
        return decision.replicas, state


class ModelDeploymentPolicy:
    """Serve policy for shared model deployments: in-flight plus queued calls per replica against a
    target, raised on a broken p95 service-time SLO (`in_flight` and `p95_service_ms` come from
    `ServiceTimes.stats()` in each replica)."""

    def __init__(self, target_in_flight_per_replica: float = 2.0, service_p95_slo_ms: float | None = None,
                 min_replicas: int = 1) -> None:
        self.target = float(target_in_flight_per_replica)
        self.slo = service_p95_slo_ms
        self.min_replicas = int(min_replicas)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        in_flight = sum(_per_replica(ctx, stats.IN_FLIGHT).values())
        decision = model_replicas(
            ctx.current_num_replicas, in_flight, float(ctx.total_queued_requests or 0.0), self.target,
            _worst(_per_replica(ctx, stats.P95_SERVICE_MS)), self.slo, self.min_replicas,
        )
        state = dict(ctx.policy_state or {})
        state["presence"] = {"replicas": decision.replicas, "reason": decision.reason}
        return decision.replicas, state
