"""Head files: the splats as a 3DGS `.ply` (the layout the INRIA 3DGS code and its viewers write) and
the rig beside it as `<name>.rig.npz`.

PLY (binary little-endian, one `vertex` element, float32 properties in this order):
    x y z            mean
    nx ny nz         zeros (3DGS writes them; unused)
    f_dc_0..2        colour as the degree-0 spherical-harmonic coefficient: (rgb - 0.5) / C0
    opacity          logit(opacity)
    scale_0..2       log(scale)
    rot_0..3         quaternion w, x, y, z
so any 3DGS viewer shows the neutral head. The rig file (numpy .npz) holds:
    format           "presence-rig/1"
    channels         (K,) channel names, in the order of `deltas`
    deltas           (K, N, 3) float32 mean offsets per unit channel weight
    head_weight      (N,) float32, how much each Gaussian follows the rigid head pose
    labels           (N,) int16 part ids; parts (P,) their names
    pivot            (3,) the head-pose pivot
Gaussian i of the PLY is row i of every rig array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.avatar.gaussians import Splats
from models.avatar.head import CHANNELS, PARTS, PIVOT, Head

SH_C0 = 0.28209479177387814
RIG_FORMAT = "presence-rig/1"
_FIELDS = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
           + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


class HeadFileError(ValueError):
    """A head file that is not a 3DGS PLY + Presence rig this code can read."""


def rig_path(ply_path: str | Path) -> Path:
    p = Path(ply_path)
    return p.with_name(p.stem + ".rig.npz")


def write_ply(path: str | Path, splats: Splats) -> None:
    n = len(splats)
    data = np.zeros(n, dtype=[(f, "<f4") for f in _FIELDS])
    data["x"], data["y"], data["z"] = splats.means.T
    dc = (np.clip(splats.colors, 0.0, 1.0) - 0.5) / SH_C0
    for i in range(3):
        data[f"f_dc_{i}"] = dc[:, i]
        data[f"scale_{i}"] = np.log(np.maximum(splats.scales[:, i], 1e-8))
    o = np.clip(splats.opacities, 1e-6, 1 - 1e-6)
    data["opacity"] = np.log(o / (1 - o))
    q = splats.quats / np.linalg.norm(splats.quats, axis=1, keepdims=True)
    for i in range(4):
        data[f"rot_{i}"] = q[:, i]
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n" + "".join(
        f"property float {f}\n" for f in _FIELDS) + "end_header\n"
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(data.tobytes())


def read_ply(path: str | Path) -> Splats:
    """Reads a 3DGS PLY (extra properties such as f_rest_* are allowed and ignored)."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise HeadFileError(f"{path}: not a PLY file")
    lines = raw[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise HeadFileError(f"{path}: only binary little-endian PLY is supported")
    n, props, in_vertex = 0, [], False
    for line in lines:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] not in ("float", "float32"):
                raise HeadFileError(f"{path}: property {parts[-1]} is {parts[1]}, expected float")
            props.append(parts[2])
    missing = [f for f in _FIELDS if f not in props and not f.startswith("n")]
    if missing:
        raise HeadFileError(f"{path}: missing 3DGS properties {missing}")
    body = raw[end + len(b"end_header\n"):]
    dtype = np.dtype([(p, "<f4") for p in props])
    if len(body) < n * dtype.itemsize:
        raise HeadFileError(f"{path}: truncated ({len(body)} bytes for {n} Gaussians)")
    data = np.frombuffer(body, dtype=dtype, count=n)

    def cols(names: list[str]) -> np.ndarray:
        return np.stack([data[c] for c in names], axis=1).astype(np.float32)

    quats = cols([f"rot_{i}" for i in range(4)])
    quats /= np.maximum(np.linalg.norm(quats, axis=1, keepdims=True), 1e-12)
    return Splats(
        means=cols(["x", "y", "z"]), quats=quats, scales=np.exp(cols([f"scale_{i}" for i in range(3)])),
        opacities=(1 / (1 + np.exp(-data["opacity"].astype(np.float64)))).astype(np.float32),
        colors=np.clip(cols([f"f_dc_{i}" for i in range(3)]) * SH_C0 + 0.5, 0.0, 1.0).astype(np.float32),
        labels=np.zeros(n, dtype=np.int16),
    )


def save_head(head: Head, ply_path: str | Path) -> tuple[Path, Path]:
    """Writes `<name>.ply` and `<name>.rig.npz`; returns both paths."""
    ply_path = Path(ply_path)
    write_ply(ply_path, head.splats)
    rig = rig_path(ply_path)
    with open(rig, "wb") as fh:
        np.savez_compressed(
            fh, format=np.array(RIG_FORMAT), channels=np.array(CHANNELS), deltas=head.deltas.astype(np.float32),
            head_weight=head.head_weight.astype(np.float32), labels=head.splats.labels.astype(np.int16),
            parts=np.array(PARTS), pivot=PIVOT.astype(np.float32))
    return ply_path, rig


def load_head(ply_path: str | Path) -> Head:
    """Reads a head written by `save_head` (or any 3DGS PLY plus a Presence rig beside it)."""
    splats = read_ply(ply_path)
    rig = rig_path(ply_path)
    if not rig.exists():
        raise HeadFileError(f"{rig} not found: a head needs its rig beside the PLY")
    with np.load(rig, allow_pickle=False) as z:
        if str(z["format"]) != RIG_FORMAT:
            raise HeadFileError(f"{rig}: format {z['format']}, expected {RIG_FORMAT}")
        channels = [str(c) for c in z["channels"]]
        deltas, head_weight, labels = z["deltas"], z["head_weight"], z["labels"]
    n = len(splats)
    if deltas.shape[1:] != (n, 3) or head_weight.shape != (n,) or labels.shape != (n,):
        raise HeadFileError(f"{rig}: rig arrays do not match the PLY's {n} Gaussians")
    # Channels are matched by name, so a rig may carry them in any order or lack some.
    full = np.zeros((len(CHANNELS), n, 3), dtype=np.float32)
    for i, name in enumerate(channels):
        if name in CHANNELS:
            full[CHANNELS.index(name)] = deltas[i]
    splats.labels = labels.astype(np.int16)
    return Head(splats=splats, deltas=full, head_weight=head_weight.astype(np.float32))


# --- the browser's head file ------------------------------------------------------------------------------
HEAD_MAGIC = b"PRHD"
HEAD_FORMAT = "presence-head/1"


def encode_head(head: Head, camera: dict | None = None) -> bytes:
    """The head as one compact binary for the browser's WebGL renderer (`static/avatar.js`):

        b"PRHD" | u32 header length | header JSON (utf-8, space-padded to 4 bytes) | arrays
    The header names each array (`arrays`: name, dtype, shape, byte offset from the end of the header):
        means    float32 (N, 3)      base positions
        cov      float32 (N, 6)      world covariance xx xy xz yy yz zz (R S S^T R^T)
        rgba     uint8   (N, 4)      colour and opacity
        head     float32 (N,)        how much each Gaussian follows the rigid head pose
        normal   int8    (N, 3)      a flat Gaussian's normal * 127 (zeros when it is not flat): a surfel
                                     facing away from the camera is behind the surface and is not drawn
        deltas   float16 (K, N, 3)   rig offsets per unit channel weight, channels in `channels` order
    plus `channels`, `pivot` and the `camera` framing. Little-endian throughout."""
    import json

    from models.avatar.gaussians import covariances, surfel_normals

    s = head.splats
    c = covariances(s.quats, s.scales)
    normal = np.round(surfel_normals(s.quats, s.scales) * 127).astype(np.int8)
    arrays = {
        "means": s.means.astype("<f4"),
        "cov": np.stack([c[:, 0, 0], c[:, 0, 1], c[:, 0, 2], c[:, 1, 1], c[:, 1, 2], c[:, 2, 2]], 1).astype("<f4"),
        "rgba": (np.concatenate([np.clip(s.colors, 0, 1), np.clip(s.opacities, 0, 1)[:, None]], 1) * 255)
        .round().astype(np.uint8),
        "head": head.head_weight.astype("<f4"),
        "normal": normal,
        "deltas": head.deltas.astype("<f2"),
    }
    meta, offset = [], 0
    for name, a in arrays.items():
        meta.append({"name": name, "dtype": a.dtype.str.lstrip("<|"), "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // 4) * 4
    header = json.dumps({"format": HEAD_FORMAT, "count": len(s), "channels": list(CHANNELS),
                         "pivot": [float(v) for v in PIVOT], "camera": camera or {}, "arrays": meta}).encode()
    header += b" " * (-len(header) % 4)
    body = bytearray(offset)
    for m, a in zip(meta, arrays.values(), strict=True):
        body[m["offset"]:m["offset"] + a.nbytes] = a.tobytes()
    return HEAD_MAGIC + len(header).to_bytes(4, "little") + header + bytes(body)


def decode_head(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of an `encode_head` blob (what the browser reads; tests check it here)."""
    import json

    if blob[:4] != HEAD_MAGIC or len(blob) < 8:
        raise HeadFileError("not a Presence head file")
    n = int.from_bytes(blob[4:8], "little")
    header = json.loads(blob[8:8 + n])
    if header.get("format") != HEAD_FORMAT:
        raise HeadFileError(f"head format {header.get('format')!r}, expected {HEAD_FORMAT}")
    base = 8 + n
    out = {}
    for m in header["arrays"]:
        dt = np.dtype(m["dtype"]).newbyteorder("<")
        count = int(np.prod(m["shape"]))
        out[m["name"]] = np.frombuffer(blob, dt, count, base + m["offset"]).reshape(m["shape"])
    return header, out
