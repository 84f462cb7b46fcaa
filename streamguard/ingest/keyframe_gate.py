"""Decode what 1 FPS needs from a WebRTC publisher: keyframes on request, nothing in between.

aiortc decodes every video frame it receives: inter frames need the frames before them, so a 5 fps publisher costs
five decodes a second (a 30 fps one, thirty) to sample one. A keyframe needs nothing before it, and any WebRTC
sender makes one when its receiver reports picture loss (RTCP PLI, RFC 4585 §6.3.1): aiortc's encoder, Chromium's,
OBS's. So the gate sits where aiortc hands assembled frames to its decoder thread (the receiver's decoder queue)
and:

* passes the keyframes the sampler will keep (VP8 key frames; H.264 access units with an IDR slice, at or after
  its next tick: one that comes early, say from a short GOP, would be decoded only to be dropped);
* drops every other frame undecoded;
* asks the publisher for a keyframe (a PLI) once a sample is due: when a frame's time reaches the sampler's next
  tick and no keyframe has passed for that tick yet. The keyframe arrives one round trip and one encode later
  (tens of ms), so the sample is that much later than the first frame after the tick would have been.

A publisher that does not answer (a sample due for `give_up_s` with no keyframe) is decoded in full from its next
keyframe on (mode "all", as without the gate; the frames before that keyframe cannot be decoded anyway); so is one
whose codec the gate does not know. The cost moves to the publisher: one
keyframe a second, a few times the bytes of an inter frame (measured in the README's WHIP benchmark).

The gate only reads the sampler's next tick; the sampler itself still decides, on decoded frames, what is kept.
Everything here runs on the event loop thread (aiortc puts frames from its RTP handler), except `get`, which
aiortc's decoder thread calls.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable
from typing import Any, Literal

log = logging.getLogger(__name__)

DecodeMode = Literal["keyframes", "all"]
_START = b"\x00\x00\x01"
_H264_IDR = 5
_VP8_KEY_START_CODE = b"\x9d\x01\x2a"


def is_keyframe(codec_name: str, data: bytes) -> bool | None:
    """Whether an assembled frame (aiortc's depayloaded bytes) decodes on its own; None for a codec we cannot tell.

    VP8 (RFC 6386 §9.1): frame tag bit 0 is 0 and the key-frame start code follows the 3-byte tag. H.264: aiortc
    depayloads to Annex B, so an access unit is a keyframe when one of its NAL units is an IDR slice (type 5)."""
    name = codec_name.upper()
    if name == "VP8":
        return len(data) >= 6 and not data[0] & 1 and data[3:6] == _VP8_KEY_START_CODE
    if name == "H264":
        at = data.find(_START)
        while at != -1 and at + 3 < len(data):
            if data[at + 3] & 0x1F == _H264_IDR:
                return True
            at = data.find(_START, at + 3)
        return False
    return None


class KeyframeGate(queue.Queue):
    """aiortc's decoder queue for one video receiver, passing keyframes only (see the module docstring).

    `next_tick`: the sampler's next tick in seconds of the track's time (None: the first frame is wanted);
    `request_keyframe`: sends a PLI; `clock_rate`: RTP timestamp units per second (90 kHz for video)."""

    def __init__(
        self,
        *,
        next_tick: Callable[[], float | None],
        request_keyframe: Callable[[], None],
        clock_rate: int = 90_000,
        retry_s: float = 0.5,
        give_up_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._next_tick = next_tick
        self._request_keyframe = request_keyframe
        self._clock_rate = clock_rate
        self._retry_s = retry_s
        self._give_up_s = give_up_s
        self._clock = clock
        self.mode: DecodeMode = "keyframes"
        self.passed = 0  # frames handed to the decoder
        self.skipped = 0  # frames dropped undecoded
        self.requests = 0  # PLIs sent
        self.last_received: float | None = None  # clock time of the last frame, passed or not: the peer is alive
        self._last_key_s: float | None = None  # track time of the last keyframe passed
        self._due_since: float | None = None  # clock time a sample has been due without a keyframe since
        self._last_request: float | None = None
        self._gave_up_at = -math.inf  # the last keyframe's time when it gave up: deltas pass after a later one
        self._gated = True  # False once a codec it cannot read came: every frame passes

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            self.last_received = self._clock()
            if self._gated and not self._admit(*item):
                self.skipped += 1
                return
            self.passed += 1
        super().put(item, block, timeout)

    def _admit(self, codec: Any, frame: Any) -> bool:
        key = is_keyframe(codec.name, frame.data)
        if key is None:
            self._gated = False
            self._fall_back(f"codec {codec.name} is not gated")
            return True
        t = frame.timestamp / self._clock_rate
        if key:
            self._last_key_s, self._due_since = t, None
            # Before the next tick the sampler would drop it; the next sample needs a later keyframe anyway.
            tick = self._next_tick() if self.mode == "keyframes" else None
            return tick is None or t >= tick
        if self.mode == "all":
            return self._last_key_s is not None and self._last_key_s > self._gave_up_at  # decodable again
        tick = self._next_tick()
        satisfied = tick is not None and self._last_key_s is not None and self._last_key_s >= tick
        if (tick is None and self._last_key_s is None) or (tick is not None and t >= tick and not satisfied):
            self._sample_due()
        return False

    def _sample_due(self) -> None:
        now = self._clock()
        if self._due_since is None:
            self._due_since = now
        elif now - self._due_since > self._give_up_s:
            self._gave_up_at = self._last_key_s if self._last_key_s is not None else -math.inf
            self._fall_back(f"no keyframe {self._give_up_s:g} s after asking for one")
            return
        if self._last_request is None or now - self._last_request >= self._retry_s:
            self._last_request = now
            self.requests += 1
            self._request_keyframe()

    def _fall_back(self, why: str) -> None:
        self.mode = "all"
        log.info("decoding every frame of this publisher: %s", why)


def install(receiver: Any, next_tick: Callable[[], float | None],
            spawn: Callable[[Any], None]) -> KeyframeGate | None:
    """Put a gate in front of `receiver`'s decoder (an aiortc RTCRtpReceiver whose decoder thread has not started:
    the "track" event, before the connection). None, decoding every frame, where aiortc's internals are not the
    ones this was written against (aiortc 1.x keeps the queue as a private attribute)."""
    attr = "_RTCRtpReceiver__decoder_queue"
    if not isinstance(getattr(receiver, attr, None), queue.Queue) or getattr(
            receiver, "_RTCRtpReceiver__decoder_thread", True) is not None:
        log.warning("aiortc's receiver is not as expected: decoding every frame")
        return None

    def request_keyframe() -> None:
        # Every SSRC heard from lately: the media one, and an RTX one, which senders ignore in a PLI.
        for source in receiver.getSynchronizationSources():
            spawn(receiver._send_rtcp_pli(source.source))

    gate = KeyframeGate(next_tick=next_tick, request_keyframe=request_keyframe)
    setattr(receiver, attr, gate)
    return gate
