"""Perception in a live WebRTC session: the client's fake camera shows a face (our avatar, rendered
as a user would appear) first neutral, then smiling. The session's perception state, the LLM's view
of the user, a persona's perception tool and the end-of-call webhook all follow the camera."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
from PIL import Image

from benchmarks.rtc_client import PresenceRTCClient
from models.avatar.animate import EMOTIONS
from models.avatar.head import build_head
from models.avatar.render import CPUAvatarRenderer, Pose

PERSONA = {
    "persona_name": "Observer",
    "system_prompt": "You are Sam, on a video call. Answer in one short sentence.",
    "layers": {"perception": {"perception_tools": [
        {"name": "user_smiling", "description": "The user has been smiling for a moment.", "signal": "joy",
         "for_s": 1.0, "min_confidence": 0.4, "llm_tool_call": True}]}},
}


def camera_faces() -> tuple[np.ndarray, np.ndarray]:
    r = CPUAvatarRenderer(build_head(20000), 320, 240)
    return r.render(Pose()).copy(), r.render(Pose().set(**EMOTIONS["joy"])).copy()


async def until(client: PresenceRTCClient, since: int, ok, timeout: float = 30) -> dict:
    """The first conversation.perception event after `since` whose properties satisfy `ok`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for ev in client.events[since:]:
            if ev["event_type"] == "conversation.perception" and ok(ev["properties"]):
                return ev
        assert asyncio.get_running_loop().time() < deadline, [e["properties"] for e in client.events[since:]
                                                              if e["event_type"] == "conversation.perception"]
        await asyncio.sleep(0.1)


async def respond(client: PresenceRTCClient, text: str) -> dict:
    """Send a typed user turn; returns the replica's utterance answering it."""
    since = len(client.events)
    client.send("conversation.respond", text=text)
    return await client.wait_event("conversation.utterance", timeout=90, since=since, role="replica")


def test_smiling_vs_neutral_face_changes_perception_and_llm_context(idle, presence, api_key, webhook):
    neutral, smiling = camera_faces()

    async def run():
        async with httpx.AsyncClient(base_url=presence, headers={"x-api-key": api_key}) as http:
            r = await http.post("/v2/personas", json=PERSONA)
            assert r.status_code == 200, r.text
            pid = r.json()["persona_id"]
            bad = await http.post("/v2/personas", json={**PERSONA, "layers": {"perception": {"perception_tools": [
                {"name": "x", "signal": "bored"}]}}})
            assert bad.status_code == 422
        client = PresenceRTCClient(presence, api_key)
        client.camera.image = neutral
        conv = await client.create(persona_id=pid, conversation_name="perception", callback_url=webhook.url)
        await client.connect()
        calm = await client.wait_event("conversation.perception", timeout=30, visible=True, emotion="neutral")
        assert calm["properties"]["visual"] == "The user looks calm, looking at you."
        first = await respond(client, "Hello there.")
        assert "llm_perception" not in first["properties"]  # calm and attentive: nothing worth telling the LLM

        client.camera.image = smiling
        since = len(client.events)
        happy = await until(client, since, lambda p: p["visual"].startswith("The user is smiling"))
        assert happy["properties"]["emotion"] == "joy"
        assert happy["properties"]["valence"] > 0.2
        tool = await client.wait_event("conversation.perception_tool_call", timeout=15, since=since, name="user_smiling")
        args = tool["properties"]["arguments"]
        assert args["signal"] == "joy" and args["held_s"] >= 1.0
        frame = tool["properties"]["frames"][-1]
        img = Image.open(io.BytesIO(base64.b64decode(frame["jpeg_base64"])))
        assert img.format == "JPEG" and max(img.size) <= 160
        llm_tool = await client.wait_event("conversation.tool_call", timeout=5, since=since, name="user_smiling")
        assert llm_tool["properties"]["source"] == "perception"

        second = await respond(client, "How do I look today?")
        assert "The user is smiling" in second["properties"]["llm_perception"]
        cid = conv["conversation_id"]
        async with httpx.AsyncClient(base_url=presence, headers={"x-api-key": api_key}) as http:
            await http.post(f"/v2/conversations/{cid}/end")
        await client.wait_event("system.shutdown", timeout=15)
        await client.close()
        return cid

    cid = asyncio.run(run())
    analysis = webhook.wait_for("application.perception_analysis")
    props = analysis["conversation_id"] == cid and analysis["properties"]
    assert props["emotion_shares"]["joy"] > 0.05 and props["emotion_shares"]["neutral"] > 0.05
    assert props["attention"] > 0.8 and [t["name"] for t in props["tool_calls"]] == ["user_smiling"]
    assert props["summary"].startswith("The user was visible")
    # The end-of-call analysis arrives before the transcript, and no internal event leaks out.
    webhook.wait_for("application.transcription_ready")  # delivered from the queue, after the call
    types = webhook.types()
    assert types.index("application.perception_analysis") < types.index("application.transcription_ready")
    assert not any(t.startswith("internal.") for t in types)
