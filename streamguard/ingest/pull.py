"""Live pull sources (RTSP/RTSPS, RTMP, HLS/HTTP, files) through PyAV: timeouts, watchdog, reconnects, states.

One `PullSource` per stream. Its blocking PyAV work (open, demux, decode) runs in a thread of its own, never in the
default executor (20+ streams blocked in reads would starve it). `on_frame` and `on_state` are always called on the
event loop thread, so a consumer may call `FrameSlot.put` or publish an event straight from them.

States (emitted on change only, except `reconnecting`, which is emitted once per attempt)::

    connecting ──first decoded frame──► live ──no frame for watchdog_s / read error / EOF──► stalled
        ▲   │                                                                                   │
        │   └──open error, timeout, no frame after opening──► reconnecting(attempt, delay_s) ◄──┘
        └─────────────────────── after delay_s ──────────────────┘  │
                                            max_attempts reached ──► failed
    close() ──► closed (from any state)

The attempt counter resets once a stream has stayed live for backoff_max_s (it recovered); a stream that flaps
faster than that keeps escalating its backoff (up to backoff_max_s: the cap is what bounds how long a source that
returns waits to be noticed) and counts towards max_attempts. The watchdog, the read timeout and
stalled apply to network sources only. A file (a path or a file: URL) is not retried: its end gives closed
("end of file"), any error failed; it is played at its own pace (`realtime`) unless told otherwise.

Timeouts are enforced on the loop side from timestamps the decode thread writes (open start, last packet, last
decoded frame), because `open_container` takes a single timeout for opening and reading, and because FFmpeg's own
read timeout on RTSP fired only after ~2× the value given (measured: 6 s for 3 s with the server SIGSTOPped). When a
deadline passes, the session is abandoned: its stop flag is set, its late results are ignored, and a fresh session
(a new thread) starts after the backoff. The abandoned thread ends by itself at the next packet or, at the latest,
when PyAV's interrupt callback fires (max(connect_timeout_s, read_timeout_s) + 1 s, given to open_container as a
backstop).

close() abandons the session the same way rather than wait out a blocked thread: a stream stuck opening (a host that
accepts and never answers) would otherwise hold `DELETE /v1/streams/{id}` and shutdown for connect_timeout_s. It
waits for a thread that is reading (it lets go at its next packet) for at most _CLOSE_GRACE_S, not at all for one
that is still opening; `closed` is emitted either way and nothing the thread produces later is delivered.

Backoff: exponential with *equal jitter*: attempt n waits uniformly in [b/2, b], b = min(backoff_max_s,
backoff_initial_s · 2^(n-1)). Full jitter (uniform in [0, b]) spreads a herd best, but it also yields near-zero
waits that hammer a server which just refused us; equal jitter still spreads 20+ streams that lost the same NVR over
a 2:1 window, never retries faster than b/2, and keeps successive delays non-decreasing up to the cap (attempt n's
longest wait, b, is attempt n+1's shortest), which is what an operator reading "reconnecting in …" expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import av
import av.container

from streamguard.config import SourceSettings
from streamguard.ingest.av_source import (
    DecodeStats,
    SourceError,
    _is_url,
    _rgb,
    _video_stream,
    configure_decoder,
    decode_video,
    open_container,
    redact_url,
)
from streamguard.ingest.gop import DecodeMode, GopWatch
from streamguard.ingest.policy import OPAQUE_OPEN_FAILURE, SourceGuard, SourceRefused
from streamguard.ingest.sampler import TimestampSampler
from streamguard.ingest.source import (
    TERMINAL_STATES,
    DecodeInfo,
    OnFrame,
    OnState,
    SourceCounters,
    StateInfo,
    StreamState,
)
from streamguard.types import SampledFrame

log = logging.getLogger(__name__)

# FFmpeg's "tty" demuxer renders any text file (.txt, .ans, …) as ANSI art: a "video" stream that is really a page
# of text, e.g. an HTTP server's error page or a mistyped URL. Not something to scan.
_TEXT_FORMATS = frozenset({"tty"})
# After a decode error, frames carry concealed damage until the next keyframe; stop waiting for one after this much
# media time (streams with intra refresh have no keyframes). Same rule as iter_sampled_frames.
_MAX_RESYNC_S = 5.0
# How long after our own connect/read deadlines PyAV's interrupt callback ends a thread we gave up on.
_BACKSTOP_MARGIN_S = 1.0
# How long close() waits for a reading thread to let go of its source (it does at its next packet) before it abandons
# the thread like a passed deadline does. A thread still opening is abandoned at once: nothing would unblock it sooner
# than the backstop.
_CLOSE_GRACE_S = 0.5



@dataclass(slots=True)
class PullStats:
    """Counters over the source's whole life (all sessions). Written by the decode thread, read anywhere."""

    decoded: int = 0  # frames out of the decoder
    sampled: int = 0  # frames handed to on_frame
    corrupt: int = 0  # packets the demuxer or decoder rejected (skipped)
    reconnects: int = 0  # reconnect attempts started (one per `reconnecting` event)
    last_frame_wall_ts: float | None = None  # time.time() of the last decoded frame


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Equal-jitter exponential backoff for reconnect `attempt` (1-based): uniform in [b/2, b] (see module doc)."""
    b = min(max_s, initial_s * 2.0 ** max(0, attempt - 1))
    return b / 2 + rng.uniform(0.0, b / 2)


@dataclass(slots=True)
class _Outcome:
    """How a session ended. eof: the source ended normally (end of file, or the server closed the stream);
    refused: the source policy does not allow it (final: retrying cannot help)."""

    reason: str
    eof: bool = False
    refused: bool = False


@dataclass(eq=False, slots=True)
class _Session:
    """One connect attempt and the reading that follows, run by one thread.

    The thread writes the *_mono timestamps (plain float stores, atomic under the GIL); the loop reads them to
    enforce deadlines. `done` is resolved on the loop once the thread has closed its container.
    """

    stop: threading.Event
    done: asyncio.Future[_Outcome]
    started_mono: float
    opened_mono: float | None = None
    last_packet_mono: float | None = None
    last_frame_mono: float | None = None
    live_since_mono: float | None = None


class PullSource:
    """Pulls one stream until closed or failed; see the module docstring for states, timeouts and backoff.

    `realtime` paces file sources by their media time, like a camera (a file decoded at full speed would hand the
    latest-wins FrameSlot samples faster than any worker takes them); network sources are paced by their sender.
    """

    def __init__(
        self,
        stream_id: str,
        url: str,
        *,
        settings: SourceSettings,
        fps: float,
        on_frame: OnFrame,
        on_state: OnState,
        realtime: bool = True,
        hwaccel: Any | None = None,
        phase: float = 0.0,
        guard: SourceGuard | None = None,
        proxy_url: str | None = None,
    ) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        self.stream_id = stream_id
        self.url = url
        self.settings = settings
        self.fps = fps
        self.realtime = realtime
        self.hwaccel = hwaccel  # a PyAV HWAccel to decode on the GPU (streamguard.ingest.nvdec), or None
        self.phase = phase  # the sampling phase (TimestampSampler), the same for every connection
        # A stream added over the API: checked against the source policy at every connection (RTSP/RTMP here, HTTP
        # through the policy's proxy at `proxy_url`), and told nothing about why it could not be opened.
        self.guard = guard
        self.proxy_url = proxy_url
        self._on_frame = on_frame
        self._on_state = on_state
        self.is_file = not _is_url(url)
        self._target = _file_path(url) if self.is_file else url
        self._shown_url = redact_url(url)
        # PyAV's own timeout is only a backstop that ends abandoned threads; the precise limits are enforced here.
        # It must fire after ours: when FFmpeg's RTSP socket timeout expires, the demuxer hands out the frame its
        # RTP depacketizer was holding back, which would look like fresh data and push our read deadline back.
        self._hard_timeout_s = max(settings.connect_timeout_s, settings.read_timeout_s) + _BACKSTOP_MARGIN_S
        # Deadlines are checked this often: a fraction of the shortest limit, so they fire at most ~25 % late.
        self._tick_s = min(0.5, settings.connect_timeout_s / 4, settings.read_timeout_s / 4, settings.watchdog_s / 4)
        self._rng = random.Random()
        self._state: StreamState | None = None
        self._state_reason: str | None = None
        self._stats = PullStats()
        self._session: _Session | None = None
        self._gop: GopWatch | None = None  # the current connection's, written by its decode thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._close_requested: asyncio.Future[None] | None = None
        self._finished: asyncio.Future[None] | None = None
        self._closing = False
        self._attempt = 0

    # --- public ------------------------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.stream_id

    @property
    def kind(self) -> str:
        return stream_kind(self.url)

    @property
    def state(self) -> StreamState | None:
        """The last state emitted; None before run() starts."""
        return self._state

    @property
    def reason(self) -> str | None:
        return self._state_reason

    @property
    def counters(self) -> SourceCounters:
        return SourceCounters(decoded=self._stats.decoded, sampled=self._stats.sampled)

    @property
    def decoding(self) -> DecodeInfo:
        """What the current connection decodes (None before one opened) and the keyframe interval it measured."""
        gop = self._gop
        return DecodeInfo(mode=gop.mode.value if gop is not None else None, gop_s=gop.gop_s if gop else None)

    # An operator added the stream: it stays listed with its final state (failed, end of file) until removed.
    listed_after_end = True

    @property
    def leave_reason(self) -> str:
        return f"stream {self._state.value if self._state else StreamState.CLOSED.value}"

    @property
    def stats(self) -> PullStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    async def run(self) -> None:
        """Connect, read and reconnect until close() or a terminal state (failed, or a file's end)."""
        if self._finished is not None:
            raise RuntimeError(f"PullSource {self.stream_id}: run() was already called")
        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        self._close_requested = self._loop.create_future()
        try:
            if self._closing:  # close() came before run()
                return
            await self._run()
        except asyncio.CancelledError:
            self._stop_session()
            self._set_state(StreamState.CLOSED, reason="cancelled")
            raise
        finally:
            self._finished.set_result(None)

    async def close(self) -> None:
        """Stop the stream: `closed` is emitted at once and nothing is delivered after it. Returns promptly: when
        the decode thread has let go of the source if packets are flowing (it stops at the next one), else after at
        most _CLOSE_GRACE_S (at once while it is still opening), leaving the blocked thread abandoned; it ends by
        itself at PyAV's backstop, max(connect_timeout_s, read_timeout_s) + 1 s after it blocked."""
        self._closing = True
        if self._close_requested is not None and not self._close_requested.done():
            self._close_requested.set_result(None)
        self._stop_session()
        if self._finished is None:  # run() never started: nothing to wait for
            self._set_state(StreamState.CLOSED, reason="closed")
            return
        await asyncio.shield(self._finished)

    # --- supervisor (event loop) ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self.settings
        while True:
            self._set_state(StreamState.CONNECTING, attempt=self._attempt)
            session = self._start_session()
            outcome = self._public(await self._supervise(session), session)
            if self._closing:
                self._set_state(StreamState.CLOSED, reason="closed")
                await self._let_go(session)
                return
            if self.is_file or outcome.refused:
                # A file does not come back by retrying, nor does a source the policy refuses: its end, or any
                # error reading it, is final.
                if outcome.eof:
                    self._set_state(StreamState.CLOSED, reason="end of file")
                else:
                    self._set_state(StreamState.FAILED, reason=outcome.reason)
                return
            now = time.monotonic()
            if session.live_since_mono is not None:
                self._set_state(StreamState.STALLED, reason=outcome.reason)
                # Live for longer than the longest wait: it had recovered, so this is a fresh failure.
                if now - session.live_since_mono >= s.backoff_max_s:
                    self._attempt = 0
            self._attempt += 1
            if s.max_attempts and self._attempt > s.max_attempts:
                self._set_state(
                    StreamState.FAILED, reason=f"gave up after {s.max_attempts} reconnects: {outcome.reason}"
                )
                return
            delay = backoff_delay(self._attempt, s.backoff_initial_s, s.backoff_max_s, self._rng)
            self._stats.reconnects += 1
            self._set_state(
                StreamState.RECONNECTING, attempt=self._attempt, delay_s=round(delay, 3), reason=outcome.reason
            )
            assert self._close_requested is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._close_requested), timeout=delay)
            if self._closing:
                self._set_state(StreamState.CLOSED, reason="closed")
                return

    def _public(self, outcome: _Outcome, session: _Session) -> _Outcome:
        """What a stream added over the API is told: a failure to open reads the same whatever its cause (closed
        port, filtered port, something else listening, no such file), so the API maps no network; the log says."""
        if self.guard is None or outcome.refused or outcome.eof or session.live_since_mono is not None:
            return outcome
        log.info("stream %s: cannot open: %s", self.stream_id, outcome.reason)
        return _Outcome(OPAQUE_OPEN_FAILURE)

    def _start_session(self) -> _Session:
        assert self._loop is not None
        session = _Session(stop=threading.Event(), done=self._loop.create_future(), started_mono=time.monotonic())
        self._session = session
        thread = threading.Thread(
            target=self._read_thread, args=(session,), name=f"pull-{self.stream_id}", daemon=True
        )
        thread.start()
        return session

    def _stop_session(self) -> None:
        if self._session is not None:
            self._session.stop.set()

    async def _supervise(self, session: _Session) -> _Outcome:
        """Wait for the session to end, or end it when a deadline passes or close() is called."""
        assert self._close_requested is not None
        while True:
            waiting: set[asyncio.Future[Any]] = {session.done, self._close_requested}
            done, _ = await asyncio.wait(waiting, timeout=self._tick_s, return_when=asyncio.FIRST_COMPLETED)
            if session.done in done:
                return session.done.result()
            if self._closing:
                session.stop.set()
                return _Outcome("closed")
            reason = self._deadline_passed(session, time.monotonic())
            if reason is not None:
                session.stop.set()  # abandoned: its thread ends on its own, its results are ignored
                return _Outcome(reason)

    def _deadline_passed(self, session: _Session, now: float) -> str | None:
        s = self.settings
        if self.is_file:
            return None  # local reads do not hang, and a paced file is silent between frames on purpose
        if session.opened_mono is None:
            if now - session.started_mono > s.connect_timeout_s:
                return f"timed out after {s.connect_timeout_s:g} s while opening (no answer from the server)"
            return None
        if now - (session.last_packet_mono or session.opened_mono) > s.read_timeout_s:
            return f"read timed out (no data for {s.read_timeout_s:g} s)"
        if now - (session.last_frame_mono or session.opened_mono) > s.watchdog_s:
            return f"no frame for {s.watchdog_s:g} s"
        return None

    async def _let_go(self, session: _Session) -> None:
        """After close(): give a reading thread a moment to close its container, then abandon it (see close())."""
        if session.opened_mono is None:
            return  # blocked opening: it ends at the backstop, or sees its stop flag right after the open
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(session.done), timeout=_CLOSE_GRACE_S)

    def _set_state(
        self, state: StreamState, *, reason: str | None = None, attempt: int | None = None,
        delay_s: float | None = None,
    ) -> None:
        if self._state in TERMINAL_STATES:
            return
        if state is self._state and state is not StreamState.RECONNECTING:
            return
        info = StateInfo()
        if reason is not None:
            info["reason"] = reason
        if attempt is not None:
            info["attempt"] = attempt
        if delay_s is not None:
            info["delay_s"] = delay_s
        self._state, self._state_reason = state, reason
        log.info("stream %s: %s%s", self.stream_id, state.value, f" {dict(info)}" if info else "")
        try:
            self._on_state(state, info)
        except Exception:  # a consumer's bug must not end this stream, let alone others
            log.exception("stream %s: on_state callback failed", self.stream_id)

    # Called on the loop thread through call_soon_threadsafe; results of abandoned sessions are dropped.

    def _went_live(self, session: _Session) -> None:
        if session is self._session and not session.stop.is_set() and not self._closing:
            session.live_since_mono = time.monotonic()
            self._set_state(StreamState.LIVE)

    def _deliver(self, session: _Session, frame: SampledFrame) -> None:
        if session is not self._session or session.stop.is_set() or self._closing:
            return
        self._stats.sampled += 1
        try:
            self._on_frame(frame)
        except Exception:
            log.exception("stream %s: on_frame callback failed", self.stream_id)

    # --- decode thread -------------------------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown): nobody is listening
            self._loop.call_soon_threadsafe(callback, *args)

    def _read_thread(self, session: _Session) -> None:
        try:
            outcome = self._read(session)
        except SourceRefused as exc:
            outcome = _Outcome(f"refused by sources.policy: {exc}", refused=True)
        except SourceError as exc:
            outcome = _Outcome(self._reason(exc))
        except Exception as exc:  # an unexpected PyAV error ends this session (and is retried), never silently
            log.exception("stream %s: decoding failed", self.stream_id)
            outcome = _Outcome(f"unexpected error: {self._clean(repr(exc))}")

        def resolve() -> None:
            if not session.done.done():
                session.done.set_result(outcome)

        self._post(resolve)

    def _read(self, session: _Session) -> _Outcome:
        container = open_container(self._target, timeout_s=self._hard_timeout_s, hwaccel=self.hwaccel,
                                   extra_options=self._policy_options())
        try:
            if session.stop.is_set():
                return _Outcome("stopped")
            session.opened_mono = time.monotonic()
            stream = _video_stream(container, self.url)
            if container.format.name in _TEXT_FORMATS:
                raise SourceError(f"{self.url}: not a video (a text document)")
            gop = self._gop = self._gop_watch()  # measured afresh per connection: a camera may be reconfigured
            # SLICE: frame threading would delay every live frame by the thread count.
            configure_decoder(stream, gop)
            return self._decode(session, container, stream, gop)
        finally:
            container.close()

    def _policy_options(self) -> dict[str, str]:
        """For a stream added over the API, before each connection: RTSP/RTMP hosts are resolved and checked here
        (SourceRefused), HTTP(S) goes through the policy's proxy, one request per connection (it checks each)."""
        if self.guard is None or self.is_file:
            return {}
        if self.kind == "hls" and self.proxy_url is not None:
            return {"http_proxy": self.proxy_url, "http_persistent": "0", "multiple_requests": "0"}
        try:
            self.guard.check_connect(self.url)
        except OSError as exc:  # does not resolve: a network failure like any other, retried
            raise SourceError(f"{self.url}: cannot resolve the host ({exc.strerror or exc})") from exc
        return {}

    def _gop_watch(self) -> GopWatch:
        """Keyframes only once the stream's GOP proves to be at most keyframe_max_gop_s (default: the sampling
        period, so the stream still gets `fps` samples per second); non-reference skipping (or none) before that."""
        s = self.settings
        max_gop_s = (s.keyframe_max_gop_s or 1.0 / self.fps) if s.keyframes_only else None
        return GopWatch(DecodeMode.NONREF if s.skip_nonref else DecodeMode.ALL, max_gop_s)

    def _decode(self, session: _Session, container: av.container.InputContainer, stream: av.VideoStream,
                gop: GopWatch) -> _Outcome:
        stats = self._stats
        rate = stream.average_rate or stream.guessed_rate
        # Files: a frame without a timestamp is one nominal frame after the last (decoding runs ahead of real time).
        # Live: such frames (the first RTSP frame has pts None) get the wall-clock time since the last one.
        frame_duration = 1.0 / float(rate) if self.is_file and rate else None
        sampler = TimestampSampler(self.fps, frame_duration_s=frame_duration, phase=self.phase)
        session_stats = DecodeStats()  # this session's counts; damaged packets are mirrored into the lifetime stats
        corrupt_seen = 0
        pace_anchor: tuple[float, float] | None = None  # (media time, monotonic time) of the pacing origin
        went_live = False
        decoded = decode_video(
            container, stream, self.url, sampler, session_stats, gop=gop, max_resync_s=_MAX_RESYNC_S,
            untimed_frames_counted=self.is_file, on_packet=lambda: _packet_read(session),
        )
        for item in decoded:
            if session.stop.is_set():
                return _Outcome("stopped")
            now = time.monotonic()
            session.last_frame_mono = now
            stats.decoded += 1  # every decoded frame comes through here, concealed ones too
            stats.corrupt += session_stats.corrupt - corrupt_seen
            corrupt_seen = session_stats.corrupt
            stats.last_frame_wall_ts = time.time()
            if not went_live:
                went_live = True
                self._post(self._went_live, session)
            if item.concealed:
                continue
            if self.is_file and self.realtime:
                t = item.pts_s if item.pts_s is not None else sampler.estimate()
                if pace_anchor is None or t < pace_anchor[0]:  # first frame, or a jump back: re-anchor
                    pace_anchor = (t, now)
                wait = pace_anchor[1] + (t - pace_anchor[0]) - time.monotonic()
                if wait > 0 and session.stop.wait(wait):
                    return _Outcome("stopped")
            if not sampler.keep(item.pts_s):
                continue
            wall_ts = time.time()
            rgb = _rgb(item.frame, None).to_ndarray()
            t = sampler.last_pts_s or 0.0
            self._post(self._deliver, session, SampledFrame(self.stream_id, t, wall_ts, rgb))
        stats.corrupt += session_stats.corrupt - corrupt_seen  # damaged packets at the very end
        if session.stop.is_set():
            return _Outcome("stopped")
        if self.is_file:
            return _Outcome("end of file", eof=True)
        return _Outcome("end of stream (the server ended it or closed the connection)", eof=True)

    # --- reasons -------------------------------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        return text.replace(self.url, self._shown_url) if self._shown_url != self.url else text

    def _reason(self, exc: SourceError) -> str:
        """The error without the URL prefix (the stream id says which stream), credentials never included."""
        text = str(exc)
        for prefix in (self.url, self._target):
            if text.startswith(f"{prefix}: "):
                text = text[len(prefix) + 2 :]
                break
        cause = exc.__cause__
        if isinstance(cause, av.error.InvalidDataError) and "timed out" not in text and not self.is_file:
            # open_container says "cannot open URL" for every URL error; say what it means when the data is junk.
            text = f"not a video or an unsupported format ({getattr(cause, 'strerror', None) or cause})"
        return self._clean(text)


def _packet_read(session: _Session) -> bool:
    """Notes a packet for the read deadline; False once the session was abandoned (ends the decode loop)."""
    session.last_packet_mono = time.monotonic()
    return not session.stop.is_set()


def _file_path(url: str) -> str:
    """A local path from a path or a file: URL (percent-decoded, so spaces and non-ASCII names work)."""
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        return unquote(parts.path) if parts.netloc in ("", "localhost") else url
    return url


def stream_kind(url: str) -> str:
    """The kind label of a pull stream: its scheme, with the secure variants folded in (rtsps is rtsp) and HTTP as
    hls; a plain path is a file."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    return {"rtsps": "rtsp", "rtmps": "rtmp", "http": "hls", "https": "hls"}.get(scheme, scheme)
