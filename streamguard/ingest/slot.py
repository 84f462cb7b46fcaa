"""Latest-wins hand-off between a source and its stream worker: a frame is replaced, never queued."""

from __future__ import annotations

import asyncio

from streamguard.types import SampledFrame


class FrameSlot:
    """Holds at most one frame. A source `put`s (on the event loop); the worker `get`s the newest.

    A frame replaced before the worker took it is counted in `dropped`: the worker was busy, and an old frame is
    worth less than the next one (stale frames are never queued).
    """

    def __init__(self) -> None:
        self._frame: SampledFrame | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, frame: SampledFrame) -> None:
        if self._closed:
            return
        if self._frame is not None:
            self.dropped += 1
        self._frame = frame
        self.put_count += 1
        self._ready.set()

    async def get(self) -> SampledFrame | None:
        """The newest frame, waiting for one; None once closed and drained."""
        while self._frame is None:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed
