"""LLM tool calls (#15): persona tools validated at create time, conversation.tool_call on the data channel,
the client's tool_result or the server's delivery to a URL fed back to the LLM, the holding phrase, an
interrupt while a tool is pending, and the apology when no result comes. The LLM is a small real
OpenAI-compatible server (tests/scripted_llm.py) that streams native tool calls."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from benchmarks.rtc_client import PresenceRTCClient, speech_pcm48k
from models.llm import GenerationParams, OpenAICompatibleLLM, StreamEnd
from models.llm_stream import PromptStats
from models.tools import ToolCall, ToolRouter, as_text_format, parse_tool_text, read_out, split_tool_calls
from serve_app.session.reply import TOOL_APOLOGY
from tests.conftest import RECEIVER_HOST, WebhookReceiver
from tests.scripted_llm import ScriptedOpenAIServer

CHECK = {"type": "function", "function": {
    "name": "check_availability", "description": "Free appointment slots on a day.",
    "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}}}


@pytest.fixture(scope="module")
def llm_server():
    server = ScriptedOpenAIServer(RECEIVER_HOST)
    yield server
    server.close()


# --- the shared parts, no Ray ----------------------------------------------------------------------

def test_native_tool_call_deltas_become_one_call(llm_server):
    async def run():
        llm = OpenAICompatibleLLM(llm_server.base_url, model="scripted")
        msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "A slot on Friday?"}]
        out = [x async for x in llm.stream(msgs, GenerationParams(), tools=[CHECK])]
        await llm.aclose()
        return out

    out = asyncio.run(run())
    calls = [x for x in out if isinstance(x, ToolCall)]
    assert len(calls) == 1 and calls[0].name == "check_availability"
    assert json.loads(calls[0].arguments) == {"day": "Friday"}
    assert isinstance(out[-1], StreamEnd) and out[-1].finish_reason == "tool_calls"
    assert llm_server.requests[-1]["tools"] == [CHECK]


@pytest.mark.parametrize("text", [
    '{"name": "check_availability", "arguments": {"day": "Tuesday"}}',
    '<tool_call>\n{"name": "check_availability", "arguments": {"day": "Tuesday"}}\n</tool_call>',
    '```json\n{"name": "check_availability", "arguments": {"day": "Tuesday"}}\n```',
    '[{"name": "check_availability", "parameters": {"day": "Tuesday"}}]',
    '{"name": "check_availability", "arguments": {"day": "Tuesday"}} I will check.',
])
def test_the_text_tool_format_is_read_in_its_variants(text):
    calls = parse_tool_text(text, {"check_availability"})
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("check_availability", {"day": "Tuesday"})]


def test_text_that_is_not_a_call_is_spoken_unchanged():
    async def run(pieces):
        async def gen():
            for p in pieces:
                yield p
            yield StreamEnd("stop")
        return [x async for x in split_tool_calls(gen(), {"check_availability"})]

    assert asyncio.run(run(["We open", " at nine."])) == ["We open", " at nine.", StreamEnd("stop")]
    assert asyncio.run(run(["<b>Hi</b>"])) == ["<b>Hi</b>", StreamEnd("stop")]
    # JSON that is no call to a known tool (a made-up result, another name) is never spoken.
    assert asyncio.run(run(["{not", " json}"])) == [StreamEnd("stop")]
    assert asyncio.run(run(['```json\n{"result": {"slots": ["Thursday"]}}\n```'])) == [StreamEnd("stop")]
    assert asyncio.run(run(['{"name": "book_flight", "arguments": {}}'])) == [StreamEnd("stop")]
    held = asyncio.run(run([" ", '{"name": "check_availability",', ' "arguments": {"day": "Monday"}}']))
    assert isinstance(held[0], ToolCall) and held[1] == StreamEnd("stop")
    # The prompt's stats come through ahead of the text, and do not end a held call.
    stats = PromptStats(cached=120, processed=9, ms=70.0)
    assert asyncio.run(run([stats, "We open", " at nine."])) == [stats, "We open", " at nine.", StreamEnd("stop")]
    held = asyncio.run(run([stats, '{"name": "check_availability",', ' "arguments": {"day": "Monday"}}']))
    assert held[0] == stats and isinstance(held[1], ToolCall) and held[2] == StreamEnd("stop")


def test_the_text_format_chat_keeps_its_prefix_and_reads_results():
    msgs = [{"role": "system", "content": "You are Mia."}, {"role": "user", "content": "Tuesday?"},
            {"role": "assistant", "content": "",
             "tool_calls": [ToolCall("c1", "check_availability", '{"day": "Tuesday"}').openai()]},
            {"role": "tool", "tool_call_id": "c1", "name": "check_availability", "content": "10:30"}]
    out = as_text_format(msgs, [CHECK])
    assert out[0]["content"].startswith("You are Mia.\n\nTools you can use:\n- check_availability(day: string)")
    assert as_text_format(msgs[:2], [CHECK])[0] == out[0]  # byte-identical system message turn to turn
    assert json.loads(out[2]["content"]) == {"name": "check_availability", "arguments": {"day": "Tuesday"}}
    assert out[3]["role"] == "user" and out[3]["content"].startswith("Tool result (check_availability): 10:30\n")
    assert all(isinstance(m["content"], str) for m in out)
    routed = as_text_format(msgs, [CHECK], teach=False)
    assert routed[0]["content"] == "You are Mia." and routed[1:] == out[1:]
    assert read_out(msgs) == "Here is what I found: 10:30."
    assert read_out([*msgs[:3], {"role": "tool", "content": '{"slots": ["Tuesday 10:30", "Tuesday 15:00"]}'}]) \
        == "Here is what I found: slots Tuesday 10:30, Tuesday 15:00."


# --- through the API and a WebRTC session ------------------------------------------------------------

def _persona(http: httpx.Client, llm_server, tools: list[dict], **llm) -> str:
    r = http.post("/v2/personas", json={
        "persona_name": "Mia", "system_prompt": "You are Mia, a clinic receptionist.",
        "layers": {"llm": {"base_url": llm_server.base_url, "model": "scripted", "tools": tools, **llm}}})
    assert r.status_code == 200, r.text
    return r.json()["persona_id"]


@pytest.mark.parametrize("tool, why", [
    ({"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}, "JSON Schema"),
    ({"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}, "object"),
    ({"type": "function", "function": {"name": "bad name!"}}, "pattern"),
    ({"type": "retrieval", "function": {"name": "x"}}, "function"),
    ({"type": "function", "function": {"name": "x"}, "delivery": {"url": "http://127.0.0.1:9/x"}}, "outbound policy"),
])
def test_bad_tool_definitions_are_422(presence, api_key, llm_server, tool, why):
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}, timeout=30) as http:
        r = http.post("/v2/personas", json={"persona_name": "Mia", "layers": {"llm": {"tools": [tool]}}})
        assert r.status_code == 422 and why in r.text, r.text
        twice = http.post("/v2/personas", json={"persona_name": "Mia", "layers": {"llm": {"tools": [CHECK, CHECK]}}})
        assert twice.status_code == 422 and "unique" in twice.text


async def _session(presence: str, api_key: str, persona_id: str) -> PresenceRTCClient:
    client = PresenceRTCClient(presence, api_key)
    await client.create(persona_id=persona_id, conversation_name="tools", video_mode="client")
    await client.connect()
    return client


def test_a_client_tool_call_is_answered_and_the_reply_uses_it(idle, presence, api_key, llm_server, tts):
    question = speech_pcm48k("Do you have a free appointment on Tuesday?", tts)
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}, timeout=30) as http:
        persona_id = _persona(http, llm_server, [CHECK])

    async def run():
        client = await _session(presence, api_key, persona_id)
        await asyncio.sleep(0.5)
        since = len(client.events)
        await client.say(question)
        call = await client.wait_event("conversation.tool_call", timeout=60, since=since)
        p = call["properties"]
        assert p["name"] == "check_availability" and p["tool_call_id"] and p["inference_id"]
        assert json.loads(p["arguments"]) == {"day": "Tuesday"}
        # The wait passes a second: the avatar says its holding phrase before the result is sent.
        holding = await client.wait_event("conversation.replica.started_speaking", timeout=10, since=since)
        assert holding["received_at"] > call["received_at"]
        await asyncio.sleep(0.8)
        client.send("conversation.tool_result", tool_call_id=p["tool_call_id"], result="Tuesday at 10:30")
        reply = await client.wait_event("conversation.utterance", timeout=60, since=since, role="replica")
        # A second answer to the same call is refused: it is no longer waiting.
        client.send("conversation.tool_result", tool_call_id=p["tool_call_id"], result="again")
        err = await client.wait_event("system.error", timeout=10, since=since)
        await client.end()
        await client.close()
        return reply, err

    reply, err = asyncio.run(run())
    assert "10:30" in reply["properties"]["speech"], reply
    assert err["properties"]["code"] == "unknown_tool_call"
    tool_msg = llm_server.requests[-1]["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["content"] == "Tuesday at 10:30"
    assert llm_server.requests[-1]["messages"][-2]["tool_calls"][0]["id"] == tool_msg["tool_call_id"]


def test_a_tool_with_a_delivery_url_is_called_by_the_server(idle, presence, api_key, llm_server):
    calendar = WebhookReceiver(reply={"result": "Friday at 2 pm"})
    tool = {**CHECK, "delivery": {"url": calendar.url, "timeout_s": 5}}
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}, timeout=30) as http:
        persona_id = _persona(http, llm_server, [tool])

    async def run():
        client = await _session(presence, api_key, persona_id)
        since = len(client.events)
        client.send("conversation.respond", text="Can I come in on Friday?")
        call = await client.wait_event("conversation.tool_call", timeout=60, since=since)
        reply = await client.wait_event("conversation.utterance", timeout=60, since=since, role="replica")
        await client.end()
        await client.close()
        return call, reply

    call, reply = asyncio.run(run())
    assert "2 pm" in reply["properties"]["speech"]
    got = calendar.received[0]
    assert got["name"] == "check_availability" and got["arguments"] == {"day": "Friday"}
    assert got["tool_call_id"] == call["properties"]["tool_call_id"]


def test_a_pending_tool_can_be_interrupted_and_a_silent_one_times_out(idle, presence, api_key, llm_server):
    with httpx.Client(base_url=presence, headers={"x-api-key": api_key}, timeout=30) as http:
        persona_id = _persona(http, llm_server, [CHECK], tool_timeout_s=2)

    async def run():
        client = await _session(presence, api_key, persona_id)
        # 1. Interrupted while the tool is pending: the reply ends, a late result is refused.
        since = len(client.events)
        client.send("conversation.respond", text="Anything on Monday?")
        call = await client.wait_event("conversation.tool_call", timeout=60, since=since)
        client.send("conversation.interrupt")
        await asyncio.sleep(0.3)
        client.send("conversation.tool_result", tool_call_id=call["properties"]["tool_call_id"], result="Monday 9:00")
        err = await client.wait_event("system.error", timeout=10, since=since)
        interrupted = [e for e in client.events[since:] if e["event_type"] == "conversation.utterance"
                       and e["properties"]["role"] == "replica"]
        # 2. No result at all: after tool_timeout_s the avatar apologises; the session goes on.
        since = len(client.events)
        client.send("conversation.respond", text="And on Wednesday?")
        await client.wait_event("conversation.tool_call", timeout=60, since=since)
        apology = await client.wait_event("conversation.utterance", timeout=60, since=since, role="replica")
        client.send("conversation.tool_result", tool_call_id="call_nobody_made", result="x")
        unknown = await client.wait_event("system.error", timeout=10, since=since)
        await client.end()
        await client.close()
        return err, interrupted, apology, unknown

    err, interrupted, apology, unknown = asyncio.run(run())
    assert err["properties"]["code"] == "unknown_tool_call"
    assert all("Monday 9:00" not in e["properties"]["speech"] for e in interrupted)
    assert TOOL_APOLOGY in apology["properties"]["speech"]
    assert unknown["properties"]["code"] == "unknown_tool_call"


def test_the_router_tells_tool_requests_from_questions_the_facts_answer():
    """The CPU default's tool decision (models.tools.ToolRouter): requests for the tool go to it, questions
    nearer one of the persona's facts do not."""
    from benchmarks.clinic import PERSONA
    from models.embed import MiniLMEmbedder
    from models.llm import grounded_system, system_facts

    facts = system_facts(grounded_system(PERSONA["system_prompt"], PERSONA["context"]))
    assert len(facts) == 8 and facts[1].startswith("Hours:")
    router = ToolRouter(MiniLMEmbedder(threads=1).embed)
    for asks in ("Can I book an appointment for Friday?", "What slots do you have on Wednesday?"):
        assert router.route(asks, [CHECK], facts) == CHECK, asks
    for other in ("What time do you open on Saturday?", "How much does a filling cost?", "Where is the clinic?"):
        assert router.route(other, [CHECK], facts) is None, other


def test_a_time_or_price_split_across_stream_pieces_stays_one_clause():
    from models.llm import ReplyShaper

    shaper = ReplyShaper()
    out = [c.text for piece in ["The first slot is at 10:", "30 on Tuesday.", " It costs 9.", "50 dollars."]
           for c in shaper.feed(piece)] + [c.text for c in shaper.flush()]
    assert out == ["The first slot is at 10:30 on Tuesday.", "It costs 9.50 dollars."]
