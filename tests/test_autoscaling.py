"""Autoscaling on the CPU profile, for real: SessionHost replicas follow live sessions (the policy in
configs/cpu.yaml: one session per replica, 1..2 replicas, 1 s up / 10 s down), a replica being scaled
down drains (keeps its live session, takes no new one), and admission refuses what no replica can host."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from benchmarks.rtc_client import PresenceRTCClient, speech_pcm48k


def host_replicas() -> dict[str, int]:
    from ray import serve

    dep = serve.status().applications["presence"].deployments["SessionHost"]
    return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items() if v}


async def wait_replicas(check, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check(host_replicas()):
            return time.monotonic() - t0
        await asyncio.sleep(0.25)
    raise TimeoutError(f"SessionHost replicas never {what}: {host_replicas()}")


def host_of(presence: str, api_key: str, cid: str) -> str:
    got = httpx.get(f"{presence}/v2/conversations/{cid}", headers={"x-api-key": api_key}).json()
    return got["session_host_replica"]


@pytest.mark.slow
def test_session_hosts_scale_with_sessions_and_drain(idle, presence, api_key, tts):
    question = speech_pcm48k("What is the capital of France?", tts)

    async def run():
        await wait_replicas(lambda r: r == {"RUNNING": 1}, 90, "settled at 1")
        a, b, c = (PresenceRTCClient(presence, api_key) for _ in range(3))
        try:
            await a.create(conversation_name="scale-a")
            await a.connect()
            ra = host_of(presence, api_key, a.conversation["conversation_id"])
            # A second session has no free replica: it waits at the handle, the policy sees the demand
            # and adds a replica (upscale_delay_s 1 s + replica start), and the session lands there.
            t0 = time.monotonic()
            await b.create(conversation_name="scale-b")
            await b.connect(timeout=60)
            up_s = time.monotonic() - t0
            rb = host_of(presence, api_key, b.conversation["conversation_id"])
            assert rb != ra and host_replicas().get("RUNNING") == 2
            assert up_s < 30, f"scale-up took {up_s:.1f} s"

            # A leaves: demand is 1, so Serve stops the newest replica, which still hosts B.
            await a.end()
            await wait_replicas(lambda r: r.get("STOPPING", 0) == 1, 45, "started draining")
            # The draining replica takes no new session: C lands on the remaining one.
            await c.create(conversation_name="scale-c")
            await c.connect(timeout=60)
            assert host_of(presence, api_key, c.conversation["conversation_id"]) != rb
            # B is not cut: it still hears, thinks and answers on the draining replica.
            since = len(b.events)
            await b.say(question)
            user = await b.wait_event("conversation.utterance", timeout=60, since=since, role="user")
            assert "france" in user["properties"]["speech"].lower()
            await b.wait_event("conversation.utterance", timeout=90, since=since, role="replica")
            assert not any(e["event_type"] == "system.shutdown" for e in b.events)
            assert host_replicas().get("STOPPING", 0) == 1
            await b.end()
            await c.end()
            # Once B has ended, the drained replica goes away; one replica is left (min_replicas).
            await wait_replicas(lambda r: r == {"RUNNING": 1}, 60, "came back to 1")
        finally:
            for client in (a, b, c):
                await client.close()
        return a.conversation["conversation_id"], b.conversation["conversation_id"], c.conversation["conversation_id"]

    ids = asyncio.run(run())
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}) as http:
        for cid in ids:
            got = http.get(f"/v2/conversations/{cid}").json()
            assert got["status"] == "ended" and got["shutdown_reason"] == "end_conversation_endpoint_hit", got
        drained = http.get(f"/v2/conversations/{ids[1]}").json()
        assert [u["role"] for u in drained["transcript"]].count("user") == 1


def test_admission_refuses_when_every_slot_is_taken(idle, presence, api_key):
    """max_sessions (= SessionHost max_replicas x max_ongoing_requests) conversations hold every slot:
    the next create is a 503 with Retry-After and a reason, and creates nothing."""
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}) as http:
        cap = http.get("/healthz").json()["max_sessions"]
        held = [http.post("/v2/conversations", json={"conversation_name": f"hold-{i}"}).json() for i in range(cap)]
        try:
            before = http.get("/v2/conversations", params={"limit": 1}).json()["total_count"]
            r = http.post("/v2/conversations", json={"conversation_name": "one too many"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
            assert r.json()["reason"] == "capacity" and "max_replicas" in r.json()["detail"]
            assert http.get("/v2/conversations", params={"limit": 1}).json()["total_count"] == before
        finally:
            for conv in held:
                http.post(f"/v2/conversations/{conv['conversation_id']}/end")
        again = http.post("/v2/conversations", json={"conversation_name": "fits again"})
        assert again.status_code == 200
        http.post(f"/v2/conversations/{again.json()['conversation_id']}/end")
