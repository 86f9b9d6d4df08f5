"""cluster.yaml through Ray's own cluster-launcher validation, and the KubeRay RayService carrying
the same Serve config as configs/gpu.yaml."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("cluster.yaml")
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # raises on any schema or consistency error
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types and all(v["max_workers"] >= v["min_workers"] for v in gpu_types.values())
    assert sum(v["min_workers"] for v in types.values()) <= prepared["max_workers"]
    start = " ".join(prepared["head_start_ray_commands"])
    assert "serve deploy configs/gpu.yaml" in start and "--autoscaling-config" in start
    assert any("-e \".[gpu]\"" in c for c in prepared["setup_commands"])

    broken = copy.deepcopy(cfg)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_rayservice_carries_the_gpu_serve_config():
    spec = importlib.util.spec_from_file_location("make_rayservice", ROOT / "scripts" / "make_rayservice.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()
    assert committed == gen.render(), "run python scripts/make_rayservice.py"
    manifest = yaml.safe_load(committed)
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_cfg == load("configs/gpu.yaml")
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_cfg)
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1 and group["maxReplicas"] >= group["minReplicas"]
