"""What every live source is to the service: one protocol for pull streams (RTSP, RTMP, HLS, files) and WHIP sessions.

A source has an id (the stream's), a kind (the `kind` label of metrics and the API), counters, its current state and
reason, and two callbacks given when it is made, both called on the event loop thread:

* `on_frame(frame)`: a sampled RGB frame (the consumer keeps the newest, see `FrameSlot`);
* `on_state(state, info)`: each state change, `info` holding the reason and, while reconnecting, the attempt and the
  wait before it.

`run()` returns once the source has ended, after its last `on_frame` and its terminal state (closed or failed);
`close()` ends it from outside and returns promptly. So "where does a frame go" and "how does a stream end" have one
answer whatever the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypedDict

from streamguard.types import SampledFrame


class StreamState(str, Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    STALLED = "stalled"  # connected, but no frame for the watchdog's timeout
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # gave up: no more reconnect attempts
    CLOSED = "closed"  # ended on purpose (source ended, stream removed)


TERMINAL_STATES = frozenset({StreamState.FAILED, StreamState.CLOSED})


class StateInfo(TypedDict, total=False):
    reason: str
    attempt: int  # 1-based while reconnecting; a source reports 0 otherwise
    delay_s: float  # the wait before the next attempt


OnFrame = Callable[[SampledFrame], None]
OnState = Callable[[StreamState, StateInfo], None]


@dataclass(frozen=True, slots=True)
class SourceCounters:
    """Over the source's whole life. `decoded` feeds streamguard_frames_decoded_total, a counter."""

    decoded: int  # video frames out of the decoder
    sampled: int  # frames handed to on_frame


@dataclass(frozen=True, slots=True)
class DecodeInfo:
    """What a source decodes of its video: `mode` is keyframes (a short-GOP pull stream; a WHIP publisher that
    sends the keyframes asked for), nonref (non-reference frames skipped), all (every frame), or None before it
    knows; `gop_s` the keyframe interval last measured (pull streams)."""

    mode: str | None
    gop_s: float | None = None


class Source(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> str:
        """rtsp, rtmp, hls, file or webrtc."""
        ...

    @property
    def state(self) -> StreamState | None:
        """The last state it reported; None before it started."""
        ...

    @property
    def reason(self) -> str | None:
        """Why it is in that state (None while all is well)."""
        ...

    @property
    def counters(self) -> SourceCounters: ...

    @property
    def decoding(self) -> DecodeInfo: ...

    @property
    def listed_after_end(self) -> bool:
        """Whether its stream stays listed (with its final state) once it ended: a pull stream was added by an
        operator and stays until removed; a WHIP session never comes back, so its stream goes when it ends."""
        ...

    @property
    def leave_reason(self) -> str:
        """Why its participants left once it ended: a camera's "stream closed", a WHIP session's own end reason."""
        ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...
