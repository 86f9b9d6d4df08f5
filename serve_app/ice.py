"""ICE policy for aiortc (aioice), applied in every process that holds peer connections.

- Loopback candidates: aioice never offers 127.0.0.1. A single-box deployment (the CPU profile, tests,
  benchmarks) wants exactly that: media on loopback only. Production sets PRESENCE_ICE_LOOPBACK=0 and
  uses STUN/TURN.
- Consent freshness (RFC 7675) as the RFC has it: consent expires when no check has been answered for
  30 s. aioice 0.13 gives each check a single 0.5 s try and ends the connection after six misses in a
  row, so a peer whose event loop answers late on a busy box (three sessions' worth of work on two
  cores, replicas starting) is cut off after ~30 s while its media still flows (tests/test_ice.py).
  Expiry is logged, and so is which signal ended a participant (serve_app.session.transport).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import aioice.ice
from aioice import stun

log = logging.getLogger("presence.ice")
CONSENT_EXPIRY_S = 30.0  # RFC 7675 section 5.1
CONSENT_RETRANSMISSIONS = 3  # each check is answered within 0.5 + 1 + 2 + 4 s, with STUN's own backoff


def loopback_only_enabled() -> bool:
    return os.environ.get("PRESENCE_ICE_LOOPBACK", "0") == "1"


def use_loopback_candidates() -> None:
    """Gather host candidates on 127.0.0.1 only (idempotent)."""
    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


async def _query_consent(self: aioice.ice.Connection) -> None:
    """A consent check every ~5 s on each nominated pair, retransmitted like any STUN request; the
    connection closes when none has been answered for CONSENT_EXPIRY_S."""
    answered = time.monotonic()
    while True:
        await asyncio.sleep(aioice.ice.CONSENT_INTERVAL * (0.8 + 0.4 * random.random()))
        for pair in list(self._nominated.values()):
            try:
                await pair.protocol.request(self.build_request(pair, nominate=False), pair.remote_addr,
                                            integrity_key=self.remote_password.encode("utf8"),
                                            retransmissions=CONSENT_RETRANSMISSIONS)
                answered = time.monotonic()
            except stun.TransactionError:
                pass
        if time.monotonic() - answered >= CONSENT_EXPIRY_S:
            log.warning("ICE consent expired: no check answered for %.0f s", time.monotonic() - answered)
            self._query_consent_task = None
            await self.close()
            return


def use_rfc_consent() -> None:
    """Consent freshness that tolerates a slow answer (idempotent)."""
    aioice.ice.Connection.query_consent = _query_consent


def apply_policy() -> None:
    use_rfc_consent()
    if loopback_only_enabled():
        use_loopback_candidates()
