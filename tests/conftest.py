"""One real local Ray cluster and one Presence Serve app per test session (the CPU profile)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["PRESENCE_ICE_LOOPBACK"] = "1"
for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_k, "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_profile_args() -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())
    return cfg["applications"][0]["args"]


@pytest.fixture(scope="session")
def presence(tmp_path_factory):
    """Base URL of a running Presence app (CPU profile, real models, real Serve)."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    db = tmp_path_factory.mktemp("db") / "presence.db"
    port = free_port()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = cpu_profile_args()
    args["ingress"] = {**args.get("ingress", {}), "api_keys": [API_KEY], "database_url": f"sqlite:///{db}",
                       "max_sessions": 2}
    serve.run(build_app(args), name="presence", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield base
    serve.shutdown()
    ray.shutdown()


class WebhookReceiver:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self) -> list[str]:
        return [e["event_type"] for e in self.received]

    def wait_for(self, event_type: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for e in self.received:
                if e["event_type"] == event_type:
                    return e
            time.sleep(0.1)
        raise TimeoutError(f"webhook never got {event_type}; got {self.types()}")


@pytest.fixture
def idle(presence):
    """Waits until no media session is live (earlier tests' sessions have drained)."""
    deadline = time.time() + 90
    while time.time() < deadline and httpx.get(f"{presence}/healthz", timeout=5).json()["live_sessions"]:
        time.sleep(0.5)
    return presence


@pytest.fixture
def webhook():
    rx = WebhookReceiver()
    yield rx
    rx.server.shutdown()


@pytest.fixture(scope="session")
def tts():
    from models.tts import PiperTTS

    return PiperTTS()


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY
