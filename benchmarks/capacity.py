"""Capacity of one box: ramp concurrent sessions 1 -> N, each a real WebRTC client as a user has it
(a camera showing a face, the clinic persona with its prompt and facts, scripted spoken questions),
and record reply latency (speech end -> first reply audio at the client), the avatar's delivered
frame rate (video frames in server mode, poses in client mode), CPU and memory at each step, for each
video mode. Finds the knee where the SLO breaks and recommends the SessionHost settings. Writes
benchmarks/results/capacity.json, capacity.md and capacity_*.png.

    python benchmarks/capacity.py                      # CPU profile, both modes, steps 1..4, p95 SLO 2500 ms
    python benchmarks/capacity.py --modes client --steps 1,2,3 --turns 4 --slo-ms 2500

The clients run in this process on the same box as the server, so they take CPU the server would
otherwise have (about 0.15 of a core per session for decoding): a box serving remote users holds at
least what is measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.box import machine_record  # noqa: E402
from benchmarks.clinic import PERSONA  # noqa: E402
from benchmarks.clinic import QUESTIONS as CLINIC_QUESTIONS  # noqa: E402
from benchmarks.turn_latency import face_photo, first_reply_audio  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
QUESTIONS = [q.text for q in CLINIC_QUESTIONS if q.kind == "fact"][:12]  # what patients ask the clinic


# --- box measurements from /proc (no psutil dependency) --------------------------------------------------
def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def process_rss_mb(match: str) -> tuple[float, int]:
    """Total RSS (MiB) and count of processes whose command line contains `match`."""
    total, n = 0.0, 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if match not in cmd:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += float(line.split()[1]) / 1024
                    n += 1
        except OSError:
            continue
    return total, n


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# --- one step: k sessions at once -----------------------------------------------------------------------
@dataclass(frozen=True)
class Users:
    """What every simulated user brings: the persona they talk to, their camera, their spoken questions."""

    persona_id: str
    face: np.ndarray
    clips: dict[str, np.ndarray]


def delivered(client) -> int:
    """Avatar frames the client got: video frames (server mode) or poses (client mode)."""
    return client.rx.frames + len(client.rx.poses)


async def one_session(url: str, key: str, users: Users, turns: int, offset_s: float, mode: str,
                      seen: dict | None = None) -> dict:
    from benchmarks.rtc_client import FakeCamera, PresenceRTCClient

    client = PresenceRTCClient(url, key)
    rows: list[dict] = []
    if seen is not None:  # what a session that never finishes had got and measured, for its result
        seen["client"], seen["rows"] = client, rows
    client.camera = FakeCamera(users.face, fps=15)
    clips = users.clips
    try:
        await client.create(conversation_name="capacity", persona_id=users.persona_id, video_mode=mode,
                            properties={"participant_left_timeout": 0})
        await client.connect(timeout=90)
        await asyncio.sleep(1.0 + offset_s)  # stagger: users do not all speak at the same instant
        t_start, frames_start = time.monotonic(), delivered(client)
        for i in range(turns):
            text = QUESTIONS[(i + int(offset_s * 10)) % len(QUESTIONS)]
            end = await client.say(clips[text])
            try:
                # The reply to this turn starts after the user's utterance is recorded; audio before it is
                # the previous reply still playing out (on a loaded box it lags), not this turn's answer.
                user = await client.wait_event_after("conversation.utterance", end - 0.5, timeout=90, role="user")
                speaking = await client.wait_event_after("conversation.replica.started_speaking",
                                                         max(end, user["received_at"]), timeout=90)
                # (the event may trail the audio by a little)
                first = await first_reply_audio(client, max(end, speaking["received_at"] - 0.15), timeout=10)
                await client.wait_event_after("conversation.utterance", speaking["received_at"], timeout=90, role="replica")
            except TimeoutError as exc:
                rows.append({"question": text, "error": str(exc)})
                continue
            rows.append({"question": text, "latency_ms": round((first - end) * 1000, 1),
                         "client_mic_late_ms": round(client.mic.last_speech_late * 1000, 1)})
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - t_start
        fps = (delivered(client) - frames_start) / elapsed if elapsed > 0 else 0.0
        # How much of each reply's prompt the LLM's cache held (sessions share the LLM's slots).
        timings = [e["properties"] for e in client.events if e["event_type"] == "conversation.turn_timings"]
        prompts = [t.get("llm_prompt") for t in timings]
        await client.end()
        return {"turns": rows, "fps": fps, "error": None, "llm_prompts": prompts,
                "stage_ms": [{**(t.get("ms_from_speech_end") or {}), "listener_behind": t.get("listener_behind_ms")}
                             for t in timings]}
    except Exception as exc:  # a refused or failed session is a result, not a crash of the benchmark
        return {"turns": rows, "fps": 0.0, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await client.close()


async def bounded_session(url: str, key: str, users: Users, turns: int, offset_s: float, mode: str) -> dict:
    """One client's session; a hung session is a failed one, never a hung benchmark."""
    seen: dict = {}
    try:
        return await asyncio.wait_for(one_session(url, key, users, turns, offset_s, mode, seen),
                                      timeout=60 + 100 * turns)
    except TimeoutError:
        client = seen.get("client")
        kinds = [e["event_type"] for e in client.events] if client is not None else []
        why = {"pc": client.pc.connectionState if client is not None and client.pc else None}
        if client is not None and client.conversation:
            import httpx

            try:  # a diagnosis that fails must not take the benchmark down with it
                async with httpx.AsyncClient(headers={"x-api-key": key}, timeout=10) as http:
                    got = (await http.get(f"{url}/v2/conversations/{client.conversation['conversation_id']}")).json()
                why.update(status=got.get("status"), shutdown_reason=got.get("shutdown_reason"))
            except (httpx.HTTPError, ValueError) as exc:
                why["lookup_error"] = repr(exc)
        # The turns it did answer count; the session is failed as a whole.
        return {"turns": seen.get("rows", []), "fps": 0.0, "error": f"session did not finish in time: {why}",
                "events_seen": kinds}


def client_process(url: str, key: str, users: Users, turns: int, offset_s: float, mode: str) -> dict:
    """One simulated user in a process of its own, as each user has their own machine: three clients in
    one process (one event loop, one GIL) fell behind real time on this box, their microphones sending
    the questions up to 12 s late, which the server then heard late."""
    cpu0 = time.process_time()
    result = asyncio.run(bounded_session(url, key, users, turns, offset_s, mode))
    return {**result, "client_cpu_s": time.process_time() - cpu0}


async def run_step(url: str, key: str, users: Users, sessions: int, turns: int, mode: str) -> dict:
    busy0, total0 = cpu_times()
    rss_samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    gpu_samples: list[float] = []

    async def sample_memory() -> None:
        from deployments.gpu_metrics import read_gpu_stats

        while not stop.is_set():
            rss_samples.append((process_rss_mb("ray::ServeReplica:presence:SessionHost")[0], process_rss_mb("ray::")[0]))
            gpu = read_gpu_stats()
            if gpu.available and gpu.gpus:
                gpu_samples.append(float(np.mean([g.utilization_pct for g in gpu.gpus])))
            try:
                await asyncio.wait_for(stop.wait(), timeout=2.0)
            except TimeoutError:
                pass

    sampler = asyncio.ensure_future(sample_memory())
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(sessions, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = await asyncio.gather(*(loop.run_in_executor(pool, client_process, url, key, users, turns, 0.7 * i, mode)
                                         for i in range(sessions)))
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    busy1, total1 = cpu_times()
    lat = [t["latency_ms"] for r in results for t in r["turns"] if t.get("latency_ms") is not None]
    failed = sum(1 for r in results for t in r["turns"] if t.get("latency_ms") is None) + sum(bool(r["error"]) for r in results)
    host_rss = max((h for h, _ in rss_samples), default=0.0)
    all_rss = max((a for _, a in rss_samples), default=0.0)
    return {
        "mode": mode, "sessions": sessions, "turns": len(lat), "failed": failed,
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
        "fps": round(float(np.mean([r["fps"] for r in results])), 2),
        "cpu_pct": round(100.0 * (busy1 - busy0) / max(1.0, total1 - total0), 1),
        # Of the box's CPU, what the clients themselves took (they stand in for the users' own machines).
        "client_cpu_pct": round(100.0 * sum(r.get("client_cpu_s", 0.0) for r in results) / (wall * (os.cpu_count() or 1)), 1),
        "gpu_pct": round(float(np.mean(gpu_samples)), 1) if gpu_samples else None,  # None: no GPU (pynvml says why)
        "rss_mb": round(all_rss, 1), "session_host_rss_mb": round(host_rss, 1),
        "rss_mb_per_session": round(host_rss / sessions, 1) if sessions else None,
        "wall_s": round(wall, 1), "errors": [r["error"] for r in results if r["error"]],
        "latencies_by_session_ms": [[t.get("latency_ms") for t in r["turns"]] for r in results],
        # How late each client's microphone sent the end of each question (the client shares the box).
        "client_mic_late_ms": [[t.get("client_mic_late_ms") for t in r["turns"]] for r in results],
        "llm_prompts": [p for r in results for p in r.get("llm_prompts", []) if p],
        # Where each turn's time went, per session (ms after the user's speech ended, as the server saw it;
        # listener_behind: how much earlier it had ended at the microphone, queued unheard).
        "stage_ms_by_session": [r.get("stage_ms", []) for r in results],
        "hung_sessions_events": [r["events_seen"] for r in results if "events_seen" in r],
    }


# --- analysis and report ----------------------------------------------------------------------------------
def analyse(steps: list[dict], slo_ms: float, target_fps: float) -> dict:
    """sessions_at_slo: the most sessions whose p95 meets the SLO with >= 80 % of the frame rate and
    no failed turn; knee: the first step that breaks it."""
    ok = [s for s in steps if s["p95_ms"] is not None and s["p95_ms"] <= slo_ms and s["fps"] >= 0.8 * target_fps
          and not s["failed"]]
    at_slo = max((s["sessions"] for s in ok), default=0)
    knee = next((s["sessions"] for s in steps if s["sessions"] > at_slo), None)
    return {"sessions_at_slo": at_slo, "knee_sessions": knee}


def recommend(at_slo: int) -> dict:
    """SessionHost settings for this box: one session per replica process (each has its own GIL, media
    loop and renderer, which keeps one session's render from stalling another's audio), as many
    replicas as the box holds sessions at the SLO."""
    return {"max_ongoing_requests": 1, "target_sessions_per_replica": 1,
            "session_host_replicas_per_node": max(1, at_slo), "ingress_max_sessions": max(1, at_slo)}


def plots(modes: dict[str, dict], slo_ms: float, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"client": "tab:green", "server": "tab:purple"}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, m in modes.items():
        x = [s["sessions"] for s in m["steps"]]
        ax.plot(x, [s["p50_ms"] or np.nan for s in m["steps"]], "o-", color=colours[mode], label=f"{mode} mode p50")
        ax.plot(x, [s["p95_ms"] or np.nan for s in m["steps"]], "s--", color=colours[mode], label=f"{mode} mode p95")
    ax.axhline(slo_ms, color="red", lw=1, ls=":", label=f"SLO p95 {slo_ms:.0f} ms")
    ax.set(xlabel="concurrent sessions", ylabel="speech end -> first reply audio (ms)", title="Reply latency vs sessions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "capacity_latency.png", dpi=110)
    fig, ax1 = plt.subplots(figsize=(6.5, 4))
    ax2 = ax1.twinx()
    for mode, m in modes.items():
        x = [s["sessions"] for s in m["steps"]]
        ax1.plot(x, [s["fps"] for s in m["steps"]], "o-", color=colours[mode], label=f"{mode}: avatar frames/s")
        ax1.axhline(m["target_fps"], color=colours[mode], lw=1, ls=":")
        ax2.plot(x, [s["cpu_pct"] for s in m["steps"]], "s--", color=colours[mode], alpha=0.6, label=f"{mode}: box CPU %")
    ax1.set(xlabel="concurrent sessions", ylabel="frames (server) / poses (client) per s",
            title="Avatar frame rate and CPU vs sessions")
    ax2.set_ylabel("box CPU %")
    ax2.set_ylim(0, 100)
    fig.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "capacity_fps_cpu.png", dpi=110)
    plt.close("all")
    return ["capacity_latency.png", "capacity_fps_cpu.png"]


def markdown(result: dict) -> str:
    lines = [
        "# Capacity of this box (CPU profile)", "",
        f"{result['machine']['cpus']} CPUs, {result['machine']['memory_gb']} GB. SLO: p95 speech end -> first reply "
        f"audio <= {result['slo_ms']:.0f} ms with >= 80 % of the avatar's frame rate (video frames in server mode, "
        f"poses in client mode). {result['turns_per_session']} spoken turns per session per step; every client shows a "
        "face on its camera and talks to the clinic persona; clients on the same box.", "",
    ]
    for mode, m in result["modes"].items():
        lines += [f"## {mode} video mode", "",
                  "| sessions | turns | p50 ms | p95 ms | p99 ms | frames/s | CPU % | RSS MB (all) | SessionHost MB / session "
                  "| failed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in m["steps"]:
            lines.append(f"| {s['sessions']} | {s['turns']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['fps']} | "
                         f"{s['cpu_pct']} | {s['rss_mb']} | {s['rss_mb_per_session']} | {s['failed']} |")
        knee = m["knee_sessions"] if m["knee_sessions"] is not None else "not reached"
        lines += ["", f"**Sessions at the SLO: {m['sessions_at_slo']}.** Knee (first step past it): {knee}.", ""]
    rec = result["recommendation"]
    lines += [
        "Recommended for this node type:", "",
        f"- SessionHost `max_ongoing_requests: {rec['max_ongoing_requests']}` and "
        f"`target_sessions_per_replica: {rec['target_sessions_per_replica']}` (one session per replica process)",
        f"- up to {rec['session_host_replicas_per_node']} SessionHost replicas per node; ingress "
        f"`max_sessions: {rec['ingress_max_sessions']}` per node of this type", "",
        "The clients decode their audio (and video, in server mode) on the same box.",
        "", "![latency](capacity_latency.png) ![fps](capacity_fps_cpu.png)", "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="1,2,3,4")
    ap.add_argument("--turns", type=int, default=4, help="spoken turns per session at each step")
    ap.add_argument("--slo-ms", type=float, default=2500.0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--modes", default="client,server", help="video modes to measure, in order")
    ap.add_argument("--llm-slots", type=int, default=None,
                    help="the embedded LLM's slots (n_parallel; default: the CPU profile's)")
    a = ap.parse_args()
    machine = machine_record()  # (before anything loads the box)
    steps = [int(x) for x in a.steps.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from benchmarks.local_app import cpu_profile_args, start_local_app
    from benchmarks.rtc_client import speech_pcm48k
    from models.tts import PiperTTS

    key, n = "capacity", max(steps)
    host_auto = {"max_queued_requests": n, "autoscaling_config": {"min_replicas": 1, "max_replicas": n, "metrics_interval_s": 0.5,
                                        "look_back_period_s": 5, "upscale_delay_s": 1, "downscale_delay_s": 5,
                                        "policy": {"policy_function": "autoscaling.policy:SessionHostPolicy",
                                                   "policy_kwargs": {"target_sessions_per_replica": 1}}}}
    llm = None
    if a.llm_slots is not None:
        llm = cpu_profile_args()["llm"]
        llm["backend_args"] = {**llm.get("backend_args", {}), "n_parallel": a.llm_slots}
    url = start_local_app(key, "sqlite:////tmp/presence-capacity.db", max_sessions=n, deployments={"SessionHost": host_auto},
                          llm=llm)
    import httpx

    from serve_app.session.pose_stream import POSE_HZ

    # The clients stand in for remote users but share these cores: at the workers' niceness (15), so they
    # neither outrank the server they measure nor starve (Ray was started from this process, at 0). Each
    # runs in its own process (client_process); how late their microphones were and how much CPU they
    # took is recorded with each step.
    os.nice(max(0, 15 - os.nice(0)))
    tts = PiperTTS()
    persona_id = httpx.post(f"{url}/v2/personas", json=PERSONA, headers={"x-api-key": key}, timeout=30).json()["persona_id"]
    users = Users(persona_id, face_photo(), {q: speech_pcm48k(q, tts) for q in QUESTIONS})
    modes: dict[str, dict] = {}
    for mode in a.modes.split(","):
        target_fps = POSE_HZ if mode == "client" else float(cpu_profile_args()["video"]["fps"])
        results = []
        for k in steps:
            time.sleep(3.0)
            step = asyncio.run(run_step(url, key, users, k, a.turns, mode))
            print(json.dumps({x: step[x] for x in ("mode", "sessions", "p50_ms", "p95_ms", "fps", "cpu_pct", "rss_mb",
                                                   "failed")}), flush=True)
            results.append(step)
        modes[mode] = {"target_fps": target_fps, **analyse(results, a.slo_ms, target_fps), "steps": results}
    best = max(m["sessions_at_slo"] for m in modes.values())
    result = {
        "benchmark": "capacity", "profile": "cpu", "slo_ms": a.slo_ms,
        "metric": "speech end -> first reply audio at the client", "turns_per_session": a.turns,
        "clients": "camera showing a face (matplotlib's Grace Hopper), clinic persona (benchmarks/clinic.py)",
        "sessions_at_slo": {m: v["sessions_at_slo"] for m, v in modes.items()},
        "recommendation": recommend(best), "modes": modes,
        "machine": machine,
    }
    result["plots"] = plots(modes, a.slo_ms, out)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    (out / "capacity.md").write_text(markdown(result))
    print(json.dumps({k: result[k] for k in ("sessions_at_slo", "recommendation")}, indent=2))


if __name__ == "__main__":
    main()
