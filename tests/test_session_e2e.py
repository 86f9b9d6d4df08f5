"""A real aiortc participant on loopback talks to the avatar through Serve: events, audio, video,
transcript in the database, webhooks, ending, echo, two sessions at once."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest

from benchmarks.rtc_client import PresenceRTCClient, speech_pcm48k
from serve_app.session.recovery import HOLDING_PHRASE

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def question(tts):
    return speech_pcm48k(QUESTION, tts)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


async def one_turn(client: PresenceRTCClient, pcm: np.ndarray) -> tuple[dict, dict, float]:
    await asyncio.sleep(0.5)
    since = len(client.events)
    speech_end = await client.say(pcm)
    user = await client.wait_event("conversation.utterance", timeout=60, since=since, role="user")
    replica = await client.wait_event("conversation.utterance", timeout=90, since=since, role="replica")
    return user, replica, speech_end


def test_spoken_turn_end_to_end(idle, presence, api_key, question, webhook):
    async def run():
        client = PresenceRTCClient(presence, api_key)
        conv = await client.create(conversation_name="e2e", callback_url=webhook.url)
        await client.connect()
        user, replica, speech_end = await one_turn(client, question)
        assert {"capital", "france"} <= words(user["properties"]["speech"])
        # Perception's voice part describes how the question sounded.
        assert user["properties"]["user_audio_analysis"].startswith("The user spoke")
        assert replica["properties"]["speech"].strip()
        timings = await client.wait_event("conversation.turn_timings", timeout=10)
        ms = timings["properties"]["ms_from_speech_end"]
        assert ms["vad_pause"] < ms["asr_final"] <= ms["first_audio_sent"]
        # llama.cpp's account of the reply's prompt: the persona's prompt, and the new turn processed.
        prompt = timings["properties"]["llm_prompt"]
        assert prompt["processed"] >= 1 and prompt["cached"] + prompt["processed"] > 50, prompt
        first_audio = client.first_audio_after(speech_end)
        assert first_audio is not None  # the reply was audible at the client
        kinds = [e["event_type"] for e in client.events]
        order = ["system.replica_joined", "conversation.user.started_speaking", "conversation.user.stopped_speaking",
                 "conversation.replica.started_speaking", "conversation.replica.stopped_speaking"]
        positions = [kinds.index(k) for k in order]
        assert positions == sorted(positions), kinds
        # The avatar's mouth moved while the reply played, more than while it listened.
        speaking = [d for t, d in client.rx.mouth if first_audio <= t <= replica["received_at"]]
        listening = [d for t, d in client.rx.mouth if t < speech_end]
        assert client.rx.frames > 20 and speaking and listening
        assert np.mean(speaking) > 1.5 * np.mean(listening) + 0.1
        cid = conv["conversation_id"]
        async with httpx.AsyncClient(base_url=presence, headers={"x-api-key": api_key}) as http:
            r = await http.post(f"/v2/conversations/{cid}/end")
            assert r.json()["status"] == "ended"
            await client.wait_event("system.shutdown", timeout=10)
            got = (await http.get(f"/v2/conversations/{cid}")).json()
        await client.close()
        return cid, got

    cid, got = asyncio.run(run())
    assert got["status"] == "ended" and got["shutdown_reason"] == "end_conversation_endpoint_hit"
    roles = [t["role"] for t in got["transcript"]]
    assert roles[:2] == ["user", "replica"]
    assert "france" in got["transcript"][0]["content"].lower()
    done = webhook.wait_for("application.transcription_ready")
    assert done["conversation_id"] == cid
    assert [t["role"] for t in done["properties"]["transcript"]][:2] == ["user", "replica"]
    types = webhook.types()
    assert "system.replica_joined" in types and "system.shutdown" in types
    assert all(t.startswith(("system.", "application.")) for t in types)
    shutdown = next(e for e in webhook.received if e["event_type"] == "system.shutdown")
    assert shutdown["properties"]["shutdown_reason"] == "end_conversation_endpoint_hit"
    assert types.count("system.shutdown") == 1 and types.count("application.transcription_ready") == 1
    # Every delivery is signed (Standard Webhooks) with the deployment's secret, and verifies.
    from serve_app.webhooks import verify

    secret = httpx.get(f"{presence}/v2/webhooks/secret", headers={"x-api-key": api_key}).json()["secret"]
    assert webhook.raw and all(verify(secret, h, body) for h, body in webhook.raw)
    assert len({h["webhook-id"] for h, _ in webhook.raw}) == len(webhook.raw)


def test_two_sessions_at_once(idle, presence, api_key, question):
    async def session():
        client = PresenceRTCClient(presence, api_key)
        await client.create(conversation_name="parallel")
        await client.connect()
        user, replica, _ = await one_turn(client, question)
        await client.end()
        await client.close()
        return user["properties"]["speech"], replica["properties"]["speech"]

    async def both():
        return await asyncio.gather(session(), session())

    results = asyncio.run(both())
    for user_text, replica_text in results:
        assert "france" in user_text.lower() and replica_text.strip()


def test_echo_interrupt_and_client_leaving(idle, presence, api_key):
    async def run():
        client = PresenceRTCClient(presence, api_key)
        conv = await client.create(conversation_name="echo", properties={"participant_left_timeout": 0})
        await client.connect()
        client.send("conversation.echo", text="Hello there. This is a rather long sentence that I will say now, "
                                              "and it keeps going for quite a while so that it can be interrupted.")
        await client.wait_event("conversation.replica.started_speaking", timeout=30)
        await asyncio.sleep(1.0)
        client.send("conversation.interrupt")
        stopped = await client.wait_event("conversation.replica.stopped_speaking", timeout=10)
        said = await client.wait_event("conversation.utterance", timeout=10, role="replica")
        client.channel.send("{not json")
        err = await client.wait_event("system.error", timeout=10)
        await client.close()  # the participant disappears without ending the call
        async with httpx.AsyncClient(base_url=presence, headers={"x-api-key": api_key}) as http:
            for _ in range(60):
                got = (await http.get(f"/v2/conversations/{conv['conversation_id']}")).json()
                if got["status"] == "ended":
                    break
                await asyncio.sleep(0.5)
        return stopped, said, err, got

    stopped, said, err, got = asyncio.run(run())
    assert stopped["properties"]["interrupted"] is True
    text = said["properties"]["speech"]
    assert said["properties"]["interrupted"] and text.startswith("Hello") and "interrupted." not in text
    assert err["properties"]["code"] == "bad_message"
    assert got["status"] == "ended" and got["shutdown_reason"] == "participant_left_timeout"
    assert got["transcript"] and got["transcript"][0]["role"] == "replica"


def _kill_replica(deployment: str) -> int:
    """kill -9 the deployment's replica process (found by the title Ray gives it); returns its pid."""
    import os
    import signal
    from pathlib import Path

    title = re.compile(rf"^ray::ServeReplica:presence:{deployment}(\.|\s|$)")
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.match(cmdline):
            pids.append(int(proc.name))
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def _wait_running(deployment: str, timeout_s: float = 120) -> None:
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications["presence"].deployments[deployment].replica_states
        if states.get("RUNNING", 0) >= 1 and sum(states.values()) == states.get("RUNNING", 0):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{deployment} did not come back")


@pytest.mark.parametrize("stage", ["TTS", "LLM"])
def test_a_model_replica_killed_mid_turn(idle, presence, api_key, question, stage):
    """kill -9 of the stage's replica as the user stops talking: the avatar says a holding phrase soon
    after the turn is decided, then the real reply from the restarted replica; the turn is kept."""
    async def run():
        client = PresenceRTCClient(presence, api_key)
        conv = await client.create(conversation_name=f"kill-{stage}")
        await client.connect()
        await one_turn(client, question)  # a normal turn first
        await asyncio.sleep(0.5)
        since = len(client.events)
        speech_end = await client.say(question)
        _kill_replica(stage)
        user = await client.wait_event("conversation.utterance", timeout=60, since=since, role="user")
        replica = await client.wait_event("conversation.utterance", timeout=90, since=since, role="replica")
        timings = await client.wait_event("conversation.turn_timings", timeout=10, since=since)
        first_audio = client.first_audio_after(speech_end)
        await client.end()
        await client.close()
        async with httpx.AsyncClient(base_url=presence, headers={"x-api-key": api_key}) as http:
            got = (await http.get(f"/v2/conversations/{conv['conversation_id']}")).json()
        return user, replica, timings, first_audio, speech_end, got

    try:
        user, replica, timings, first_audio, speech_end, got = asyncio.run(run())
    finally:
        _wait_running(stage)
    heard_s = first_audio - user["received_at"]
    reply_s = timings["properties"]["ms_from_speech_end"]["first_audio_sent"] / 1000
    print(f"{stage} killed: audio {heard_s:.2f} s after the turn was decided; the reply's own audio "
          f"{reply_s:.2f} s after speech end (the holding phrase at {first_audio - speech_end:.2f} s)")
    assert heard_s < 2.5  # the holding phrase (2 s, with slack for this loaded 2-core box)
    assert first_audio - speech_end < reply_s - 0.3  # ... which is not the reply
    assert "france" in user["properties"]["speech"].lower() and replica["properties"]["speech"].strip()
    assert HOLDING_PHRASE not in replica["properties"]["speech"]  # the LLM itself may say "moment"
    contents = [t["content"] for t in got["transcript"]]
    assert len(contents) == 4 and HOLDING_PHRASE not in " ".join(contents)
