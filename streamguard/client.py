"""A client for meeting bots: publish each participant's video over WHIP, and follow the event feed.

    pub = await publish("https://sg.example/v1/whip", "call.mp4", participant_id="alice", token=TOKEN)
    ...
    await pub.close()                                   # DELETE the WHIP session, close the peer connection

    async for event in events("https://sg.example", token=TOKEN, types=["alert.raised"]):
        ...                                             # reconnects by itself, resuming after the last seq

Publishing (RFC 9725 WHIP): the offer is POSTed with `Content-Type: application/sdp`, `Authorization: Bearer`, and
the participant's id and display name both as query parameters (`participant_id`, `name`) and as headers
(`X-Participant-Id`, `X-Participant-Name`). The server reads both and the header wins; sending both keeps the
values when a proxy strips one. A display name that is not printable ASCII is sent only as the (UTF-8,
percent-encoded) query parameter, since HTTP header values are ASCII.

Frame rate: the video is sent at most at `max_fps` (default `DEFAULT_MAX_FPS` = 5), frames dropped before the
encoder (`FrameRateCap`), so the bot encodes and the server decodes a sixth of a 30 fps source. Why 5: the service
samples 1 FPS by timestamp, taking the first frame at or after each tick; at 5 fps a sample is at most 200 ms off
its tick and a lost frame costs 200 ms, not the sample, while the encoder's and the server's decoder's work (aiortc
decodes every frame received) falls with the rate. `max_fps=None` sends every frame.

STUN/TURN: unless `ice_servers` is given, the publisher first asks the endpoint with OPTIONS and gathers with the
servers it advertises (RFC 9725 §4.6 `Link: <turn:...>; rel="ice-server"; username=...; credential=...`).
RFC 9725 prefers the Link headers of the 201, but those come after the offer, and aiortc can neither change its
ICE servers nor restart ICE once the offer is made: the OPTIONS pre-flight is the RFC's way for such clients.

Event feed: a WebSocket on `/v1/events`, one JSON event per message (`{"seq", "ts", "type", ...}`; messages without
`seq`, such as pings, are skipped). After any disconnect the client reconnects with back-off and `since=<last seq>`,
and drops any event with seq <= the last one it yielded, so an event is neither missed nor repeated. Auth
failures (HTTP 401/403 at the handshake, close codes 4401/4403) raise EventAuthError; a request the server cannot
serve (close code 1008: a bad `since` or an unknown type; HTTP 400/404 at the handshake) EventRequestError; other
refusals (4409: `since` beyond the server's last event) EventStreamError; none is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import av
import httpx
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription
from av.frame import Frame
from av.packet import Packet

from streamguard.file_track import LoopingFileTrack
from streamguard.ingest.sampler import TimestampSampler

log = logging.getLogger(__name__)

REASON_TRACK_ENDED = "video track ended"
PC_CLOSE_TIMEOUT_S = 5.0  # the longest close() waits for aiortc to close the peer connection

# Frames per second sent by default: well above the service's 1 FPS sampling, far below a camera's 30 (module doc).
DEFAULT_MAX_FPS = 5.0

Codec = Literal["H264", "VP8"]
_CODECS: dict[str, str] = {"h264": "video/H264", "vp8": "video/VP8"}
# RFC 8288 link-value: <target> then ; name[=token or quoted-string] parameters.
_LINK_RE = re.compile(r'<([^>]*)>((?:\s*;\s*[^\s;,=]+(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^\s;,"]*))?)*)')
_LINK_PARAM_RE = re.compile(r';\s*([^\s;,=]+)(?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;,"]*)))?')


class WhipClientError(Exception):
    """The WHIP endpoint refused the offer (or answered nonsense); `code`/`message` from its JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"WHIP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(eq=False)
class Publication:
    """A live WHIP session: the peer connection sending the participant's media and the session's URL."""

    location: str
    participant_id: str
    display_name: str | None
    answer_sdp: str
    etag: str | None
    video_codec: str | None
    pc: RTCPeerConnection = field(repr=False)
    _http: httpx.AsyncClient = field(repr=False)
    _owns_http: bool = field(repr=False)
    _auth: dict[str, str] = field(repr=False)
    ice_servers: list[RTCIceServer] = field(default_factory=list, repr=False)  # what ICE gathered with
    _owned_tracks: list[MediaStreamTrack] = field(default_factory=list, repr=False)
    closed: bool = False
    end_reason: str | None = None  # why it ended on its own (set once, before the session is DELETEd)
    deleted: bool = False  # our DELETE ended the session (a 2xx; 404: the server had ended it already)
    _ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _closing: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def session_id(self) -> str:
        return urlsplit(self.location).path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def connection_state(self) -> str:
        return self.pc.connectionState

    def watch(self, video: MediaStreamTrack) -> None:
        """End the session as soon as it cannot send any more: its video track ended (a file that cannot be read,
        a caller's track stopped) or its RTP sender died (aiortc stops the track when its sender task fails, e.g. on
        an encoder error), or the connection failed or closed. The session is then DELETEd at once, instead of
        reading "connected" until the server's no-frame timeout; `wait_ended()` says why."""
        video.on("ended", lambda: self._lost(REASON_TRACK_ENDED))

        def connection() -> None:
            if self.pc.connectionState in ("failed", "closed"):
                self._lost(f"WebRTC connection {self.pc.connectionState}")

        self.pc.on("connectionstatechange", connection)
        if video.readyState == "ended":  # it ended before anyone listened
            self._lost(REASON_TRACK_ENDED)
        connection()

    def _lost(self, reason: str) -> None:
        if self.closed or self.end_reason is not None:
            return  # our own close() stops the tracks and closes the connection: not an end of its own
        self.end_reason = reason
        log.warning("WHIP session %s of %s ended: %s; deleting it", self.session_id, self.participant_id, reason)
        self._ended.set()
        self._closing = asyncio.get_running_loop().create_task(self.close())

    async def wait_ended(self) -> str:
        """Wait until the session ended on its own (see `watch`); returns why. Not for a session you close()."""
        await self._ended.wait()
        assert self.end_reason is not None
        if self._closing is not None:
            await asyncio.shield(self._closing)  # the DELETE has been sent by the time this returns
        return self.end_reason

    async def close(self) -> None:
        """DELETE the session (best effort: a server that already ended it answers 404), then close everything."""
        if self.closed:
            return
        self.closed = True
        try:
            response = await self._http.delete(self.location, headers=self._auth)
            self.deleted = response.is_success
            if response.status_code >= 400 and response.status_code != 404:
                log.warning("WHIP DELETE %s: HTTP %s", self.location, response.status_code)
        except httpx.HTTPError as exc:
            log.warning("WHIP DELETE %s failed: %s", self.location, exc)
        finally:
            try:  # bounded, as the server bounds its own: a close that never returns must not keep a bot from exiting
                await asyncio.wait_for(self.pc.close(), PC_CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("WHIP session %s: closing the peer connection took over %g s; leaving it",
                            self.session_id, PC_CLOSE_TIMEOUT_S)
            for track in self._owned_tracks:  # the player's tracks; a caller's track stays the caller's
                track.stop()
            if self._owns_http:
                await self._http.aclose()

    async def __aenter__(self) -> Publication:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def publish(
    whip_url: str,
    source: str | MediaStreamTrack,
    *,
    participant_id: str,
    display_name: str | None = None,
    token: str | None = None,
    codec: Codec | None = None,
    audio: bool | MediaStreamTrack = True,
    loop: bool | None = None,
    player_format: str | None = None,
    player_options: dict[str, str] | None = None,
    ice_servers: Iterable[RTCIceServer] | None = None,
    connect_timeout_s: float | None = 10.0,
    http: httpx.AsyncClient | None = None,
    max_fps: float | None = DEFAULT_MAX_FPS,
) -> Publication:
    """Publish a video source as one participant over WHIP; returns once the connection is up.

    source: a file path or URL, or a video MediaStreamTrack (left running on close: it is the caller's). A local
    file loops by default (`loop`) in a `LoopingFileTrack` (video only); URLs and `loop=False` use MediaPlayer.
    audio: True sends the player's audio when it has some, False sends none, a track sends that track.
    codec: force "H264" or "VP8" (setCodecPreferences); None lets the server pick from aiortc's default order.
    ice_servers: None asks the endpoint (OPTIONS) for its STUN/TURN servers; [] means host candidates only.
    connect_timeout_s: wait this long for ICE+DTLS to connect (None: return right after the answer is applied).
    http: an httpx client to use (its timeouts, TLS and proxies); by default one is made and owned.
    max_fps: send at most this many frames a second (see the module doc); None: every frame of the source.
    """
    if max_fps is not None and not (math.isfinite(max_fps) and max_fps > 0):
        raise ValueError(f"max_fps must be a positive number or None, got {max_fps!r}")
    mime = None
    if codec is not None:
        mime = _CODECS.get(str(codec).lower())
        if mime is None:
            raise ValueError(f"codec must be H264 or VP8, got {codec!r}")
    video, audio_track, owned = _tracks(source, audio, loop, player_format, player_options)
    if max_fps is not None:
        video = FrameRateCap(video, max_fps)
        owned.append(video)  # stopping it leaves the source running: a caller's track stays the caller's
    client = http if http is not None else httpx.AsyncClient(timeout=15.0, follow_redirects=True)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    pc: RTCPeerConnection | None = None
    location: str | None = None
    try:
        if ice_servers is None:
            ice_servers = await _advertised_ice_servers(client, whip_url, auth)
        servers = list(ice_servers)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        offer = await _offer(pc, video, audio_track, mime)
        response = await _post_offer(client, whip_url, offer, participant_id, display_name, auth)
        if response.status_code != 201:
            raise _error_from(response)
        if not response.headers.get("Location"):
            raise WhipClientError(response.status_code, "no_location", "the 201 response has no Location header")
        location = str(response.url.join(response.headers["Location"]))
        if not servers and ice_servers_from_links(response.headers.get_list("Link")):
            log.info("WHIP endpoint advertises STUN/TURN servers on its 201 only: too late for aiortc to use them")
        answer = response.text
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        publication = Publication(
            location=location,
            participant_id=participant_id,
            display_name=display_name,
            answer_sdp=answer,
            etag=response.headers.get("ETag"),
            video_codec=_sending_video_codec(answer),
            pc=pc,
            _http=client,
            _owns_http=http is None,
            _auth=auth,
            ice_servers=servers,
            _owned_tracks=owned,
        )
        if connect_timeout_s is not None:
            await _wait_connected(pc, connect_timeout_s)
        publication.watch(video)  # from here on, its end is the publication's to handle (before: the except below)
        return publication
    except BaseException:
        if location is not None:  # the server has a session: end it rather than leave it to its watchdog
            with contextlib.suppress(Exception):
                await client.delete(location, headers=auth)
        if pc is not None:
            await pc.close()
        _stop_all(owned)
        if http is None:
            await client.aclose()
        raise


def _tracks(source: str | MediaStreamTrack, audio: bool | MediaStreamTrack, loop: bool | None,
            player_format: str | None, player_options: dict[str, str] | None,
            ) -> tuple[MediaStreamTrack, MediaStreamTrack | None, list[MediaStreamTrack]]:
    """(video, audio or None, the tracks we opened and must stop) for `publish`'s source and audio arguments."""
    if isinstance(source, MediaStreamTrack):
        if source.kind != "video":
            raise ValueError(f"source must be a video track, got a {source.kind} track")
        return source, audio if isinstance(audio, MediaStreamTrack) else None, []
    if loop is None:
        loop = "://" not in source or source.startswith("file://")
    if loop and player_format is None:
        # MediaPlayer(loop=True) ends its tracks at the end of the file (aiortc 1.16, PyAV 18): our own track loops.
        track = LoopingFileTrack(source.removeprefix("file://"))
        return track, audio if isinstance(audio, MediaStreamTrack) else None, [track]
    player = MediaPlayer(source, format=player_format, options=player_options, loop=loop)
    owned = [t for t in (player.video, player.audio) if t is not None]
    if player.video is None:
        _stop_all(owned)
        raise ValueError(f"{source}: no video stream")
    audio_track = audio if isinstance(audio, MediaStreamTrack) else (player.audio if audio else None)
    return player.video, audio_track, owned


class FrameRateCap(MediaStreamTrack):
    """`source`'s frames, at most `max_fps` a second by presentation time: the others are dropped before they
    reach the encoder. The same rule as the service's sampler (`TimestampSampler`): the first frame at or after each
    tick of 1/max_fps, so a 30 fps source at 5 sends every 6th frame with its own timestamp; frames without one
    are timed by the wall clock. It ends when the source ends."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, max_fps: float) -> None:
        super().__init__()
        self.source = source
        self.max_fps = max_fps
        self.dropped = 0
        self._sampler = TimestampSampler(max_fps)
        source.on("ended", self.stop)

    async def recv(self) -> Frame | Packet:
        while True:
            frame = await self.source.recv()
            t = frame.time if isinstance(frame, av.VideoFrame) else None  # a Packet (pre-encoded): wall clock
            if self._sampler.keep(t):
                return frame
            self.dropped += 1


async def _offer(pc: RTCPeerConnection, video: MediaStreamTrack, audio: MediaStreamTrack | None,
                 mime: str | None) -> str:
    transceiver = pc.addTransceiver(video, direction="sendonly")
    if mime is not None:
        caps = RTCRtpSender.getCapabilities("video").codecs
        # Keep RTX so NACKed packets can still be retransmitted.
        transceiver.setCodecPreferences([c for c in caps if c.mimeType in (mime, "video/rtx")])
    if audio is not None:
        pc.addTransceiver(audio, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate: no trickle needed
    return str(pc.localDescription.sdp)


async def _post_offer(client: httpx.AsyncClient, whip_url: str, offer: str, participant_id: str,
                      display_name: str | None, auth: dict[str, str]) -> httpx.Response:
    """POST the offer with the participant in headers and query (proxies may strip either; non-ASCII names go in
    the query only, since header values are ASCII)."""
    headers = {"Content-Type": "application/sdp", "Accept": "application/sdp", **auth}
    params = {"participant_id": participant_id}
    headers["X-Participant-Id"] = participant_id
    if display_name is not None:
        params["name"] = display_name
        if display_name.isascii() and display_name.isprintable():
            headers["X-Participant-Name"] = display_name
    url = httpx.URL(whip_url).copy_merge_params(params)  # keeps any query the WHIP URL already has
    return await client.post(url, content=offer.encode(), headers=headers)


def ice_servers_from_links(values: Iterable[str]) -> list[RTCIceServer]:
    """The STUN/TURN servers in `Link` header values (RFC 9725 §4.6): the links with rel="ice-server"."""
    servers = []
    for value in values:
        for link in _LINK_RE.finditer(value):
            params = _link_params(link[2])
            if "ice-server" in params.get("rel", "").split():
                servers.append(RTCIceServer(
                    link[1], params.get("username"), params.get("credential"), params.get("credential-type", "password")
                ))
    return servers


def _link_params(text: str) -> dict[str, str]:
    """A link-value's parameters, names lower-cased, quoted-strings unescaped; the first of a repeated name wins."""
    params: dict[str, str] = {}
    for param in _LINK_PARAM_RE.finditer(text):
        value = re.sub(r"\\(.)", r"\1", param[2]) if param[2] is not None else param[3] or ""
        params.setdefault(param[1].lower(), value)
    return params


async def _advertised_ice_servers(client: httpx.AsyncClient, whip_url: str, auth: dict[str, str]) -> list[RTCIceServer]:
    """What the endpoint answers OPTIONS with; [] when it does not answer with a 2xx (the POST says why, if at all)."""
    response = await client.options(whip_url, headers=auth)
    if not response.is_success:
        log.debug("WHIP OPTIONS %s: HTTP %s, gathering without STUN/TURN", whip_url, response.status_code)
        return []
    servers = ice_servers_from_links(response.headers.get_list("Link"))
    log.debug("WHIP OPTIONS %s: ICE servers %s", whip_url, [s.urls for s in servers])
    return servers


async def _wait_connected(pc: RTCPeerConnection, timeout_s: float) -> None:
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def changed() -> None:
        if pc.connectionState in ("connected", "failed", "closed") and not done.done():
            done.set_result(pc.connectionState)

    pc.on("connectionstatechange", changed)
    changed()
    try:
        state = await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        raise ConnectionError(f"WebRTC connection not up after {timeout_s:g} s ({pc.connectionState})") from None
    finally:
        pc.remove_listener("connectionstatechange", changed)
    if state != "connected":
        raise ConnectionError(f"WebRTC connection {state}")


def _error_from(response: httpx.Response) -> WhipClientError:
    code, message = "http_error", response.text[:200]
    with contextlib.suppress(ValueError, AttributeError):
        body = response.json()
        code, message = str(body.get("error", code)), str(body.get("message", message))
    return WhipClientError(response.status_code, code, message)


def _sending_video_codec(answer_sdp: str) -> str | None:
    with contextlib.suppress(Exception):
        for media in SessionDescription.parse(answer_sdp).media:
            if media.kind == "video" and media.rtp.codecs:
                return media.rtp.codecs[0].mimeType.split("/", 1)[1]
    return None


def _stop_all(tracks: Iterable[MediaStreamTrack]) -> None:
    for track in tracks:
        track.stop()


# -- event feed ---------------------------------------------------------------------------------------------------


class EventStreamError(Exception):
    """The event feed refused us for a reason retrying cannot fix (bad filter, cursor ahead, gave up, ...)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # WebSocket close code or HTTP status, when there is one


class EventAuthError(EventStreamError):
    """Missing or wrong token (HTTP 401/403 at the handshake, close code 4401/4403)."""


class EventRequestError(EventStreamError):
    """The server cannot serve the request as sent (close code 1008, e.g. an unknown event type; HTTP 400/404 at the
    handshake): a bug on our side or a server that differs from what we expect, not a credentials problem."""


AUTH_CLOSE_CODES = frozenset({4401, 4403})
BAD_REQUEST_CLOSE_CODES = frozenset({1003, 1007, 1008, 1009, 1010})
# Worth a reconnect: normal closes (server restarting), going away, abnormal (network), server errors and
# restarts (1011-1014), and 4008 (we were too slow: resume from our last seq). Everything else in 1002-1010 and
# 4000-4999 says our request was wrong, and sending it again would be refused again.
RETRY_CLOSE_CODES = frozenset({1000, 1001, 1005, 1006, 1011, 1012, 1013, 1014, 4008})


async def events(
    base_url: str,
    *,
    token: str | None = None,
    since: int | None = None,
    stream_id: str | None = None,
    participant_id: str | None = None,
    types: Sequence[str] | None = None,
    backoff_initial_s: float = 0.5,
    backoff_max_s: float = 30.0,
    max_retries: int | None = None,
    open_timeout_s: float = 10.0,
    on_reconnect: Callable[[int, float, str], None] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield every event (a dict) from the service's feed, for ever, resuming after disconnects.

    since: resume after this seq (None: the server's default, live events only; 0: everything it stores). Events
    that happen while the *first* connection is being made are only replayed when since is given.
    types: event types to receive, sent as one comma-separated `types` query parameter.
    max_retries: consecutive failed reconnects before EventStreamError (None: never give up); a connection that
    delivers an event resets the count.
    on_reconnect(attempt, delay_s, why): called before each back-off sleep (logging, metrics, tests).
    The token goes in the Authorization header, never the URL (URLs end up in access logs).
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ValueError(f"since must be a seq, an integer >= 0 (0: every stored event), got {since!r}")
    url = _events_url(base_url)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    filters = {k: v for k, v in (("stream_id", stream_id), ("participant_id", participant_id),
                                 ("types", ",".join(types) if types else None)) if v is not None}
    last = since
    attempt = 0
    while True:
        params = dict(filters)
        if last is not None:
            params["since"] = str(last)
        target = str(httpx.URL(url).copy_merge_params(params))
        try:
            async with connect(target, additional_headers=headers, open_timeout=open_timeout_s) as ws:
                async for message in ws:  # ends on a normal close (1000/1001), raises on any other
                    event = _parse(message)
                    if event is None:
                        continue
                    seq = event["seq"]
                    if last is not None and seq <= last:
                        continue  # a replay overlapping what we already have
                    last = seq
                    attempt = 0
                    yield event
                code, reason = ws.close_code or 1005, ws.close_reason or ""
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (1006, "connection lost")
        except InvalidStatus as exc:
            code, reason = _refused_handshake(exc.response.status_code)
        except InvalidURI:
            raise
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            code, reason = 0, f"{type(exc).__name__}: {exc}"
        _raise_if_final(code, reason)
        why = f"closed {code} {reason}".strip() if code else reason
        attempt += 1
        if max_retries is not None and attempt > max_retries:
            raise EventStreamError(f"event feed: gave up after {max_retries} reconnects ({why})", code or None)
        # Full jitter on an exponential back-off: many bots dropped at once by a restart do not return in step.
        delay = random.uniform(0.5, 1.0) * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))
        log.info("event feed: %s; reconnecting in %.1f s with since=%s", why, delay, last)
        if on_reconnect is not None:
            on_reconnect(attempt, delay, why)
        await asyncio.sleep(delay)


def _refused_handshake(status: int) -> tuple[int, str]:
    """A handshake refused with HTTP `status`: raises when asking again cannot help, else (0, why) to retry."""
    if status in (401, 403):
        # StreamGuard itself refuses a token after the handshake (4401); these come from a proxy, or from a server
        # that refuses bad queries before the handshake (Starlette's 403).
        raise EventAuthError(f"event feed: HTTP {status} at the handshake (token missing or wrong, or the request "
                             "refused before the WebSocket opened)", status) from None
    if 400 <= status < 500 and status not in (408, 429):
        raise EventRequestError(f"event feed: HTTP {status} at the handshake", status) from None
    return 0, f"HTTP {status}"


def _raise_if_final(code: int, reason: str) -> None:
    """Close codes that a reconnect would only meet again raise; the others (and 0: no close frame) return."""
    if code in AUTH_CLOSE_CODES:
        raise EventAuthError(f"event feed closed {code}: {reason}", code)
    if code in BAD_REQUEST_CLOSE_CODES:
        raise EventRequestError(f"event feed refused the request (close {code}): {reason}", code)
    if code and code not in RETRY_CLOSE_CODES:
        raise EventStreamError(f"event feed closed {code}: {reason}", code)


def _events_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"base_url must be http(s):// or ws(s)://, got {base_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/events"):
        path += "/v1/events"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _parse(message: str | bytes) -> dict[str, Any] | None:
    """An event dict, or None for messages that are not events (pings, garbage)."""
    try:
        event = json.loads(message)
    except ValueError:
        log.warning("event feed: a message that is not JSON was skipped")
        return None
    if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
        return None
    return event
