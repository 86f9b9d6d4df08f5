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


def cpu_profile_args() -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())
    return cfg["applications"][0]["args"]


def start_local_app(api_key: str, database_url: str, max_sessions: int | None = None, port: int | None = None,
                    num_gpus: int = 0) -> str:
    """ray.init + serve.run of configs/cpu.yaml's graph; media on loopback only. Returns the base URL
    once /healthz answers. The caller owns shutdown (serve.shutdown(); ray.shutdown())."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PRESENCE_ICE_LOOPBACK"] = "1"  # inherited by the local cluster's workers
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(k, "1")
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = port or free_port()
    ray.init(num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = cpu_profile_args()
    ingress = {**args.get("ingress", {}), "api_keys": [api_key], "database_url": database_url}
    if max_sessions is not None:
        ingress["max_sessions"] = max_sessions
    args["ingress"] = ingress
    serve.run(build_app(args), name="presence", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("Presence did not become healthy within 120 s")
