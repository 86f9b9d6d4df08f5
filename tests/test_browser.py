"""The real web client in headless Chromium: fake microphone speaking a question, fake camera.
Checks the user's words come back as an utterance, the avatar answers audibly, and its mouth moves
while the reply plays."""

from __future__ import annotations

import shutil
import wave

import httpx
import numpy as np
import pytest

from benchmarks.rtc_client import speech_pcm48k

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.browser


def write_wav(path, pcm: np.ndarray, rate: int = 48000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())


def write_y4m(path, frames: int = 20, w: int = 320, h: int = 240) -> None:
    """A plain Y4M clip (a grey face-sized oval on a darker background) for the fake camera."""
    yy, xx = np.mgrid[0:h, 0:w]
    oval = ((xx - w / 2) / (w * 0.22)) ** 2 + ((yy - h / 2) / (h * 0.35)) ** 2 < 1
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            y = np.where(oval, 170, 60).astype(np.uint8) + (i % 3)
            f.write(b"FRAME\n" + y.tobytes() + np.full((h // 2) * (w // 2) * 2, 128, np.uint8).tobytes())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by scripts/test.sh (apt-get install chromium)")
def test_browser_conversation(idle, presence, api_key, tts, tmp_path):
    from playwright.sync_api import sync_playwright

    question = speech_pcm48k("What is the capital of France?", tts)
    lead = np.zeros(48000 * 4, np.int16)  # getUserMedia starts the file before the call connects
    tail = np.zeros(48000 * 12, np.int16)
    wav, y4m = tmp_path / "question.wav", tmp_path / "camera.y4m"
    write_wav(wav, np.concatenate([lead, question, tail]))
    write_y4m(y4m)
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-quic", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop",
            f"--use-file-for-fake-video-capture={y4m}", "--allow-loopback-in-peer-connection",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        page = browser.new_page()
        page.goto(f"{presence}/#key={api_key}&autostart=1")
        page.wait_for_function(
            "() => window.presence.events.some(e => e.event_type === 'conversation.utterance'"
            " && e.properties.role === 'replica')",
            timeout=90_000)
        page.wait_for_timeout(1500)
        data = page.evaluate("() => ({events: window.presence.events, audio: window.presence.audioLevels,"
                             " mouth: window.presence.mouth, id: window.presence.conversationId})")
        page.screenshot(path=str(tmp_path / "client.png"))
        browser.close()
    # Free the session slot now rather than after participant_left_timeout.
    httpx.post(f"{presence}/v2/conversations/{data['id']}/end", headers={"x-api-key": api_key}, timeout=30)
    users = [e for e in data["events"] if e["event_type"] == "conversation.utterance" and e["properties"]["role"] == "user"]
    assert users and "france" in users[0]["properties"]["speech"].lower()
    started = next(e for e in data["events"] if e["event_type"] == "conversation.replica.started_speaking")
    reply = next(e for e in data["events"]
                 if e["event_type"] == "conversation.utterance" and e["properties"]["role"] == "replica")
    t0, t1 = started["received_at"], reply["received_at"]
    loud = [rms for t, rms in data["audio"] if t0 <= t <= t1]
    quiet = [rms for t, rms in data["audio"] if t < users[0]["received_at"] - 3000]
    assert loud and max(loud) > 0.02 and max(loud) > 5 * (np.mean(quiet) if quiet else 0) + 1e-4
    moving = [d for t, d in data["mouth"] if t0 <= t <= t1]
    still = [d for t, d in data["mouth"] if t < users[0]["received_at"] - 3000]
    assert len(data["mouth"]) > 20 and moving and still
    assert np.mean(moving) > 1.5 * np.mean(still) + 0.2
