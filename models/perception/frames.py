"""Camera frames on their way to perception: the size a session downscales them to, and the checked
decoding of what arrives (I420 as the WebRTC decoder hands it over, RGB arrays, or JPEG/PNG bytes).

I420 at most `MAX_PIXELS` is ~96 KB: Ray passes it inline (a 320×240 RGB array, 230 KB, went through
the object store at ~4 ms more CPU per call; JPEG cost ~1.5 ms to encode and decode).
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
from PIL import Image

MAX_SIDE = 640  # frames are downscaled by the host; anything bigger is refused
MAX_PIXELS = 65_536  # 294×220 for a 4:3 camera; a face of a third of the frame's width is ~100 px
MAX_ENCODED_BYTES = 1 << 20


def wire_size(width: int, height: int) -> tuple[int, int]:
    """The size a camera frame is downscaled to for perception: even sides, at most MAX_PIXELS, aspect
    kept, never enlarged."""
    scale = min(1.0, math.sqrt(MAX_PIXELS / max(width * height, 1)), MAX_SIDE / max(width, height, 1))
    return max(16, int(width * scale) // 2 * 2), max(16, int(height * scale) // 2 * 2)


def decode_frame(frame: bytes | np.ndarray) -> np.ndarray:
    """An RGB uint8 frame from an I420 array, an RGB array or JPEG/PNG bytes, checked; ValueError otherwise."""
    bad = ValueError(f"expected an I420 [H*3/2, W] or RGB [H, W, 3] uint8 array, or JPEG/PNG bytes; sides 16..{MAX_SIDE} px")
    if isinstance(frame, (bytes, bytearray, memoryview)):
        if len(frame) > MAX_ENCODED_BYTES:
            raise bad
        try:
            img = Image.open(io.BytesIO(frame))
            if img.format not in ("JPEG", "PNG") or not (16 <= min(img.size) and max(img.size) <= MAX_SIDE):
                raise bad  # checked before decoding the pixels: no decompression bombs
            frame = np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise bad from exc
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise bad
    if frame.ndim == 2:  # I420: the Y plane, then U and V at half resolution, stacked as rows
        rows, w = frame.shape
        h = rows * 2 // 3
        if rows % 3 or h % 2 or w % 2 or not (16 <= min(h, w) and max(h, w) <= MAX_SIDE):
            raise bad
        return cv2.cvtColor(frame, cv2.COLOR_YUV2RGB_I420)
    if not (frame.ndim == 3 and frame.shape[2] == 3 and 16 <= min(frame.shape[:2]) and max(frame.shape[:2]) <= MAX_SIDE):
        raise bad
    return frame
