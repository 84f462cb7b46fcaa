"""WebRTC ingest by WHIP (RFC 9725) on aiortc: one session per published participant, framework-independent.

The HTTP layer maps requests onto `WhipManager` and `WhipError` onto responses:

    POST   /v1/whip            -> create_session(body, content_type, participant_id, display_name)
                                  201, Content-Type application/sdp, body session.answer_sdp,
                                  Location <prefix>/v1/whip/{session.id}, ETag session.etag,
                                  one `Link: ice_server_links(...)` header per configured STUN/TURN URL
    OPTIONS /v1/whip           -> 204 with the same Link headers (none on a CORS preflight)
    DELETE /v1/whip/{id}       -> delete(id)                         200 (404 unknown)
    PATCH  /v1/whip/{id}       -> patch(id)                          always a WhipError (404 or 405)
    any WhipError              -> status e.status, headers e.headers, JSON body e.as_dict()

STUN/TURN (RFC 9725 §4.6): the configured servers are used by every session's peer connection and advertised to
clients as `Link: <turn:host:3478?transport=udp>; rel="ice-server"; username="u"; credential="p";
credential-type="password"` headers, on the 201 and on OPTIONS. The OPTIONS form is there for clients that, like
aiortc, cannot change their ICE servers once the offer is made (no setConfiguration, no ICE restart).

Participant id and display name come from the request: `participant_from_request(headers, query)` reads the headers
`X-Participant-Id` / `X-Participant-Name` and the query parameters `participant_id` / `name`, the header winning when
both are given (`streamguard.client.publish` sends both, so it works behind proxies that strip either; a non-ASCII
name comes only in the query, since header values are ASCII).

Status codes (RFC 9725 and RFC 9110):

* 400 the body is not an SDP offer we can use: not UTF-8, not `type=value` lines, no `v=0`, no `m=video`, no
  DTLS fingerprint, no video codec in common, or anything aiortc refuses in setRemoteDescription (its reason is
  passed on); also a malformed participant id or name.
* 413 the body is larger than `max_sdp_bytes` (real offers are 2-10 kB; this bounds parsing work per request).
* 415 the Content-Type is not `application/sdp` (RFC 9725 §4.2 fixes it; parameters such as charset are allowed).
* 503 with Retry-After when `max_sessions` are live or the manager is shutting down. RFC 9725's load-balancing
  section has an overloaded endpoint answer 503 (Service Unavailable) with Retry-After; 429 (Too Many Requests,
  RFC 6585) says that *this* client sent too many requests, which is not what a server-wide capacity limit means.
* 404 unknown session on DELETE / PATCH.
* 405 with `Allow: DELETE` on PATCH: trickle ICE and ICE restarts are optional in WHIP and we support neither, so
  PATCH is a method the session resource does not have (RFC 9110 §15.5.6). aiortc gathers all its candidates
  before it returns the answer, and WHIP clients put the candidates they have into the offer.

Per session: every received track is drained (`recv()` in a loop, audio too: an undrained aiortc track queues every
decoded frame forever, aiortc#554). The first video track feeds a `TimestampSampler`; only kept frames are converted
to RGB (in a worker thread, so a large frame never blocks the loop) and handed, on the loop thread, to the one
consumer `attach`ed to the session (`WhipSource`, which makes a session a `Source` like any pull stream). A session
ends, `wait_ended()` then returning its reason, after its last frame was handed over, when the client DELETEs it,
when the connection fails or the peer closes it, when its video track ends, when no video frame arrived for
`no_frame_timeout_s` (a peer that vanished without a word, or never connected), when the same participant publishes
again (the new session replaces the old), or at `close_all()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.sdp import SessionDescription

from streamguard.config import IceServerSettings
from streamguard.ingest import keyframe_gate
from streamguard.ingest.keyframe_gate import DecodeMode, KeyframeGate
from streamguard.ingest.sampler import TimestampSampler
from streamguard.types import SampledFrame

log = logging.getLogger(__name__)

SDP_CONTENT_TYPE = "application/sdp"
PARTICIPANT_ID_HEADER = "X-Participant-Id"
PARTICIPANT_NAME_HEADER = "X-Participant-Name"
PARTICIPANT_ID_PARAM = "participant_id"
PARTICIPANT_NAME_PARAM = "name"

REASON_DELETED = "deleted by client"
REASON_SHUTDOWN = "server shutdown"
REASON_ICE_FAILED = "ice failed"
REASON_CONNECTION_FAILED = "connection failed"  # ICE was fine, DTLS failed
REASON_PEER_CLOSED = "closed by peer"
REASON_TRACK_ENDED = "video track ended"
REASON_REPLACED = "replaced by a new session of the same participant"

# Meeting platforms use numeric ids, UUIDs, e-mail-like identities: allow those, nothing that needs escaping in
# a URL path, a log line or a header.
PARTICIPANT_ID_RE = re.compile(r"^[A-Za-z0-9_.:@+=~-]{1,128}$")
MAX_DISPLAY_NAME = 256
_SDP_LINE_RE = re.compile(r"^[a-z]=")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_RTPMAP_RE = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/")
_FMTP_RE = re.compile(r"^a=fmtp:(\d+) (.*)$")

PC_CLOSE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 5


class WhipError(Exception):
    """A request the WHIP endpoint refuses: `status` is the HTTP status, `as_dict()` the JSON body."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "status": self.status}


@dataclass(eq=False)
class WhipSession:
    """One published participant. Counters are for metrics and tests; `end_reason` is set once, when it ends."""

    id: str
    participant_id: str
    display_name: str | None
    stream_id: str
    answer_sdp: str
    etag: str
    video_codec: str | None
    created_at: float  # unix seconds
    pc: RTCPeerConnection = field(repr=False)
    video_frames: int = 0
    audio_frames: int = 0
    other_frames: int = 0  # extra video tracks beyond the first: drained, not sampled
    kept_frames: int = 0
    last_frame_at: float | None = None  # monotonic, last video frame decoded
    end_reason: str | None = None
    _started_at: float = field(default_factory=time.monotonic, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)
    _video_track: MediaStreamTrack | None = field(default=None, repr=False)
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _on_frame: Callable[[SampledFrame], None] | None = field(default=None, repr=False)
    _gate: KeyframeGate | None = field(default=None, repr=False)

    @property
    def decode_mode(self) -> DecodeMode:
        """keyframes: only the keyframes asked for each sample are decoded (`keyframe_gate`); all: every frame."""
        return self._gate.mode if self._gate is not None else "all"

    @property
    def last_received_at(self) -> float | None:
        """Monotonic time of the last video frame received, decoded or skipped by the keyframe gate."""
        if self._gate is None or self._gate.last_received is None:
            return self.last_frame_at
        return max(self._gate.last_received, self.last_frame_at or 0.0)

    @property
    def skipped_frames(self) -> int:
        """Video frames received and dropped undecoded."""
        return self._gate.skipped if self._gate is not None else 0

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def attach(self, on_frame: Callable[[SampledFrame], None]) -> None:
        """Hand this session's sampled frames to `on_frame` (on the loop thread), until it ends. Frames sampled
        before are dropped unconverted; none come before the answer reached the client, and that is after
        create_session returned."""
        self._on_frame = on_frame

    async def wait_ended(self) -> str:
        """Wait until the session is fully closed (pc closed, its tasks done: no frame follows)."""
        await self._done.wait()
        assert self.end_reason is not None
        return self.end_reason


class WhipManager:
    """Creates, tracks and ends WHIP sessions. Use from one event loop; every method runs on it.

    `ice_servers=None` means no STUN/TURN at all (host candidates only), not aiortc's default of Google's public STUN
    server: a server is normally reachable at its own address, and clients behind NAT are learnt as
    peer-reflexive candidates from their connectivity checks. Give STUN/TURN servers when the server itself sits
    behind NAT (aiortc uses the first STUN and the first TURN URL). `ice_transport_policy="relay"` gathers TURN
    relay candidates only: answers reveal no local address, and every session's media goes through the TURN
    server. A TURN server that does not answer delays each answer by aioice's 5 s timeout.
    """

    def __init__(
        self,
        *,
        fps: float,
        max_sessions: int,
        max_sdp_bytes: int,
        no_frame_timeout_s: float,
        ice_servers: Iterable[RTCIceServer] | None = None,
        ice_transport_policy: Literal["all", "relay"] = "all",
        phase_of: Callable[[str], float] | None = None,
        sender_max_fps: float | None = None,
        sender_max_height: int | None = None,
        keyframes_only: bool = False,
    ) -> None:
        if max_sessions < 1 or max_sdp_bytes < 1 or no_frame_timeout_s <= 0:
            raise ValueError("max_sessions, max_sdp_bytes and no_frame_timeout_s must be positive")
        TimestampSampler(fps)  # validate fps now rather than at the first session
        self.fps = fps
        self._phase_of = phase_of  # stream id -> sampling phase (TimestampSampler); None: phase 0
        self.max_sessions = max_sessions
        self.max_sdp_bytes = max_sdp_bytes
        self.no_frame_timeout_s = no_frame_timeout_s
        self.ice_servers: tuple[RTCIceServer, ...] = tuple(ice_servers or ())
        self._ice_policy = RTCIceTransportPolicy(ice_transport_policy)
        self.sender_max_fps = sender_max_fps  # codec hints in the answer (with_codec_hints)
        self.sender_max_height = sender_max_height
        self.keyframes_only = keyframes_only  # decode only the keyframes asked for each sample (keyframe_gate)
        self._sessions: dict[str, WhipSession] = {}
        self._pending = 0  # offers being negotiated: they count against max_sessions
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def sessions(self) -> Mapping[str, WhipSession]:
        """Live sessions by id (read-only view)."""
        return MappingProxyType(self._sessions)

    # -- requests ----------------------------------------------------------------------------------------------

    async def create_session(
        self,
        sdp_offer: str | bytes,
        content_type: str | None,
        participant_id: str | None = None,
        display_name: str | None = None,
    ) -> WhipSession:
        """Validate an offer, negotiate, and start a session; raises WhipError (nothing is left running then)."""
        sdp = validate_offer(sdp_offer, content_type, self.max_sdp_bytes)
        participant_id = _check_participant_id(participant_id)
        display_name = _check_display_name(display_name)
        if self._closed:
            raise WhipError(503, "shutting_down", "the server is shutting down", {"Retry-After": str(RETRY_AFTER_S)})
        previous = self._find_participant(participant_id) if participant_id else None
        if len(self._sessions) + self._pending - (previous is not None) >= self.max_sessions:
            raise WhipError(
                503,
                "too_many_sessions",
                f"{self.max_sessions} sessions are live; try again later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self._pending += 1
        try:
            session = await self._negotiate(sdp, participant_id or f"p-{secrets.token_hex(6)}", display_name)
        finally:
            self._pending -= 1
        if self._closed:  # close_all ran while we negotiated
            await self._discard(session)
            raise WhipError(503, "shutting_down", "the server is shutting down", {"Retry-After": str(RETRY_AFTER_S)})
        previous = self._find_participant(session.participant_id)
        self._sessions[session.id] = session
        self._spawn(session, self._watchdog(session))
        if previous is not None:
            self._end(previous, REASON_REPLACED)
        log.info(
            "whip session %s started: participant %s (%s), video %s",
            session.id,
            session.participant_id,
            session.display_name,
            session.video_codec,
        )
        return session

    async def delete(self, session_id: str) -> None:
        """End a session at the client's request (WHIP DELETE); 404 if it is unknown or already ended."""
        session = self._sessions.get(session_id)
        if session is None:
            raise WhipError(404, "unknown_session", f"no session {session_id!r}")
        await self.end(session, REASON_DELETED)

    async def patch(self, session_id: str) -> None:
        """WHIP PATCH (trickle ICE, ICE restart): not supported, so always an error (404 first, else 405)."""
        if session_id not in self._sessions:
            raise WhipError(404, "unknown_session", f"no session {session_id!r}")
        raise WhipError(
            405,
            "method_not_allowed",
            "trickle ICE and ICE restarts are not supported: put all candidates in the offer",
            {"Allow": "DELETE"},
        )

    async def end(self, session: WhipSession, reason: str) -> str:
        """End a session (idempotent: the first reason wins) and wait until it is fully closed; returns the reason."""
        self._end(session, reason)
        return await session.wait_ended()

    async def close_all(self) -> None:
        """End every session with "server shutdown" and refuse new ones from now on."""
        self._closed = True
        for session in list(self._sessions.values()):
            self._end(session, REASON_SHUTDOWN)
        while self._finishing:
            await asyncio.gather(*list(self._finishing), return_exceptions=True)

    # -- negotiation -------------------------------------------------------------------------------------------

    async def _negotiate(self, sdp: str, participant_id: str, display_name: str | None) -> WhipSession:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers), iceTransportPolicy=self._ice_policy))
        session_id = secrets.token_urlsafe(16)
        session = WhipSession(
            id=session_id,
            participant_id=participant_id,
            display_name=display_name,
            stream_id=f"whip:{session_id}",
            answer_sdp="",
            etag=f'"{secrets.token_urlsafe(12)}"',
            video_codec=None,
            created_at=time.time(),
            pc=pc,
        )
        # Both handlers must exist before setRemoteDescription, which emits "track".
        pc.on("track", lambda track: self._on_track(session, track))
        pc.on("connectionstatechange", lambda: self._on_connection_state(session))
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except Exception as exc:  # aiortc raises ValueError, KeyError, OperationError, ... on bad offers
                hint = "; supported video codecs: H264, VP8" if "video" in str(exc) else ""
                raise WhipError(400, "sdp_rejected", f"offer rejected: {exc or type(exc).__name__}{hint}") from exc
            # setLocalDescription gathers every local candidate before it returns, so the answer is complete.
            await pc.setLocalDescription(await pc.createAnswer())
            session.answer_sdp = with_codec_hints(pc.localDescription.sdp, self.sender_max_fps, self.sender_max_height)
            session.video_codec = _receiving_video_codec(session.answer_sdp)
            if session.video_codec is None:
                raise WhipError(400, "no_video", "the offer sends no video we can receive")
            if session.ended:
                raise WhipError(400, "connection_failed", f"connection {session.end_reason} during setup")
        except BaseException:
            await self._discard(session)
            raise
        return session

    async def _discard(self, session: WhipSession) -> None:
        """Tear down a session that was never handed out."""
        session.end_reason = session.end_reason or "not started"
        await self._stop(session)
        session._done.set()

    # -- per-session tasks -------------------------------------------------------------------------------------

    def _spawn(self, session: WhipSession, coro: Any) -> None:
        if session.ended:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        session._tasks.add(task)
        task.add_done_callback(session._tasks.discard)

    def _on_track(self, session: WhipSession, track: MediaStreamTrack) -> None:
        """A track of the offer (aiortc's "track" event, before the connection starts): the first video track is
        sampled, behind a keyframe gate when asked; every track is drained."""
        sampler = None
        if track.kind == "video" and session._video_track is None:
            session._video_track = track
            # no frame_duration_s: a live track without pts uses wall time
            phase = self._phase_of(session.stream_id) if self._phase_of else 0.0
            sampler = video_sampler = TimestampSampler(self.fps, phase=phase)
            receiver = next((t.receiver for t in session.pc.getTransceivers() if t.receiver.track is track), None)
            if self.keyframes_only and receiver is not None:
                session._gate = keyframe_gate.install(receiver, lambda: video_sampler.next_tick_s,
                                                      lambda coro: self._spawn(session, coro))
        self._spawn(session, self._drain(session, track, sampler))

    async def _drain(self, session: WhipSession, track: MediaStreamTrack, sampler: TimestampSampler | None) -> None:
        """Read every frame of a track until it ends; sample the first video track (`sampler` given)."""
        try:
            while True:
                frame = await track.recv()
                if track.kind == "audio":
                    session.audio_frames += 1
                    continue
                if sampler is None or not isinstance(frame, av.VideoFrame):  # (a decoded track has no packets)
                    session.other_frames += 1
                    continue
                session.video_frames += 1
                session.last_frame_at = time.monotonic()
                pts_s = float(frame.time) if frame.time is not None else None
                if not sampler.keep(pts_s) or session.ended or session._on_frame is None:
                    continue
                rgb = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                if session.ended:  # ended while converting: no frame is handed over after the end
                    return
                session.kept_frames += 1
                sampled = SampledFrame(session.stream_id, float(sampler.last_pts_s or 0.0), time.time(), rgb)
                try:
                    session._on_frame(sampled)
                except Exception:
                    log.exception("whip session %s: on_frame failed", session.id)
        except MediaStreamError:
            if track is session._video_track:
                self._end(session, REASON_TRACK_ENDED)

    async def _watchdog(self, session: WhipSession) -> None:
        """End the session when no video frame came for no_frame_timeout_s (counted from creation at first)."""
        timeout = self.no_frame_timeout_s
        while not session.ended:
            await asyncio.sleep(min(1.0, timeout / 4))
            last = session.last_received_at or session._started_at
            if time.monotonic() - last > timeout:
                self._end(session, f"no frames for {timeout:g} s")
                return

    def _on_connection_state(self, session: WhipSession) -> None:
        state = session.pc.connectionState
        if state == "failed":
            ice_failed = session.pc.iceConnectionState == "failed"
            self._end(session, REASON_ICE_FAILED if ice_failed else REASON_CONNECTION_FAILED)
        elif state == "closed":
            self._end(session, REASON_PEER_CLOSED)  # our own pc.close() gets here too, after end_reason is set

    # -- ending ------------------------------------------------------------------------------------------------

    def _end(self, session: WhipSession, reason: str) -> None:
        """Start ending a session; safe from any callback, including the session's own tasks."""
        if session.ended:
            return
        session.end_reason = reason
        if self._sessions.get(session.id) is not session:
            return  # still negotiating: create_session sees end_reason and discards it
        del self._sessions[session.id]
        # A separate task, so a session task that ends its own session is not cancelled half-way through this.
        task = asyncio.get_running_loop().create_task(self._finish(session))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, session: WhipSession) -> None:
        try:
            await self._stop(session)
            log.info("whip session %s ended: %s", session.id, session.end_reason)
        finally:
            session._done.set()

    async def _stop(self, session: WhipSession) -> None:
        tasks = [t for t in session._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(session.pc.close(), PC_CLOSE_TIMEOUT_S)
        except Exception:
            log.warning("whip session %s: closing the peer connection failed", session.id, exc_info=True)

    def _find_participant(self, participant_id: str) -> WhipSession | None:
        for session in self._sessions.values():
            if session.participant_id == participant_id:
                return session
        return None


# -- validation (pure functions, before aiortc sees anything) -----------------------------------------------------


def validate_offer(body: str | bytes, content_type: str | None, max_bytes: int) -> str:
    """The offer as text, or a WhipError saying why it cannot be one (415, 413, 400)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != SDP_CONTENT_TYPE:
        raise WhipError(415, "unsupported_media_type", f"Content-Type must be {SDP_CONTENT_TYPE}, got {content_type!r}")
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    if len(raw) > max_bytes:
        raise WhipError(413, "sdp_too_large", f"the offer is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WhipError(400, "malformed_sdp", f"the offer is not UTF-8 text: {exc}") from None
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0].strip() != "v=0":
        raise WhipError(400, "malformed_sdp", "an SDP offer starts with v=0")
    for number, line in enumerate(lines, 1):
        if not _SDP_LINE_RE.match(line):
            raise WhipError(400, "malformed_sdp", f"SDP line {number} is not <type>=<value>: {line[:40]!r}")
    videos = [line.split() for line in lines if line.startswith("m=video ")]
    if not videos:
        raise WhipError(400, "no_video", "the offer has no m=video section")
    # Port 0 declines a section (RFC 3264 §5.1); aiortc would still answer it, and no frame would ever come.
    if all(len(m) < 2 or m[1] == "0" for m in videos):
        raise WhipError(400, "no_video", "the offer declines its only video section (m=video 0)")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise WhipError(400, "malformed_sdp", "the offer has no DTLS fingerprint (a=fingerprint)")
    return "\r\n".join(lines) + "\r\n"


def rtc_ice_servers(servers: Iterable[IceServerSettings]) -> list[RTCIceServer]:
    """aiortc's form of the configured STUN/TURN servers (credentials revealed: aioice and clients need them)."""
    return [
        RTCIceServer(list(s.urls), s.username, s.credential.get_secret_value() if s.credential else None)
        for s in servers
    ]


def ice_server_links(servers: Iterable[RTCIceServer]) -> list[str]:
    """One RFC 9725 §4.6 `Link` header value per server URL; TURN URLs carry the username and password."""
    links = []
    for server in servers:
        for url in [server.urls] if isinstance(server.urls, str) else server.urls:
            link = f'<{url}>; rel="ice-server"'
            if url.startswith("turn") and server.username is not None and server.credential is not None:
                link += f"; username={_quote(server.username)}; credential={_quote(server.credential)}"
                link += '; credential-type="password"'
            links.append(link)
    return links


def _quote(value: str) -> str:
    """An RFC 9110 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def participant_from_request(headers: Mapping[str, str], query: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(participant id, display name) from a request's headers and query parameters; a header wins over the query."""
    lowered = {k.lower(): v for k, v in headers.items()}

    def pick(header: str, param: str) -> str | None:
        return lowered.get(header.lower()) or query.get(param) or None

    return (
        pick(PARTICIPANT_ID_HEADER, PARTICIPANT_ID_PARAM),
        pick(PARTICIPANT_NAME_HEADER, PARTICIPANT_NAME_PARAM),
    )


def _check_participant_id(participant_id: str | None) -> str | None:
    if participant_id is None or participant_id == "":
        return None
    if not PARTICIPANT_ID_RE.match(participant_id):
        raise WhipError(
            400, "invalid_participant_id", "participant id: 1-128 characters of A-Z a-z 0-9 and _ . : @ + = ~ -"
        )
    return participant_id


def _check_display_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()
    if len(name) > MAX_DISPLAY_NAME or _CONTROL_RE.search(name):
        raise WhipError(400, "invalid_name", f"display name: at most {MAX_DISPLAY_NAME} characters, no control codes")
    return name or None


def with_codec_hints(sdp: str, max_fps: float | None, max_height: int | None) -> str:
    """The answer with the receiver's codec limits a standard publisher may follow, in each video codec's fmtp:
    VP8 (RFC 7741) `max-fr` (frames a second) and `max-fs` (frame size in 16x16 macroblocks); H.264 (RFC 6184)
    `max-fs` and `max-mbps` (macroblocks a second). aiortc's own description is left as it is: these only describe
    what we ask to receive. What Chromium does with them is measured in the README (WHIP: what publishers should
    set)."""
    hints = _codec_hints(max_fps, max_height)
    if not hints:
        return sdp
    out: list[str] = []
    section: list[str] = []
    for line in [*sdp.split("\r\n"), "m=end"]:
        if line.startswith("m="):  # a media section starts: the one before is complete
            out += _hint_section(section, hints) if section and section[0].startswith("m=video") else section
            section = []
        section.append(line)
    return "\r\n".join(out)


def _codec_hints(max_fps: float | None, max_height: int | None) -> dict[str, dict[str, int]]:
    """fmtp parameters by lower-case codec name; a 16:9 frame `max_height` tall gives max-fs (720: 80x45 = 3600)."""
    hints: dict[str, dict[str, int]] = {}
    max_fs = math.ceil(max_height * 16 / 9 / 16) * math.ceil(max_height / 16) if max_height else None
    vp8 = {"max-fr": max(1, math.ceil(max_fps))} if max_fps else {}
    h264 = {}
    if max_fs:
        vp8["max-fs"] = h264["max-fs"] = max_fs
        if max_fps:
            h264["max-mbps"] = math.ceil(max_fs * max_fps)
    for name, params in (("vp8", vp8), ("h264", h264)):
        if params:
            hints[name] = params
    return hints


def _hint_section(lines: list[str], hints: dict[str, dict[str, int]]) -> list[str]:
    codecs = {m[1]: m[2].lower() for line in lines if (m := _RTPMAP_RE.match(line))}
    with_fmtp = {m[1] for line in lines if (m := _FMTP_RE.match(line))}
    out = []
    for line in lines:
        fmtp = _FMTP_RE.match(line)
        if fmtp and (extra := hints.get(codecs.get(fmtp[1], ""))):
            line += "".join(f";{k}={v}" for k, v in extra.items() if f"{k}=" not in fmtp[2])
        out.append(line)
        rtpmap = _RTPMAP_RE.match(line)
        if rtpmap and rtpmap[1] not in with_fmtp and (extra := hints.get(rtpmap[2].lower())):
            out.append(f"a=fmtp:{rtpmap[1]} " + ";".join(f"{k}={v}" for k, v in extra.items()))  # VP8: aiortc has none
    return out


def _receiving_video_codec(answer_sdp: str) -> str | None:
    """The codec of the first video section the answer receives on ("H264", "VP8"), None if there is none."""
    for media in SessionDescription.parse(answer_sdp).media:
        receiving = media.port != 0 and media.direction in ("recvonly", "sendrecv")
        if media.kind == "video" and receiving and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType.split("/", 1)[1]
    return None
