// Client video mode: the avatar's Gaussian-splat head drawn in the browser with WebGL2.
// The head file (models/avatar/headfile.py: encode_head) is fetched once per replica and content hash
// and kept in Cache Storage; during the call only poses arrive (serve_app/session/pose_stream.py), each
// stamped with the media time of the avatar's audio, and each is shown when that audio sample plays.
// The maths is the server's rasteriser's (EWA projection, 0.3 px low-pass, front-to-back compositing).

const TEX_W = 1024;
const BACKGROUND = [0.86, 0.88, 0.9];
const POSE_BYTES_FIXED = 8 + 4 * 4;

// --- the head file -------------------------------------------------------------------------------
export function parseHead(buf) {
  const magic = new TextDecoder().decode(new Uint8Array(buf, 0, 4));
  if (magic !== "PRHD") throw new Error("not a Presence head file");
  const hlen = new DataView(buf).getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, hlen)));
  if (header.format !== "presence-head/1") throw new Error("head format " + header.format);
  const base = 8 + hlen;
  const types = { f4: Float32Array, f2: Uint16Array, u1: Uint8Array, i1: Int8Array };
  const arrays = {};
  for (const a of header.arrays) {
    const T = types[a.dtype];
    const count = a.shape.reduce((x, y) => x * y, 1);
    arrays[a.name] = new T(buf, base + a.offset, count);
  }
  return { header, arrays };
}

/** The head file's bytes: from Cache Storage when this replica+version was fetched before. */
export async function fetchHead(url, token, cacheKey) {
  const store = typeof caches !== "undefined" ? await caches.open("presence-heads").catch(() => null) : null;
  const key = new Request(location.origin + "/__head-cache/" + cacheKey);
  if (store) {
    const hit = await store.match(key);
    if (hit) return { buf: await hit.arrayBuffer(), cached: true };
  }
  const res = await fetch(url, { headers: { authorization: "Bearer " + token } });
  if (!res.ok) throw new Error("head file: " + res.status + " " + (await res.text()));
  const buf = await res.arrayBuffer();
  if (store) await store.put(key, new Response(buf.slice(0))).catch(() => {});
  return { buf, cached: false };
}

// --- poses on the audio clock --------------------------------------------------------------------
export function readPose(data, channels) {
  const v = new DataView(data);
  const w = new Float32Array(channels);
  for (let i = 0; i < channels; i++) w[i] = v.getFloat32(POSE_BYTES_FIXED + 4 * i, true);
  return { t: v.getFloat64(0, true), yaw: v.getFloat32(8, true), pitch: v.getFloat32(12, true),
           roll: v.getFloat32(16, true), speaking: v.getFloat32(20, true) > 0.5, w };
}

/** Poses by media time, and the media time of the audio being played now (RTP timestamps). */
export class PoseTimeline {
  constructor(channels) {
    this.channels = channels;
    this.poses = [];
    this.clock = null; // {rtp_origin, rate}
    this.receiver = null; // the avatar audio's RTCRtpReceiver
    this.sync = "none";
    this.late = false;
    this.originChanges = 0; // the session's audio skipped ahead (a stalled event loop) and remapped RTP time
    // Per pose received: [arrival (ms), how far ahead of the audio playing then its stamp was (s)]. A pose
    // whose slack is below zero came too late to be shown with its audio.
    this.slack = [];
    // ms since the audio played last reported its position (a starved audio output reports it in bursts)
    this.audioAge = null;
  }
  onMessage(data) {
    if (typeof data === "string") {
      const clock = JSON.parse(data).clock;
      if (this.clock && clock.rtp_origin !== this.clock.rtp_origin) this.originChanges++;
      this.clock = clock;
      return;
    }
    const p = readPose(data, this.channels);
    p.arrived = performance.now();
    const playing = this.playoutTime();
    if (playing !== null) {
      this.slack.push([p.arrived, p.t - playing]);
      if (this.slack.length > 20000) this.slack.shift();
    }
    const a = this.poses;
    let i = a.length;
    while (i > 0 && a[i - 1].t > p.t) i--; // the channel is unordered
    // A stamp sent again carries speech queued after it was first sent (pose_stream.py): it replaces it.
    if (i > 0 && a[i - 1].t === p.t) a[i - 1] = p;
    else a.splice(i, 0, p);
    while (a.length > 2 && a[a.length - 1].t - a[0].t > 4) a.shift();
  }
  /** Media time of the audio sample being played out now, or null before audio and clock are known. */
  playoutTime() {
    if (!this.clock || !this.receiver) return null;
    const src = this.receiver.getSynchronizationSources();
    if (!src.length) return null;
    const s = src[0];
    // Chrome stamps sources on the epoch clock, the spec on performance.now()'s: accept both.
    const at = s.timestamp > 1e11 ? s.timestamp - performance.timeOrigin : s.timestamp;
    const rel = ((s.rtpTimestamp - this.clock.rtp_origin) >>> 0) / this.clock.rate;
    this.audioAge = Math.max(0, performance.now() - at);
    return rel + this.audioAge / 1000;
  }
  /** The pose to show now: interpolated at the audio's playout time (arrival time only as a fallback). */
  current() {
    const a = this.poses;
    if (!a.length) return null;
    let t = this.playoutTime();
    this.sync = t === null ? "arrival" : "rtp";
    if (t === null) t = a[a.length - 1].t - 0.1;
    // Late: the audio being played is past the newest pose received (the face holds it meanwhile).
    this.late = t > a[a.length - 1].t + 0.04;
    if (t <= a[0].t) return a[0];
    if (t >= a[a.length - 1].t) return a[a.length - 1];
    let i = a.length - 1;
    while (a[i - 1].t > t) i--;
    const p0 = a[i - 1], p1 = a[i], f = (t - p0.t) / Math.max(1e-6, p1.t - p0.t);
    const w = new Float32Array(this.channels);
    for (let k = 0; k < this.channels; k++) w[k] = p0.w[k] + f * (p1.w[k] - p0.w[k]);
    return { t, yaw: p0.yaw + f * (p1.yaw - p0.yaw), pitch: p0.pitch + f * (p1.pitch - p0.pitch),
             roll: p0.roll + f * (p1.roll - p0.roll), speaking: f < 0.5 ? p0.speaking : p1.speaking, w };
  }
}

// --- WebGL2 splat renderer -----------------------------------------------------------------------
const VS = `#version 300 es
precision highp float; precision highp int;
uniform highp sampler2D u_mean, u_covA, u_covB, u_delta;
uniform lowp sampler2D u_color;
uniform highp usampler2D u_order;
uniform lowp sampler2D u_normal;
uniform vec3 u_eye;
uniform int u_rows, u_channels;
uniform float u_w[16];
uniform mat3 u_R;
uniform vec3 u_pivot;
uniform mat4 u_view;
uniform vec2 u_focal, u_size;
out vec4 v_color;
out vec2 v_d;
out vec3 v_conic;
void main() {
  // One quad per splat, drawn in depth order: vertex 4q+c is corner c of the q-th nearest splat.
  int q = gl_VertexID >> 2;
  vec2 a_corner = vec2(float(gl_VertexID & 1) * 2.0 - 1.0, float((gl_VertexID >> 1) & 1) * 2.0 - 1.0);
  int idx = int(texelFetch(u_order, ivec2(q % ${TEX_W}, q / ${TEX_W}), 0).r);
  ivec2 p = ivec2(idx % ${TEX_W}, idx / ${TEX_W});
  vec4 m = texelFetch(u_mean, p, 0);
  vec3 pos = m.xyz;
  for (int k = 0; k < 16; k++) {   // the rig: base + sum_k w_k delta_k
    if (k >= u_channels) break;
    if (u_w[k] != 0.0) pos += u_w[k] * texelFetch(u_delta, ivec2(p.x, p.y + k * u_rows), 0).xyz;
  }
  pos = mix(pos, u_R * (pos - u_pivot) + u_pivot, m.w);   // rigid head pose, by head weight
  // A surfel facing away from the camera lies behind the surface in front of it: not drawn (halves the
  // fill, which is what a software WebGL pays most for). Non-flat Gaussians have no normal (zero).
  vec3 nrm = texelFetch(u_normal, p, 0).xyz * 2.0 - 1.0;
  if (m.w > 0.5) nrm = u_R * nrm;
  if (dot(nrm, normalize(u_eye - pos)) < -0.35) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }
  vec4 ca = texelFetch(u_covA, p, 0), cb = texelFetch(u_covB, p, 0);
  mat3 S = mat3(ca.x, ca.y, ca.z, ca.y, ca.w, cb.x, ca.z, cb.x, cb.y);
  if (m.w > 0.5) S = u_R * S * transpose(u_R);
  vec4 cam = u_view * vec4(pos, 1.0);
  float z = cam.z;
  if (z < 0.05) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }
  vec2 lim = 1.3 * 0.5 * u_size / u_focal;
  float tx = clamp(cam.x / z, -lim.x, lim.x) * z, ty = clamp(cam.y / z, -lim.y, lim.y) * z;
  mat3 J = mat3(u_focal.x / z, 0.0, 0.0, 0.0, u_focal.y / z, 0.0,
                -u_focal.x * tx / (z * z), -u_focal.y * ty / (z * z), 0.0);
  mat3 T = J * mat3(u_view);
  mat3 C = T * S * transpose(T);
  float a = C[0][0] + 0.3, b = C[0][1], c = C[1][1] + 0.3;
  float det = a * c - b * b;
  if (det <= 0.0) { gl_Position = vec4(0.0, 0.0, 2.0, 1.0); return; }
  v_conic = vec3(c, -b, a) / det;
  float mid = 0.5 * (a + c), disc = sqrt(max(0.01, mid * mid - det));
  float l1 = mid + disc, l2 = max(0.01, mid - disc);
  vec2 e1 = abs(b) < 1e-9 ? (a >= c ? vec2(1.0, 0.0) : vec2(0.0, 1.0)) : normalize(vec2(b, l1 - a));
  vec2 e2 = vec2(-e1.y, e1.x);
  vec2 d = a_corner.x * min(3.0 * sqrt(l1), 1024.0) * e1 + a_corner.y * min(3.0 * sqrt(l2), 1024.0) * e2;
  vec2 center = vec2(u_focal.x * cam.x / z, u_focal.y * cam.y / z) + 0.5 * u_size;
  vec2 px = center + d;
  v_d = d;
  v_color = texelFetch(u_color, p, 0);
  gl_Position = vec4(px.x / u_size.x * 2.0 - 1.0, 1.0 - px.y / u_size.y * 2.0, 0.0, 1.0);
}`;

const FS = `#version 300 es
precision highp float;
in vec4 v_color;
in vec2 v_d;
in vec3 v_conic;
out vec4 frag;
void main() {
  float power = -0.5 * (v_conic.x * v_d.x * v_d.x + v_conic.z * v_d.y * v_d.y) - v_conic.y * v_d.x * v_d.y;
  if (power > 0.0) discard;
  float alpha = min(0.999, v_color.a * exp(power));
  if (alpha < 1.0 / 255.0) discard;
  frag = vec4(v_color.rgb * alpha, alpha);
}`;

const BG_VS = `#version 300 es
in vec2 a_corner;
void main() { gl_Position = vec4(a_corner, 0.0, 1.0); }`;
const BG_FS = `#version 300 es
precision mediump float;
uniform vec3 u_bg;
out vec4 frag;
void main() { frag = vec4(u_bg, 1.0); }`;

function compile(gl, vs, fs) {
  const prog = gl.createProgram();
  for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
    const sh = gl.createShader(type);
    gl.shaderSource(sh, src);
    gl.compileShader(sh);
    if (!gl.getShaderParameter(sh, gl.COMPILE_STATUS)) throw new Error("shader: " + gl.getShaderInfoLog(sh));
    gl.attachShader(prog, sh);
  }
  gl.linkProgram(prog);
  if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) throw new Error("link: " + gl.getProgramInfoLog(prog));
  return prog;
}

/** Euler angles to the row-major rotation R = Ry(yaw) Rx(pitch) Rz(roll) (models/avatar/render.py). */
export function eulerToMatrix(yaw, pitch, roll) {
  const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  const cr = Math.cos(roll), sr = Math.sin(roll);
  const mul = (A, B) => { const o = new Array(9).fill(0);
    for (let i = 0; i < 3; i++) for (let j = 0; j < 3; j++) for (let k = 0; k < 3; k++) o[3 * i + j] += A[3 * i + k] * B[3 * k + j];
    return o; };
  const ry = [cy, 0, sy, 0, 1, 0, -sy, 0, cy], rx = [1, 0, 0, 0, cp, -sp, 0, sp, cp], rz = [cr, -sr, 0, sr, cr, 0, 0, 0, 1];
  return mul(mul(ry, rx), rz);
}

export class SplatRenderer {
  constructor(canvas, head) {
    const gl = canvas.getContext("webgl2", { antialias: false, premultipliedAlpha: true, preserveDrawingBuffer: true });
    if (!gl) throw new Error("WebGL2 is not available");
    this.gl = gl;
    this.canvas = canvas;
    const { header, arrays } = head;
    this.n = header.count;
    this.channels = header.channels.length;
    this.channelIndex = Object.fromEntries(header.channels.map((c, i) => [c, i]));
    this.pivot = header.pivot;
    this.view = header.camera.viewmat; // row-major 4x4
    this.fov = header.camera.fov_y_deg * Math.PI / 180;
    const v = this.view; // camera centre: -R^T t
    this.eye = [0, 1, 2].map((j) => -(v[j] * v[3] + v[4 + j] * v[7] + v[8 + j] * v[11]));
    this.means = arrays.means;
    this.headWeight = arrays.head;
    this.rows = Math.ceil(this.n / TEX_W);
    this.prog = compile(gl, VS, FS);
    this.bgProg = compile(gl, BG_VS, BG_FS);
    this._textures(arrays);
    this._buffers();
    this.depth = new Float32Array(this.n);
    this.counts = new Uint32Array(65536);
    this.keys = new Uint16Array(this.n);
    this.weights = new Float32Array(16);
    this.frames = 0;
    this._readback = null; // the region readback in flight: {sync, bytes, w, h, done}
    this._pbo = null;
    this._pboBytes = 0;
    this._constantUniforms();
  }

  /**
   * Read a region of the frame just drawn without waiting for the GPU (a pixel-pack buffer and a fence):
   * a synchronous read (getImageData of this canvas) waits until the frame is finished, and under software
   * WebGL that kept the page's main thread waiting nearly all the time. Fractions of the canvas, top-left
   * origin. `done(pixels RGBA, w, h)` is called from `pollReadback` once the GPU has finished; one readback
   * is in flight at a time (false: one already is).
   */
  readRegion(fx, fy, fw, fh, done) {
    if (this._readback) return false;
    const gl = this.gl, W = this.canvas.width, H = this.canvas.height;
    const w = Math.max(1, Math.round(fw * W)), h = Math.max(1, Math.round(fh * H));
    const x = Math.round(fx * W), y = H - Math.round(fy * H) - h; // GL rows count from the bottom
    const bytes = w * h * 4;
    if (!this._pbo) this._pbo = gl.createBuffer();
    gl.bindBuffer(gl.PIXEL_PACK_BUFFER, this._pbo);
    if (this._pboBytes !== bytes) { gl.bufferData(gl.PIXEL_PACK_BUFFER, bytes, gl.STREAM_READ); this._pboBytes = bytes; }
    gl.readPixels(x, y, w, h, gl.RGBA, gl.UNSIGNED_BYTE, 0);
    gl.bindBuffer(gl.PIXEL_PACK_BUFFER, null);
    this._readback = { sync: gl.fenceSync(gl.SYNC_GPU_COMMANDS_COMPLETE, 0), bytes, w, h, done };
    gl.flush();
    return true;
  }

  /** Hands over the readback in flight if the GPU has finished it (call once per animation frame). */
  pollReadback() {
    const r = this._readback, gl = this.gl;
    if (!r || gl.getSyncParameter(r.sync, gl.SYNC_STATUS) !== gl.SIGNALED) return;
    gl.deleteSync(r.sync);
    this._readback = null;
    const px = new Uint8Array(r.bytes);
    gl.bindBuffer(gl.PIXEL_PACK_BUFFER, this._pbo);
    gl.getBufferSubData(gl.PIXEL_PACK_BUFFER, 0, px);
    gl.bindBuffer(gl.PIXEL_PACK_BUFFER, null);
    r.done(px, r.w, r.h);
  }

  /** Texture units, the rig's size, the camera and the background: set once; `draw` sets the rest. */
  _constantUniforms() {
    const gl = this.gl;
    this.loc = Object.fromEntries(["u_w", "u_R", "u_focal", "u_size"].map((n) => [n, gl.getUniformLocation(this.prog, n)]));
    const u = (name) => gl.getUniformLocation(this.prog, name);
    gl.useProgram(this.prog);
    ["u_mean", "u_covA", "u_covB", "u_color", "u_delta", "u_order", "u_normal"].forEach((name, i) => gl.uniform1i(u(name), i));
    gl.uniform1i(u("u_rows"), this.rows);
    gl.uniform1i(u("u_channels"), this.channels);
    gl.uniform3fv(u("u_pivot"), this.pivot);
    gl.uniformMatrix4fv(u("u_view"), true, this.view);
    gl.uniform3fv(u("u_eye"), this.eye);
    gl.useProgram(this.bgProg);
    gl.uniform3fv(gl.getUniformLocation(this.bgProg, "u_bg"), BACKGROUND);
    gl.useProgram(null);
  }

  _texture(unit, internal, format, type, data, height) {
    const gl = this.gl;
    const tex = gl.createTexture();
    gl.activeTexture(gl.TEXTURE0 + unit);
    gl.bindTexture(gl.TEXTURE_2D, tex);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
    gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
    gl.texImage2D(gl.TEXTURE_2D, 0, internal, TEX_W, height, 0, format, type, data);
    return tex;
  }

  _textures(arrays) {
    const gl = this.gl, n = this.n, rows = this.rows, size = TEX_W * rows;
    const mean = new Float32Array(size * 4), covA = new Float32Array(size * 4), covB = new Float32Array(size * 4);
    const color = new Uint8Array(size * 4), normal = new Uint8Array(size * 4);
    for (let i = 0; i < n; i++) {
      mean.set([arrays.means[3 * i], arrays.means[3 * i + 1], arrays.means[3 * i + 2], arrays.head[i]], 4 * i);
      const c = arrays.cov.subarray(6 * i, 6 * i + 6);
      covA.set([c[0], c[1], c[2], c[3]], 4 * i);
      covB.set([c[4], c[5], 0, 0], 4 * i);
      color.set(arrays.rgba.subarray(4 * i, 4 * i + 4), 4 * i);
      for (let j = 0; j < 3; j++) normal[4 * i + j] = Math.round((arrays.normal[3 * i + j] / 127 * 0.5 + 0.5) * 255);
    }
    // Rig deltas: channel k occupies rows [k*rows, (k+1)*rows); half floats, as the file stores them.
    const k = this.channels, delta = new Uint16Array(size * 4 * k), src = arrays.deltas;
    for (let ch = 0; ch < k; ch++) {
      for (let i = 0; i < n; i++) {
        const s = 3 * (ch * n + i), d = 4 * (ch * size + i);
        delta[d] = src[s]; delta[d + 1] = src[s + 1]; delta[d + 2] = src[s + 2];
      }
    }
    this.tex = [
      this._texture(0, gl.RGBA32F, gl.RGBA, gl.FLOAT, mean, rows),
      this._texture(1, gl.RGBA32F, gl.RGBA, gl.FLOAT, covA, rows),
      this._texture(2, gl.RGBA32F, gl.RGBA, gl.FLOAT, covB, rows),
      this._texture(3, gl.RGBA8, gl.RGBA, gl.UNSIGNED_BYTE, color, rows),
      this._texture(4, gl.RGBA16F, gl.RGBA, gl.HALF_FLOAT, delta, rows * k),
      this._texture(6, gl.RGBA8, gl.RGBA, gl.UNSIGNED_BYTE, normal, rows),
    ];
  }

  _buffers() {
    // No instancing: SwiftShader (WebGL on machines without a GPU) pays per instance, ~10 us each.
    // A static index buffer makes two triangles of every 4 vertices; the shader finds its splat from
    // gl_VertexID through the depth order, uploaded each frame as a texture.
    const gl = this.gl, n = this.n;
    this.vao = gl.createVertexArray();
    gl.bindVertexArray(this.vao);
    const idx = new Uint32Array(6 * n);
    for (let q = 0; q < n; q++) idx.set([4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 1, 4 * q + 3, 4 * q + 2], 6 * q);
    const ib = gl.createBuffer();
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib);
    gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, idx, gl.STATIC_DRAW);
    this.orderData = new Uint32Array(TEX_W * this.rows);
    this.orderTex = this._texture(5, gl.R32UI, gl.RED_INTEGER, gl.UNSIGNED_INT, this.orderData, this.rows);
    this.bgVao = gl.createVertexArray();
    gl.bindVertexArray(this.bgVao);
    const quad = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, quad);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    const loc = gl.getAttribLocation(this.bgProg, "a_corner");
    gl.enableVertexAttribArray(loc);
    gl.vertexAttribPointer(loc, 2, gl.FLOAT, false, 0, 0);
    gl.bindVertexArray(null);
  }

  /** Front-to-back order by camera depth under the rigid head pose (the rig's mm offsets do not reorder). */
  _sort(R) {
    const n = this.n, m = this.means, hw = this.headWeight, v = this.view, p = this.pivot;
    const d = this.depth;
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < n; i++) {
      let x = m[3 * i], y = m[3 * i + 1], z = m[3 * i + 2];
      const w = hw[i];
      if (w > 0) {
        const dx = x - p[0], dy = y - p[1], dz = z - p[2];
        x += w * (R[0] * dx + R[1] * dy + R[2] * dz + p[0] - x);
        y += w * (R[3] * dx + R[4] * dy + R[5] * dz + p[1] - y);
        z += w * (R[6] * dx + R[7] * dy + R[8] * dz + p[2] - z);
      }
      const depth = v[8] * x + v[9] * y + v[10] * z + v[11];
      d[i] = depth;
      if (depth < lo) lo = depth;
      if (depth > hi) hi = depth;
    }
    const counts = this.counts, keys = this.keys, scale = 65535 / Math.max(1e-9, hi - lo);
    counts.fill(0);
    for (let i = 0; i < n; i++) { const k = ((d[i] - lo) * scale) | 0; keys[i] = k; counts[k]++; }
    for (let k = 1; k < 65536; k++) counts[k] += counts[k - 1];
    const order = this.orderData;
    for (let i = n - 1; i >= 0; i--) order[--counts[keys[i]]] = i;
  }

  /** Draw one pose {yaw, pitch, roll, w} at the canvas's own resolution. */
  draw(pose) {
    const gl = this.gl, canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(1, Math.round(canvas.clientWidth * dpr)), H = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== W || canvas.height !== H) { canvas.width = W; canvas.height = H; }
    const R = eulerToMatrix(pose.yaw, pose.pitch, pose.roll);
    this._sort(R);
    gl.activeTexture(gl.TEXTURE5);
    gl.bindTexture(gl.TEXTURE_2D, this.orderTex);
    gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, TEX_W, this.rows, gl.RED_INTEGER, gl.UNSIGNED_INT, this.orderData);
    gl.viewport(0, 0, W, H);
    gl.clearColor(0, 0, 0, 0);
    gl.clear(gl.COLOR_BUFFER_BIT);
    gl.enable(gl.BLEND);
    gl.blendFuncSeparate(gl.ONE_MINUS_DST_ALPHA, gl.ONE, gl.ONE_MINUS_DST_ALPHA, gl.ONE); // front to back
    gl.useProgram(this.prog);
    const loc = this.loc, w = this.weights;
    w.set(pose.w.subarray ? pose.w.subarray(0, this.channels) : pose.w);
    gl.uniform1fv(loc.u_w, w);
    gl.uniformMatrix3fv(loc.u_R, true, R);
    const f = 0.5 * H / Math.tan(this.fov / 2);
    gl.uniform2f(loc.u_focal, f, f);
    gl.uniform2f(loc.u_size, W, H);
    gl.bindVertexArray(this.vao);
    gl.drawElements(gl.TRIANGLES, 6 * this.n, gl.UNSIGNED_INT, 0);
    gl.useProgram(this.bgProg);  // the background shows through what the splats left uncovered
    gl.bindVertexArray(this.bgVao);
    gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
    gl.bindVertexArray(null);
    this.frames++;
  }
}
