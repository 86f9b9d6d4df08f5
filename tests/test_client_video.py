"""Client video mode through real Serve and a real aiortc peer: the session sends no video, the head
file is served to the meeting token (and refused otherwise), poses arrive at >= 30 Hz stamped on the
audio's media clock, and the mouth they describe is in sync with the audio the client hears."""

from __future__ import annotations

import asyncio

import httpx

from benchmarks.lipsync import lipsync_offset_ms
from benchmarks.rtc_client import PresenceRTCClient
from models.avatar.head import CHANNELS
from models.avatar.headfile import decode_head

LONG = ("Hello there, and welcome to the clinic. We open at eight in the morning and close at six, "
        "every weekday, and on Saturdays we see patients until noon.")


def test_client_mode_sends_poses_not_video(idle, presence, api_key):
    async def run():
        client = PresenceRTCClient(presence, api_key)
        conv = await client.create(conversation_name="client mode", video_mode="client")
        await client.connect()
        avatar = await client.wait_event("conversation.replica.avatar", timeout=10)
        props = avatar["properties"]
        token = conv["meeting_token"]
        async with httpx.AsyncClient(base_url=presence) as http:
            head = await http.get(props["head_url"], headers={"authorization": f"Bearer {token}"})
            again = await http.get(props["head_url"], headers={"authorization": f"Bearer {token}",
                                                              "if-none-match": head.headers["etag"]})
            bad_token = await http.get(props["head_url"], headers={"authorization": "Bearer nope"})
            no_token = await http.get(props["head_url"])
            unknown = await http.get("/v2/replicas/r-doesnotexist/head", headers={"authorization": f"Bearer {token}"})
            unknown_key = await http.get("/v2/replicas/r-doesnotexist/head", headers={"x-api-key": api_key})
        await asyncio.sleep(1.0)
        n0 = len(client.rx.poses)
        # Poses go 120 ms ahead and are sent again when speech is queued under them: the ones recorded
        # from here start well before the speech.
        await asyncio.sleep(0.4)
        client.send("conversation.echo", text=LONG)
        await client.wait_event("conversation.replica.started_speaking", timeout=30)
        await client.wait_event("conversation.replica.stopped_speaking", timeout=60)
        await asyncio.sleep(0.5)
        stats = await client.pc.getStats()
        video_in = [s for s in stats.values() if s.type == "inbound-rtp" and s.kind == "video"]
        await client.end()
        await client.close()
        return conv, props, head, again, bad_token, no_token, unknown, unknown_key, client.rx, n0, video_in

    conv, props, head, again, bad_token, no_token, unknown, unknown_key, rx, n0, video_in = asyncio.run(run())
    assert props["video_mode"] == "client" and props["replica_id"] == conv["replica_id"] == "r-stock"
    # The head file: the announced version, decodable, cacheable; 304 when the browser has it.
    assert head.status_code == 200 and head.headers["etag"] == f'"{props["head_version"]}"'
    assert "immutable" in head.headers["cache-control"]
    header, arrays = decode_head(head.content)
    assert header["channels"] == list(CHANNELS) and arrays["deltas"].shape == (len(CHANNELS), header["count"], 3)
    assert again.status_code == 304
    assert bad_token.status_code == 401 and no_token.status_code == 401
    assert unknown.status_code == 403 and unknown_key.status_code == 404
    # No video: no track, no RTP.
    assert rx.video_tracks == 0 and rx.frames == 0
    assert all(s.packetsReceived == 0 for s in video_in)
    # Poses at >= 30 Hz, on the media clock (their stamps advance as the wall clock does).
    assert rx.rtp_origin is not None
    poses = rx.poses[n0:]
    span = poses[-1][0] - poses[0][0]
    assert span > 3 and (len(poses) - 1) / span >= 29.0
    media_span = poses[-1][1] - poses[0][1]
    assert abs(media_span - span) < 0.25
    assert any(p[3] for p in poses) and not poses[0][3]
    # Lip sync on the media clock: the audio's RTP timestamps mapped with the session's origin against
    # the poses' stamps. The mouth must move with the audio the client heard, within +-45 ms.
    audio = [(((rtp - rx.rtp_origin) & 0xFFFFFFFF) / 48000 + 0.01, rms) for rtp, rms in rx.audio_rtp]  # frame centres
    t0 = min(p[1] for p in poses if p[3]) - 1.0
    t1 = max(p[1] for p in poses if p[3]) + 1.0
    audio = [(t, v) for t, v in audio if t0 <= t <= t1]
    mouth = [(p[1], p[2]) for p in poses if t0 <= p[1] <= t1]
    offset, r = lipsync_offset_ms(audio, mouth)
    assert r > 0.2, (offset, r)  # a real peak (a mapping off by seconds correlates at ~0)
    assert abs(offset) <= 45, (offset, r)
