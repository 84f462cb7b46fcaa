"""examples/meeting_bot.py against a real service: it sees its own participant.joined, and a refusal is one clean
line, not a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from serve_helpers import LiveServer, fast_settings, media_tool

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
