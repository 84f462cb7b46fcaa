"""Real parts for the live-service tests and the serve benchmark.

- `LiveServer`: the real app on a real uvicorn server, in-process in a thread of its own (own event loop), on a free
  127.0.0.1 port. In-process so a test can monkeypatch (aioice's host addresses) and look at the service.
- `ServeProcess`: `streamguard serve` as a subprocess (config file + environment), for exit codes, signals, stderr.
- `RtspServer`: tools/rtsp_server.py (GStreamer's gst-rtsp-server) under Debian's /usr/bin/python3.
- `Feed`: a WebSocket client on /v1/events (the `websockets` package) that records every event it gets.

Model: the shipped default (engines/streamguard-sbi.onnx) when it exists; until it does, the imported MesoNet
`mesonet-meso4-df` from engines/.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BROWSER_DIR = REPO / "tests" / "browser"  # the Playwright driver scripts and their node_modules (npm ci)
CHROMIUM = os.environ.get("STREAMGUARD_CHROMIUM", "/usr/bin/chromium")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"
DEFAULT_ENGINE = REPO / "engines" / "streamguard-sbi.onnx"
# None: the service's default model. Until engines/streamguard-sbi.onnx exists, the imported MesoNet stands in.
# STREAMGUARD_TEST_MODEL=<name> picks another (e.g. to tell a model's failures from the service's).
MODEL: str | None = os.environ.get("STREAMGUARD_TEST_MODEL") or (None if DEFAULT_ENGINE.exists() else
                                                                 "mesonet-meso4-df")


# Variables that are not settings but point at the session's temporary engines folder (tests/conftest.py): kept for
# child processes, whose environment is otherwise cleared of STREAMGUARD_* settings.
SESSION_VARIABLES = ("STREAMGUARD_ENGINES", "STREAMGUARD_ENGINE_CACHE")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without STREAMGUARD_* settings (the session's engines folder kept), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGUARD_") or k in SESSION_VARIABLES}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def media_tool() -> ModuleType:
    """tools/make_test_media.py as a module."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_test_media
    finally:
        sys.path.remove(str(REPO / "tools"))
    return make_test_media


def face_photos(n: int) -> list[Path]:
    """n real face photos (one face each) from ../shared/data/real_faces; [] when the folder is absent."""
    return sorted((SHARED / "real_faces").glob("img*.jpg"))[:n] if (SHARED / "real_faces").is_dir() else []


@functools.cache
def gst_available() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


LOCAL_SOURCES: dict[str, Any] = {"allow_files": True, "deny_networks": []}


def fast_settings(data_dir: Path, port: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Service settings with small timeouts so failures and recoveries happen within seconds."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port or free_port(),
        "data_dir": str(data_dir),
        "model": MODEL,
        "log_level": "warning",
        # The tests' sources are on this machine (files, 127.0.0.1 servers): the policy for streams added over the
        # API allows them here; tests/test_source_policy.py checks the shipped defaults.
        "sources": {"connect_timeout_s": 3.0, "read_timeout_s": 3.0, "watchdog_s": 2.0, "backoff_initial_s": 0.2,
                    "backoff_max_s": 1.0, "policy": LOCAL_SOURCES},
        "whip": {"no_frame_timeout_s": 5.0},
        "participants": {"min_samples": 2},
        "events": {"publish_scores": True},
    }
    return deep_merge(base, overrides)


# --- servers -------------------------------------------------------------------------------------------------------


class LiveServer:
    """The real app on uvicorn in a background thread with its own event loop; `url` is its base URL."""

    def __init__(self, settings: dict[str, Any], ws_ping_interval_s: float = 20.0, sndbuf: int | None = None) -> None:
        """sndbuf: fix the kernel send buffer of accepted connections (no autotuning, which on loopback grows to
        megabytes), so a client that stops reading blocks the server's sends after a few hundred kB, not MBs."""
        from streamguard.api.app import create_app
        from streamguard.config import ServiceConfig
        from streamguard.service import Service

        self.config = ServiceConfig(**settings)
        self.service = Service(self.config)
        self.app = create_app(self.service)
        self.url = f"http://127.0.0.1:{self.config.port}"
        self._ping = ws_ping_interval_s
        self._sndbuf = sndbuf
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def start(self, timeout_s: float = 120.0) -> LiveServer:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.config.port, log_level="warning", lifespan="on",
            ws_ping_interval=self._ping, ws_ping_timeout=self._ping, timeout_graceful_shutdown=10,
        ))

        sock = None
        if self._sndbuf is not None:  # accepted sockets inherit the listening socket's buffer sizes
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            sock.bind(("127.0.0.1", self.config.port))

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self._server.serve(sockets=[sock] if sock is not None else None)

        def run() -> None:
            try:
                # The loop `streamguard serve` runs on (uvicorn's choice: uvloop when installed), so tests and
                # benchmarks measure the service users run.
                with asyncio.Runner(loop_factory=self._server.config.get_loop_factory()) as runner:
                    runner.run(serve())
            except BaseException as exc:  # noqa: BLE001 - reported by start()/stop()
                self.error = exc

        self._thread = threading.Thread(target=run, name=f"uvicorn-{self.config.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on port {self.config.port} did not start: {self.error!r}")
            time.sleep(0.05)
        return self

    def call(self, fn: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run fn on the server's loop (a coroutine function's result is awaited there) and return its result."""
        assert self.loop is not None

        async def wrapper() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful shutdown, like SIGTERM: streams close, participants leave, the store is flushed."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"server on port {self.config.port} did not stop in {timeout_s} s")
            self._thread = None

    async def astop(self, timeout_s: float = 60.0) -> None:
        await asyncio.to_thread(self.stop, timeout_s)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def streamguard_command() -> list[str]:
    script = Path(sys.executable).parent / "streamguard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamguard.cli"]


class ServeProcess:
    """`streamguard serve` in a subprocess, its settings in a YAML file; stdout/stderr go to files."""

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, config_text: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "streamguard.yaml"
        if config_text is not None:
            self.config_path.write_text(config_text)
        elif settings is not None:
            self.config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.port = int(settings["port"]) if settings and "port" in settings else None
        self.url = f"http://127.0.0.1:{self.port}" if self.port else ""
        self.env = child_env(**(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        cmd = [*streamguard_command(), "serve"]
        if self.config_path.exists():
            cmd += ["--config", str(self.config_path)]
        self._out = open(self.workdir / "stdout.log", "wb")  # noqa: SIM115 - closed in wait()
        self._err = open(self.workdir / "stderr.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([*cmd, *self.args], stdout=self._out, stderr=self._err, env=self.env,
                                     cwd=self.workdir)
        return self

    @property
    def stderr(self) -> str:
        return (self.workdir / "stderr.log").read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamguard serve exited {self.proc.returncode}: {self.stderr[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"streamguard serve not ready after {timeout_s} s: {self.stderr[-2000:]}")

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is not None:
                self._out.close()
                self._err.close()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class RtspServer:
    """tools/rtsp_server.py in a subprocess (mounts: name -> H.264 MP4); can be killed and started again."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None) -> None:
        self.mounts = mounts
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{mount}"

    def start(self, timeout_s: float = 20.0) -> RtspServer:
        specs = [f"{name}={path}" for name, path in self.mounts.items()]
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_server.py"), "--port", str(self.port), *specs],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        ready: list[str] = []
        out = self.proc.stdout
        assert out is not None
        reader = threading.Thread(target=lambda: ready.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not ready or not ready[0].startswith("READY"):
            self.kill()
            raise RuntimeError(f"RTSP server on port {self.port} did not start: {ready}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def http_folder(folder: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """A local HTTP server (http.server in a thread) over a folder on `host`; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the event feed ------------------------------------------------------------------------------------------------

Event = dict[str, Any]
Pred = Callable[[Event], bool]


def is_(type_: str, stream_id: str | None = None, **data: Any) -> Pred:
    """A predicate: event of this type (and stream), whose data has these values."""

    def pred(e: Event) -> bool:
        return (e["type"] == type_ and (stream_id is None or e["stream_id"] == stream_id)
                and all(e["data"].get(k) == v for k, v in data.items()))

    return pred


def state(stream_id: str, value: str) -> Pred:
    return is_("stream.state", stream_id, state=value)


class Feed:
    """A real WebSocket client on /v1/events recording every event (and the close code) in a background task.

    `params` go in the query string (since, stream_id, type, access_token); `headers` at the handshake.
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, **params: Any) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items() if v is not None)
        self.url = base_url.replace("http://", "ws://") + "/v1/events" + (f"?{query}" if query else "")
        self.headers = headers
        self.events: list[Event] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ws: Any = None

    async def __aenter__(self) -> Feed:
        from websockets.asyncio.client import connect

        self._ws = await connect(self.url, additional_headers=self.headers, open_timeout=10, max_queue=None)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self._ws:
                self.events.append(json.loads(message))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason
            self.closed.set()
            self._changed.set()

    @property
    def last_seq(self) -> int | None:
        return self.events[-1]["seq"] if self.events else None

    def of(self, pred: Pred) -> list[Event]:
        return [e for e in self.events if pred(e)]

    async def wait_for(self, pred: Pred, timeout_s: float, what: str = "", *, after: int = 0) -> Event:
        """The first recorded event from index `after` on that matches (waiting for it); AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        i = after
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return self.events[i]
                i += 1
            left = deadline - time.monotonic()
            if left <= 0 or self.closed.is_set():
                seen = [(e["seq"], e["type"], e.get("stream_id"), e["data"].get("state") or e["data"].get("reason"))
                        for e in self.events[-25:]]
                raise AssertionError(f"no {what or 'matching event'} within {timeout_s} s "
                                     f"(closed: {self.close_code}); last events: {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_count(self, pred: Pred, n: int, timeout_s: float, what: str = "") -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.of(pred)) < n:
            if time.monotonic() > deadline or self.closed.is_set():
                raise AssertionError(f"{len(found)} of {n} {what or 'events'} within {timeout_s} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)
        return found


async def until(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll cond() (a coroutine function or a plain one) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def stored_events(data_dir: Path) -> list[Event]:
    """Every event in a (closed) service's store, as the wire dicts."""
    from streamguard.events.store import EventStore

    with EventStore(Path(data_dir) / "events.sqlite3", synchronous="NORMAL") as store:
        out: list[Event] = []
        while batch := store.since(out[-1]["seq"] if out else 0, limit=1000):
            out += [json.loads(e.model_dump_json()) for e in batch]
        return out


class RawWebSocket:
    """A bare WebSocket client whose socket is only read when the test says so (a consumer that stops reading).

    No background reader: asyncio's stream buffer is tiny and the socket's receive buffer small, so the server's
    sends back up after a few kB. Frames are parsed by hand (the server does not mask; no extensions offered).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str, rcvbuf: int = 4096) -> RawWebSocket:
        import base64

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        await writer.drain()
        status = await reader.readline()
        if b" 101 " not in status:
            raise ConnectionError(f"handshake refused: {status!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload); opcode 8 is close (payload: 2-byte code + reason)."""
        head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return head[0] & 0x0F, await self.reader.readexactly(n)

    async def read_until_close(self, timeout_s: float) -> tuple[int, str, int]:
        """Read (and count) data frames until the close frame: (close code, reason, data frames read)."""
        frames = 0
        async with asyncio.timeout(timeout_s):
            while True:
                opcode, payload = await self.frame()
                if opcode == 8:
                    return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace"), frames
                frames += opcode in (1, 2)

    def close(self) -> None:
        self.writer.close()


def need_browser() -> None:
    """Skip (with how to get it) unless headless Chromium, node and playwright-core are here."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    if shutil.which("node") is None:
        pytest.skip("needs node (>= 18) to run the Playwright driver")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("needs playwright-core: (cd tests/browser && npm ci)")
