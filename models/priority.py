"""Thread priorities: work no reply waits for yields the CPU to the reply path (no Ray here)."""

from __future__ import annotations

import os
import threading

# Niceness steps below a Serve worker's (Ray starts workers at 15) for the work no reply waits for:
# perception (a reply reads the latest face state, never waits for one), fitting replicas, decoding the
# camera. On a busy CPU that work lags, not the reply path (VAD, ASR, the turn model, the LLM, TTS).
BACKGROUND_NICE = 4

_LOWERED: set[int] = set()  # native thread ids already lowered (each is lowered once)


def lower_priority(by: int, thread_name: str | None = None) -> int:
    """Renice this process's threads (or only the Python threads named `thread_name`) `by` steps
    down, once each; threads they start later inherit it. Returns how many were lowered.

    On a busy CPU the work that may lag (perception, decoding the camera) then yields to the reply
    path's stages (VAD, ASR, the LLM, TTS), which keep Ray's worker priority. Raising a niceness
    needs no privilege; where the OS refuses anyway, nothing changes."""
    if thread_name is None:
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            tids = [threading.get_native_id()]
    else:
        tids = [t.native_id for t in threading.enumerate() if t.name == thread_name and t.native_id]
    lowered = 0
    for tid in tids:
        if tid in _LOWERED:
            continue
        try:  # on Linux each thread has its own niceness
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except (OSError, AttributeError):
            continue
        _LOWERED.add(tid)
        lowered += 1
    return lowered
