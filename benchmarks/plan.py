"""Capacity planner: how big a cluster serves N concurrent sessions at a reply-latency SLO, with which
GPU fractions, at what cost per session-minute.

    python benchmarks/plan.py --sessions 1000 --slo-ms 600 --node h100x8
    python benchmarks/plan.py --sessions 2 --slo-ms 2500 --profile cpu --node cpu2   # measured CPU numbers

Queueing model (stated, deliberately simple):
- Each session produces user turns as a Poisson stream, one every `turn_interval_s` on average
  (a person speaks, the avatar answers, ~20 s a turn), so N sessions offer lambda = N / turn_interval_s
  turns per second to every shared stage.
- A shared stage (ASR, TurnTaking, LLM, TTS) is an M/M/c queue: c = replicas x slots per replica
  (slots = requests a replica serves at once: CTranslate2 workers, vLLM's batch, ...) and mean
  service H = the slot time a turn takes in all (the LLM holds a slot for the whole reply, not just
  its first clause). The p95 wait is the Erlang-C tail:
  P(W > t) = C(c, a) exp(-(c mu - lambda) t), a = lambda / mu.
- Reply latency p95 <= fixed (VAD endpoint, network, first frame) + ASR (smart-turn runs beside it)
  + LLM to first clause + TTS first audio, each stage counted as S + W95, where S is the stage's
  critical-path time (less than H for the LLM and TTS, which stream).
  Summing per-stage p95s over-estimates the end-to-end p95, so the plan errs on the safe side.
  Replicas are added one at a time to the stage with the largest p95 wait until the sum meets the SLO.
- Sessions: each SessionHost replica holds `sessions_per_host` sessions (its render + media work,
  measured by benchmarks/capacity.py on CPU; a GPU estimate for gsplat rendering otherwise) and
  `headroom` spare replicas' worth of slots for arrivals.
- Nodes: the GPU fractions and CPUs of all replicas are packed onto the chosen node type (first-fit by
  GPU fraction); cost = nodes x price + the head node.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Stage:
    name: str
    service_ms: float       # time on the reply's critical path per turn (e.g. LLM: to the first clause)
    hold_ms: float          # slot time per turn in all (LLM: the whole reply; ASR: partials + final)
    slots: int              # requests one replica serves at once
    gpu: float              # GPU fraction per replica
    cpus: float             # CPUs per replica
    source: str = "estimated"


# GPU profile (configs/gpu.yaml). No GPU was available to measure these, so all are ESTIMATES:
# ASR large-v3-turbo fp16 on a 3 s utterance ~40 ms; smart-turn on GPU ~6 ms; LLM (Qwen2.5-3B on vLLM)
# time to first clause ~120 ms with up to 32 sequences batched; piper on CUDA first clause ~30 ms.
# Slot time per turn: ASR 3 partials + 1 final; the LLM holds a batch slot for the whole ~80-token
# reply (~10 ms/token batched); TTS speaks ~4 clauses.
GPU_STAGES = [
    Stage("ASR", 40, 160, 4, 0.10, 1),
    Stage("TurnTaking", 6, 9, 8, 0.05, 1),
    Stage("LLM", 120, 800, 32, 0.40, 2),
    Stage("TTS", 30, 120, 4, 0.05, 1),
]
GPU_FIXED_MS = {"vad_endpoint": 60.0, "network_and_jitter_buffer": 80.0, "first_frame": 40.0}
# A SessionHost at 1/8 GPU holds 5 sessions at 25 fps, rendering its sessions in one batched gsplat call
# per frame (50k Gaussians, 512x512). Measured on an H200 (benchmarks/results/render_gpu.json, the batch of 4
# row, frames copied to the host): ~0.7 ms per session-frame, so 5 x 25 x 0.7 ms = 0.09 GPU-seconds per
# second; x264 encoding of 125 frames/s at 512x512 fits its 2 CPUs (~3 ms a frame on one core, measured
# here at 256x256 and scaled). Without the file, the earlier estimate of 1.0 ms stands.
def gpu_host() -> dict:
    host = {"sessions_per_host": 5, "gpu": 0.125, "cpus": 2, "fps": 25, "render_ms_per_frame": 1.0,
            "source": "estimated"}
    path = RESULTS / "render_gpu.json"
    if path.exists():
        rows = [r for r in json.loads(path.read_text())["rows"]
                if (r["width"], r["height"], r["sessions"]) == (512, 512, 4) and r["gaussians"] > 40000]
        if rows:
            host.update(render_ms_per_frame=round(rows[0]["render_ms_per_session"], 3),
                        source="render: measured (H200, render_gpu.json); encode: estimated")
    return host


GPU_HOST = gpu_host()


def cpu_stages_from_results() -> tuple[list[Stage], dict, dict]:
    """The CPU profile's stage times as measured on this box (turn_latency.json, capacity.json)."""
    tl = json.loads((RESULTS / "turn_latency.json").read_text())
    p50 = tl["stages_p50_ms"]
    asr = p50["asr_final"] - p50["vad_pause"]
    llm = p50["first_clause"] - p50["turn_decision"]
    tts = p50["tts_first_audio"] - p50["first_clause"]
    # Slot times: ASR ~4 calls a turn; the LLM generates ~3x its first clause; TTS ~3 clauses.
    stages = [Stage("ASR", asr, 4 * asr, 2, 0, 0, "measured"), Stage("TurnTaking", 30, 45, 1, 0, 0, "measured"),
              Stage("LLM", llm, 3 * llm, 2, 0, 0, "measured"), Stage("TTS", tts, 3 * tts, 1, 0, 0, "measured")]
    fixed = {"vad_endpoint": p50["vad_pause"], "send_and_network": p50["first_audio_sent"] - p50["tts_first_audio"]
             + max(0.0, tl["p50_ms"] - p50["first_audio_sent"])}
    # The whole 2-core box renders, encodes and runs the models: a session takes the box's share
    # that benchmarks/capacity.py measured at the SLO.
    cap = RESULTS / "capacity.json"
    at_slo = json.loads(cap.read_text())["sessions_at_slo"] if cap.exists() else 1
    if isinstance(at_slo, dict):  # per video mode: the box holds what its better mode holds
        at_slo = max(at_slo.values())
    host = {"sessions_per_host": 1, "gpu": 0.0, "cpus": 2.0 / max(1, at_slo), "source": "measured",
            "box_sessions_at_slo": at_slo}
    return stages, fixed, host


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load a = lambda/mu (< c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    # Stable recurrence for the Erlang-B blocking probability, then B -> C.
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    rho = a / c
    return b / (1 - rho + rho * b)


def wait_p95_ms(lam: float, service_ms: float, servers: int) -> float:
    """95th percentile of the M/M/c waiting time (ms); inf when the queue is unstable."""
    mu = 1000.0 / service_ms
    if lam >= servers * mu:
        return math.inf
    pw = erlang_c(servers, lam / mu)
    if pw <= 0.05:
        return 0.0
    return 1000.0 * math.log(pw / 0.05) / (servers * mu - lam)


def plan(sessions: int, slo_ms: float, stages: list[Stage], fixed_ms: dict, host: dict, node: dict,
         turn_interval_s: float = 20.0, headroom: float = 0.1, head: dict | None = None) -> dict:
    lam = sessions / turn_interval_s
    replicas = {s.name: 1 for s in stages}

    def waits() -> dict[str, float]:
        return {s.name: wait_p95_ms(lam, s.hold_ms, replicas[s.name] * s.slots) for s in stages}

    # Stability first (utilisation < 1), then add replicas where the p95 wait is worst until the SLO holds.
    for s in stages:
        while lam * s.hold_ms / 1000.0 >= replicas[s.name] * s.slots * 0.95:
            replicas[s.name] += 1
    fixed = sum(fixed_ms.values())
    by_name = {s.name: s for s in stages}

    def critical_path(w: dict[str, float]) -> float:
        """fixed + ASR (turn prediction runs beside it) + LLM first clause + TTS first audio."""
        def t(name: str) -> float:
            return by_name[name].service_ms + w[name] if name in by_name else 0.0
        return fixed + max(t("ASR"), t("TurnTaking")) + t("LLM") + t("TTS")

    unloaded = critical_path({s.name: 0.0 for s in stages})
    for _ in range(100000):
        w = waits()
        if critical_path(w) <= slo_ms:
            break
        worst = max(w, key=w.get)
        if w[worst] == 0:
            break  # the SLO is below the unloaded critical path: no number of replicas meets it
        replicas[worst] += 1
    w = waits()
    p95 = critical_path(w)
    hosts = math.ceil(sessions * (1 + headroom) / host["sessions_per_host"] - 1e-9)
    gpu_items = [(s.name, s.gpu, s.cpus) for s in stages for _ in range(replicas[s.name])]
    gpu_items += [("SessionHost", host["gpu"], host["cpus"])] * hosts
    nodes = pack(gpu_items, node)
    head = head or {"usd_per_hour": 0.0}
    usd_per_hour = nodes * node["usd_per_hour"] + head["usd_per_hour"]
    return {
        "sessions": sessions, "slo_ms": slo_ms, "turn_interval_s": turn_interval_s, "turns_per_s": round(lam, 2),
        "meets_slo": p95 <= slo_ms, "predicted_p95_ms": round(p95, 1),
        "fixed_ms": fixed_ms, "unloaded_critical_path_ms": round(unloaded, 1),
        "replicas": {**replicas, "SessionHost": hosts},
        "p95_wait_ms": {k: round(v, 1) for k, v in w.items()},
        "utilisation": {s.name: round(lam * s.hold_ms / 1000 / (replicas[s.name] * s.slots), 3)
                        for s in stages},
        "gpu_fractions": {**{s.name: s.gpu for s in stages}, "SessionHost": host["gpu"]},
        "gpus_total": round(sum(g for _, g, _ in gpu_items), 2),
        "node_type": node, "nodes": nodes, "usd_per_hour": round(usd_per_hour, 2),
        "usd_per_session_minute": round(usd_per_hour / 60 / max(1, sessions), 5),
        "stages": [asdict(s) for s in stages], "session_host": host,
    }


def pack(items: list[tuple[str, float, float]], node: dict) -> int:
    """First-fit-decreasing of (name, gpu, cpus) replicas onto nodes; returns the node count."""
    bins: list[list[float]] = []  # [gpu_left, cpu_left]
    for _, gpu, cpus in sorted(items, key=lambda x: (-x[1], -x[2])):
        for b in bins:
            if b[0] + 1e-9 >= gpu and b[1] + 1e-9 >= cpus:
                b[0] -= gpu
                b[1] -= cpus
                break
        else:
            if gpu > node["gpus"] + 1e-9 or cpus > node["cpus"]:
                raise ValueError(f"a replica needing {gpu} GPU / {cpus} CPU does not fit on {node}")
            bins.append([node["gpus"] - gpu, node["cpus"] - cpus])
    return len(bins)


def render(p: dict) -> str:
    lines = [f"Plan for {p['sessions']} concurrent sessions, reply p95 <= {p['slo_ms']:.0f} ms "
             f"({p['turns_per_s']} turns/s at one turn per {p['turn_interval_s']:.0f} s per session):",
             f"  predicted p95 {p['predicted_p95_ms']} ms (unloaded critical path {p['unloaded_critical_path_ms']} ms)"
             f" -> {'meets' if p['meets_slo'] else 'DOES NOT MEET'} the SLO",
             "  replicas (GPU fraction each, utilisation):"]
    for name, n in p["replicas"].items():
        util = p["utilisation"].get(name)
        lines.append(f"    {name:12s} {n:5d}  x {p['gpu_fractions'][name]:<6} GPU"
                     + (f"  util {util:.2f}, p95 wait {p['p95_wait_ms'][name]} ms" if util is not None else ""))
    node = p["node_type"]
    lines += [f"  GPUs in use: {p['gpus_total']}  ->  {p['nodes']} x {node['instance']} "
              f"({node['gpus']} GPU, ${node['usd_per_hour']}/h)",
              f"  cost: ${p['usd_per_hour']}/h  =  ${p['usd_per_session_minute']} per session-minute"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Cluster size and cost for N concurrent sessions at an SLO.")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--slo-ms", type=float, default=600.0)
    ap.add_argument("--node", default="h100x8", help="a key of benchmarks/node_types.yaml")
    ap.add_argument("--nodes-file", type=Path, default=ROOT / "benchmarks" / "node_types.yaml")
    ap.add_argument("--profile", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--turn-interval-s", type=float, default=20.0)
    ap.add_argument("--json", type=Path, help="also write the plan as JSON here")
    a = ap.parse_args()
    nodes = yaml.safe_load(a.nodes_file.read_text())
    if a.profile == "gpu":
        stages, fixed, host = GPU_STAGES, GPU_FIXED_MS, GPU_HOST
        head, headroom = nodes.get("head"), 0.1
    else:  # one box, no separate head, no spare slots
        stages, fixed, host = cpu_stages_from_results()
        head, headroom = None, 0.0
    p = plan(a.sessions, a.slo_ms, stages, fixed, host, nodes[a.node], a.turn_interval_s, headroom, head)
    print(render(p))
    if a.json:
        a.json.write_text(json.dumps(p, indent=2))


if __name__ == "__main__":
    sys.exit(main())
