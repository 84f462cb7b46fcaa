"""examples/meeting_bot.py against a real service: it sees its own participant.joined, a refusal is one clean
line, not a traceback, and when its session ends it publishes again, or exits saying why."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from serve_helpers import SHARED, LiveServer, face_photos, fast_settings, media_tool

from streamguard.client import publish

REPO = Path(__file__).resolve().parents[1]
BOT = REPO / "examples" / "meeting_bot.py"


@pytest.fixture(scope="module")
def bot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meeting_bot", BOT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool = media_tool()
    out = tmp_path_factory.mktemp("bot") / "slides.mp4"
    return tool.make_slideshow(tool.synthetic_images(2), out, fps=10, seconds_per_image=2.0, size=(320, 240))


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    token = getattr(request, "param", None)
    settings = fast_settings(tmp_path / "data", **({"token": token} if token else {}))
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice gathers no 127.0.0.1 candidate; make both peers (same process) use loopback only."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.mark.timeout(180)
def test_bot_sees_its_own_join(bot: ModuleType, server: LiveServer, video: Path, loopback_ice: None) -> None:
    lines: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(bot.run(server.url, str(video), "alice", name="Alice", out=lines.append,
                                           connect_timeout_s=30))
        try:
            for _ in range(600):
                if any("participant.joined" in line for line in lines) or task.done():
                    break
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    joined = [line for line in lines if "participant.joined" in line]
    assert joined, lines
    assert "'label': 'Alice'" in joined[0]


@pytest.mark.parametrize("server", ["s3cret-token"], indirect=True)
def test_bot_refused_without_token_says_so_cleanly(server: LiveServer, video: Path) -> None:
    proc = subprocess.run([sys.executable, str(BOT), server.url, str(video), "--participant", "alice"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "refused alice: HTTP 401" in line and "--token" in line, line


def test_bot_without_a_server_says_so_cleanly(video: Path) -> None:
    from serve_helpers import free_port

    proc = subprocess.run([sys.executable, str(BOT), f"http://127.0.0.1:{free_port()}", str(video),
                           "--participant", "alice"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert any(line.startswith("error: cannot reach http://127.0.0.1:") for line in proc.stderr.splitlines())


# --- the session ends: republish, or exit ---------------------------------------------------------------------------

# The bot as a real process, with aioice gathering 127.0.0.1 only (as the loopback_ice fixture does in-process).
BOT_LOOPBACK_SHIM = """\
import runpy, sys
import aioice.ice
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class BotProcess:
    """examples/meeting_bot.py in a subprocess; its stdout lines and its stderr are collected by threads as they
    come (an unread pipe that fills, 64 KB of log lines, would block the bot on its next write)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", BOT_LOOPBACK_SHIM, str(BOT), *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._error_reader = threading.Thread(target=self._read_errors, daemon=True)
        self._error_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_errors(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._errors.append(line)

    def wait_for(self, text: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if text in line]
            if found:
                return found[-1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the bot: {self.lines}; stderr: {self.stderr()}")

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        self._error_reader.join(5)
        return "".join(self._errors)

    def exit(self, timeout_s: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the bot still runs {timeout_s} s after its session ended: {self.lines}; stderr: "
                                 f"{self.stderr()[-3000:]}") from None
        self._reader.join(5)
        return rc, self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def session_of(line: str) -> str:
    return line.rsplit("WHIP session ", 1)[1].rstrip(")")


@pytest.mark.timeout(180)
def test_bot_republishes_when_its_session_ends(bot: ModuleType, server: LiveServer, video: Path,
                                               loopback_ice: None) -> None:
    """The server ends the session (here: its WHIP resource is deleted): the bot notices, publishes again as the same
    participant and follows the new session; the participant is monitored again."""
    lines: list[str] = []

    def published() -> list[str]:
        return [session_of(line) for line in lines if line.startswith("publishing ")]

    async def wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if task.done():
                task.result()  # raises what ended it
                raise AssertionError(f"the bot returned while waiting for {what}: {lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {lines}")
            await asyncio.sleep(0.05)

    async def main() -> None:
        nonlocal task
        task = asyncio.create_task(bot.run(server.url, str(video), "alice", name="Alice", out=lines.append,
                                           connect_timeout_s=30))
        try:
            await wait(lambda: any("participant.joined" in line for line in lines), "the first join")
            (first,) = published()
            async with httpx.AsyncClient(base_url=server.url) as http:
                assert (await http.delete(f"/v1/whip/{first}")).status_code == 200
                await wait(lambda: len(published()) == 2, "a second session", timeout_s=20)
                second = published()[1]
                assert second != first
                await wait(lambda: sum("participant.joined" in line for line in lines) == 2, "the second join")
                streams = {s["id"]: s for s in (await http.get("/v1/streams")).json()}
                assert f"whip:{first}" not in streams and streams[f"whip:{second}"]["state"] == "live", streams
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    task: asyncio.Task[None]
    asyncio.run(main())
    ended = [line for line in lines if "ended: deleted by client; republishing in" in line]
    assert len(ended) == 1 and "alice" in ended[0], lines
    assert "participant.left" in "\n".join(lines)  # it printed its own leave, then republished


@pytest.mark.timeout(180)
def test_bot_replaced_by_another_session_exits_with_a_clear_message(server: LiveServer, video: Path,
                                                                    loopback_ice: None) -> None:
    """Another publisher of the same participant replaces the bot's session: the bot does not take it back (two
    bots would flap for ever); it exits with status 3 and says why."""
    proc = BotProcess(server.url, str(video), "--participant", "alice")
    try:
        first = session_of(proc.wait_for("WHIP session "))
        proc.wait_for("participant.joined")

        async def replace() -> str:
            async with await publish(f"{server.url}/v1/whip", str(video), participant_id="alice", loop=True,
                                     connect_timeout_s=30) as other:
                assert other.session_id != first
                rc, stderr = await asyncio.to_thread(proc.exit, 30)
                assert rc == 3, (rc, stderr, proc.lines)
                return stderr

        stderr = asyncio.run(replace())
    finally:
        proc.kill()
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"session {first} of alice ended: replaced by a new session" in line and "not taking it back" in line
    assert len([line for line in proc.lines if line.startswith("publishing ")]) == 1  # never republished


@pytest.mark.timeout(180)
def test_bot_exit_on_end_exits_when_the_server_shuts_down(tmp_path: Path, video: Path, loopback_ice: None) -> None:
    with LiveServer(fast_settings(tmp_path / "data")) as srv:
        proc = BotProcess(srv.url, str(video), "--participant", "alice", "--exit-on-end")
        try:
            session = session_of(proc.wait_for("WHIP session "))
            proc.wait_for("participant.joined")
            srv.stop()  # graceful, like SIGTERM
            rc, stderr = proc.exit(30)
        finally:
            proc.kill()
    assert rc == 3, (rc, stderr, proc.lines)
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"the WHIP session {session} of alice ended: " in line and "--exit-on-end" in line, line


@pytest.mark.timeout(180)
def test_bot_retries_republishing_while_the_server_is_down_then_gives_up(tmp_path: Path, video: Path,
                                                                         loopback_ice: None) -> None:
    with LiveServer(fast_settings(tmp_path / "data")) as srv:
        proc = BotProcess(srv.url, str(video), "--participant", "alice", "--max-republish", "2")
        try:
            proc.wait_for("participant.joined")
            srv.stop()
            rc, stderr = proc.exit(40)
        finally:
            proc.kill()
    assert rc == 1, (rc, stderr, proc.lines)
    assert "Traceback" not in stderr
    assert any("ended: " in line and "republishing in" in line for line in proc.lines), proc.lines
    assert len([line for line in proc.lines if line.startswith("republishing alice failed")]) == 1, proc.lines
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: cannot reach {srv.url}"), line


# --- a file published in a loop, and ends that the client notices ---------------------------------------------------


@pytest.fixture(scope="module")
def short_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s of two real faces (1.5 s each): several play-throughs fit in a short test."""
    photos = face_photos(2)
    if len(photos) < 2:
        pytest.skip(f"needs real face photos in {SHARED / 'real_faces'} (../shared is absent in a user's clone)")
    out = tmp_path_factory.mktemp("bot") / "faces.mp4"
    return media_tool().make_slideshow(photos, out, fps=10, seconds_per_image=1.5, size=(480, 360))


@pytest.mark.asyncio
async def test_the_looping_file_track_keeps_its_timestamps_rising(short_faces: Path) -> None:
    from aiortc.mediastreams import MediaStreamError

    from streamguard.file_track import LoopingFileTrack

    track = LoopingFileTrack(str(short_faces))
    started = time.monotonic()
    times = [float((await track.recv()).time) for _ in range(75)]  # 7.5 s of a 3 s file: two loops and a half
    elapsed = time.monotonic() - started
    assert track.loops == 2
    assert all(b > a for a, b in zip(times, times[1:], strict=False)), times  # never back, also at each loop
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(steps) == pytest.approx(0.1, abs=0.02), steps  # one frame apart, at the joins too
    assert elapsed > 6.5  # at the file's own pace
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


@pytest.mark.timeout(120)
def test_a_file_loops_in_one_session_with_scores_throughout(bot: ModuleType, server: LiveServer, short_faces: Path,
                                                            loopback_ice: None) -> None:
    """A 3 s file published for 16 s (the server ends a session after 5 s without frames): one session, no
    participant.left, scores up to the end. MediaPlayer(loop=True) stopped sending after one play-through."""
    lines: list[str] = []
    stamps: list[float] = []

    def out(line: str) -> None:
        lines.append(line)
        stamps.append(time.monotonic())

    async def main() -> None:
        task = asyncio.create_task(bot.run(server.url, str(short_faces), "alice", name="Alice", out=out,
                                           connect_timeout_s=30))
        try:
            for _ in range(300):
                if any("participant.joined" in line for line in lines) or task.done():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(16)
            assert not task.done(), lines
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert len([line for line in lines if line.startswith("publishing ")]) == 1, lines
    assert not [line for line in lines if "participant.left" in line or "republishing" in line], lines
    scores = [t for t, line in zip(stamps, lines, strict=True) if " score alice: " in line]
    assert len(scores) >= 8 and stamps[-1] - scores[-1] < 3.0, lines  # still scored at the end


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_track_that_ends_ends_the_session_at_once(server: LiveServer, loopback_ice: None) -> None:
    """The caller's track stops (or its sender dies: aiortc then stops the track): the publication notices at
    once and DELETEs the session, well before the server's 5 s without frames would end it."""
    from aiortc.mediastreams import VideoStreamTrack
    from serve_helpers import Feed

    async with Feed(server.url, type="participant.left") as feed:
        track = VideoStreamTrack()
        pub = await publish(f"{server.url}/v1/whip", track, participant_id="bob", connect_timeout_s=30)
        await asyncio.sleep(1.0)
        stopped = time.monotonic()
        track.stop()
        assert await asyncio.wait_for(pub.wait_ended(), 5) == "video track ended"
        left = await feed.wait_for(lambda e: e["participant_id"] == "bob", 5, "bob left")
        assert left["data"]["reason"] == "deleted by client" and time.monotonic() - stopped < 3.0, left
        await pub.close()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_sender_that_dies_on_restarting_timestamps_ends_the_session(server: LiveServer,
                                                                            loopback_ice: None) -> None:
    """A publisher whose timestamps go back: aiortc's VP8 encoder raises and the RTP sender task dies (silently,
    but it stops the track): the publication ends and DELETEs the session."""
    from aiortc.mediastreams import VideoStreamTrack

    class Rewinding(VideoStreamTrack):
        """Starts at 10 s, and after 1 s its timestamps restart from 0 (a player that loops by starting over)."""

        async def recv(self):  # type: ignore[no-untyped-def]
            frame = await super().recv()
            if frame.pts <= 90000:
                frame.pts += 900000
            return frame

    pub = await publish(f"{server.url}/v1/whip", Rewinding(), participant_id="carol", codec="VP8",
                        connect_timeout_s=30)
    assert await asyncio.wait_for(pub.wait_ended(), 10) == "video track ended"
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert f"whip:{pub.session_id}" not in {s["id"] for s in (await http.get("/v1/streams")).json()}
    await pub.close()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
@pytest.mark.timeout(120)
def test_sigterm_and_sigint_end_the_bots_session(server: LiveServer, short_faces: Path, loopback_ice: None,
                                                 sig: signal.Signals, status: int) -> None:
    proc = BotProcess(server.url, str(short_faces), "--participant", "dave")
    try:
        session = session_of(proc.wait_for("WHIP session "))
        proc.wait_for("participant.joined")
        sent = time.monotonic()
        proc.proc.send_signal(sig)
        rc, stderr = proc.exit(15)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert rc == status and "Traceback" not in stderr, (rc, stderr)
    assert f"stopped by {sig.name}" in stderr, stderr
    left = [e for e in server.service.store.since(0, participant_id="dave", types=["participant.left"])]
    assert left and left[-1].stream_id == f"whip:{session}", left
    assert left[-1].data["reason"] == "deleted by client" and took < 5.0, (left, took)  # DELETEd, not timed out
