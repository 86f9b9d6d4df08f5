"""Consent freshness (serve_app.ice): two real aioice connections on loopback, one of which answers its
peer's consent checks late or not at all. Intervals are shortened (checks every ~0.2 s, expiry 2 s) so
the rules run in seconds."""

from __future__ import annotations

import asyncio

import aioice.ice
import pytest

from serve_app import ice


async def connected_pair() -> tuple[aioice.ice.Connection, aioice.ice.Connection]:
    a = aioice.ice.Connection(ice_controlling=True, components=1)
    b = aioice.ice.Connection(ice_controlling=False, components=1)
    await asyncio.gather(a.gather_candidates(), b.gather_candidates())
    for one, other in ((a, b), (b, a)):
        one.remote_username, one.remote_password = other.local_username, other.local_password
        for c in other.local_candidates:
            await one.add_remote_candidate(c)
        await one.add_remote_candidate(None)
    await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), timeout=10)
    return a, b


def answer_consent(conn: aioice.ice.Connection, delay_s: float | None) -> None:
    """`conn` answers STUN requests `delay_s` late, or never (None)."""
    original = conn.request_received

    def late(message, addr, protocol, *rest):
        if delay_s is not None:
            asyncio.get_running_loop().call_later(delay_s, original, message, addr, protocol, *rest)

    conn.request_received = late


async def alive_after(conn: aioice.ice.Connection, seconds: float) -> bool:
    """Whether `conn` is still open `seconds` from now (it closes itself when consent expires)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        if conn._closing or conn._closed:
            return False
        await asyncio.sleep(0.05)
    return not (conn._closing or conn._closed)


@pytest.fixture
def short_consent(monkeypatch):
    ice.use_loopback_candidates()
    ice.use_rfc_consent()
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)
    monkeypatch.setattr(ice, "CONSENT_EXPIRY_S", 2.0)


def test_late_consent_answers_keep_the_connection(short_consent):
    async def run() -> bool:
        a, b = await connected_pair()
        try:
            answer_consent(b, delay_s=0.8)  # past aioice's own 0.5 s window on every check
            return await alive_after(a, 6.0)  # aioice alone closes after 6 missed checks (~4.2 s here)
        finally:
            await asyncio.gather(a.close(), b.close())

    assert asyncio.run(run())


def test_unanswered_consent_closes_the_connection(short_consent, caplog):
    async def run() -> tuple[bool, bool, ice.ConsentStats]:
        a, b = await connected_pair()
        try:
            answer_consent(b, delay_s=None)  # the peer is gone
            early = await alive_after(a, 1.0)
            return early, await alive_after(a, 6.0), ice.consent_stats(a)
        finally:
            await asyncio.gather(a.close(), b.close())

    with caplog.at_level("WARNING", logger="presence.ice"):
        early, late, stats = asyncio.run(run())
    assert early and not late  # kept within the expiry, closed after it
    # The expiry says where the checks were lost: ours went unanswered, the peer's still reached us.
    assert stats.sent >= 1 and not stats.refused
    assert stats.received >= 1 and not stats.we_refused
    assert "ICE consent expired" in caplog.text and "the peer's requests: " in caplog.text
