"""Dry-run a profile's fractional-GPU packing on any machine: every deployment of a Serve config is
replaced by a probe with the same name, replica count and `ray_actor_options` (GPU fractions
included), and each probe reports where Ray placed it and which GPU it was given.

    python -m autoscaling.placement configs/gpu.yaml --gpus 1 --session-hosts 3

On a CPU box Ray's GPUs are logical (`ray.init(num_gpus=...)`), which is exactly what the scheduler
packs: the probes prove that the fractions fit beside the LLM on one node, not that the models do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PlacementProbe:
    """Stands in for a model deployment; reports its placement."""

    def __init__(self, name: str) -> None:
        import ray

        ctx = ray.get_runtime_context()
        self.info = {
            "deployment": name, "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "assigned": ctx.get_assigned_resources(),
        }

    async def where(self) -> dict[str, Any]:
        return self.info


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PlacementReport:
    """Collects every probe replica's placement (calls each deployment until all replicas answered)."""

    def __init__(self, replicas: dict[str, int], **probes) -> None:
        self.replicas = replicas
        self.probes = probes

    async def report(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for name, handle in self.probes.items():
            seen: dict[int, dict] = {}
            for _ in range(200):
                if len(seen) >= self.replicas[name]:
                    break
                infos = await asyncio.gather(*(handle.where.remote() for _ in range(8)))
                seen.update({i["pid"]: i for i in infos})
            out[name] = list(seen.values())
        return out


def replica_plan(config: dict, overrides: dict[str, int] | None = None) -> dict[str, tuple[int, dict]]:
    """name -> (replicas, ray_actor_options) of the first application's deployments (no Ingress):
    `num_replicas`, else autoscaling `min_replicas`, unless `overrides` says otherwise."""
    plan = {}
    for d in config["applications"][0].get("deployments", []):
        if d["name"] == "Ingress":
            continue
        auto = d.get("autoscaling_config") or {}
        n = int(d.get("num_replicas") or auto.get("min_replicas") or 1)
        plan[d["name"]] = (int((overrides or {}).get(d["name"], n)), dict(d.get("ray_actor_options") or {}))
    return plan


def probe_app(config: dict, overrides: dict[str, int] | None = None, zero_cpus: bool = True):
    """The probe application for `config`. `zero_cpus` drops CPU requests so a small box can host it."""
    plan = replica_plan(config, overrides)
    probes = {}
    for name, (n, opts) in plan.items():
        opts = {**opts, "num_cpus": 0} if zero_cpus else opts
        probes[name] = PlacementProbe.options(name=name, num_replicas=n, ray_actor_options=opts).bind(name)
    return PlacementReport.bind({k: v[0] for k, v in plan.items()}, **probes), plan


def main() -> None:
    import ray
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--gpus", type=float, default=1, help="logical GPUs on this node")
    ap.add_argument("--session-hosts", type=int, help="SessionHost replicas to place")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    config = yaml.safe_load(a.config.read_text())
    ray.init(num_gpus=a.gpus, include_dashboard=False, log_to_driver=False)
    overrides = {"SessionHost": a.session_hosts} if a.session_hosts else None
    app, _ = probe_app(config, overrides)
    handle = serve.run(app, name="placement", route_prefix=None)
    report = handle.report.remote().result()
    for name, infos in report.items():
        for i in infos:
            print(f"{name:12s} pid {i['pid']:>7}  GPU {','.join(i['gpu_ids']) or '-':>3}  {json.dumps(i['assigned'])}")
    print("GPU left on the node:", ray.available_resources().get("GPU", 0.0))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
