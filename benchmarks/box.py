"""What box a benchmark ran on, including how fast its cores were that hour: the same 2-core box has
run a pure-Python probe in 0.24 s one day and 1.5 s another, so figures from different runs compare
only beside this probe."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def python_probe_s(steps: int = 5_000_000) -> float:
    """Seconds for a plain Python loop of `steps` additions (best of three): one core's speed now."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total = 0
        for i in range(steps):
            total += i
        best = min(best, time.perf_counter() - t0)
    return round(best, 3)


def machine_record() -> dict:
    """Cores, memory, CPU model, Python and the probe; call it before the benchmark loads the box."""
    mem_gb = None
    cpu_model = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "memory_gb": mem_gb, "cpu_model": cpu_model,
            "python": platform.python_version(), "python_probe_5m_s": python_probe_s()}
