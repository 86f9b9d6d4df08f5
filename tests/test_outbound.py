"""The outbound-HTTP policy and the webhook queue, against real local HTTP servers and a real
database (no Ray): refused destinations, no redirects, byte and time caps, Standard Webhooks
signatures, per-endpoint isolation and a queue that survives a restart."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from deployments import outbound
from serve_app.db import Store
from serve_app.webhooks import WebhookQueue, new_secret, sign, verify
from tests.conftest import RECEIVER_HOST, WebhookReceiver

ALLOW = outbound.OutboundPolicy(allow=(f"{RECEIVER_HOST}/32",), deadline_s=3, max_bytes=1000)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:8265/api/jobs/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.1.2.3/v1", "private"),
    ("http://[::1]:8000/v1", "loopback"),
    ("http://[::ffff:127.0.0.1]/v1", "loopback"),
    ("http://localhost:9/v1", "loopback"),
    ("http://0.0.0.0:8000/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
])
def test_internal_destinations_are_refused(url, why):
    with pytest.raises(ValueError, match=why):
        asyncio.run(outbound.check_destination(url, outbound.OutboundPolicy()))


@pytest.mark.parametrize("url, base_url, why", [
    ("http://8.8.8.8/v1?x=", True, "query"),
    ("http://user:pw@8.8.8.8/v1", False, "credentials"),
    ("file:///etc/passwd", False, "http"),
])
def test_malformed_destinations_are_refused(url, base_url, why):
    with pytest.raises(ValueError, match=why):
        outbound.check_url(url, base_url=base_url)


def test_public_and_allowlisted_destinations_pass():
    asyncio.run(outbound.check_destination("http://8.8.8.8/v1", outbound.OutboundPolicy(), base_url=True))
    asyncio.run(outbound.check_destination(f"http://{RECEIVER_HOST}:9/hook", ALLOW))


def test_connect_time_check_catches_a_name_that_resolves_inside():
    """A URL that passed a create-time check may resolve elsewhere later (DNS rebinding): the
    connection itself is checked, on the address actually dialled."""
    async def run():
        async with outbound.client(outbound.OutboundPolicy()) as http:
            with pytest.raises(httpx.ConnectError, match="loopback"):
                await http.get("http://localhost:9/")
    asyncio.run(run())


def test_no_redirects_and_caps():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://127.0.0.1:8265/")
                self.end_headers()
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"x" * 5000)
            else:  # slow drip
                self.send_response(200)
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((RECEIVER_HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{RECEIVER_HOST}:{server.server_address[1]}"

    async def run():
        async with outbound.client(ALLOW) as http:
            assert (await outbound.post(http, f"{base}/redirect", ALLOW))[0] == 302  # returned, never followed
            with pytest.raises(ValueError, match="bytes"):
                await outbound.post(http, f"{base}/big", ALLOW)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await outbound.post(http, f"{base}/drip", ALLOW)
            assert time.monotonic() - t0 < ALLOW.deadline_s + 1
    try:
        asyncio.run(run())
    finally:
        server.shutdown()


def test_signature_recipe():
    secret = new_secret()
    body = '{"event_type":"system.shutdown"}'
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": sign(secret, "msg_1", ts, body)}
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body.replace("shutdown", "error"))
    assert not verify(new_secret(), headers, body)
    assert not verify(secret, {**headers, "webhook-timestamp": str(ts - 3600),
                               "webhook-signature": sign(secret, "msg_1", ts - 3600, body)}, body)  # replayed


async def _until(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.05)


def test_slow_endpoint_does_not_delay_another(tmp_path):
    slow, fast = WebhookReceiver(delay_s=2.5), WebhookReceiver()
    store = Store(f"sqlite:///{tmp_path / 'q.db'}")
    policy = outbound.OutboundPolicy(allow=(f"{RECEIVER_HOST}/32",), deadline_s=10)
    secret = new_secret()

    async def run():
        queue = WebhookQueue(store, secret, policy, per_endpoint=1)
        loop = asyncio.ensure_future(queue.run())
        for i in range(3):
            queue.enqueue(slow.url, {"event_type": "application.transcription_ready", "n": i})
        queue.enqueue(fast.url, {"event_type": "application.transcription_ready", "n": 99})
        queue.wake()
        t0 = time.monotonic()
        await _until(lambda: fast.received, 5)
        fast_s = time.monotonic() - t0
        await _until(lambda: len(slow.received) == 3, 15)
        loop.cancel()
        await queue.aclose()
        return fast_s

    try:
        fast_s = asyncio.run(run())
    finally:
        slow.server.shutdown(), fast.server.shutdown()
    assert fast_s < 1.0, fast_s  # not behind the slow endpoint's 3 x 2.5 s
    assert [e["n"] for e in slow.received] == [0, 1, 2]  # one at a time, in order, per endpoint
    for headers, body in slow.raw + fast.raw:
        assert verify(secret, headers, body)
    assert len({h["webhook-id"] for h, _ in slow.raw}) == 3


def test_queued_webhook_survives_a_restart(tmp_path):
    store_path = f"sqlite:///{tmp_path / 'q.db'}"
    policy = outbound.OutboundPolicy(allow=(f"{RECEIVER_HOST}/32",), deadline_s=2)
    down = WebhookReceiver()
    url = down.url
    down.server.shutdown(), down.server.server_close()  # the endpoint is down when the event happens

    async def first_life():
        queue = WebhookQueue(Store(store_path), new_secret(), policy)
        loop = asyncio.ensure_future(queue.run())
        queue.enqueue(url, {"event_type": "application.transcription_ready"})
        queue.wake()
        await asyncio.sleep(1.0)  # it tries, fails and backs off; then the ingress dies
        loop.cancel()
        await queue.aclose()

    asyncio.run(first_life())
    store = Store(store_path)
    (row,) = store.webhooks()
    assert row.status == "pending" and row.attempts >= 1 and row.last_error
    # The endpoint comes back; a new ingress (a new queue on the same database) delivers.
    back = WebhookReceiver(port=int(url.rsplit(":", 1)[1].split("/")[0]))

    async def second_life():
        store.webhook_done(row.id, "pending", row.attempts, time.time())  # due now rather than after its backoff
        queue = WebhookQueue(store, new_secret(), policy)
        loop = asyncio.ensure_future(queue.run())
        await _until(lambda: back.received, 5)
        loop.cancel()
        await queue.aclose()

    try:
        asyncio.run(second_life())
    finally:
        back.server.shutdown()
    assert back.received[0]["event_type"] == "application.transcription_ready"
    assert store.webhooks()[0].status == "delivered"


def test_upstream_error_bodies_never_travel_on():
    """Was: a non-200 body (300 characters, a traceback) went to the participant and the webhook."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from models.llm import EndpointError, GenerationParams, OpenAICompatibleLLM

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"Traceback (most recent call last): secret=sk-live-123 at /srv/app.py")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((RECEIVER_HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def run():
        llm = OpenAICompatibleLLM(f"http://{RECEIVER_HOST}:{server.server_address[1]}/v1",
                                  http=outbound.client(ALLOW))
        with pytest.raises(EndpointError) as err:
            async for _ in llm.stream([{"role": "user", "content": "hi"}], GenerationParams()):
                pass
        await llm.aclose()
        return str(err.value)
    try:
        message = asyncio.run(run())
    finally:
        server.shutdown()
    assert "500" in message and "Traceback" not in message and "sk-live" not in message
