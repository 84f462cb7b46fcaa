"""A WHIP session as a `Source`: the adapter that lets the service treat a published participant like a camera.

A session is live from the moment it exists (the offer was answered), so its state is `live` at once and `run()`
only waits for its end, then reports `closed` with the session's reason ("deleted by client", "no frames for 15 s",
"replaced by a new session of the same participant", ...). `close()` ends the session (its peer connection too).
"""

from __future__ import annotations

from streamguard.ingest.source import DecodeInfo, OnFrame, OnState, SourceCounters, StateInfo, StreamState
from streamguard.ingest.webrtc import WhipManager, WhipSession

REASON_REMOVED = "stream removed"  # through the streams API, not by the publisher


class WhipSource:
    kind = "webrtc"
    # A session never comes back (a publisher that returns gets a new session and stream): its stream goes with it.
    listed_after_end = False

    def __init__(self, session: WhipSession, manager: WhipManager, *, on_frame: OnFrame, on_state: OnState) -> None:
        self.session = session
        self._manager = manager
        self._on_state = on_state
        session.attach(on_frame)

    @property
    def id(self) -> str:
        return self.session.stream_id

    @property
    def state(self) -> StreamState:
        return StreamState.CLOSED if self.session.ended else StreamState.LIVE

    @property
    def reason(self) -> str | None:
        return self.session.end_reason

    @property
    def counters(self) -> SourceCounters:
        return SourceCounters(decoded=self.session.video_frames, sampled=self.session.kept_frames)

    @property
    def decoding(self) -> DecodeInfo:
        # keyframes: the gate passes the keyframes asked for each sample; all: aiortc decodes every frame received
        # (a publisher that ignores keyframe requests, or whip.keyframes_only off).
        return DecodeInfo(mode=self.session.decode_mode)

    @property
    def leave_reason(self) -> str:
        # The stream is the participant's own session: why it ended is why they left.
        return self.session.end_reason or REASON_REMOVED

    async def run(self) -> None:
        reason = await self.session.wait_ended()
        self._on_state(StreamState.CLOSED, StateInfo(reason=reason))

    async def close(self) -> None:
        await self._manager.end(self.session, REASON_REMOVED)
