"""One real local Ray cluster and one Presence Serve app per test session (the CPU profile)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from benchmarks.local_app import start_local_app

API_KEY = "test-key"
# Test webhook receivers listen on this loopback address, the only one the test app's outbound policy
# allows: 127.0.0.1 stays refused, as in production.
RECEIVER_HOST = "127.0.0.2"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    """The test app's database (tests read it to check what is stored, as an operator could)."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'presence.db'}"


@pytest.fixture(scope="session")
def presence(database_url):
    """Base URL of a running Presence app (CPU profile, real models, real Serve)."""
    import ray
    from ray import serve

    yield start_local_app(API_KEY, database_url, max_sessions=2, num_gpus=1,
                          outbound_allow=[f"{RECEIVER_HOST}/32"])
    serve.shutdown()
    ray.shutdown()


class WebhookReceiver:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self, delay_s: float = 0.0, status: int = 200, port: int = 0, reply: dict | None = None) -> None:
        """`reply`: a JSON body to answer with (a tool delivery endpoint); none by default."""
        self.received: list[dict] = []
        self.raw: list[tuple[dict, str]] = []  # (headers, body) as delivered, for signature checks
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                time.sleep(delay_s)  # a slow endpoint
                outer.raw.append((dict(self.headers), body.decode()))
                outer.received.append(json.loads(body))
                self.send_response(status)
                answer = json.dumps(reply).encode() if reply is not None else b""
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((RECEIVER_HOST, port), Handler)
        self.url = f"http://{RECEIVER_HOST}:{self.server.server_address[1]}/hook"
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
