"""A video file as a live WebRTC track that loops for ever, for bots that publish a recording as a participant.

Why not aiortc's `MediaPlayer(loop=True)`: with aiortc 1.16 and PyAV 18 its reader gets `av.EOFError` (not
`StopIteration`) at the end of the file and ends the track, so publishing stops after one play-through while the
peer connection still reads "connected". And a player that loops by restarting its timestamps would not help:
aiortc's VP8 encoder refuses a frame whose pts goes back (`InvalidDataError`) and its RTP sender dies silently.

`LoopingFileTrack` decodes the file with PyAV (in a worker thread: a frame's decode never blocks the event loop),
reopens it at its end, and stamps every frame itself on a 90 kHz clock that keeps rising across loops (each loop
starts one frame after the previous one's last frame); frames are handed out at the file's own pace. Video only:
the service samples video, and a second looping track would need its own clock kept in step with this one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from fractions import Fraction

import av
import av.container
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

CLOCK = Fraction(1, 90000)  # RTP's video clock
DEFAULT_FPS = 25.0  # for files that state no frame rate


class LoopingFileTrack(MediaStreamTrack):
    """A video track playing `path` in a loop at its own frame rate, with timestamps that only ever rise."""

    kind = "video"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        with av.open(path) as container:  # fail now, in the caller, for a file that is not a video
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            rate = container.streams.video[0].average_rate or container.streams.video[0].guessed_rate
        self.frame_s = 1.0 / float(rate) if rate else 1.0 / DEFAULT_FPS
        self.loops = 0  # completed play-throughs
        self._frames: Iterator[tuple[float, av.VideoFrame]] | None = None
        self._offset_s = 0.0  # where the current loop starts on the track's clock
        self._last_s = -self.frame_s  # the last frame's time on the track's clock
        self._started: float | None = None  # time.monotonic() of the first frame handed out

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        t, frame = await asyncio.to_thread(self._next)
        if self._started is None:
            self._started = time.monotonic()
        wait = self._started + t - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame.pts = round(t / CLOCK)
        frame.time_base = CLOCK
        return frame

    def _next(self) -> tuple[float, av.VideoFrame]:
        """The next frame and its time on the track's clock, reopening the file at its end (a worker thread)."""
        for _attempt in range(2):  # a loop that yields no frame at all is a file that cannot be played
            if self._frames is None:
                self._frames = self._decode()
            for t_file, frame in self._frames:
                t = max(self._offset_s + t_file, self._last_s + self.frame_s / 2)  # strictly rising
                self._last_s = t
                return t, frame
            self._frames = None
            self.loops += 1
            self._offset_s = self._last_s + self.frame_s
        raise MediaStreamError(f"{self.path}: no frame could be decoded")

    def _decode(self) -> Iterator[tuple[float, av.VideoFrame]]:
        """One play-through: (seconds since the file's first frame, frame)."""
        try:
            container = av.open(self.path)
        except (av.FFmpegError, OSError) as exc:  # the file went away: the track ends, and the client notices
            raise MediaStreamError(f"{self.path}: {exc}") from exc
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first: float | None = None
            t = -self.frame_s
            try:
                for frame in container.decode(stream):
                    t = float(frame.time) if frame.time is not None else t + self.frame_s  # untimed: one frame on
                    first = t if first is None else first
                    yield t - first, frame
            except av.FFmpegError:  # a damaged tail: this play-through ends here, the next one starts over
                return
