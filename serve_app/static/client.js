// Presence web client: create or join a conversation, stream mic + camera, show the avatar: its video
// track (server video mode) or its head drawn here with WebGL2 from poses on the data channel (client mode).
// window.presence exposes what the page saw (events, reply audio levels, mouth motion, fps) for tests.
import { PoseTimeline, SplatRenderer, fetchHead, parseHead } from "./avatar.js";

const $ = (id) => document.getElementById(id);
const state = { events: [], audioLevels: [], mouth: [], mouthOpen: [], mouthCavity: [], mouthProbe: [], pc: null, conversationId: null, apiKey: null,
                token: null, ended: false, videoMode: null, head: null, fps: 0, sync: null, error: null };
window.presence = state;
const timeline = new PoseTimeline(13);

function hashParams() {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

function setStatus(text) { $("status").textContent = text; }

function caption(role, text) {
  const p = document.createElement("p");
  p.className = role;
  p.textContent = (role === "user" ? "You: " : "Avatar: ") + text;
  $("captions").appendChild(p);
  $("captions").scrollTop = 1e9;
}

function onEvent(ev) {
  state.events.push({ ...ev, received_at: performance.now() });
  const props = ev.properties || {};
  switch (ev.event_type) {
    case "conversation.utterance": caption(props.role, props.speech); break;
    case "conversation.turn_timings": {
      const ms = props.ms_from_speech_end || {};
      $("latency").textContent = "speech end → first audio sent: " + (ms.first_audio_sent ?? "?") +
        " ms  (ASR " + (ms.asr_final ?? "?") + ", LLM first token " + (ms.llm_first_token ?? "?") +
        ", TTS " + (ms.tts_first_audio ?? "?") + ")";
      break;
    }
    case "conversation.perception": $("perception").textContent = "What the avatar sees: " + props.visual; break;
    case "system.replica_joined": setStatus("connected"); break;
    case "conversation.replica.avatar":
      state.videoMode = props.video_mode;
      if (props.video_mode === "client") showClientAvatar(props).catch((e) => { state.error = String(e); setStatus(String(e)); });
      break;
    case "system.shutdown": setStatus("ended: " + props.shutdown_reason); state.ended = true; break;
  }
}

async function createConversation(apiKey) {
  const videoMode = hashParams().get("video");  // "client" | "server"; none: the server's default
  const res = await fetch("/v2/conversations", {
    method: "POST",
    headers: { "content-type": "application/json", "x-api-key": apiKey },
    body: JSON.stringify({ conversation_name: "web client", ...(videoMode ? { video_mode: videoMode } : {}) }),
  });
  if (!res.ok) throw new Error("create failed: " + res.status + " " + (await res.text()));
  return res.json();
}

function measureReplyAudio(stream) {
  const ctx = new AudioContext();
  const src = ctx.createMediaStreamSource(stream);
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 1024;
  src.connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(buf);
    let s = 0;
    for (let i = 0; i < buf.length; i++) s += buf[i] * buf[i];
    state.audioLevels.push([performance.now(), Math.sqrt(s / buf.length)]);
    if (state.audioLevels.length > 20000) state.audioLevels.shift();
  }, 20);
}

async function showClientAvatar(props) {
  const t0 = performance.now();
  const { buf, cached } = await fetchHead(props.head_url, state.token, props.replica_id + "/" + props.head_version);
  const head = parseHead(buf);
  const canvas = $("avatar-canvas");
  $("avatar").hidden = true;
  canvas.hidden = false;
  timeline.channels = head.header.channels.length;
  const renderer = new SplatRenderer(canvas, head);
  const jaw = renderer.channelIndex.jaw_open;
  state.poseSlack = timeline.slack;
  state.head = { count: head.header.count, bytes: buf.byteLength, cached, load_ms: performance.now() - t0 };
  // At 100 Hz, apart from drawing (software WebGL may draw only a few frames a second): the jaw the face
  // shows now, and the level of the audio being played out now (the RTP audio-level of the packet at
  // playout; the AnalyserNode's level comes through WebAudio's own buffering, which the listener does
  // not hear). The page's lip-sync measurement compares the two.
  setInterval(() => {
    const pose = timeline.current();
    const src = timeline.receiver ? timeline.receiver.getSynchronizationSources()[0] : null;
    if (pose) state.mouthProbe.push([performance.now(), pose.w[jaw], src && src.audioLevel !== undefined ? src.audioLevel : -1,
                                     timeline.late ? 1 : 0, timeline.audioAge]);
    if (state.mouthProbe.length > 30000) state.mouthProbe.shift();
  }, 10);
  let last = performance.now(), frames = 0;
  const frame = () => {
    const pose = timeline.current();
    renderer.pollReadback();
    if (pose) {
      renderer.draw(pose);
      const drawnAt = performance.now(), drawnJaw = pose.w[jaw];
      renderer.readRegion(...MOUTH_BOX, (px) => {
        mouthChange(px);
        state.mouthCavity.push([drawnAt, drawnJaw, cavityFraction(px)]);
        if (state.mouthCavity.length > 20000) state.mouthCavity.shift();
      });
      state.sync = timeline.sync;
      state.originChanges = timeline.originChanges;
      state.mouthOpen.push([performance.now(), pose.w[jaw], pose.t]);
      if (state.mouthOpen.length > 20000) state.mouthOpen.shift();
      frames++;
    }
    const now = performance.now();
    if (now - last >= 1000) { state.fps = frames * 1000 / (now - last); frames = 0; last = now;
      $("fps").textContent = state.fps.toFixed(1) + " fps (drawn here, " + canvas.width + "×" + canvas.height + ")"; }
    if (!state.ended) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}

// The mouth region (fractions of the frame: x, y, width, height) whose change the page measures.
const MOUTH_BOX = [0.35, 0.5, 0.3, 0.2];
let previousMouth = null;

/** Mean absolute change of the mouth region's red and green since the last sample (lips moving with
 * speech show up here), appended to state.mouth. */
function mouthChange(px) {
  if (previousMouth && previousMouth.length === px.length) {
    let d = 0;
    for (let i = 0; i < px.length; i += 4) d += Math.abs(px[i] - previousMouth[i]) + Math.abs(px[i + 1] - previousMouth[i + 1]);
    state.mouth.push([performance.now(), d / (px.length / 2)]);
    if (state.mouth.length > 20000) state.mouth.shift();
  }
  previousMouth = px;
}

/** Fraction of the mouth region that is the open mouth's dark inside (no channel above 70 of 255): it
 * grows with the jaw and, unlike the frame-to-frame change, barely moves when the whole head sways or
 * nods, so it tells a talking mouth from a listening head. */
function cavityFraction(px) {
  let n = 0;
  for (let i = 0; i < px.length; i += 4) if (px[i] < 70 && px[i + 1] < 70 && px[i + 2] < 70) n++;
  return n / (px.length / 4);
}

function measureMouth(video) {
  // The server-rendered <video>, sampled 15 times a second (the client-rendered canvas is read back
  // by its renderer after each frame instead, without waiting on the GPU).
  const canvas = document.createElement("canvas");
  const w = 64, h = 64;
  canvas.width = w; canvas.height = h;
  const g = canvas.getContext("2d", { willReadFrequently: true });
  setInterval(() => {
    if (video.readyState < 2 || !video.videoWidth) return;
    const [fx, fy, fw, fh] = MOUTH_BOX, vw = video.videoWidth, vh = video.videoHeight;
    g.drawImage(video, vw * fx, vh * fy, vw * fw, vh * fh, 0, 0, w, h);
    mouthChange(g.getImageData(0, 0, w, h).data);
  }, 66);
}

async function join(conversationId, token) {
  state.conversationId = conversationId;
  state.token = token;
  setStatus("asking for camera and microphone…");
  const local = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    video: { width: 320, height: 240, frameRate: 10 },
  });
  $("self").srcObject = local;
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  const channel = pc.createDataChannel("events");
  state.channel = channel;
  channel.onmessage = (m) => onEvent(JSON.parse(m.data));
  // Client video mode: poses, unordered and unreliable (a late pose is worth nothing).
  const avatar = pc.createDataChannel("avatar", { ordered: false, maxRetransmits: 0 });
  avatar.binaryType = "arraybuffer";
  avatar.onmessage = (m) => timeline.onMessage(m.data);
  for (const track of local.getTracks()) pc.addTrack(track, local);
  const remote = new MediaStream();
  pc.ontrack = (e) => {
    remote.addTrack(e.track);
    if (e.track.kind === "video") { $("avatar").srcObject = new MediaStream([e.track]); measureMouth($("avatar")); }
    else {
      timeline.receiver = e.receiver;  // its RTP timestamps say which pose to show
      $("voice").srcObject = new MediaStream([e.track]);
      measureReplyAudio(new MediaStream([e.track]));
    }
  };
  pc.onconnectionstatechange = () => { if (pc.connectionState !== "connected") setStatus(pc.connectionState); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {  // non-trickle ICE: send the offer with all candidates
    if (pc.iceGatheringState === "complete") return resolve();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
    setTimeout(resolve, 3000);
  });
  setStatus("connecting…");
  const res = await fetch(`/v2/conversations/${conversationId}/webrtc`, {
    method: "POST",
    // The operator who created the call (API key in memory) joins with the operator grant: echo and
    // context changes. A participant (join link) has only the meeting token.
    headers: { "content-type": "application/sdp", authorization: "Bearer " + token,
               ...(state.apiKey ? { "x-api-key": state.apiKey } : {}) },
    body: pc.localDescription.sdp,
  });
  if (res.status !== 201) { setStatus("join failed: " + res.status + " " + (await res.text())); return; }
  await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
  $("end").disabled = false;
}

async function start() {
  const apiKey = $("apikey").value.trim();
  if (!apiKey) { setStatus("enter the API key printed by the server"); return; }
  // Kept in memory only (never in browser storage): nothing can read it back after this tab closes.
  state.apiKey = apiKey;
  $("start").disabled = true;
  try {
    const conv = await createConversation(apiKey);
    history.replaceState(null, "", `/c/${conv.conversation_id}#t=${conv.meeting_token}`);
    await join(conv.conversation_id, conv.meeting_token);
  } catch (e) { setStatus(String(e)); $("start").disabled = false; }
}

async function end() {
  if (state.channel && state.channel.readyState === "open" && state.apiKey) {
    await fetch(`/v2/conversations/${state.conversationId}/end`, { method: "POST", headers: { "x-api-key": state.apiKey } });
  }
  if (state.pc) state.pc.close();
  $("end").disabled = true;
}

window.addEventListener("load", () => {
  const params = hashParams();
  $("apikey").value = params.get("key") || "";
  $("start").onclick = start;
  $("end").onclick = end;
  const m = location.pathname.match(/^\/c\/([\w-]+)/);
  if (m && params.get("t")) {
    $("start").disabled = true;
    join(m[1], params.get("t")).catch((e) => setStatus(String(e)));
  } else if (params.get("autostart") === "1") {
    start();
  }
});
