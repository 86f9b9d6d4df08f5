"""The head files browsers fetch in client video mode: each replica's head encoded once
(`models.avatar.headfile.encode_head`), named by a content hash, gzipped for the wire."""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from models.avatar.camera import portrait_camera
from models.avatar.head import build_head
from models.avatar.headfile import encode_head, load_head

MAX_CACHED = 16


@dataclass(frozen=True)
class HeadBlob:
    version: str  # content hash: the cache key with the replica id
    raw: bytes
    gz: bytes


def camera_json() -> dict:
    """The server's framing (portrait_camera), so the browser frames the head exactly as it renders it."""
    cam = portrait_camera(512, 512)
    fov_y = np.degrees(2 * np.arctan(0.5 * cam.height / cam.fy))
    return {"viewmat": [float(v) for v in np.asarray(cam.viewmat).ravel()], "fov_y_deg": round(float(fov_y), 6)}


class HeadFiles:
    """Encoded heads by (replica id, head file path); the stock head is built like the SessionHost's."""

    def __init__(self, gaussians: int = 20000) -> None:
        self.gaussians = gaussians
        self._blobs: OrderedDict[tuple[str, str | None], HeadBlob] = OrderedDict()

    def get(self, replica_id: str, head_path: str | None) -> HeadBlob:
        """Raises OSError / HeadFileError when a fitted head cannot be read."""
        key = (replica_id, head_path)
        if key not in self._blobs:
            head = load_head(head_path) if head_path else build_head(self.gaussians)
            raw = encode_head(head, camera_json())
            self._blobs[key] = HeadBlob(hashlib.sha256(raw).hexdigest()[:16], raw, gzip.compress(raw, 6))
            if len(self._blobs) > MAX_CACHED:
                self._blobs.popitem(last=False)
        return self._blobs[key]
