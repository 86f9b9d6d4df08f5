#!/usr/bin/env bash
# Set up (if needed) and run Presence with the CPU profile; prints the web client's URL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p data
if [ -z "${PRESENCE_API_KEYS:-}" ]; then
  # The key file is the operator's admin key: readable by this user only.
  [ -f data/api_key ] || (umask 077 && python -c "import secrets; print(secrets.token_urlsafe(18))" > data/api_key)
  chmod 600 data/api_key
  PRESENCE_API_KEYS=$(cat data/api_key)
fi
export PRESENCE_API_KEYS
KEY=${PRESENCE_API_KEYS%%,*}

serve run configs/cpu.yaml &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' INT TERM EXIT
for _ in $(seq 1 300); do
  if curl -sf http://127.0.0.1:8000/healthz >/dev/null 2>&1; then break; fi
  if ! kill -0 $SERVE_PID 2>/dev/null; then echo "serve run exited" >&2; exit 1; fi
  sleep 1
done
echo
echo "Presence is up (CPU profile)."
echo "  Web client:  http://127.0.0.1:8000/#key=${KEY}"
echo "  API docs:    http://127.0.0.1:8000/docs   (x-api-key: ${KEY})"
echo "  Metrics:     http://127.0.0.1:8000/metrics"
echo "Ctrl-C to stop."
wait $SERVE_PID
