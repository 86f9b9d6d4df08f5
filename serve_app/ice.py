"""ICE candidate policy for aiortc.

aioice never offers 127.0.0.1. A single-box deployment (the CPU profile, tests, benchmarks) wants
exactly that: media on loopback only. Production sets PRESENCE_ICE_LOOPBACK=0 and uses STUN/TURN.
"""

from __future__ import annotations

import os

import aioice.ice


def loopback_only_enabled() -> bool:
    return os.environ.get("PRESENCE_ICE_LOOPBACK", "0") == "1"


def use_loopback_candidates() -> None:
    """Gather host candidates on 127.0.0.1 only (idempotent)."""
    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


def apply_policy() -> None:
    if loopback_only_enabled():
        use_loopback_candidates()
