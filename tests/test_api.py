"""REST API over real HTTP through the Serve proxy: auth, personas, conversations, bad input."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def http(presence, api_key):
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}, timeout=30) as c:
        yield c


def test_auth_required(presence):
    r = httpx.post(f"{presence}/v2/conversations", json={})
    assert r.status_code == 401
    r = httpx.get(f"{presence}/v2/personas", headers={"x-api-key": "wrong"})
    assert r.status_code == 401


def test_openapi_and_client_served(presence):
    spec = httpx.get(f"{presence}/openapi.json").json()
    assert "/v2/conversations" in spec["paths"] and "/v2/personas/{persona_id}" in spec["paths"]
    page = httpx.get(f"{presence}/")
    assert page.status_code == 200 and "Presence" in page.text
    assert httpx.get(f"{presence}/static/client.js").status_code == 200


def test_persona_crud_and_validation(http):
    r = http.post("/v2/personas", json={"persona_name": "Tutor", "system_prompt": "You teach maths.",
                                        "layers": {"llm": {"base_url": "http://8.8.8.8/v1", "api_key": "sk-secret",
                                                           "model": "m"},
                                                   "conversational_flow": {"turn_taking_patience": "high"}}})
    assert r.status_code == 200, r.text
    persona = r.json()
    pid = persona["persona_id"]
    assert persona["layers"]["llm"]["api_key"] == "***"
    assert http.get(f"/v2/personas/{pid}").json()["system_prompt"] == "You teach maths."
    r = http.patch(f"/v2/personas/{pid}", json={"context": "Fractions today."})
    assert r.status_code == 200 and r.json()["context"] == "Fractions today."
    listed = http.get("/v2/personas", params={"limit": 100}).json()
    assert any(p["persona_id"] == pid for p in listed["data"])
    assert http.post("/v2/personas", json={"persona_name": ""}).status_code == 422
    bad_flow = {"persona_name": "x", "layers": {"conversational_flow": {"turn_taking_patience": "forever"}}}
    assert http.post("/v2/personas", json=bad_flow).status_code == 422
    assert http.post("/v2/personas", json={"persona_name": "x", "bogus": 1}).status_code == 422
    assert http.delete(f"/v2/personas/{pid}").status_code == 204
    assert http.get(f"/v2/personas/{pid}").status_code == 404
    assert http.delete(f"/v2/personas/{pid}").status_code == 404


def test_conversation_lifecycle_without_media(http):
    r = http.post("/v2/conversations", json={"conversation_name": "lifecycle", "properties": {"max_call_duration": 60}})
    assert r.status_code == 200, r.text
    conv = r.json()
    cid = conv["conversation_id"]
    assert conv["status"] == "active" and conv["meeting_token"] in conv["conversation_url"]
    got = http.get(f"/v2/conversations/{cid}").json()
    assert "meeting_token" not in got and conv["meeting_token"] not in got["conversation_url"]
    assert got["conversation_name"] == "lifecycle" and got["transcript"] == []
    listed = http.get("/v2/conversations", params={"limit": 100}).json()
    assert any(c["conversation_id"] == cid for c in listed["data"]) and listed["total_count"] >= 1
    assert http.post(f"/v2/conversations/{cid}/end").json()["status"] == "ended"
    assert http.get(f"/v2/conversations/{cid}").json()["status"] == "ended"
    assert http.delete(f"/v2/conversations/{cid}").status_code == 204
    assert http.get(f"/v2/conversations/{cid}").status_code == 404


def test_bad_input(http, presence):
    assert http.get("/v2/conversations/cnope").status_code == 404
    assert http.post("/v2/conversations/cnope/end").status_code == 404
    assert http.post("/v2/conversations", json={"persona_id": "pnope"}).status_code == 404
    assert http.post("/v2/conversations", json={"properties": {"max_call_duration": -1}}).status_code == 422
    assert http.post("/v2/conversations", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    big = b"x" * (2 << 20)
    assert http.post("/v2/personas", content=big, headers={"content-type": "application/json"}).status_code == 413
    conv = http.post("/v2/conversations", json={}).json()
    cid, token = conv["conversation_id"], conv["meeting_token"]
    url = f"{presence}/v2/conversations/{cid}/webrtc"
    sdp_headers = {"content-type": "application/sdp", "authorization": f"Bearer {token}"}
    assert httpx.post(url, content="v=0\r\n", headers={"content-type": "application/sdp"}).status_code == 401
    assert httpx.post(url, content="v=0\r\n", headers={**sdp_headers, "authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(url, content="this is not sdp", headers=sdp_headers, timeout=30)
    assert r.status_code == 400 and "SDP" in r.json()["detail"]
    r = httpx.post(url, content="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=garbage\r\n", headers=sdp_headers, timeout=30)
    assert r.status_code == 400
    r = httpx.post(url, json={"type": "answer", "sdp": "v=0"}, headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 400
    r = httpx.post(url, content="v=0", headers={"content-type": "text/plain", "authorization": f"Bearer {token}"})
    assert r.status_code == 415
    # The conversation is still usable after all that.
    assert http.get(f"/v2/conversations/{cid}").json()["status"] == "active"
    http.post(f"/v2/conversations/{cid}/end")
