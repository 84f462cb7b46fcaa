"""Which frames a stream decodes: keyframes only when its keyframes come as often as samples are needed.

At 1 FPS almost every decoded frame is thrown away. Skipping non-reference frames (``skip_frame = NONREF``) only
helps streams with B-frames; IP cameras usually send none, so that skip has nothing to skip. What such cameras do
send is a short GOP (a keyframe every 1-2 s), and a keyframe decodes on its own: when keyframes come at least every
sampling period, decoding them alone (``skip_frame = NONKEY``, and the other packets never reach the decoder) gives
the sampler a frame for every tick at ~1/30 of the decoding work of a 30 fps stream.

The GOP is not declared anywhere a client can rely on, so it is measured: `GopWatch` sees every keyframe's time and
switches to keyframes-only after `confirm` consecutive keyframe intervals of at most `max_gop_s` (until then, and on
streams whose GOP is longer, the fallback mode runs: today's non-reference skipping). A keyframe interval that turns
out longer while keyframes-only runs switches back at that keyframe; the samples of that one long GOP are lost (the
frames in between were never decoded, and could not be decoded without the frames before them).

Sampling times then follow keyframes: a stream with a GOP of g seconds is sampled at min(fps, 1/g) samples per
second, and at the keyframes' instants, not at its own sampling phase. `max_gop_s` defaults to the sampling period
(the source's caller decides), so a stream decoded keyframes-only still gets its `fps` samples per second.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

SkipFrame = Literal["DEFAULT", "NONREF", "NONKEY"]

# Keyframe intervals up to this much longer than max_gop_s still count as short: timestamps are rounded to their
# clock (90 kHz RTP, a container's time base), and a camera set to "GOP = frame rate" at 29.97 fps has intervals of
# 1.001 s. Such a stream is sampled at >= fps / 1.05.
GOP_TOLERANCE = 1.05
# Consecutive short intervals before keyframes-only starts: one interval could be a scene cut's extra keyframe.
CONFIRM_INTERVALS = 2


class DecodeMode(str, Enum):
    ALL = "all"  # every frame (skipping off, or frames without timestamps, which can only be counted)
    NONREF = "nonref"  # non-reference frames skipped: all that can be skipped on a long-GOP stream
    KEYFRAMES = "keyframes"  # keyframes only: the stream's keyframes come at least every max_gop_s

    @property
    def skip_frame(self) -> SkipFrame:
        """The decoder's AVDiscard setting for this mode (PyAV's `skip_frame` names)."""
        return _SKIP_FRAME[self]


_SKIP_FRAME: dict[DecodeMode, SkipFrame] = {
    DecodeMode.ALL: "DEFAULT", DecodeMode.NONREF: "NONREF", DecodeMode.KEYFRAMES: "NONKEY",
}


class GopWatch:
    """Measures a stream's keyframe interval from its packets and says which `DecodeMode` to run in.

    `fallback`: the mode for a stream whose GOP is long or not known yet (NONREF, or ALL when skipping is off).
    `max_gop_s`: the longest keyframe interval decoded keyframes-only; None never switches (offline scans).
    """

    def __init__(self, fallback: DecodeMode, max_gop_s: float | None, *, confirm: int = CONFIRM_INTERVALS) -> None:
        if fallback is DecodeMode.KEYFRAMES:
            raise ValueError("the fallback decodes more than keyframes: ALL or NONREF")
        if max_gop_s is not None and not max_gop_s > 0:
            raise ValueError(f"max_gop_s must be positive, got {max_gop_s!r}")
        self.fallback: DecodeMode = fallback
        self.max_gop_s = max_gop_s
        self.confirm = max(1, confirm)
        self.mode: DecodeMode = fallback
        self.gop_s: float | None = None  # the last keyframe interval measured
        self.switches = 0  # mode changes after the start (both ways)
        self._last_key_s: float | None = None
        self._short_run = 0

    def disable(self) -> None:
        """Decode everything from now on (a stream without timestamps: frame times are counted, none may be lost)."""
        self.fallback = self.mode = DecodeMode.ALL
        self.max_gop_s = None

    def keyframe(self, pts_s: float | None) -> DecodeMode:
        """Note a keyframe packet at pts_s (None: no timestamp, not measured); returns the mode from this packet on."""
        if pts_s is None:
            return self.mode
        last, self._last_key_s = self._last_key_s, pts_s
        if last is None or pts_s <= last:  # the first one, or a restart (timestamps jumped back): measure afresh
            self._short_run = 0
            return self.mode
        self.gop_s = round(pts_s - last, 6)
        short = self.max_gop_s is not None and self.gop_s <= self.max_gop_s * GOP_TOLERANCE
        self._short_run = self._short_run + 1 if short else 0
        if self.mode is DecodeMode.KEYFRAMES and not short:
            self._switch(self.fallback)
        elif self.mode is not DecodeMode.KEYFRAMES and self._short_run >= self.confirm:
            self._switch(DecodeMode.KEYFRAMES)
        return self.mode

    def _switch(self, mode: DecodeMode) -> None:
        self.mode = mode
        self.switches += 1
