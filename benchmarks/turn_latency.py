"""Turn latency as a user has it: real WebRTC clients hold clinic conversations with the CPU profile.

Each conversation: a receptionist persona with a system prompt and a page of grounded context (hours,
address, prices, doctors), the client's camera showing a real face photo (matplotlib's
`grace_hopper.jpg`, 320x320 at 15 fps), 12 spoken turns without waiting politely: some questions
have a mid-turn pause ("I'd like to move my appointment to ... next Tuesday afternoon"), and on some
turns the user talks over the avatar's reply. Clips are piper speech made here.

Measured at the client:
- latency: speech end (the question's last sample leaves the microphone) -> first reply audio frame
  above -40 dBFS; per turn index too, so growth over a conversation shows;
- bargein_ms: the interruption's first sample leaves the microphone -> the avatar's audio is silent
  (the first frame after which 300 ms stay below -40 dBFS);
- cut_ins: replies whose audio started inside a mid-turn pause;
- the server's stage breakdown (`conversation.turn_timings`) and CPU per process (from /proc).

Writes benchmarks/results/turn_latency.json.

    python benchmarks/turn_latency.py                      # starts its own local Serve app
    python benchmarks/turn_latency.py --sessions 1 --url http://127.0.0.1:8000 --api-key KEY
    python benchmarks/turn_latency.py --documents --paired --sessions 6 --out benchmarks/results/turn_latency_knowledge.json
        # what the knowledge base adds: conversations without and with the clinic handbook, alternating
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.box import machine_record  # noqa: E402
from benchmarks.clinic import PERSONA  # noqa: E402
from benchmarks.local_app import cpu_llm_model, start_local_app  # noqa: E402

SILENT_RMS = 0.01  # -40 dBFS
@dataclass(frozen=True)
class Turn:
    text: str  # what the user says (both parts of a paused question, joined)
    pause_after: str | None = None  # a mid-turn pause after these words (then `text` goes on)
    barge_in: bool = False  # the user talks over this turn's reply (with the next turn's words)


SCRIPT = [
    Turn("Hi, what time do you open on Saturday?"),
    Turn("Which dentist works with children?"),
    Turn("I'd like to move my appointment to next Tuesday afternoon, if that works.",
         pause_after="I'd like to move my appointment to"),
    Turn("How much is a check-up and cleaning?", barge_in=True),
    Turn("Sorry, one more thing, do you take Cigna insurance?"),
    Turn("Where exactly is the clinic?"),
    Turn("Is there somewhere to park my car?"),
    Turn("My tooth really hurts, and I was wondering how much an emergency visit costs.",
         pause_after="My tooth really hurts, and I was wondering"),
    Turn("Who does braces at your clinic?", barge_in=True),
    Turn("Wait, is Dr. Haddad there on Fridays?"),
    Turn("What should I do before my first visit?"),
    Turn("Great, thank you so much for your help.")]


def face_photo(size: int = 320) -> np.ndarray:
    """A real face: matplotlib's sample photo of Grace Hopper, cropped to head and shoulders."""
    import matplotlib
    from PIL import Image

    img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    w, h = img.size
    side = min(w, h)
    return np.asarray(img.crop(((w - side) // 2, 0, (w + side) // 2, side)).resize((size, size)))


def clips_for(turn: Turn, tts, pause_s: float = 0.9) -> list[np.ndarray]:
    """The microphone audio of a turn: one clip, or two around a silent mid-turn pause."""
    from benchmarks.rtc_client import RATE, speech_pcm48k

    if turn.pause_after is None:
        return [speech_pcm48k(turn.text, tts)]
    rest = turn.text[len(turn.pause_after):].strip()
    return [speech_pcm48k(turn.pause_after, tts), np.zeros(int(pause_s * RATE), np.int16), speech_pcm48k(rest, tts)]


def silent_from(audio: list[tuple[float, float]], t: float, hold_s: float = 0.3) -> float | None:
    """The first received frame after `t` from which `hold_s` of audio stays below SILENT_RMS."""
    start = None
    for ts, rms in audio:
        if ts < t:
            continue
        if rms >= SILENT_RMS:
            start = None
        elif start is None:
            start = ts
        elif ts - start >= hold_s:
            return start
    return None


def _processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process still readable in /proc."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append((int(pid), Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return out


def _replica(cmd: str) -> str | None:
    """A Serve replica's deployment name from its command line (None for other processes)."""
    return cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1] if "ServeReplica:" in cmd else None


def niceness() -> dict[str, int]:
    """The scheduling niceness of the client and of the server's processes (Serve replicas by name)."""
    out = {"client (this benchmark)": os.nice(0)}
    for pid, cmd in _processes():
        name = _replica(cmd) or ("raylet" if "raylet" in cmd and "raylet" not in out else None)
        if name is not None:
            try:
                out[name] = os.getpriority(os.PRIO_PROCESS, pid)
            except OSError:
                continue
    return out


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far, by process (Serve replicas by deployment name)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid, cmd in _processes():
        if (name := _replica(cmd)) is None:
            if pid == os.getpid():
                name = "client (this benchmark)"
            elif cmd.startswith("ray::") or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
                name = "ray (controller, proxy, raylet, gcs)"
            else:
                continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def run_conversation(url: str, key: str, persona_id: str, clips: list[list[np.ndarray]], face: np.ndarray,
                           gap_s: float, video_mode: str | None = None) -> dict:
    from benchmarks.rtc_client import FakeCamera, PresenceRTCClient

    client = PresenceRTCClient(url, key)
    client.camera = FakeCamera(face, fps=15)
    await client.create(conversation_name="turn-latency", persona_id=persona_id, video_mode=video_mode,
                        properties={"participant_left_timeout": 0})
    await client.connect()
    await asyncio.sleep(2.0)  # the face is seen, the avatar is idle
    rows: list[dict] = []
    for i, (turn, parts) in enumerate(zip(SCRIPT, clips, strict=True)):
        row: dict = {"turn": i + 1, "text": turn.text, "kind": "pause" if turn.pause_after else
                     ("barge_in" if turn.barge_in else "plain")}
        started = time.monotonic()
        part_ends = []
        for k, part in enumerate(parts):
            part_ends.append(await client.say(part))
            if k == 0 and rows and rows[-1]["kind"] == "barge_in":
                rows[-1]["bargein_from"] = client.mic.clip_started  # this question talked over that reply
        end = part_ends[-1]
        if turn.pause_after is not None:  # a reply heard before the user finished = a cut-in
            first = client.first_audio_after(part_ends[0] + 0.05, SILENT_RMS)
            row["cut_in"] = first is not None and first < end + 0.15
        try:
            user = await client.wait_event_after("conversation.utterance", end - 0.5, timeout=30, role="user")
            row["heard"] = user["properties"]["speech"]
            row["turn_index"] = sum(e["event_type"] == "conversation.utterance" and e["properties"]["role"] == "user"
                                    and e["received_at"] <= user["received_at"] for e in client.events)
            # The reply to this turn starts after the user's utterance is recorded: audio before that is
            # an earlier reply still audible, or one to half the question (an early reply, counted).
            row["early_replies"] = sum(e["event_type"] == "conversation.replica.started_speaking"
                                       and started + 0.3 < e["received_at"] < user["received_at"] for e in client.events)
            speaking = await client.wait_event_after("conversation.replica.started_speaking",
                                                     max(end, user["received_at"]), timeout=45)
            # Give the data channel 150 ms: the event may trail the audio.
            first = await first_reply_audio(client, max(end, speaking["received_at"] - 0.15), timeout=10)
            row["latency_ms"] = round((first - end) * 1000, 1)
            if turn.barge_in:
                await asyncio.sleep(0.6)  # the reply is playing: the next question talks over it
            else:
                await client.wait_event_after("conversation.replica.stopped_speaking", speaking["received_at"] - 1e-6,
                                              timeout=60)
                await asyncio.sleep(gap_s)
        except TimeoutError as exc:
            row["error"] = str(exc)
        row["wall_s"] = round(time.monotonic() - started, 2)
        rows.append(row)
    await asyncio.sleep(3.0)
    timed = {e["properties"]["turn_index"]: e["properties"]
             for e in client.events if e["event_type"] == "conversation.turn_timings"}
    for row in rows:
        props = timed.get(row.get("turn_index")) or {}
        row["stages_ms"] = props.get("ms_from_speech_end")
        if "passages" in props:  # what the knowledge base gave the reply (--documents)
            row["passages"] = props["passages"]
        if "llm_prompt" in props:  # how much of the reply's prompt the LLM's cache held
            row["llm_prompt"] = props["llm_prompt"]
        for key in ("turn_decision", "listener_behind_ms"):  # why a turn waited: judged unfinished, or heard late
            if key in props:
                row[key] = props[key]
        if "bargein_from" in row:
            quiet = silent_from(client.rx.audio, row["bargein_from"])
            row["bargein_ms"] = round((quiet - row.pop("bargein_from")) * 1000, 1) if quiet else None
    await client.end()
    await client.close()
    return {"turns": rows}


async def first_reply_audio(client, t: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = client.first_audio_after(t, SILENT_RMS)
        if first is not None:
            return first
        await asyncio.sleep(0.02)
    raise TimeoutError("no reply audio")


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def summarize(sessions: list[dict], cpu: dict[str, float], wall_s: float) -> dict:
    rows = [r for s in sessions for r in s["turns"]]
    lat = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
    by_index: dict[int, list[float]] = {}
    stages: dict[str, list[float]] = {}
    for r in rows:
        if r.get("latency_ms") is not None:
            by_index.setdefault(r["turn"], []).append(r["latency_ms"])
        for k, v in (r.get("stages_ms") or {}).items():
            stages.setdefault(k, []).append(v)
    early = [v for i in range(1, 5) for v in by_index.get(i, [])]
    late = [v for i in range(9, 13) for v in by_index.get(i, [])]
    barge = [r["bargein_ms"] for r in rows if r.get("bargein_ms") is not None]
    paused = [r for r in rows if r["kind"] == "pause"]
    return {
        "n_turns": len(rows), "n_measured": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
        "mean_ms": round(float(np.mean(lat)), 1) if lat else None,
        "by_turn_index": {str(i): {"p50_ms": pct(v, 50), "n": len(v)} for i, v in sorted(by_index.items())},
        "late_vs_early": round(float(np.median(late) / np.median(early)), 2) if early and late else None,
        "bargein_ms": {"p50": pct(barge, 50), "max": max(barge) if barge else None, "values": barge,
                       "n_attempted": sum(r["kind"] == "barge_in" for r in rows)},
        "cut_ins": {"count": sum(bool(r.get("cut_in")) for r in paused), "of": len(paused)},
        # replies that began before the user had finished the turn (an answer to half a question)
        "early_replies": sum(r.get("early_replies", 0) for r in rows),
        "turns_per_session": len(SCRIPT), "sessions": len(sessions),
        "stages_p50_ms": {k: pct(v, 50) for k, v in stages.items()},
        "stages_p95_ms": {k: pct(v, 95) for k, v in stages.items()},
        "cpu_cores_by_process": {k: round(v / wall_s, 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "asr_word_perfect": sum(_words(r.get("heard") or "") == _words(r["text"]) for r in rows),
        "errors": [r["error"] for r in rows if "error" in r],
        **_passages_summary(rows),
        **_prompt_summary(rows),
    }


def _prompt_summary(rows: list[dict]) -> dict:
    """The LLM's prompt per reply (where the backend reports it): tokens its cache held, tokens it
    processed and the time that took, as p50 and by turn index (a cache that stops holding shows as
    processed tokens growing with the turn)."""
    given = [(r["turn"], r["llm_prompt"]) for r in rows if r.get("llm_prompt")]
    if not given:
        return {}
    by_turn: dict[int, list[dict]] = {}
    for turn, p in given:
        by_turn.setdefault(turn, []).append(p)

    def p50(ps: list[dict], key: str) -> float | None:
        return pct([p[key] for p in ps if p.get(key) is not None], 50)

    keys = ("cached", "processed", "ms")
    return {"llm_prompt_p50": {k: p50([p for _, p in given], k) for k in keys} | {"n": len(given)},
            "llm_prompt_by_turn_index": {str(t): {k: p50(ps, k) for k in keys} for t, ps in sorted(by_turn.items())}}


def _passages_summary(rows: list[dict]) -> dict:
    """With a knowledge base: how many replies read passages, and how many of those were prefilled."""
    given = [r["passages"] for r in rows if "passages" in r]
    if not given:
        return {}
    return {"replies_with_passages": {
        "replies": len(given), "with_passages": sum(p["count"] > 0 for p in given),
        "prefilled": sum(p["count"] > 0 and p["prefilled"] for p in given),
        "passages_mean": round(float(np.mean([p["count"] for p in given])), 2)}}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=2, help="conversations, one after another (12 turns each)")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between a reply and the next question")
    ap.add_argument("--url")
    ap.add_argument("--api-key")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "turn_latency.json"))
    ap.add_argument("--llm-model", help="another embedded LLM (models.assets.EMBEDDED_LLMS) instead of the profile's")
    ap.add_argument("--llm-threads", type=int, default=1)
    ap.add_argument("--documents", action="store_true",
                    help="the persona also has a knowledge-base document (the clinic handbook): passages every turn")
    ap.add_argument("--paired", action="store_true",
                    help="with --documents: alternate conversations without and with the document in one run (the same "
                    "server, the same minutes), and report what the knowledge base adds to each figure")
    ap.add_argument("--knowledge-chars", type=int, help="with --documents: the persona's knowledge.max_chars "
                    "(passage characters per turn; default the persona default, 700)")
    ap.add_argument("--late-passages", type=int, help="with --documents: the persona's knowledge.late_passages "
                    "(passages a reply with none prefilled reads itself; default the persona default, 1)")
    ap.add_argument("--video-mode", choices=["client", "server"], help="the conversations' video mode (default: the "
                    "profile's); client: poses on the data channel, no video rendered or sent")
    a = ap.parse_args()
    machine = machine_record()  # (before anything loads the box)
    import httpx

    from models.tts import PiperTTS

    if a.url:
        url, key = a.url, a.api_key
    else:
        key = "bench"
        llm = None
        if a.llm_model:
            llm = {"backend": "llamacpp", "backend_args": {"model": a.llm_model, "n_parallel": 1, "threads": a.llm_threads}}
        url = start_local_app(key, "sqlite:////tmp/presence-bench.db", llm=llm)
    # The client stands in for a remote participant but shares these 2 cores: once the server is up (Ray
    # started from this process at its niceness, as `serve run` from a shell), run the client at the
    # niceness Ray gives its workers (15), so it neither outranks the server it measures nor is starved.
    os.nice(max(0, 15 - os.nice(0)))
    persona = dict(PERSONA)
    personas = []
    if a.paired:
        if not a.documents:
            ap.error("--paired compares conversations without and with --documents")
        personas.append(httpx.post(f"{url}/v2/personas", json=persona, headers={"x-api-key": key},
                                   timeout=30).json()["persona_id"])
    if a.documents:
        from benchmarks.clinic import HANDBOOK

        doc = httpx.post(f"{url}/v2/documents", files={"file": ("handbook.md", HANDBOOK.encode(), "text/markdown")},
                         headers={"x-api-key": key}, timeout=60).json()
        while doc["status"] == "processing":
            time.sleep(0.5)
            doc = httpx.get(f"{url}/v2/documents/{doc['document_id']}", headers={"x-api-key": key}, timeout=30).json()
        if doc["status"] != "ready":
            raise RuntimeError(f"the handbook was not ingested: {doc}")
        persona["document_ids"] = [doc["document_id"]]
        if a.knowledge_chars:
            persona["knowledge"] = {"max_chars": a.knowledge_chars, "top_k": 2 if a.knowledge_chars < 500 else 3}
        if a.late_passages is not None:
            persona["knowledge"] = {**persona.get("knowledge", {}), "late_passages": a.late_passages}
    personas.append(httpx.post(f"{url}/v2/personas", json=persona, headers={"x-api-key": key},
                               timeout=30).json()["persona_id"])
    tts = PiperTTS()
    clips = [clips_for(t, tts) for t in SCRIPT]
    face = face_photo()
    cpu0, t0 = cpu_seconds(), time.time()
    # Paired: without, with, without, with ... (the last persona is the one with the document).
    sessions = [asyncio.run(run_conversation(url, key, personas[i % len(personas)], clips, face, a.gap, a.video_mode))
                for i in range(a.sessions)]
    wall = time.time() - t0
    cpu1 = cpu_seconds()
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
    paired = {}
    if a.paired:
        without = summarize(sessions[0::2], cpu, wall)
        without["sessions_detail"] = sessions[0::2]  # turn by turn, beside the with-documents ones
        sessions = sessions[1::2]
        with_docs = summarize(sessions, cpu, wall)
        paired = {"without_documents": {k: without[k] for k in ("n_measured", "p50_ms", "p95_ms", "mean_ms", "by_turn_index",
                                                                 "bargein_ms", "cut_ins", "stages_p50_ms", "stages_p95_ms",
                                                                 "llm_prompt_p50", "sessions_detail")},
                  "knowledge_adds_ms": {k: round(with_docs[k] - without[k], 1) for k in ("p50_ms", "p95_ms", "mean_ms")}}
    result = {"benchmark": "turn_latency", "profile": "cpu", "llm_model": a.llm_model or cpu_llm_model(),
              "knowledge_base": ({"document": "clinic handbook (benchmarks/clinic.py HANDBOOK)",
                                  "max_chars": a.knowledge_chars or 700,
                                  "late_passages": 1 if a.late_passages is None else a.late_passages}
                                 if a.documents else None),
              "video_mode": a.video_mode or "profile default",
              "metric": "speech end -> first reply audio at the client (camera on, clinic persona, 12-turn "
                        "conversations with mid-turn pauses and barge-ins)",
              "target": {"p50_ms": 1500, "p95_ms": 2500, "late_vs_early": 1.2, "bargein_p50_ms": 300,
                         "cut_ins_per_12": 1},
              **summarize(sessions, cpu, wall), **paired, "niceness": niceness(), "sessions_detail": sessions,
              "machine": machine, "wall_s": round(wall, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("n_measured", "p50_ms", "p95_ms", "by_turn_index", "late_vs_early",
                                             "bargein_ms", "cut_ins", "stages_p50_ms", "cpu_cores_by_process",
                                             "knowledge_adds_ms") if k in result}, indent=1))


if __name__ == "__main__":
    main()
