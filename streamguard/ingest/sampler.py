"""Pick frames at a fixed rate by presentation time: the first frame, then the first frame at or after each tick.

Pure Python (no PyAV) so sources of any kind (files, RTSP, WebRTC tracks) share one tested rule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable


class TimestampSampler:
    """Keeps one frame per tick (tick = 1/fps seconds of presentation time), whatever the source frame rate.

    Rules, in order:

    * The first frame is kept; it anchors a tick grid ``anchor + (phase + k)/fps``. The next tick is the grid's
      first point at least half a period after the anchor: one period later at phase 0, ``1 + phase`` periods for
      a phase under 0.5, ``phase`` periods from 0.5 on.
    * A frame is kept when its time reaches the next tick; the next tick then moves one period on, so timestamp
      jitter never makes the grid drift (a 25 fps clip at 1 FPS is sampled at every whole second).
    * A frame more than half a period late for its tick (after a freeze, lost or undecodable frames, a jump
      forwards) is kept and the grid re-anchors on it: a gap yields one frame, never a burst of "catch-up" frames,
      and two samples are never closer than half a period (a late frame is not followed by an on-time one 40 ms
      later). This re-anchoring drops the phase, so a source at about the sampling rate keeps every frame (the grid
      follows its frames); streams that lose the same frames (one server's freeze) then sample together until they
      restart.
    * A jump backwards by more than ``restart_after_s`` (default 2 s) is a stream restart (new RTSP session,
      looped file, wrapped timestamps): the sampler keeps that frame as a new first frame and re-anchors, phase
      and all. Smaller steps backwards are jitter, e.g. frames a damaged packet put out of order (up to the B-frame
      reorder depth, ~0.6 s at 25 fps): such frames are dropped and the grid is kept, so they cannot add samples.
    * A frame without a timestamp (``pts_s is None``) gets an estimate:
        - the previous frame's time + ``frame_duration_s`` when the caller gave a nominal frame duration (files and
          demuxed streams: the container's average rate is known and decoding runs faster than real time, so the
          wall clock would be meaningless);
        - otherwise the previous frame's time + the wall-clock time elapsed since it (live sources that do not
          stamp frames: real time is the best estimate there).
      The very first frame without a timestamp is placed at 0.0. ``last_pts_s`` gives the time that was used, so
      the caller can stamp the kept frame with it.

    Why a phase: streams from one server share a clock and start on the same keyframe, so at phase 0 every stream
    samples the same instant and face detection gets N frames at once each tick. A phase (a fraction of the period,
    in [0, 1)) moves a stream's ticks by that much; the service spreads its streams' phases over the period.
    `scan` keeps phase 0, so its sample times are those of the file alone.
    """

    def __init__(
        self,
        fps: float = 1.0,
        *,
        frame_duration_s: float | None = None,
        restart_after_s: float = 2.0,
        phase: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        if not 0.0 <= phase < 1.0:  # also refuses NaN
            raise ValueError(f"phase must be a fraction of the period in [0, 1), got {phase!r}")
        if frame_duration_s is not None and not (math.isfinite(frame_duration_s) and frame_duration_s > 0):
            frame_duration_s = None  # an unknown or broken nominal rate: fall back to the wall clock
        self.fps = fps
        self.period_s = 1.0 / fps
        self.frame_duration_s = frame_duration_s
        self.restart_after_s = restart_after_s
        self.phase = phase
        # From an anchor to its first tick: the phased grid's first point at least half a period on (1 at phase 0).
        self._first_tick_s = (phase if phase >= 0.5 else 1.0 + phase) * self.period_s
        self._clock = clock
        # Float rounding of pts * time_base must not push a frame that sits exactly on a tick to the next one.
        self._eps = min(1e-6, self.period_s * 1e-3)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame is kept as a first frame."""
        self._next_tick: float | None = None
        self._last_pts: float | None = None
        self._last_clock: float | None = None
        self.restarts = 0

    @property
    def next_tick_s(self) -> float | None:
        """The time from which the next frame is kept (None: the next frame is kept, as a first frame)."""
        return self._next_tick

    @property
    def last_pts_s(self) -> float | None:
        """The time (given or estimated) of the last frame passed to `keep`."""
        return self._last_pts

    def estimate(self) -> float:
        """The time a frame without a timestamp would get now (see the class docstring)."""
        if self._last_pts is None:
            return 0.0
        if self.frame_duration_s is not None:
            return self._last_pts + self.frame_duration_s
        assert self._last_clock is not None
        return self._last_pts + max(0.0, self._clock() - self._last_clock)

    def observe(self, pts_s: float | None) -> float:
        """Note a frame that will not be sampled whatever its time (e.g. damaged); returns the time it was given.

        Keeps the estimate for frames without timestamps counting, and leaves the tick grid alone, so the tick
        goes to the next frame that is offered to `keep`.
        """
        t = self.estimate() if pts_s is None or not math.isfinite(pts_s) else float(pts_s)
        self._last_pts = t
        self._last_clock = self._clock()
        return t

    def keep(self, pts_s: float | None) -> bool:
        """Whether to keep the frame with presentation time pts_s (seconds, or None when unknown)."""
        last = self._last_pts
        t = self.observe(pts_s)
        if self._next_tick is None:
            self._next_tick = t + self._first_tick_s
            return True
        if last is not None and t < last - self.restart_after_s:
            self.restarts += 1
            self._next_tick = t + self._first_tick_s
            return True
        if t < self._next_tick - self._eps:
            return False
        if t - self._next_tick < self.period_s / 2:
            self._next_tick += self.period_s
        else:
            self._next_tick = t + self.period_s  # late (a gap, lost frames): one frame, and a fresh grid from here
        return True


def spread_phase(in_use: Iterable[float]) -> float:
    """A sampling phase for one more stream: the middle of the widest gap between the phases in use (0 for the first).

    Taken in turn this gives 0, 1/2, 1/4, 3/4, 1/8, ...: N streams are at least 1/(2N) of a period apart, and a
    stream that left leaves the widest gap, so the next stream fills it.
    """
    phases = sorted(in_use)
    if not phases:
        return 0.0
    gaps = [(b - a, a) for a, b in zip(phases, [*phases[1:], phases[0] + 1.0], strict=True)]
    width, start = max(gaps, key=lambda gap: gap[0])  # the first of equal gaps: the same inputs, the same phase
    return (start + width / 2) % 1.0
