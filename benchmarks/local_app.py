"""Start the CPU-profile Presence app on a local Ray cluster in this process (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_profile_config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())


def cpu_profile_args() -> dict:
    return cpu_profile_config()["applications"][0]["args"]


def cpu_llm_model() -> str:
    """The embedded LLM configs/cpu.yaml runs (models.assets.EMBEDDED_LLMS)."""
    return cpu_profile_args()["llm"]["backend_args"]["model"]


def deployment_options(name: str) -> dict:
    """The CPU profile's options for one deployment (for `Deployment.options(**...)` when a benchmark
    deploys it alone): the config file is the one place they are set."""
    for d in cpu_profile_config()["applications"][0]["deployments"]:
        if d["name"] == name:
            return {k: v for k, v in d.items() if k != "name"}
    raise KeyError(name)


def start_local_app(api_key: str, database_url: str, max_sessions: int | None = None, port: int | None = None,
                    num_gpus: int = 0, deployments: dict[str, dict] | None = None, timeout_s: float = 180,
                    llm: dict | None = None, outbound_allow: list[str] | None = None,
                    address: str | None = None) -> str:
    """ray.init, then deploy configs/cpu.yaml exactly as `serve run configs/cpu.yaml` does (its
    deployment options and autoscaling included), with the test's API key, database, port and any
    per-deployment option `deployments` overrides, `llm` (the LLM deployment's args, e.g. another
    embedded model) in place of the profile's, and `outbound_allow` (CIDRs webhooks and persona
    endpoints may reach although internal); media on loopback only. `address`: join that running cluster
    (e.g. a ray.cluster_utils.Cluster) instead of starting a one-node one. Returns the base URL once
    /healthz answers. The caller owns shutdown (serve.shutdown(); ray.shutdown())."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PRESENCE_ICE_LOOPBACK"] = "1"  # inherited by the local cluster's workers
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = port or free_port()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = cpu_profile_config()
    app = cfg["applications"][0]
    ingress = {**app["args"].get("ingress", {}), "api_keys": [api_key], "database_url": database_url}
    if max_sessions is not None:
        ingress["max_sessions"] = max_sessions
    app["args"]["ingress"] = ingress
    if llm is not None:
        app["args"]["llm"] = llm
    if outbound_allow is not None:
        app["args"]["outbound"] = {**app["args"].get("outbound", {}), "allow": outbound_allow}
    for d in app.get("deployments", []):
        d.update((deployments or {}).get(d["name"], {}))
    # What `serve run`/`serve deploy` do with a config file (the HTTP options were set above).
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(
        {"applications": [app], "proxy_location": cfg.get("proxy_location", "HeadOnly")}))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"Presence did not become healthy within {timeout_s:.0f} s")
