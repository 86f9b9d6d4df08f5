"""The avatar's face: the animator's pose at each frame's media time, rendered for the outgoing video
track (or the last frame reused when nothing visible moved), or sent as animation state (client mode)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.avatar.animate import Animator, SpeechTrack
from models.avatar.render import AvatarRenderer, Pose
from serve_app.session.timings import TurnTimings

STILL_WEIGHT = 0.015  # largest rig-weight change that is invisible at these resolutions
STILL_ANGLE = 0.004  # radians
YIELD_FPS = 4.0  # render rate while a reply is being prepared (the LLM and TTS get the CPU)


class AvatarFace:
    """`yield_cpu()` says a reply is being prepared: the face then renders at YIELD_FPS (the listening
    face barely moves) and the other frames repeat the last one."""

    def __init__(self, renderer: AvatarRenderer | None, animator: Animator, yield_cpu: Callable[[], bool] = bool) -> None:
        self.renderer = renderer
        self.animator = animator
        self.yield_cpu = yield_cpu
        self._last_pose: Pose | None = None
        self._last_frame: np.ndarray | None = None
        self._last_t = -1e9
        self._first_frame: tuple[TurnTimings, float] | None = None
        self._held: list[SpeechTrack] = []  # lip sync held while the audio is paused

    def hold_speech(self) -> None:
        """The audio paused: close the mouth, keep what it was saying."""
        self._held, self.animator.tracks = self.animator.tracks, []

    def release_speech(self, shift_s: float, keep: bool) -> None:
        """The audio goes on `shift_s` later (keep), or was dropped (not keep)."""
        tracks, self._held = self._held + self.animator.tracks, []
        self.animator.tracks = []
        for track in tracks if keep else []:
            track.t0 += shift_s
            self.animator.speak(track)

    def mark_first_frame(self, timings: TurnTimings | None, t0: float) -> None:
        """The first frame at or after media time `t0` marks `first_frame_sent` in `timings`."""
        if timings is not None:
            self._first_frame = (timings, t0)

    def pose(self, t: float) -> Pose:
        """The face at media time `t`, for a frame rendered here or sent to the browser (client mode)."""
        pose = self.animator.pose(t)
        mark = self._first_frame
        if mark is not None and t >= mark[1]:
            self._first_frame = None
            mark[0].mark("first_frame_sent")
        return pose

    def render(self, t: float) -> np.ndarray:
        """The RGB frame for media time `t` (called from the video track's render thread)."""
        pose = self.pose(t)
        last = self._last_pose
        if self._last_frame is not None and (
                (self.yield_cpu() and t - self._last_t < 1.0 / YIELD_FPS)
                or (np.abs(pose.weights - last.weights).max() < STILL_WEIGHT
                    and abs(pose.yaw - last.yaw) < STILL_ANGLE and abs(pose.pitch - last.pitch) < STILL_ANGLE)):
            frame = self._last_frame
        else:
            frame = self.renderer.render(pose).copy()
            self._last_pose, self._last_frame, self._last_t = pose, frame, t
        return frame
