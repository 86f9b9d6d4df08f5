"""The session's WebRTC side: the SDP offer/answer, the user's incoming tracks, the avatar's outgoing
tracks, the `events` data channel with a backlog for events emitted before it opens, and the `avatar`
channel (client video mode: animation state, unordered and unreliable, so a late pose is dropped)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

log = logging.getLogger("presence.session")
MAX_BACKLOG = 1000
AVATAR_CHANNEL = "avatar"
MAX_AVATAR_BUFFERED = 16 << 10  # bytes queued on the avatar channel before poses are dropped (~7 s of them)


class BadOffer(ValueError):
    """The client's SDP offer cannot be used."""


class Transport:
    """One aiortc peer. `on_track(track)` gets each incoming track; `on_message(raw)` each data-channel
    message. `connected` is set once the peer connects; `left_at` is when the participant went away."""

    def __init__(self, ice_servers: list[dict], on_track: Callable[[MediaStreamTrack], None],
                 on_message: Callable[[Any], None]) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers]))
        self.channel = None
        self.avatar_channel = None
        self.audio_sender = None
        self._backlog: list[dict] = []
        self.connected = asyncio.Event()
        self.left_at: float | None = None
        self._on_track = on_track
        self._on_message = on_message
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", on_track)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, offer_sdp: str, audio_out: MediaStreamTrack, video_out: MediaStreamTrack | None) -> str:
        """Apply the client's offer; returns the SDP answer (non-trickle: candidates included). With no
        `video_out` (client video mode) the user's camera is received and no video is sent.
        Raises BadOffer (and closes the peer) when the offer is unusable."""
        if not isinstance(offer_sdp, str) or not offer_sdp.startswith("v=0") or "m=" not in offer_sdp:
            await self.pc.close()
            raise BadOffer("body is not an SDP offer (must start with 'v=0' and contain media sections)")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError and friends on malformed SDP
            await self.pc.close()
            raise BadOffer(f"malformed SDP offer: {exc}") from exc
        if "audio" not in {t.kind for t in self.pc.getTransceivers()}:
            await self.pc.close()
            raise BadOffer("the offer has no audio section: the user's microphone is required")
        for t in self.pc.getTransceivers():
            out = audio_out if t.kind == "audio" else video_out
            if out is None:
                t.direction = "recvonly"
                continue
            t.sender.replaceTrack(out) if t.sender.track else self.pc.addTrack(out)
            t.direction = "sendrecv"
            if t.kind == "audio":
                self.audio_sender = t.sender
        await self.pc.setLocalDescription(await self.pc.createAnswer())  # waits for ICE gathering
        return self.pc.localDescription.sdp

    def send(self, ev: dict) -> None:
        """Send an event to the client now, or hold it until the channel opens (after ICE/DTLS)."""
        if self.channel is not None and self.channel.readyState == "open":
            self._send(ev)
        elif len(self._backlog) < MAX_BACKLOG:
            self._backlog.append(ev)

    def send_avatar(self, data: bytes | str) -> bool:
        """Send on the avatar channel if it is open and not backed up; False when dropped."""
        ch = self.avatar_channel
        if ch is None or ch.readyState != "open" or ch.bufferedAmount > MAX_AVATAR_BUFFERED:
            return False
        try:
            ch.send(data)
        except Exception:
            log.debug("avatar channel send failed", exc_info=True)
            return False
        return True

    def participant_left(self, why: str = "") -> None:
        if self.left_at is not None:
            return
        # Which signal ended it (a peer state, the microphone track) is what tells a user who left from a
        # connection that failed under load.
        log.warning("participant left: %s (connection %s, ICE %s)", why or "peer state", self.pc.connectionState,
                    self.pc.iceConnectionState)
        self.left_at = time.monotonic()

    async def close(self) -> None:
        await self.pc.close()

    def _send(self, ev: dict) -> None:
        try:
            self.channel.send(json.dumps(ev))
        except Exception:  # a closing channel must not take the session down
            log.debug("data channel send failed", exc_info=True)

    def _on_datachannel(self, channel) -> None:
        if channel.label == AVATAR_CHANNEL:
            self.avatar_channel = channel  # server -> client only
            return
        self.channel = channel
        channel.on("message", self._on_message)
        backlog, self._backlog = self._backlog, []
        for ev in backlog:
            self._send(ev)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.left_at = None
            self.connected.set()
        elif state in ("failed", "closed", "disconnected"):
            self.participant_left(f"connection {state}")
