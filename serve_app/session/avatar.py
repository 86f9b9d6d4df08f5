"""The avatar's face on the outgoing video track: the animator's pose at each frame's media time,
rendered (or the last frame reused when nothing visible moved)."""

from __future__ import annotations

import numpy as np

from models.avatar.animate import Animator
from models.avatar.render import AvatarRenderer, Pose
from serve_app.session.timings import TurnTimings

STILL_WEIGHT = 0.015  # largest rig-weight change that is invisible at these resolutions
STILL_ANGLE = 0.004  # radians


class AvatarFace:
    def __init__(self, renderer: AvatarRenderer, animator: Animator) -> None:
        self.renderer = renderer
        self.animator = animator
        self._last_pose: Pose | None = None
        self._last_frame: np.ndarray | None = None
        self._first_frame: tuple[TurnTimings, float] | None = None

    def mark_first_frame(self, timings: TurnTimings | None, t0: float) -> None:
        """The first frame at or after media time `t0` marks `first_frame_sent` in `timings`."""
        if timings is not None:
            self._first_frame = (timings, t0)

    def render(self, t: float) -> np.ndarray:
        """The RGB frame for media time `t` (called from the video track's render thread)."""
        pose = self.animator.pose(t)
        last = self._last_pose
        if (self._last_frame is not None and last is not None
                and np.abs(pose.weights - last.weights).max() < STILL_WEIGHT
                and abs(pose.yaw - last.yaw) < STILL_ANGLE and abs(pose.pitch - last.pitch) < STILL_ANGLE):
            frame = self._last_frame
        else:
            frame = self.renderer.render(pose).copy()
            self._last_pose, self._last_frame = pose, frame
        mark = self._first_frame
        if mark is not None and t >= mark[1]:
            self._first_frame = None
            mark[0].mark("first_frame_sent")
        return frame
