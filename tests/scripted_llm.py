"""A small real OpenAI-compatible chat server for tests: it streams server-sent events exactly as the
OpenAI protocol does, with native `tool_calls` deltas. Its answers follow a script instead of a model:
with tools and a user's last message, it calls the first tool (the weekday in the message as `day`);
after a tool result, it answers with the result; otherwise it says a short sentence."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()), "model": "scripted",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


class ScriptedOpenAIServer:
    def __init__(self, host: str) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                outer.requests.append(body)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                for piece in outer.answer(body):
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(0.02)
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.base_url = f"http://{host}:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body: dict):
        last = body["messages"][-1]
        if last["role"] == "tool":
            yield from self._say(f"The first free slot is {last['content'].strip(chr(34))}.")
        elif body.get("tools") and last["role"] == "user":
            text = last["content"].lower()
            day = next((d for d in DAYS if d in text), "tuesday").capitalize()
            name = body["tools"][0]["function"]["name"]
            yield _chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": f"call_{len(self.requests)}", "type": "function",
                 "function": {"name": name, "arguments": ""}}]})
            args = json.dumps({"day": day})
            for part in (args[: len(args) // 2], args[len(args) // 2:]):
                yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            yield _chunk({}, "tool_calls")
        else:
            yield from self._say("Happy to help with that.")

    def _say(self, text: str):
        for word in re.findall(r"\S+\s*", text):
            yield _chunk({"content": word})
        yield _chunk({}, "stop")

    def close(self) -> None:
        self.server.shutdown()
