"""configs/gpu.yaml's fractional GPUs, scheduled for real by Ray on this CPU box's one logical GPU:
the minimum replica set plus two more SessionHosts pack onto GPU 0 beside the LLM, and nothing more
fits. Probes stand in for the models (which need CUDA); what is checked is Ray's placement."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from autoscaling.placement import probe_app, replica_plan

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_profile_packs_on_one_gpu(presence):
    import ray
    from ray import serve

    config = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    assert ray.cluster_resources().get("GPU") == 1  # the test cluster's one logical GPU
    minimum = replica_plan(config)
    assert sum(n * opts.get("num_gpus", 0) for n, opts in minimum.values()) <= 1.0
    app, plan = probe_app(config, {"SessionHost": 3})
    wanted = sum(n * opts.get("num_gpus", 0) for n, opts in plan.values())
    assert wanted == pytest.approx(1.0)  # the GPU is full
    handle = serve.run(app, name="gpu-placement", route_prefix=None)
    try:
        report = handle.report.remote().result(timeout_s=120)
        for name, (n, opts) in plan.items():
            infos = report[name]
            assert len(infos) == n, (name, infos)
            for info in infos:
                if opts.get("num_gpus", 0) > 0:
                    assert info["gpu_ids"] == ["0"] and info["cuda_visible_devices"] == "0"
                    assert info["assigned"].get("GPU", 0) == pytest.approx(opts["num_gpus"])
                else:  # CPU-only deployments get no GPU at all
                    assert info["gpu_ids"] == [] and "GPU" not in info["assigned"]
        assert len({i["node_id"] for infos in report.values() for i in infos}) == 1
        deadline = time.time() + 10
        while ray.available_resources().get("GPU", 0) > 1e-6 and time.time() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("GPU", 0) == pytest.approx(0.0, abs=1e-6)

        # One more SessionHost (1/8 GPU) does not fit on this node: Ray leaves it pending (on a
        # cluster the Ray autoscaler would add a GPU worker from cluster.yaml for it).
        @ray.remote(num_cpus=0, num_gpus=plan["SessionHost"][1]["num_gpus"])
        def one_more() -> str:
            return "placed"

        ref = one_more.remote()
        ready, _ = ray.wait([ref], timeout=3)
        assert not ready
        ray.cancel(ref, force=True)
    finally:
        serve.delete("gpu-placement")


def test_gpu_metrics_say_why_they_are_absent(presence):
    """pynvml is installed (dev extra) but this box has no NVIDIA driver: the reader says so."""
    from deployments.gpu_metrics import GPUMetricsExporter, read_gpu_stats, start_gpu_metrics

    stats = read_gpu_stats()
    assert not stats.available and stats.gpus == []
    assert "NVML" in stats.reason or "pynvml" in stats.reason
    exported = GPUMetricsExporter("TestDeployment").export()  # the driver holds no GPU
    assert not exported.available and "no GPU assigned" in exported.reason
    assert start_gpu_metrics("TestDeployment") is None  # CPU replicas start no metrics thread
