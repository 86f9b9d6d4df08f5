"""GPU memory and utilisation per process through pynvml, exported as Ray metrics (and so to
Prometheus through Ray's metrics endpoint).

Each GPU-backed replica reports the GPUs Ray assigned it and its own process's memory on them. On a
box without pynvml or without an NVIDIA driver the reader says exactly that, once, and the replica
exports `presence_gpu_metrics_available 0` instead of numbers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger("presence.gpu")


@dataclass
class GPUReading:
    index: int
    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int
    process_memory_bytes: int  # this process's share (0 if it holds no context on this GPU)


@dataclass
class GPUStats:
    available: bool
    reason: str = ""
    gpus: list[GPUReading] = field(default_factory=list)


def read_gpu_stats(gpu_indices: list[int] | None = None, pid: int | None = None) -> GPUStats:
    """Utilisation and memory of `gpu_indices` (all GPUs when None), with `pid`'s own memory on each."""
    try:
        import pynvml  # nvidia-ml-py: an optional dependency (the gpu and dev extras)
    except ImportError:
        return GPUStats(False, "pynvml is not installed (pip install nvidia-ml-py): no GPU metrics")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GPUStats(False, f"NVML did not start ({exc}): no NVIDIA driver or GPU on this node, no GPU metrics")
    pid = os.getpid() if pid is None else pid
    try:
        indices = range(pynvml.nvmlDeviceGetCount()) if gpu_indices is None else gpu_indices
        readings = []
        for i in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(i))
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            mine = sum(int(p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                       if p.pid == pid)
            readings.append(GPUReading(int(i), float(util.gpu), int(mem.used), int(mem.total), mine))
        return GPUStats(True, gpus=readings)
    except pynvml.NVMLError as exc:
        return GPUStats(False, f"NVML query failed: {exc}")
    finally:
        pynvml.nvmlShutdown()


def assigned_gpu_indices() -> list[int]:
    """The physical GPU indices Ray assigned this worker (empty on CPU)."""
    import ray

    return [int(i) for i in ray.get_gpu_ids()]


class GPUMetricsExporter:
    """Sets Ray gauges for one replica's GPUs; call `export()` periodically (e.g. with its stats)."""

    def __init__(self, deployment: str) -> None:
        from ray.util.metrics import Gauge

        self.deployment = deployment
        keys = ("deployment", "gpu")
        self.available = Gauge("presence_gpu_metrics_available", "1 if pynvml could read this replica's GPUs",
                               tag_keys=("deployment",))
        self.util = Gauge("presence_gpu_utilization_pct", "GPU utilisation (whole device)", tag_keys=keys)
        self.used = Gauge("presence_gpu_memory_used_bytes", "GPU memory in use (whole device)", tag_keys=keys)
        self.total = Gauge("presence_gpu_memory_total_bytes", "GPU memory (whole device)", tag_keys=keys)
        self.process = Gauge("presence_gpu_process_memory_bytes", "GPU memory held by this replica's process",
                             tag_keys=keys)
        self._noted = False

    def export(self) -> GPUStats:
        indices = assigned_gpu_indices()
        stats = read_gpu_stats(indices) if indices else GPUStats(False, "no GPU assigned to this replica")
        self.available.set(1.0 if stats.available else 0.0, tags={"deployment": self.deployment})
        if not stats.available and not self._noted:
            log.info("%s: %s", self.deployment, stats.reason)
            self._noted = True
        for g in stats.gpus:
            tags = {"deployment": self.deployment, "gpu": str(g.index)}
            self.util.set(g.utilization_pct, tags=tags)
            self.used.set(g.memory_used_bytes, tags=tags)
            self.total.set(g.memory_total_bytes, tags=tags)
            self.process.set(g.process_memory_bytes, tags=tags)
        return stats


def start_gpu_metrics(deployment: str, interval_s: float = 5.0) -> GPUMetricsExporter | None:
    """In a replica Ray gave GPUs to: export its GPU metrics every `interval_s` from a daemon thread.
    Replicas without GPUs (the whole CPU profile) start nothing."""
    import threading
    import time

    if not assigned_gpu_indices():
        return None
    exporter = GPUMetricsExporter(deployment)

    def loop() -> None:
        while True:
            try:
                exporter.export()
            except Exception as exc:  # metrics must never take a replica down
                log.warning("%s: GPU metrics failed: %s", deployment, exc)
            time.sleep(interval_s)

    threading.Thread(target=loop, name=f"gpu-metrics-{deployment}", daemon=True).start()
    return exporter
