"""WHIP ingest and the bot client with real aiortc peers on this machine (media over UDP on 127.0.0.1).

ICE on one machine: aioice's `get_host_addresses` skips 127.0.0.1, so by default the peers would pair up over the
host's interface addresses, and a machine with only a loopback interface would have no candidate at all. The
`loopback_ice` fixture makes both peers gather 127.0.0.1 only: traffic cannot leave the machine, there are fewer
candidate pairs to check, and it works in a network-less sandbox.

The HTTP side is a minimal FastAPI app built here (the service's real app lives elsewhere) driven through httpx's
ASGI transport, with the mapping the real app should use: WhipError -> status, headers, JSON body. The real app is
used where its own behaviour is the point (the STUN/TURN Link headers).

TURN: a real coturn `turnserver` on 127.0.0.1 (Debian package coturn; the test skips without it) relays the media
of a session whose server side may only use relay candidates.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aioice.ice
import av
import httpx
import numpy as np
import pytest
from aioice import stun
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from serve_helpers import LiveServer, fast_settings

from streamguard.client import (
    EventAuthError,
    EventStreamError,
    WhipClientError,
    events,
    ice_servers_from_links,
    publish,
)
from streamguard.config import ConfigError, ServiceConfig, load_config
from streamguard.ingest.source import StateInfo, StreamState
from streamguard.ingest.webrtc import (
    REASON_DELETED,
    REASON_REPLACED,
    REASON_SHUTDOWN,
    WhipError,
    WhipManager,
    WhipSession,
    ice_server_links,
    participant_from_request,
    rtc_ice_servers,
    with_codec_hints,
)
from streamguard.ingest.whip_source import WhipSource
from streamguard.types import SampledFrame

pytestmark = pytest.mark.timeout(120)

BASE = "http://streamguard.test"
T = TypeVar("T")


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture(scope="module")
def face_video(shared_data: Path) -> Path:
    path = shared_data / "ffpp_smoke" / "real_519.mp4"
    if not path.is_file():
        pytest.skip(f"needs {path} (a real 640x480 face video)")
    return path


def run(coro: Awaitable[T], timeout: float = 90.0) -> T:
    async def main() -> T:
        result = await asyncio.wait_for(coro, timeout)
        # No leaks: whatever aiortc, the manager and the client started must be gone after their close().
        await asyncio.sleep(0.2)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not left, f"tasks left running: {left}"
        return result

    return asyncio.run(main())


class Recorder:
    """What each session's `WhipSource` (the adapter the service consumes sessions through) reported: its frames
    and its end."""

    def __init__(self) -> None:
        self.frames: list[SampledFrame] = []
        self.ended: list[tuple[WhipSession, str]] = []
        self.frame_after_end = False
        self._runs: dict[WhipSession, asyncio.Task[None]] = {}

    def watch(self, session: WhipSession, manager: WhipManager) -> None:
        def on_frame(frame: SampledFrame) -> None:
            assert frame.stream_id == session.stream_id
            if any(s is session for s, _ in self.ended):
                self.frame_after_end = True
            self.frames.append(frame)

        def on_state(state: StreamState, info: StateInfo) -> None:
            assert state is StreamState.CLOSED  # a session is live from the start; its end is the one change
            self.ended.append((session, info["reason"]))

        source = WhipSource(session, manager, on_frame=on_frame, on_state=on_state)
        assert source.state is StreamState.LIVE and source.id == session.stream_id
        self._runs[session] = asyncio.get_running_loop().create_task(source.run())

    async def ends(self) -> list[tuple[WhipSession, str]]:
        """(session, reason) of each session that ended, once its source has reported it (its run() returned)."""
        await asyncio.gather(*(run for session, run in self._runs.items() if session.ended))
        return self.ended

    async def wait_frames(self, n: int, timeout: float) -> None:
        await until(lambda: len(self.frames) >= n, timeout, f"{n} sampled frames")


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class WatchedManager(WhipManager):
    """The real manager; every session it hands out is consumed through a WhipSource that reports to `rec`."""

    def __init__(self, rec: Recorder, **opts: Any) -> None:
        super().__init__(**opts)
        self.rec = rec

    async def create_session(self, *args: Any, **kwargs: Any) -> WhipSession:
        session = await super().create_session(*args, **kwargs)
        self.rec.watch(session, self)
        return session


def make_manager(rec: Recorder, **kw: Any) -> WhipManager:
    opts: dict[str, Any] = dict(fps=2.0, max_sessions=4, max_sdp_bytes=16 * 1024, no_frame_timeout_s=5.0)
    opts.update(kw)
    return WatchedManager(rec, **opts)


def make_app(manager: WhipManager) -> FastAPI:
    """The WHIP routes, thin: everything that matters is in the manager."""
    app = FastAPI()

    @app.exception_handler(WhipError)
    async def whip_error(_: Request, exc: WhipError) -> JSONResponse:
        return JSONResponse(exc.as_dict(), status_code=exc.status, headers=exc.headers)

    def with_ice_links(response: Response) -> Response:
        for link in ice_server_links(manager.ice_servers):
            response.headers.append("Link", link)
        return response

    @app.options("/v1/whip")
    async def whip_options() -> Response:
        return with_ice_links(Response(status_code=204))

    @app.post("/v1/whip")
    async def whip_post(request: Request) -> Response:
        pid, name = participant_from_request(request.headers, request.query_params)
        session = await manager.create_session(await request.body(), request.headers.get("content-type"), pid, name)
        headers = {"Location": f"/v1/whip/{session.id}", "ETag": session.etag}
        answer = Response(session.answer_sdp, status_code=201, media_type="application/sdp", headers=headers)
        return with_ice_links(answer)

    @app.delete("/v1/whip/{session_id}")
    async def whip_delete(session_id: str) -> Response:
        await manager.delete(session_id)
        return Response(status_code=200)

    @app.patch("/v1/whip/{session_id}")
    async def whip_patch(session_id: str) -> Response:
        await manager.patch(session_id)
        return Response(status_code=204)

    return app


def http_client(manager: WhipManager) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(manager)), base_url=BASE)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def source_frames(path: Path, n: int) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        out = []
        for frame in container.decode(video=0):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                break
    return out


class FaceTrack(VideoStreamTrack):
    """Real face frames at 25 fps from a list of RGB images; `pause()` stops frames without closing anything."""

    def __init__(self, images: list[np.ndarray]) -> None:
        super().__init__()
        self.images = images
        self.index = 0
        self.paused = asyncio.Event()

    async def recv(self) -> av.VideoFrame:
        if self.paused.is_set():
            await asyncio.Future()  # a frozen camera: the sender waits for ever, the connection stays up
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self.images[self.index % len(self.images)], format="rgb24")
        self.index += 1
        frame.pts, frame.time_base = pts, time_base
        return frame


async def offer_sdp(video: bool = True, audio: bool = False) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        if video:
            pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
        if audio:
            pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


# -- publishing real media ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["H264", "VP8"])
def test_publish_face_video_sampled_frames_then_delete(loopback_ice, face_video, codec):
    reference = source_frames(face_video, 200)

    async def main():
        rec = Recorder()
        manager = make_manager(rec, fps=2.0)
        async with http_client(manager) as http:
            pub = await publish(
                f"{BASE}/v1/whip",
                str(face_video),
                participant_id="alice-1",
                display_name="Alice Zoë",  # non-ASCII: sent as the query parameter only
                codec=codec,
                audio=AudioStreamTrack(),
                http=http,
                max_fps=None,  # every frame: the pictures are compared with the source's, frame by frame
            )
            assert pub.connection_state == "connected" and pub.video_codec == codec
            (session,) = manager.sessions.values()
            assert session.participant_id == "alice-1" and session.display_name == "Alice Zoë"
            assert session.video_codec == codec and session.stream_id == f"whip:{session.id}"
            assert pub.session_id == session.id and pub.etag == session.etag

            # Generous timeouts: ~3 s on an idle machine, but the sender encodes in Python and CI may be busy.
            await rec.wait_frames(1, 20)
            await until(lambda: session.audio_frames > 0, 10, "audio frames")
            audio0 = session.audio_frames
            await rec.wait_frames(6, 30)
            assert session.audio_frames > audio0  # the audio track is drained (aiortc#554)
            assert session.video_frames > 8 * session.kept_frames  # 25 fps in, 2 fps kept

            for f in rec.frames:
                assert f.stream_id == session.stream_id
                assert f.rgb.shape == (480, 640, 3) and f.rgb.dtype == np.uint8
            pts = [f.pts_s for f in rec.frames]
            steps = np.diff(pts)
            assert np.all(steps > 0) and abs(float(np.median(steps)) - 0.5) < 0.05, pts
            assert abs((len(pts) - 1) - 2.0 * (pts[-1] - pts[0])) <= 1, pts  # fps=2 in media time
            # The right pictures in the right colour order: each sample matches the source frame at its time
            # (measured: 31-37 dB for that frame, ~26 dB for its neighbours, ~14 dB with red and blue swapped).
            for f in rec.frames:
                k = round(f.pts_s * 25)
                best = max(psnr(f.rgb, reference[j]) for j in (k - 1, k, k + 1) if 0 <= j < len(reference))
                assert best > 28, (f.pts_s, best)

            await pub.close()
            assert await session.wait_ended() == REASON_DELETED
            assert [(s.id, r) for s, r in await rec.ends()] == [(session.id, REASON_DELETED)]
            assert not manager.sessions and not rec.frame_after_end
            assert session.pc.connectionState == "closed"
            await manager.close_all()
            assert len(await rec.ends()) == 1  # exactly once

    run(main())


@pytest.mark.parametrize("codec", ["H264", "VP8"])
def test_publish_sends_at_most_max_fps_and_the_service_still_samples_1_fps(loopback_ice, face_video, codec):
    """The client's default (5 fps) from a 25 fps file: a fifth of the frames reach the server (and its decoder),
    the 1 FPS samples still come one a second, each close to its tick."""

    async def main():
        rec = Recorder()
        manager = make_manager(rec, fps=1.0)
        async with http_client(manager) as http:
            pub = await publish(f"{BASE}/v1/whip", str(face_video), participant_id="fay", codec=codec, http=http)
            (session,) = manager.sessions.values()
            await rec.wait_frames(2, 20)
            frames0, t0 = session.video_frames, time.monotonic()
            await rec.wait_frames(6, 20)
            rate = (session.video_frames - frames0) / (time.monotonic() - t0)
            await pub.close()
            await manager.close_all()
        assert 3.5 <= rate <= 5.5, rate  # 5 fps sent; a frame or two lost or late on a busy host
        pts = [f.pts_s for f in rec.frames]
        assert np.allclose(np.diff(pts), 1.0, atol=0.21), pts  # one a second, at most a 5 fps frame off its tick

    run(main())


def test_answer_codec_hints_in_fmtp():
    offer = asyncio.run(offer_sdp())  # aiortc's: VP8 without fmtp, two H.264 profiles with one each
    hinted = with_codec_hints(offer, 5.0, 720)
    lines = hinted.split("\r\n")
    fmtp = {line.split()[0].removeprefix("a=fmtp:"): line for line in lines if line.startswith("a=fmtp:")}
    rtpmap = {line.split()[0].removeprefix("a=rtpmap:"): line.split()[1] for line in lines if "a=rtpmap:" in line}
    for pt, codec in rtpmap.items():
        if codec.startswith("VP8"):
            assert fmtp[pt].endswith(f"a=fmtp:{pt} max-fr=5;max-fs=3600"), fmtp  # 1280x720 = 80x45 macroblocks
        elif codec.startswith("H264"):
            assert fmtp[pt].endswith(";max-fs=3600;max-mbps=18000") and "profile-level-id=" in fmtp[pt], fmtp
        else:
            assert "max-" not in fmtp.get(pt, ""), fmtp  # rtx: untouched
    assert len(lines) == len(offer.split("\r\n")) + 1 and hinted.endswith("\r\n")  # one fmtp added, for VP8
    assert with_codec_hints(hinted, 5.0, 720) == hinted  # hints already there are not repeated
    assert with_codec_hints(offer, None, None) == offer
    size_only = with_codec_hints(offer, None, 1080)  # 1920x1080: 120 x 68 macroblocks
    assert "max-mbps" not in size_only and "max-fr" not in size_only and "max-fs=8160" in size_only


def test_publish_refuses_a_bad_max_fps():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_fps"):
            asyncio.run(publish(f"{BASE}/v1/whip", VideoStreamTrack(), participant_id="x", max_fps=bad))


def test_peer_closed_without_delete_ends_session(loopback_ice, face_video):
    async def main():
        rec = Recorder()
        manager = make_manager(rec, no_frame_timeout_s=3.0)
        async with http_client(manager) as http:
            pub = await publish(f"{BASE}/v1/whip", str(face_video), participant_id="bob", codec="VP8", http=http)
            (session,) = manager.sessions.values()
            await rec.wait_frames(1, 10)
            t0 = time.monotonic()
            pub.closed = True  # the bot crashes: no DELETE (a live Publication DELETEs when its connection closes)
            await pub.pc.close()
            reason = await asyncio.wait_for(session.wait_ended(), 10)
            assert reason in ("closed by peer", "video track ended", "ice failed") or reason.startswith("no frames")
            assert time.monotonic() - t0 < 8
            await asyncio.sleep(0.3)
            assert [r for _, r in await rec.ends()] == [reason] and not manager.sessions and not rec.frame_after_end
            await pub.close()  # the bot restarts and cleans up: its DELETE gets 404, which is not an error
        await manager.close_all()

    run(main())


def test_silent_peer_ends_by_watchdog(loopback_ice, shared_data):
    import cv2

    paths = [shared_data / "real_faces" / f"img{i}.jpg" for i in (1, 2)]
    images = [cv2.cvtColor(cv2.resize(cv2.imread(str(p)), (320, 240)), cv2.COLOR_BGR2RGB) for p in paths]

    async def main():
        rec = Recorder()
        manager = make_manager(rec, no_frame_timeout_s=1.5)
        track = FaceTrack(images)
        async with http_client(manager) as http:
            pub = await publish(f"{BASE}/v1/whip", track, participant_id="carol", codec="H264", http=http)
            (session,) = manager.sessions.values()
            await rec.wait_frames(2, 10)
            assert rec.frames[-1].rgb.shape == (240, 320, 3)
            track.paused.set()  # camera freezes; ICE/DTLS stay up
            t0 = time.monotonic()
            reason = await asyncio.wait_for(session.wait_ended(), 10)
            assert reason == "no frames for 1.5 s"
            assert 1.0 < time.monotonic() - t0 < 6
            assert len(await rec.ends()) == 1 and not rec.frame_after_end
            await pub.close()  # its DELETE gets 404: already ended, not an error
            track.stop()
        await manager.close_all()

    run(main())


def test_peer_that_never_connects_ends_by_watchdog(loopback_ice):
    async def main():
        rec = Recorder()
        manager = make_manager(rec, no_frame_timeout_s=0.6)
        session = await manager.create_session(await offer_sdp(), "application/sdp", None, None)  # its pc is gone
        assert session.participant_id.startswith("p-") and session.display_name is None
        assert await asyncio.wait_for(session.wait_ended(), 3) == "no frames for 0.6 s"
        assert [(s.id, r) for s, r in await rec.ends()] == [(session.id, "no frames for 0.6 s")]
        assert not manager.sessions and session.pc.connectionState == "closed"
        await manager.close_all()

    run(main())


def test_same_participant_replaces_capacity_and_shutdown(loopback_ice, face_video):
    async def main():
        rec = Recorder()
        manager = make_manager(rec, max_sessions=1)
        async with http_client(manager) as http:
            first = await publish(f"{BASE}/v1/whip", str(face_video), participant_id="dave", codec="VP8", http=http)
            (old,) = manager.sessions.values()
            # The same participant again (a bot that restarted): allowed at capacity, the old session is replaced.
            second = await publish(f"{BASE}/v1/whip", str(face_video), participant_id="dave", codec="VP8", http=http)
            assert await asyncio.wait_for(old.wait_ended(), 5) == REASON_REPLACED
            (new,) = manager.sessions.values()
            assert new.id != old.id
            # Anyone else: 503 with Retry-After.
            r = await http.post(
                "/v1/whip",
                content=await offer_sdp(),
                headers={"Content-Type": "application/sdp"},
                params={"participant_id": "eve"},
            )
            assert r.status_code == 503 and r.json()["error"] == "too_many_sessions" and r.headers["retry-after"]
            with pytest.raises(WhipClientError) as info:
                await publish(f"{BASE}/v1/whip", VideoStreamTrack(), participant_id="eve", http=http)
            assert info.value.status == 503
            await manager.close_all()
            assert await new.wait_ended() == REASON_SHUTDOWN
            assert sorted(r for _, r in await rec.ends()) == sorted([REASON_REPLACED, REASON_SHUTDOWN])
            r = await http.post("/v1/whip", content=await offer_sdp(), headers={"Content-Type": "application/sdp"})
            assert r.status_code == 503 and r.json()["error"] == "shutting_down"
            for pub in (first, second):
                await pub.close()

    run(main())


# -- refusals ----------------------------------------------------------------------------------------------------


def test_refusals_are_4xx_with_json(loopback_ice):
    async def main():
        rec = Recorder()
        manager = make_manager(rec, max_sdp_bytes=8 * 1024)
        good = await offer_sdp(video=True, audio=True)
        sdp = {"Content-Type": "application/sdp"}
        frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
        no_common_codec = good.replace("H264/90000", "H265/90000").replace("VP8/90000", "AV1X/90000")
        no_fingerprint = "".join(line + "\r\n" for line in good.splitlines() if not line.startswith("a=fingerprint"))

        async def post(body: str | bytes, headers: dict[str, str] = sdp, **params: str) -> httpx.Response:
            return await http.post("/v1/whip", content=body, headers=headers, params=params)

        async with http_client(manager) as http:
            cases = [
                (await post("hello, I am not SDP"), 400, "malformed_sdp"),
                (await post(b"v=0\r\n\xff\xfe\r\n"), 400, "malformed_sdp"),
                (await post(await offer_sdp(video=False, audio=True)), 400, "no_video"),
                (await post(good, {"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
                (await post(good, {}), 415, "unsupported_media_type"),
                (await post(good + "a=x-pad:" + "x" * 8192 + "\r\n"), 413, "sdp_too_large"),
                (await post(good.replace("a=ice-ufrag", "a=x-ufrag")), 400, "sdp_rejected"),
                (await post(no_common_codec), 400, "sdp_rejected"),
                (await post(no_fingerprint), 400, "malformed_sdp"),
                (await post(good, participant_id="bad id/with space"), 400, "invalid_participant_id"),
                (await http.delete("/v1/whip/nope"), 404, "unknown_session"),
                (await http.patch("/v1/whip/nope", content="a=end", headers=frag), 404, "unknown_session"),
            ]
            for response, status, code in cases:
                assert response.status_code == status, (response.status_code, response.text, code)
                body = response.json()
                assert body["error"] == code and body["message"] and body["status"] == status

            # A good offer is accepted (charset parameter allowed), PATCH on it is 405, DELETE ends it.
            headers = {"Content-Type": "application/sdp; charset=utf-8", "X-Participant-Id": "h"}
            r = await post(good, headers, participant_id="q")
            assert r.status_code == 201 and r.headers["content-type"].startswith("application/sdp")
            assert r.text.startswith("v=0") and "a=candidate:" in r.text and "127.0.0.1" in r.text
            location = r.headers["location"]
            (session,) = manager.sessions.values()
            assert session.participant_id == "h"  # the header wins over the query parameter
            r = await http.patch(location, content="a=end-of-candidates", headers=frag)
            assert r.status_code == 405 and r.headers["allow"] == "DELETE"
            assert (await http.delete(location)).status_code == 200
            assert (await http.delete(location)).status_code == 404
            assert [r for _, r in await rec.ends()] == [REASON_DELETED]
        await manager.close_all()
        assert not rec.frames

    run(main())


# -- STUN/TURN ---------------------------------------------------------------------------------------------------

TURN_USER, TURN_PASSWORD = "sg-bot", 's3cr"et\\pw'  # a quote and a backslash: the Link header must escape them


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stun_answers(port: int) -> bool:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.sendto(bytes(request), ("127.0.0.1", port))
        try:
            return stun.parse_message(s.recv(2048)).transaction_id == request.transaction_id
        except (OSError, ValueError):
            return False


@pytest.fixture
def turn_port(tmp_path: Path) -> Iterator[int]:
    """coturn on 127.0.0.1 with one long-term-credential user; loopback peers allowed (both peers are local)."""
    exe = shutil.which("turnserver")
    if exe is None:
        pytest.skip("needs coturn's turnserver (apt-get install coturn, as tools/install_test_deps.sh does)")
    port = free_udp_port()
    log = tmp_path / "turnserver.log"
    args = [
        exe, "-n", "--no-cli", "--no-tls", "--no-dtls", "--no-rfc5780", "--no-software-attribute", "--fingerprint",
        "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}", "--allow-loopback-peers",
        "--lt-cred-mech", "--realm=streamguard.test", f"--user={TURN_USER}:{TURN_PASSWORD}",
        f"--db={tmp_path / 'turndb'}", f"--pidfile={tmp_path / 'turnserver.pid'}", f"--log-file={log}", "--simple-log",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not stun_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"turnserver did not come up (exit {proc.returncode}):\n{tail}")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("whip", "field", "message"),
    [
        ({"ice_servers": [{"urls": "http://turn.example"}]}, "whip.ice_servers.0.urls", "is not a stun:"),
        ({"ice_servers": [{"urls": ["stuns:stun.example"]}]}, "whip.ice_servers.0.urls", "is not a stun:"),
        ({"ice_servers": [{"urls": ["stun:s.example?transport=tcp"]}]}, "whip.ice_servers.0.urls", "is not a stun:"),
        ({"ice_servers": [{"urls": ["turns:t.example?transport=udp"], "username": "u", "credential": "hunter2"}]},
         "whip.ice_servers.0.urls", "is not a stun:"),
        ({"ice_servers": [{"urls": ["turn:t.example:70000"], "username": "u", "credential": "hunter2"}]},
         "whip.ice_servers.0.urls", "is not a stun:"),
        ({"ice_servers": [{"urls": []}]}, "whip.ice_servers.0.urls", "at least 1"),
        ({"ice_servers": [{"urls": ["turn:t.example"]}]}, "whip.ice_servers.0", "username, credential:"),
        ({"ice_servers": [{"urls": ["turn:t.example"], "credential": "hunter2"}]},
         "whip.ice_servers.0", "username, credential:"),
        ({"ice_servers": [{"urls": ["turn:t.example"], "username": "u", "credential": "hunter2\r\nX-Evil: 1"}]},
         "whip.ice_servers.0", "credential: printable ASCII"),
        ({"ice_servers": [{"urls": ["turn:t.example"], "username": "ü", "credential": "hunter2"}]},
         "whip.ice_servers.0.username", "printable ASCII"),
        ({"ice_servers": [{"urls": ["stun:s.example"]}], "ice_transport_policy": "relay"},
         "whip.ice_transport_policy", "needs a TURN server"),
        ({"ice_servers": [{"urls": ["stun:s.example"], "password": "hunter2"}]}, "whip.ice_servers.0.password", ""),
    ],
)
def test_ice_server_config_errors_name_the_field_and_not_the_secret(whip, field, message):
    with pytest.raises(ConfigError) as info:
        load_config(whip=whip)
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith(f"{field}: ") and message in line for line in lines), lines
    if "credential" in whip["ice_servers"][0]:
        assert "hunter2" not in str(info.value)


def test_ice_server_links_follow_rfc_9725_and_the_client_reads_them():
    cfg = ServiceConfig(whip={"ice_transport_policy": "relay", "ice_servers": [
        {"urls": "stun:stun.example.net"},
        {"urls": ["turn:turn.example.net?transport=udp", "turns:turn.example.net:443"], "username": TURN_USER,
         "credential": TURN_PASSWORD},
    ]})
    assert TURN_PASSWORD not in repr(cfg) and TURN_PASSWORD not in cfg.model_dump_json()
    servers = rtc_ice_servers(cfg.whip.ice_servers)
    links = ice_server_links(servers)
    assert links == [
        '<stun:stun.example.net>; rel="ice-server"',
        '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="sg-bot"; credential="s3cr\\"et\\\\pw"; '
        'credential-type="password"',
        '<turns:turn.example.net:443>; rel="ice-server"; username="sg-bot"; credential="s3cr\\"et\\\\pw"; '
        'credential-type="password"',
    ]
    # Back to the same servers, one per URL, whether the links come as separate headers or in one.
    expected = [
        RTCIceServer("stun:stun.example.net"),
        RTCIceServer("turn:turn.example.net?transport=udp", TURN_USER, TURN_PASSWORD),
        RTCIceServer("turns:turn.example.net:443", TURN_USER, TURN_PASSWORD),
    ]
    assert ice_servers_from_links(links) == expected
    assert ice_servers_from_links([", ".join(links)]) == expected
    # Other links are not ICE servers; token parameters, case and spacing vary in the wild.
    other = ['</v1/whip/x>; rel="urn:ietf:params:whip:ext:example"', "<stun:s.example>;REL=ice-server"]
    assert ice_servers_from_links(other) == [RTCIceServer("stun:s.example")]


@pytest.mark.timeout(90)
def test_real_app_advertises_ice_servers_on_201_and_options_only_when_configured(tmp_path, loopback_ice):
    turn = {"urls": ["turn:turn.example.net?transport=udp"], "username": TURN_USER, "credential": TURN_PASSWORD}
    auth = {"Authorization": "Bearer t0k"}

    async def whip_round(url: str, headers: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            options = await http.options("/v1/whip")
            offer = await offer_sdp()
            created = await http.post("/v1/whip", content=offer, headers={"Content-Type": "application/sdp"})
            assert created.status_code == 201, created.text
            assert (await http.delete(created.headers["location"])).status_code == 200
            return options, created

    with LiveServer(fast_settings(tmp_path / "a", token="t0k", whip={"ice_servers": [turn]})) as srv:
        options, created = asyncio.run(whip_round(srv.url, auth))
        want = ice_server_links(rtc_ice_servers(srv.config.whip.ice_servers))
        assert len(want) == 1 and want[0].startswith('<turn:turn.example.net?transport=udp>; rel="ice-server"')
        assert options.status_code == 204 and options.headers.get_list("link") == want
        assert created.headers.get_list("link") == want
        # ... and the service's own peer connections gather with them.
        assert [s.urls for s in srv.service.whip.ice_servers] == [["turn:turn.example.net?transport=udp"]]
        # The credentials stay behind the token, and a CORS preflight gets none (RFC 9725 §4.6).
        anonymous = httpx.options(f"{srv.url}/v1/whip")
        assert anonymous.status_code == 401 and "link" not in anonymous.headers
        preflight = httpx.options(f"{srv.url}/v1/whip", headers={**auth, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "link" not in preflight.headers

    with LiveServer(fast_settings(tmp_path / "b")) as srv:
        options, created = asyncio.run(whip_round(srv.url, {}))
        assert options.status_code == 204 and "link" not in options.headers and "link" not in created.headers


def test_publish_through_a_turn_relay(loopback_ice, turn_port):
    url = f"turn:127.0.0.1:{turn_port}?transport=udp"
    image = np.zeros((120, 160, 3), np.uint8)
    image[:, :, 0] = np.linspace(0, 255, 160, dtype=np.uint8)  # a gradient, so frames are not trivially empty

    async def main():
        rec = Recorder()
        # The server may only use relay candidates: media can reach it through coturn and nothing else.
        turn = RTCIceServer(url, TURN_USER, TURN_PASSWORD)
        manager = make_manager(rec, ice_servers=[turn], ice_transport_policy="relay")
        track = FaceTrack([image])
        async with http_client(manager) as http:
            # No ice_servers given: the client takes them from the endpoint's OPTIONS Link headers.
            pub = await publish(f"{BASE}/v1/whip", track, participant_id="tina", codec="VP8", http=http)
            assert pub.ice_servers == [turn]
            assert " typ relay " in pub.pc.localDescription.sdp  # the client allocated a relay on coturn too
            (session,) = manager.sessions.values()
            candidates = [line for line in session.answer_sdp.splitlines() if line.startswith("a=candidate:")]
            assert candidates and all(" typ relay " in c for c in candidates), candidates
            assert "127.0.0.1" in candidates[0]
            await rec.wait_frames(2, 10)
            assert rec.frames[-1].rgb.shape == (120, 160, 3)
            await pub.close()
            assert await session.wait_ended() == REASON_DELETED
            track.stop()
        await manager.close_all()

    run(main(), timeout=30)


# -- event feed client ---------------------------------------------------------------------------------------------


class FeedServer:
    """A real WebSocket server with the event feed's protocol: `since` query parameter, one JSON event per message.

    Each connection misbehaves in turn, the way the service (or the network) can: it closes with 4008 (slow
    consumer), drops the TCP connection (1006), closes with 1001 (going away), replays an overlap with events the
    client already has; pings without seq are mixed in.
    """

    def __init__(self, total: int, token: str = "t0k") -> None:
        self.total = total
        self.token = token
        self.connections: list[dict[str, Any]] = []

    def event(self, seq: int) -> dict[str, Any]:
        return {"seq": seq, "ts": 1000.0 + seq, "type": "participant.score", "stream_id": "s", "data": {}}

    async def handler(self, ws) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        since = int(query["since"][0]) if "since" in query else 0
        self.connections.append({"since": since, "auth": ws.request.headers.get("Authorization"), "query": query})
        if ws.request.headers.get("Authorization") != f"Bearer {self.token}":
            await ws.close(4401, "bad token")
            return
        n = len(self.connections)
        start = max(1, since - 2) if n == 4 else since + 1  # 4th connection: overlap of 2 already-seen events
        for i, seq in enumerate(range(start, self.total + 1)):
            await ws.send(json.dumps(self.event(seq)))
            if i == 1:
                await ws.send(json.dumps({"type": "ping", "ts": 0}))
            if i == 4:
                if n == 1:
                    await ws.close(4008, "slow consumer: resume with since")
                    return
                if n == 2:
                    await asyncio.sleep(0.2)  # let the events sent so far reach the client, then vanish
                    ws.transport.abort()  # no close frame: 1006
                    return
                if n == 3:
                    await ws.close(1001, "going away")
                    return
        await ws.wait_closed()  # then stay open, idle, until the client leaves


def test_events_resume_after_disconnects_without_gaps_or_repeats():
    from websockets.asyncio.server import serve

    async def main():
        server = FeedServer(total=30)
        async with serve(server.handler, "127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            got, reconnects = [], []
            stream = events(
                f"http://127.0.0.1:{port}",
                token="t0k",
                since=0,
                types=["participant.score", "alert.raised"],
                backoff_initial_s=0.01,
                on_reconnect=lambda attempt, delay, why: reconnects.append(why),
            )
            async for event in stream:
                got.append(event["seq"])
                if len(got) == 30:
                    break
            await stream.aclose()
            assert got == list(range(1, 31))
            assert [c["since"] for c in server.connections] == [0, 5, 10, 15]
            assert server.connections[0]["query"]["types"] == ["participant.score,alert.raised"]
            assert all(c["auth"] == "Bearer t0k" for c in server.connections)
            assert reconnects[0].startswith("closed 4008") and "1006" in reconnects[1] and "1001" in reconnects[2]

            with pytest.raises(EventAuthError) as info:
                async for _ in events(f"http://127.0.0.1:{port}", token="wrong"):
                    pass
            assert info.value.code == 4401

    run(main())


def test_events_handshake_refusals_and_giving_up():
    from http import HTTPStatus

    from websockets.asyncio.server import serve

    def reject(connection, request):
        status = HTTPStatus.FORBIDDEN if "forbidden" in request.path else HTTPStatus.NOT_FOUND
        return connection.respond(status, "no\n")

    async def never(ws) -> None:
        raise AssertionError("every handshake is refused")

    async def main():
        async with serve(never, "127.0.0.1", 0, process_request=reject) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            with pytest.raises(EventAuthError):
                async for _ in events(f"http://127.0.0.1:{port}/forbidden"):
                    pass
            with pytest.raises(EventStreamError) as info:
                async for _ in events(f"http://127.0.0.1:{port}"):
                    pass
            assert info.value.code == 404
        # Nobody listening: network errors are retried, then given up on when asked to.
        with pytest.raises(EventStreamError, match="gave up after 2"):
            async for _ in events(f"http://127.0.0.1:{port}", max_retries=2, backoff_initial_s=0.01):
                pass

    run(main())


def test_cors_lets_a_configured_origin_publish_over_whip_and_no_other(tmp_path, loopback_ice):
    origin = "https://meet.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}

    async def publish(url: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url) as http:
            created = await http.post("/v1/whip", content=await offer_sdp(), headers={
                "Content-Type": "application/sdp", "Authorization": "Bearer t0k", "Origin": origin})
            assert created.status_code == 201, created.text
            assert (await http.delete(created.headers["location"], headers={"Authorization": "Bearer t0k"})
                    ).status_code == 200
            return created

    with LiveServer(fast_settings(tmp_path / "a", token="t0k", cors_origins=[origin])) as srv:
        answer = httpx.options(f"{srv.url}/v1/whip", headers=preflight)  # a browser's preflight carries no token
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        created = asyncio.run(publish(srv.url))
        assert created.headers["access-control-allow-origin"] == origin
        exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
        assert {"location", "link", "etag"} <= exposed  # what a WHIP client must read across origins
        other = httpx.options(f"{srv.url}/v1/whip", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    with LiveServer(fast_settings(tmp_path / "b", token="t0k")) as srv:  # none configured: no cross-origin access
        answer = httpx.options(f"{srv.url}/v1/whip", headers=preflight)
        assert answer.status_code == 401 and "access-control-allow-origin" not in answer.headers


def test_real_app_whip_patch_and_delete_errors_are_json(tmp_path, loopback_ice):
    """The real app's PATCH goes through WhipManager.patch (404 for an unknown session, 405 for a live one), and the
    session path without an id is a JSON 404, not a 307 with an empty body."""
    auth = {"Authorization": "Bearer t0k"}
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}

    def json_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
        assert r.status_code == status, (r.status_code, r.headers, r.text)
        assert r.headers["content-type"].startswith("application/json"), r.headers
        body = r.json()
        assert set(body) == {"error", "message"} and body["error"] == code and body["message"], body
        return body

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=auth) as http:
            body = json_error(await http.patch("/v1/whip/nope", content="a=end-of-candidates", headers=frag),
                              404, "unknown_session")
            assert "nope" in body["message"]
            for method in ("DELETE", "PATCH"):
                r = await http.request(method, "/v1/whip/", content="a=end-of-candidates", headers=frag)
                assert "/v1/whip/<id>" in json_error(r, 404, "unknown_session")["message"]
            # Still behind the token, like every WHIP route.
            assert (await http.delete("/v1/whip/", headers={"Authorization": "Bearer wrong"})).status_code == 401

            offer = await offer_sdp()
            created = await http.post("/v1/whip", content=offer, headers={"Content-Type": "application/sdp"})
            assert created.status_code == 201, created.text
            location = created.headers["location"]
            r = await http.patch(location, content="a=end-of-candidates", headers=frag)
            json_error(r, 405, "method_not_allowed")
            assert r.headers["allow"] == "DELETE"
            assert (await http.delete(location)).status_code == 200
            json_error(await http.patch(location, content="a=end-of-candidates", headers=frag), 404, "unknown_session")
            json_error(await http.delete(location), 404, "unknown_session")

    with LiveServer(fast_settings(tmp_path, token="t0k")) as srv:
        run(main(srv.url))


CONSOLE_PANELS_JS = """
import { chromium } from "playwright-core";
const [url, chromiumPath] = process.argv.slice(1);
const browser = await chromium.launch({ executablePath: chromiumPath, headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"] });
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(url, { waitUntil: "load" });
  await page.waitForTimeout(500);
  const shown = (sel) => page.$eval(sel, (el) => ({ hidden: el.hidden, display: getComputedStyle(el).display,
                                                  height: el.getBoundingClientRect().height }));
  const onLoad = { camera: await shown("#camera"), more: await shown("#moreAlerts") };
  await page.$eval("#camera", (el) => { el.hidden = false; });  // what pressing Monitor does
  console.log(JSON.stringify({ onLoad, unhidden: await shown("#camera") }));
} finally {
  await browser.close();
}
"""


@pytest.mark.timeout(120)
def test_console_camera_panel_stays_hidden_until_monitor(tmp_path):
    """`#camera { display: flex }` beat the `hidden` attribute: the "Your camera: starting" panel showed on load,
    before anyone pressed Monitor. Checked in the real console page, in headless Chromium, served by the real app."""
    chromium = "/usr/bin/chromium"
    browser_dir = Path(__file__).resolve().parent / "browser"
    if not Path(chromium).is_file() or shutil.which("node") is None:
        pytest.skip("needs /usr/bin/chromium and node")
    if not (browser_dir / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs playwright-core: (cd tests/browser && npm ci)")
    with LiveServer(fast_settings(tmp_path)) as srv:
        out = subprocess.run(["node", "--input-type=module", "-e", CONSOLE_PANELS_JS, "--", srv.url + "/", chromium],
                             cwd=browser_dir, capture_output=True, text=True, timeout=90)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    result = json.loads(lines[-1])
    for name, panel in result["onLoad"].items():
        assert panel["hidden"] and panel["display"] == "none" and panel["height"] == 0, (name, result)
    unhidden = result["unhidden"]
    assert unhidden["display"] == "flex" and unhidden["height"] > 0, result
