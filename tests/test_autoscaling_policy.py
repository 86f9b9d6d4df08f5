"""The autoscaling policies as pure functions of their inputs, and through Serve's context type."""

from __future__ import annotations

import pytest

from autoscaling.policy import ModelDeploymentPolicy, SessionHostPolicy, model_replicas, session_host_replicas


def test_session_hosts_follow_sessions_per_replica():
    assert session_host_replicas(1, 0, 1).replicas == 0  # Serve's min_replicas keeps the floor
    assert session_host_replicas(1, 1, 1).replicas == 1
    assert session_host_replicas(1, 3, 1).replicas == 3
    assert session_host_replicas(2, 9, 4).replicas == 3
    assert session_host_replicas(1, 1, 1, headroom_sessions=1).replicas == 2  # one warm slot ahead
    with pytest.raises(ValueError):
        session_host_replicas(1, 1, 0)


def test_session_hosts_scale_up_when_an_slo_breaks():
    ok = session_host_replicas(2, 2, 1, reply_p95_ms=1800, reply_p95_slo_ms=2500)
    assert ok.replicas == 2
    slow = session_host_replicas(2, 2, 1, reply_p95_ms=3100, reply_p95_slo_ms=2500)
    assert slow.replicas == 3 and "reply p95" in slow.reason
    frames = session_host_replicas(3, 2, 1, frame_p95_ms=200, frame_p95_slo_ms=150)
    assert frames.replicas == 4 and "frame p95" in frames.reason
    # A stale p95 with nobody connected does not hold replicas up.
    assert session_host_replicas(3, 0, 1, reply_p95_ms=9000, reply_p95_slo_ms=2500).replicas == 0


def test_model_deployments_follow_queue_and_service_time():
    assert model_replicas(1, 0, 0, 2).replicas == 1  # idle keeps min_replicas
    assert model_replicas(1, 3, 2, 2).replicas == 3
    assert model_replicas(2, 2, 0, 2, service_p95_ms=900, service_p95_slo_ms=400).replicas == 3
    assert model_replicas(2, 0, 0, 2, service_p95_ms=900, service_p95_slo_ms=400).replicas == 1


def context(metrics: dict, current: int, queued: float = 0.0, ongoing: float = 0.0):
    """A real ray.serve.config.AutoscalingContext, as the controller builds it."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="SessionHost", app_name="presence")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(current)]
    per_replica = {name: dict(zip(replicas, values, strict=True)) for name, values in metrics.items()}
    return AutoscalingContext(
        deployment_id=dep, deployment_name="SessionHost", app_name="presence", current_num_replicas=current,
        target_num_replicas=current, running_replicas=replicas, total_num_requests=lambda: ongoing,
        total_queued_requests=lambda: queued, aggregated_metrics=lambda: per_replica, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=None)


def test_policies_read_the_serve_context():
    policy = SessionHostPolicy(target_sessions_per_replica=2, reply_p95_slo_ms=2500, frame_p95_slo_ms=150)
    n, state = policy(context({"sessions": [2, 1], "reply_p95_ms": [1200, 900], "frame_p95_ms": [80, 70]}, 2))
    assert n == 2 and state["presence"]["sessions"] == 3
    n, _ = policy(context({"sessions": [2, 2], "reply_p95_ms": [1200, 900], "frame_p95_ms": [80, 70]}, 2, queued=1,
                              ongoing=5.0))
    assert n == 3  # a session waiting at the handle is demand (Serve counts it as ongoing)
    n, state = policy(context({"sessions": [2, 1], "reply_p95_ms": [3000, 900], "frame_p95_ms": [80, 70]}, 2))
    assert n == 3 and "reply p95" in state["presence"]["reason"]
    # The hand-off measured in a 3-session ramp (2 sessions live, the third refused): a queued session
    # landing on a replica that has just started. The handle's window mean of queued requests and the
    # new replica's window mean of sessions move at different times, so their sum swung from 1.98 to
    # 2.29; Serve's merged ongoing count stayed at 2.00, and the policy follows it.
    one = SessionHostPolicy(target_sessions_per_replica=1)
    for live, queued in (([1.0, 0.77], 0.22), ([1.0, 0.46], 0.82), ([1.0, 0.0], 0.98)):
        n, state = one(context({"sessions": live}, 2, queued=queued, ongoing=2.0))
        assert n == 2, (live, queued, state)
    # A handle that stops reporting (its ingress died) leaves the replicas' own count as the floor.
    assert one(context({"sessions": [1.0, 1.0, 1.0]}, 3, ongoing=0.0))[0] == 3
    # A short call's trace in the window mean is not a session.
    assert one(context({"sessions": [1.0, 1.0]}, 2, ongoing=2.02))[0] == 2
    model = ModelDeploymentPolicy(target_in_flight_per_replica=2, service_p95_slo_ms=500)
    n, _ = model(context({"in_flight": [2, 3], "p95_service_ms": [300, 350]}, 2, queued=1))
    assert n == 3


def test_configs_wire_the_policies():
    """Both profiles name these policies, with Serve's own config model accepting them."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parent.parent
    for profile in ("cpu", "gpu"):
        cfg = yaml.safe_load((root / "configs" / f"{profile}.yaml").read_text())
        schema = ServeDeploySchema.model_validate(cfg)
        deps = {d.name: d for d in schema.applications[0].deployments}
        host = deps["SessionHost"]
        auto = host.autoscaling_config
        assert auto["policy"]["policy_function"] == "autoscaling.policy:SessionHostPolicy"
        assert auto["metrics_interval_s"] <= 1.0 and auto["upscale_delay_s"] <= 5
        # Draining: a stopping replica keeps its sessions for as long as a call may last (4 h).
        assert host.graceful_shutdown_timeout_s >= 4 * 3600
        # Admission: the ingress's session budget is the SessionHost deployment at max_replicas.
        args = schema.applications[0].args
        assert args["ingress"]["max_sessions"] == auto["max_replicas"] * host.max_ongoing_requests
        # Every session the ingress admits can wait at the handle while replicas start (a ramp from
        # one replica): a smaller queue turns a join the autoscaler is about to serve into a 503.
        assert host.max_queued_requests >= args["ingress"]["max_sessions"]
