"""Live pull sources against real servers: GStreamer's RTSP server (a subprocess), http.server, bare TCP sockets.

Timeouts are small (watchdog 2 s, backoff 0.2-1 s) so the whole file runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamguard.config import SourceSettings
from streamguard.ingest.pull import PullSource, backoff_delay, redact_url
from streamguard.ingest.source import StreamState
from streamguard.types import SampledFrame

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"
SIZE = (320, 240)
FPS = 25  # of the test video; sources are sampled at 1 FPS

S = StreamState


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def faces_mp4(media, tmp_path_factory) -> Path:
    """8 s of H.264 at 25 fps (keyframe every 2 s) made from 4 real face photos."""
    photos = sorted((SHARED / "real_faces").glob("img*.jpg"))[:4]
    if len(photos) < 4:
        pytest.skip(f"needs real face photos in {SHARED / 'real_faces'} (../shared is absent in a user's clone)")
    out = tmp_path_factory.mktemp("pull") / "faces.mp4"
    return media.make_slideshow(photos, out, fps=FPS, seconds_per_image=2.0, size=SIZE, gop=2 * FPS)


@pytest.fixture(scope="session")
def gst_ok() -> None:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        ok = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip(f"{SYSTEM_PYTHON} cannot import gi/GstRtspServer (apt: python3-gi gir1.2-gst-rtsp-server-1.0)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """tools/rtsp_server.py in a subprocess, serving the video at /face; can be killed, paused and restarted."""

    def __init__(self, video: Path, port: int) -> None:
        self.video = video
        self.port = port
        self.url = f"rtsp://127.0.0.1:{port}/face"
        self.proc: subprocess.Popen[str] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="rtsp-server-", suffix=".log", delete=False)  # noqa: SIM115

    def __repr__(self) -> str:
        """Shown with the test's locals when one fails: whether the server still runs, and the end of its stderr."""
        state = "not started" if self.proc is None else f"pid {self.proc.pid}, exit {self.proc.poll()}"
        tail = Path(self.log.name).read_text(errors="replace")[-1500:]
        return f"RtspServer({self.url}, {state}, stderr tail: {tail!r})"

    def start(self, timeout_s: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_server.py"), "--port", str(self.port), f"face={self.video}"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not ready or not ready[0].startswith("READY"):
            self.kill()
            raise RuntimeError(f"RTSP server on port {self.port} did not start: {ready}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a SIGSTOPped process too
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def remove_log(self) -> None:
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


@pytest.fixture
def rtsp(gst_ok, faces_mp4) -> Iterator[Callable[[], RtspServer]]:
    """Starts RTSP servers on free ports; every one of them is killed at teardown."""
    servers: list[RtspServer] = []

    def start() -> RtspServer:
        server = RtspServer(faces_mp4, free_port())
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        print(repr(server))  # shown with a failing test: did the server die, and what did it say
        server.kill()
        server.remove_log()


@pytest.fixture(scope="session")
def camera_mp4(media, tmp_path_factory) -> Path:
    """8 s at 25 fps as IP cameras send it: a keyframe every second, no B-frames (synthetic pictures will do)."""
    out = tmp_path_factory.mktemp("pull") / "camera.mp4"
    images = media.synthetic_images(4, SIZE)
    return media.make_slideshow(images, out, fps=FPS, seconds_per_image=2.0, size=SIZE, gop=FPS, options={"bf": "0"})


@pytest.fixture
def http_dir(tmp_path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server (http.server in a thread) over a temporary folder: (base URL, folder)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


# --- a recording consumer ------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Collects what a PullSource emits, with arrival times, and checks it came on the loop thread."""

    loop_thread: int = field(default_factory=threading.get_ident)
    t0: float = field(default_factory=time.monotonic)
    states: list[tuple[float, StreamState, dict[str, Any]]] = field(default_factory=list)
    frames: list[tuple[float, SampledFrame]] = field(default_factory=list)
    wrong_thread: int = 0

    def on_state(self, state: StreamState, info: dict[str, Any]) -> None:
        self.wrong_thread += threading.get_ident() != self.loop_thread
        self.states.append((time.monotonic() - self.t0, state, dict(info)))

    def on_frame(self, frame: SampledFrame) -> None:
        self.wrong_thread += threading.get_ident() != self.loop_thread
        self.frames.append((time.monotonic() - self.t0, frame))

    @property
    def names(self) -> list[StreamState]:
        return [s for _, s, _ in self.states]

    def last(self, state: StreamState) -> dict[str, Any]:
        return [info for _, s, info in self.states if s is state][-1]

    def since(self, state: StreamState, nth: int = 1) -> list[SampledFrame]:
        """Frames that arrived after the nth time `state` was entered."""
        t = [t for t, s, _ in self.states if s is state][nth - 1]
        return [f for ft, f in self.frames if ft >= t]

    async def until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; states: {self.states}")
            await asyncio.sleep(0.02)

    def count(self, state: StreamState) -> int:
        return self.names.count(state)


def settings(**overrides: Any) -> SourceSettings:
    base: dict[str, Any] = dict(
        connect_timeout_s=3.0,
        read_timeout_s=3.0,
        watchdog_s=2.0,
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
        max_attempts=0,
    )
    return SourceSettings(**{**base, **overrides})


def start(url: str, rec: Recorder, stream_id: str = "cam", **kwargs: Any) -> tuple[PullSource, asyncio.Task[None]]:
    source = PullSource(
        stream_id,
        url,
        settings=kwargs.pop("settings", None) or settings(),
        fps=kwargs.pop("fps", 1.0),
        on_frame=rec.on_frame,
        on_state=rec.on_state,
        **kwargs,
    )
    return source, asyncio.create_task(source.run())


# --- pure parts ----------------------------------------------------------------------------------------------------


def test_backoff_equal_jitter_grows_within_bounds():
    rng = random.Random(7)
    for _ in range(200):
        delays = [backoff_delay(n, 0.5, 8.0, rng) for n in range(1, 9)]
        bases = [min(8.0, 0.5 * 2 ** (n - 1)) for n in range(1, 9)]
        assert all(b / 2 <= d <= b for d, b in zip(delays, bases, strict=True))
        assert delays[:5] == sorted(delays[:5])  # non-decreasing until the cap (8 s) is reached


def test_redact_url():
    assert redact_url("rtsp://admin:hunter2@10.0.0.5:554/ch1") == "rtsp://admin:***@10.0.0.5:554/ch1"
    assert redact_url("rtsp://10.0.0.5/ch1") == "rtsp://10.0.0.5/ch1"


# --- RTSP ----------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rtsp_goes_live_and_samples_one_frame_per_second(rtsp, media):
    server = rtsp()
    rec = Recorder()
    source, task = start(server.url, rec)
    await rec.until(lambda: S.LIVE in rec.names, 10, "live")
    await asyncio.sleep(4.2)
    t_close = time.monotonic()
    await source.close()
    assert time.monotonic() - t_close < 1.0  # packets flow every 40 ms: the decode thread stops at once
    await asyncio.wait_for(task, 2)

    assert rec.names == [S.CONNECTING, S.LIVE, S.CLOSED]
    frames = rec.since(S.LIVE)
    assert 4 <= len(frames) <= 6, [f.pts_s for f in frames]
    for f in frames:
        assert f.rgb.shape == (SIZE[1], SIZE[0], 3) and f.rgb.dtype == np.uint8 and f.stream_id == "cam"
        # The frame-index stamp the video carries matches the timestamp: right frames, decoded right, in RGB.
        assert media.read_stamp(f.rgb) == round(f.pts_s * FPS) % (8 * FPS)
    pts = [f.pts_s for f in frames]
    assert pts[0] == 0.0  # the first RTSP frame has no pts: the sampler puts it at 0
    assert np.allclose(np.diff(pts), 1.0, atol=0.05)
    # Arrival in real time, one a second (the first second comes as one burst from FFmpeg's probing); single gaps
    # jitter by a few hundred ms on a loaded 2-core host, their mean does not.
    walls = np.diff([f.wall_ts for f in frames[1:]])
    assert abs(walls.mean() - 1.0) < 0.1 and np.all((walls > 0.5) & (walls < 1.5)), walls
    stats = source.stats
    assert stats.sampled == len(rec.frames) and stats.decoded > 4 * 10 and stats.reconnects == 0
    assert stats.last_frame_wall_ts is not None and time.time() - stats.last_frame_wall_ts < 2.0
    # Keyframes every 2 s: keyframes-only would sample every 2 s, so non-reference frames are skipped instead
    assert source.decoding.mode == "nonref" and source.decoding.gop_s == pytest.approx(2.0, abs=0.01)
    assert rec.wrong_thread == 0


@pytest.mark.asyncio
async def test_rtsp_camera_with_a_1s_gop_decodes_keyframes_only(gst_ok, camera_mp4, media):
    server = RtspServer(camera_mp4, free_port())
    server.start()
    try:
        rec = Recorder()
        source, task = start(server.url, rec)
        assert source.decoding.mode is None  # not connected yet
        await rec.until(lambda: S.LIVE in rec.names, 10, "live")
        await rec.until(lambda: source.decoding.mode == "keyframes", 6, "keyframes-only decoding")
        decoded, t0 = source.stats.decoded, time.monotonic()
        n0 = len(rec.frames)
        await asyncio.sleep(4.0)
        decoded = source.stats.decoded - decoded
        elapsed = time.monotonic() - t0
        await source.close()
        await asyncio.wait_for(task, 2)
    finally:
        server.kill()
        server.remove_log()
    assert source.decoding.gop_s == pytest.approx(1.0, abs=0.01)
    assert decoded <= elapsed + 1  # one frame a second decoded, of 25
    frames = [f for _, f in rec.frames[n0:]]
    assert len(frames) >= 3, [f.pts_s for f in frames]
    assert np.allclose(np.diff([f.pts_s for f in frames]), 1.0, atol=0.05)  # still sampled at 1 FPS
    for f in frames:
        assert media.read_stamp(f.rgb) % FPS == 0  # each sample is a keyframe (the stamps count from the file's start)
    assert rec.wrong_thread == 0


@pytest.mark.asyncio
async def test_rtsp_server_killed_and_restarted_recovers(rtsp):
    server = rtsp()
    rec = Recorder()
    source, task = start(server.url, rec)
    await rec.until(lambda: len(rec.frames) >= 2, 10, "first frames")

    server.kill()  # SIGKILL: no goodbye to the clients
    await rec.until(lambda: rec.count(S.RECONNECTING) >= 2, 5, "reconnect attempts")
    assert rec.names[:5] == [S.CONNECTING, S.LIVE, S.STALLED, S.RECONNECTING, S.CONNECTING]
    assert "end of stream" in rec.last(S.STALLED)["reason"]
    assert rec.last(S.RECONNECTING)["attempt"] >= 2
    assert "refused" in rec.last(S.RECONNECTING)["reason"].lower()  # nobody listens while it is down

    server.start()  # same port
    await rec.until(lambda: rec.count(S.LIVE) == 2, 10, "live again")
    await rec.until(lambda: len(rec.since(S.LIVE, 2)) >= 3, 5, "frames after the restart")
    await source.close()
    await task
    resumed = rec.since(S.LIVE, 2)
    assert resumed[0].pts_s == 0.0  # a new RTSP session: a fresh sampler
    assert np.allclose(np.diff([f.pts_s for f in resumed]), 1.0, atol=0.05)
    assert source.stats.reconnects == rec.count(S.RECONNECTING) >= 2
    assert rec.wrong_thread == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("watchdog_s", "read_timeout_s", "reason"),
    [(2.0, 8.0, "no frame for 2 s"), (8.0, 2.0, "read timed out (no data for 2 s)")],
    ids=["watchdog", "read-timeout"],
)
async def test_frozen_server_is_restarted(rtsp, watchdog_s, read_timeout_s, reason):
    """SIGSTOP: the TCP connection stays up and no byte comes; whichever of the watchdog and the read timeout is
    shorter fires (FFmpeg's own read timeout would take ~2× as long, and is only a backstop here)."""
    server = rtsp()
    rec = Recorder()
    s = settings(watchdog_s=watchdog_s, read_timeout_s=read_timeout_s, connect_timeout_s=1.5)
    source, task = start(server.url, rec, settings=s)
    await rec.until(lambda: len(rec.frames) >= 2, 10, "first frames")

    server.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    await rec.until(lambda: S.STALLED in rec.names, 5, "stalled")
    waited = time.monotonic() - frozen
    assert 1.5 <= waited <= 3.5, waited  # last frame/packet ≤ 40 ms before the freeze, + 2 s, + one check tick
    assert rec.last(S.STALLED)["reason"] == reason
    await rec.until(lambda: rec.count(S.RECONNECTING) >= 2, 6, "reconnects while frozen")
    # The kernel still accepts connections for the frozen server: opening times out on our 1.5 s clock.
    assert "timed out after 1.5 s while opening" in rec.last(S.RECONNECTING)["reason"]

    server.signal(signal.SIGCONT)
    await rec.until(lambda: rec.count(S.LIVE) == 2, 15, "live after the server resumed")
    await rec.until(lambda: len(rec.since(S.LIVE, 2)) >= 2, 5, "frames after resuming")
    await source.close()
    await task
    assert rec.names[:4] == [S.CONNECTING, S.LIVE, S.STALLED, S.RECONNECTING]
    assert rec.wrong_thread == 0


# --- failures ------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_refused_url_backs_off_then_fails():
    port = free_port()  # nothing listens there
    rec = Recorder()
    s = settings(backoff_initial_s=0.2, backoff_max_s=2.0, max_attempts=3)
    source, task = start(f"rtsp://admin:secret@127.0.0.1:{port}/live", rec, settings=s)
    await asyncio.wait_for(task, 5)

    reconnects = [info for _, st, info in rec.states if st is S.RECONNECTING]
    assert [r["attempt"] for r in reconnects] == [1, 2, 3]
    delays = [r["delay_s"] for r in reconnects]
    assert delays == sorted(delays) and 0.1 <= delays[0] <= 0.2 and 0.4 <= delays[2] <= 0.8, delays
    assert rec.names[-1] is S.FAILED and source.state is S.FAILED
    reason = rec.last(S.FAILED)["reason"]
    assert "refused" in reason.lower() and "3 reconnects" in reason
    assert all("secret" not in str(info) for _, _, info in rec.states)  # credentials never reach events
    assert source.stats.reconnects == 3
    await source.close()  # after failed: a no-op
    assert rec.names[-1] is S.FAILED


@pytest.mark.asyncio
@pytest.mark.parametrize("scheme", ["rtsp", "http"])
async def test_unresponsive_host_times_out_on_the_connect_timeout(silent_port, scheme):
    rec = Recorder()
    s = settings(connect_timeout_s=1.0, read_timeout_s=2.0)
    source, task = start(f"{scheme}://127.0.0.1:{silent_port}/live", rec, settings=s)
    await rec.until(lambda: S.RECONNECTING in rec.names, 5, "reconnecting")
    took = [t for t, st, _ in rec.states if st is S.RECONNECTING][0]
    assert 1.0 <= took <= 1.6, took
    assert rec.last(S.RECONNECTING)["reason"].startswith("timed out after 1 s while opening")
    t_close = time.monotonic()
    await source.close()  # the thread may still be blocked in the open: close abandons it, waits for nothing
    await task
    assert time.monotonic() - t_close < 1.0
    assert rec.names[-1] is S.CLOSED


def pull_threads(stream_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"pull-{stream_id}" and t.is_alive()]


@pytest.mark.asyncio
async def test_close_while_stuck_opening_returns_at_once(silent_port):
    """DELETE /v1/streams/{id} and shutdown await close(): a camera that accepts and never answers must not hold
    them for connect_timeout_s (up to 120 s). The blocked thread is abandoned, like a passed deadline abandons it."""
    rec = Recorder()
    s = settings(connect_timeout_s=10.0, read_timeout_s=10.0, watchdog_s=10.0)
    source, task = start(f"rtsp://127.0.0.1:{silent_port}/x", rec, "stuck", settings=s)
    await asyncio.sleep(1.0)  # well inside the open (10 s)
    assert rec.names == [S.CONNECTING] and len(pull_threads("stuck")) == 1
    t_close = time.monotonic()
    await source.close()
    took = time.monotonic() - t_close
    assert took < 3.0, took  # before: ~9 s, the rest of connect_timeout_s + the backstop margin
    await asyncio.wait_for(task, 1)
    assert rec.names == [S.CONNECTING, S.CLOSED] and rec.last(S.CLOSED)["reason"] == "closed"
    assert source.state is S.CLOSED
    assert len(pull_threads("stuck")) == 1  # abandoned, not waited for: it ends by itself at PyAV's backstop
    await asyncio.sleep(1.0)
    assert rec.names == [S.CONNECTING, S.CLOSED] and rec.frames == []


@pytest.mark.asyncio
async def test_late_answer_after_close_is_ignored(faces_mp4, tmp_path):
    """A server that answers only after close(): the abandoned thread sees its stop flag, lets go of the source and
    ends by itself; nothing it read reaches the consumer."""
    release = threading.Event()

    class Slow(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(10)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    (tmp_path / "faces.mp4").write_bytes(faces_mp4.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rec = Recorder()
        s = settings(connect_timeout_s=10.0, read_timeout_s=10.0, watchdog_s=10.0)
        url = f"http://127.0.0.1:{server.server_address[1]}/faces.mp4"
        source, task = start(url, rec, "late", settings=s)
        await asyncio.sleep(0.5)
        t_close = time.monotonic()
        await source.close()
        assert time.monotonic() - t_close < 3.0
        await asyncio.wait_for(task, 1)
        assert rec.names == [S.CONNECTING, S.CLOSED]
        release.set()  # the server answers now, with a playable video
        await rec.until(lambda: not pull_threads("late"), 5, "the abandoned thread to end")
        await asyncio.sleep(0.3)  # anything it posted has run on the loop by now
        assert rec.names == [S.CONNECTING, S.CLOSED] and rec.frames == [] and source.stats.sampled == 0
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.asyncio
async def test_non_video_urls_are_named_as_such(http_dir):
    base, folder = http_dir
    (folder / "notes.txt").write_text("this is a text file, not a video\n" * 50)
    (folder / "notes.mp4").write_text("this is a text file named .mp4\n" * 50)
    for name, expected in [("notes.txt", "not a video"), ("notes.mp4", "not a video"), ("missing.mp4", "404")]:
        rec = Recorder()
        source, task = start(f"{base}/{name}", rec, settings=settings(max_attempts=1))
        await asyncio.wait_for(task, 5)
        assert rec.names == [S.CONNECTING, S.RECONNECTING, S.CONNECTING, S.FAILED], name
        assert expected in rec.last(S.RECONNECTING)["reason"], rec.states
        assert expected in rec.last(S.FAILED)["reason"]


# --- files ---------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_file_plays_in_real_time_to_its_end(media, faces_mp4, tmp_path):
    photos = sorted((SHARED / "real_faces").glob("img*.jpg"))[4:6]
    clip = media.make_slideshow(photos, tmp_path / "short clip.mp4", fps=FPS, seconds_per_image=1.5, size=SIZE)
    rec = Recorder()
    source, task = start(clip.as_uri(), rec)  # file:// URL, percent-encoded space
    await asyncio.wait_for(task, 10)
    elapsed = rec.states[-1][0]
    assert rec.names == [S.CONNECTING, S.LIVE, S.CLOSED]
    assert rec.last(S.CLOSED)["reason"] == "end of file"
    assert len(rec.frames) == 3  # 3 s at 1 FPS: 0, 1, 2
    assert 2.7 <= elapsed <= 4.0, elapsed  # paced like a camera
    # skip_nonref: the frame on a tick may be a skipped B-frame, then the next one (+40 ms) is taken
    assert [f.pts_s for _, f in rec.frames] == pytest.approx([0.0, 1.0, 2.0], abs=0.041)

    rec = Recorder()
    source, task = start(str(faces_mp4), rec, realtime=False, fps=2.0)
    await asyncio.wait_for(task, 10)
    assert rec.last(S.CLOSED)["reason"] == "end of file"
    assert len(rec.frames) == 16 == source.stats.sampled  # 8 s × 2 FPS
    assert rec.states[-1][0] < 2.0


@pytest.mark.asyncio
async def test_missing_file_fails_without_retrying(tmp_path):
    rec = Recorder()
    source, task = start(str(tmp_path / "nope.mp4"), rec)
    await asyncio.wait_for(task, 5)
    assert rec.names == [S.CONNECTING, S.FAILED] and rec.last(S.FAILED)["reason"] == "no such file"


# --- isolation -----------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failing_streams_do_not_disturb_a_live_one(rtsp, silent_port):
    server = rtsp()
    good = Recorder()
    refused, hung = Recorder(), Recorder()

    def broken_consumer(state: StreamState, info: dict[str, Any]) -> None:
        refused.on_state(state, info)
        raise RuntimeError("a consumer bug")

    source, task = start(server.url, good, "good")
    bad_source = PullSource(
        "refused",
        f"rtsp://127.0.0.1:{free_port()}/x",
        settings=settings(max_attempts=2),
        fps=1.0,
        on_frame=refused.on_frame,
        on_state=broken_consumer,
    )
    bad_task = asyncio.create_task(bad_source.run())
    hung_source, hung_task = start(
        f"rtsp://127.0.0.1:{silent_port}/x", hung, "hung", settings=settings(connect_timeout_s=1.0, read_timeout_s=1.0)
    )
    await good.until(lambda: S.LIVE in good.names, 10, "good stream live")
    await asyncio.sleep(5.2)
    await asyncio.wait_for(bad_task, 1)
    await asyncio.gather(source.close(), hung_source.close())
    await asyncio.gather(task, hung_task)

    assert refused.names[-1] is S.FAILED  # its consumer raised on every state: the machine went on regardless
    assert hung.count(S.RECONNECTING) >= 2
    assert good.names == [S.CONNECTING, S.LIVE, S.CLOSED]
    gaps = np.diff([f.wall_ts for f in good.since(S.LIVE)[1:]])
    assert len(gaps) >= 3 and abs(gaps.mean() - 1.0) < 0.1 and gaps.max() < 1.5, gaps
