"""Uploaded media (a photo or a short video of a person): cheap probing before work is queued, and
decoding to RGB frames. Pure PyAV + Pillow (the ReplicaTrainer runs both; the ingress decodes nothing).

Bounded against hostile files: the pixel count is read from the header and checked before a pixel is
decoded (a 1 kB PNG can claim 40,000 x 40,000), frame size and the number of frames decoded are
capped, decoding stops once the frames it needs are in, and only container formats of the declared
type are opened, so no playlist demuxer (HLS, concat) ever reads a URL or file named inside a file."""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np

IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp"}
VIDEO_TYPES = {"video/mp4", "video/webm", "video/quicktime"}
MAX_VIDEO_S = 60.0
MAX_FRAMES = 12
MIN_SIDE = 64
MAX_PIXELS = 25_000_000  # per image or video frame (a 24 MP photo passes)
MAX_DECODED_FRAMES = 4000  # frames read from one video, chosen or not (60 s at 60 fps is 3600)
# FFmpeg demuxers per declared type: nothing else is probed.
DEMUXERS = {"video/mp4": "mp4", "video/quicktime": "mov", "video/webm": "webm"}


class MediaError(ValueError):
    """Uploaded media that cannot be used (the API answers 422 with this message)."""


def decode_media(data: bytes, content_type: str, max_frames: int = MAX_FRAMES) -> list[np.ndarray]:
    """RGB uint8 frames: the image, or up to `max_frames` frames spread over the video."""
    if content_type in IMAGE_TYPES:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data), formats=[content_type.split("/")[1].upper()])
            _check_pixels(*img.size)
            img.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise MediaError(f"not a readable {content_type.split('/')[1].upper()} image") from exc
        frames = [np.asarray(img.convert("RGB"))]
    elif content_type in VIDEO_TYPES:
        frames = _decode_video(data, max_frames, content_type)
    else:
        raise MediaError(f"unsupported type {content_type}")
    if min(frames[0].shape[:2]) < MIN_SIDE:
        raise MediaError(f"image too small: {frames[0].shape[1]}x{frames[0].shape[0]} (at least {MIN_SIDE} px a side)")
    return frames


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise MediaError(f"{width}x{height} is {width * height / 1e6:.0f} MP; at most {MAX_PIXELS / 1e6:.0f} MP")


@contextmanager
def _open_video(data: bytes, content_type: str):
    """The upload's first video stream and its duration, after the checks every caller needs;
    FFmpeg errors inside the block (decoding included) become MediaError."""
    import av

    try:
        with av.open(io.BytesIO(data), format=DEMUXERS[content_type]) as container:
            if not container.streams.video:
                raise MediaError("the upload has no video stream")
            stream = container.streams.video[0]
            _check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0)
            duration = (float(stream.duration * stream.time_base) if stream.duration
                        else (container.duration or 0) / 1e6)
            if duration > MAX_VIDEO_S:
                raise MediaError(f"video is {duration:.0f} s long; at most {MAX_VIDEO_S:.0f} s")
            yield container, stream, duration
    except av.error.FFmpegError as exc:
        raise MediaError(f"not a decodable video: {exc}") from exc


def probe_media(data: bytes, content_type: str) -> dict:
    """Cheap checks before a fit is queued: type, decodability, size, duration. Raises MediaError."""
    if content_type in IMAGE_TYPES:
        frame = decode_media(data, content_type)[0]
        return {"kind": "image", "width": int(frame.shape[1]), "height": int(frame.shape[0])}
    if content_type not in VIDEO_TYPES:
        raise MediaError(f"unsupported type {content_type}")
    with _open_video(data, content_type) as (container, stream, duration):
        first = next(container.decode(stream), None)
        if first is not None:
            _check_pixels(first.width, first.height)
    if first is None:
        raise MediaError("the video has no frames")
    if min(first.width, first.height) < MIN_SIDE:
        raise MediaError(f"video too small: {first.width}x{first.height} (at least {MIN_SIDE} px a side)")
    return {"kind": "video", "width": first.width, "height": first.height, "duration_s": round(duration, 2)}


def _decode_video(data: bytes, max_frames: int, content_type: str) -> list[np.ndarray]:
    """Up to `max_frames` frames spread over the video. Only the chosen frames are converted to RGB,
    so a minute of HD video never sits in memory as arrays."""
    with _open_video(data, content_type) as (container, stream, duration):
        total = min(stream.frames or int(round(duration * float(stream.average_rate or 0))), MAX_DECODED_FRAMES)
        wanted = (set(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int).tolist())
                  if total > 0 else None)  # unknown length: the first max_frames frames
        last = max(wanted) if wanted else max_frames - 1
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i > last:  # early stop (last < MAX_DECODED_FRAMES): the rest of the file is never decoded
                break
            _check_pixels(frame.width, frame.height)  # a stream may change size midway
            if wanted is None or i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise MediaError("the video has no frames")
    return frames
