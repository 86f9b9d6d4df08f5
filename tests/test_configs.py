"""The Serve config files parse as Serve schemas and name real deployments; importing the project
never needs the GPU libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENTS = {"SessionHost", "ASR", "LLM", "TTS", "TurnTaking", "Perception", "ReplicaTrainer", "Knowledge", "Ingress"}


def test_profiles_are_valid_serve_configs():
    for name in ("cpu", "gpu"):
        cfg = ServeDeploySchema(**yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))
        app = cfg.applications[0]
        assert app.import_path == "serve_app.app:build_app"
        assert {d.name for d in app.deployments} == DEPLOYMENTS


def test_gpu_profile_uses_fractional_gpus_and_real_backends():
    cfg = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())["applications"][0]
    gpus = {d["name"]: d.get("ray_actor_options", {}).get("num_gpus", 0) for d in cfg["deployments"]}
    assert 0 < gpus["SessionHost"] < 1 and 0 < gpus["LLM"] < 1 and 0 < gpus["ASR"] < 1
    assert cfg["args"]["llm"]["backend"] == "vllm" and cfg["args"]["asr"]["device"] == "cuda"


def test_import_without_gpu_libraries():
    code = ("import sys; sys.modules['vllm'] = None; sys.modules['gsplat'] = None; sys.modules['pynvml'] = None; "
            "import serve_app.app, deployments.llm, models.llm, models.avatar.render")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_deployment_options_come_from_the_config_files():
    """The decorators set no options, so what configs/*.yaml say is what runs; and each profile
    sets the options a deployment needs (resources, capacity) for every deployment."""
    from deployments.asr import ASR
    from deployments.knowledge import Knowledge
    from deployments.llm import LLM
    from deployments.perception import Perception
    from deployments.replica_trainer import ReplicaTrainer
    from deployments.tts import TTS
    from deployments.turn_taking import TurnTaking
    from serve_app.api import Ingress
    from serve_app.session_host import SessionHost

    for d in (ASR, LLM, Perception, ReplicaTrainer, TTS, TurnTaking, Knowledge, Ingress, SessionHost):
        assert d._deployment_config.user_configured_option_names == set(), d.name
    for name in ("cpu", "gpu"):
        for d in yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["applications"][0]["deployments"]:
            assert "ray_actor_options" in d and "max_ongoing_requests" in d, (name, d["name"])
