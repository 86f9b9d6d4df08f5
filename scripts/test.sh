#!/usr/bin/env bash
# Set up (if needed, including Chromium) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
. .venv/bin/activate
export RAY_AUTH_MODE=disabled
ruff check .
python -m pytest -q -rs "$@"
# A Ray cluster per process: the two-node cluster test runs in its own pytest process, after the rest.
python -m pytest -q -rs -m multinode "$@"
