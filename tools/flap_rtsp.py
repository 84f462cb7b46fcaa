#!/usr/bin/env python3
"""A flapping camera: kill and restart an RTSP server N times and measure how soon StreamGuard is live again.

    python tools/flap_rtsp.py --cycles 10 --up 8 --down 20 [--clip camera.mp4] [--json out.json]

It starts `streamguard serve` (default settings: this measures the shipped backoff) with one RTSP stream from a
local GStreamer RTSP server (tools/rtsp_server.py, Debian's /usr/bin/python3) playing a camera-like clip (640x480,
25 fps, a keyframe every 2 s; real faces from ../shared/data when present), follows the event feed, and per cycle:
waits for `live`, lets it run `--up` seconds, kills the server with SIGKILL, waits `--down` seconds, starts it
again on the same port and times from the moment it listens (READY) to the stream's next `stream.state live`.
It also counts the reconnect attempts made while the server was down (what a dead camera is sent) and the longest
wait announced (`retry_in_s`). Prints one line per cycle and a summary; exit status 1 if any recovery took longer
than `--max-recovery` (10 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Cycle:
    down_s: float  # how long the server was gone
    recovery_s: float | None  # from the server listening again to the stream's `live`; None: not within the limit
    attempts: int  # reconnect attempts while it was down
    max_retry_in_s: float  # the longest wait before an attempt while it was down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtspProcess:
    """tools/rtsp_server.py serving one file at /cam, on a fixed port so it can come back where it was."""

    def __init__(self, clip: Path, port: int) -> None:
        self.clip, self.port = clip, port
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> float:
        """Start and wait until it listens; returns that moment (time.time())."""
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_server.py"), "--port", str(self.port),
                                      f"cam={self.clip}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "READY <port>" once it listens; "" if it died
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"the RTSP server did not start: {line!r}")
        return time.time()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class StateLog:
    """The stream's `stream.state` events from the feed, as they come."""

    def __init__(self, base_url: str, stream_id: str) -> None:
        self.base_url, self.stream_id = base_url, stream_id
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> StateLog:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        from streamguard.client import events

        async for event in events(self.base_url, since=0, stream_id=self.stream_id, types=["stream.state"]):
            self.events.append(event)
            self._changed.set()

    async def wait_live(self, after_ts: float, timeout_s: float) -> dict[str, Any] | None:
        """The first `live` with ts >= after_ts, or None after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events:
                if event["data"]["state"] == "live" and event["ts"] >= after_ts:
                    return event
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        return None

    def reconnects(self, since_ts: float, until_ts: float) -> list[dict[str, Any]]:
        return [e for e in self.events if e["data"]["state"] == "reconnecting" and since_ts <= e["ts"] <= until_ts]


async def run_cycles(base_url: str, rtsp: RtspProcess, stream_id: str, *, cycles: int, up_s: float, down_s: float,
                     limit_s: float = 60.0, out: Any = print) -> list[Cycle]:
    """Kill and restart `rtsp` `cycles` times while `base_url` pulls it as `stream_id`; one Cycle each."""
    results = []
    async with StateLog(base_url, stream_id) as log:
        if await log.wait_live(0.0, limit_s) is None:
            raise RuntimeError(f"{stream_id} never went live")
        for n in range(1, cycles + 1):
            await asyncio.sleep(up_s)
            killed = time.time()
            rtsp.kill()
            await asyncio.sleep(down_s)
            back = await asyncio.to_thread(rtsp.start)
            live = await log.wait_live(back, limit_s)
            tried = log.reconnects(killed, back)
            cycle = Cycle(down_s=round(back - killed, 2),
                          recovery_s=round(live["ts"] - back, 2) if live is not None else None,
                          attempts=len(tried), max_retry_in_s=max((e["data"].get("retry_in_s") or 0 for e in tried),
                                                                  default=0.0))
            results.append(cycle)
            out(f"cycle {n:2d}: down {cycle.down_s:5.1f} s, {cycle.attempts} attempts (longest wait "
                f"{cycle.max_retry_in_s:.1f} s), live again after {cycle.recovery_s} s")
            if live is None:
                break
    return results


def camera_clip(folder: Path) -> Path:
    """640x480 H.264 at 25 fps with a keyframe every 2 s (a camera's GOP), 60 s: real faces when ../shared has them."""
    sys.path.insert(0, str(REPO / "tools"))
    import make_test_media as media

    photos = sorted((SHARED / "real_faces").glob("img*.jpg"))[:6]
    images: list[Any] = list(photos) if photos else media.synthetic_images(6)
    return media.make_slideshow(images, folder / "camera.mp4", fps=25, seconds_per_image=10.0, size=(640, 480))


def summary(cycles: list[Cycle]) -> dict[str, Any]:
    recoveries = [c.recovery_s for c in cycles if c.recovery_s is not None]
    down = sum(c.down_s for c in cycles)
    return {
        "cycles": len(cycles), "recovered": len(recoveries),
        "recovery_s": {"median": round(statistics.median(recoveries), 2) if recoveries else None,
                       "max": max(recoveries, default=None), "all": recoveries},
        "attempts_per_min_down": round(60 * sum(c.attempts for c in cycles) / down, 1) if down else None,
        "max_retry_in_s": max((c.max_retry_in_s for c in cycles), default=None),
    }


def serve(workdir: Path, rtsp_url: str, port: int, sources: dict[str, float]) -> subprocess.Popen[bytes]:
    config = workdir / "streamguard.yaml"
    config.write_text(yaml.safe_dump({"port": port, "data_dir": str(workdir / "data"), "log_level": "warning",
                                      "sources": sources, "streams": [{"id": "cam", "url": rtsp_url}]}))
    command = [str(Path(sys.executable).parent / "streamguard"), "serve", "--config", str(config)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(workdir / "serve.log", "wb"))  # noqa: SIM115


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError("streamguard serve did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--up", type=float, default=8.0, help="seconds live before each kill")
    ap.add_argument("--down", type=float, default=20.0, help="seconds the server stays dead")
    ap.add_argument("--clip", type=Path, help="H.264 MP4 to serve (default: a camera-like clip made here)")
    ap.add_argument("--max-recovery", type=float, default=10.0)
    ap.add_argument("--limit", type=float, default=60.0, help="give a recovery up after this many seconds")
    ap.add_argument("--json", type=Path, help="write the cycles and the summary here")
    ap.add_argument("--backoff-max", type=float, help="sources.backoff_max_s to measure (default: the shipped one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flap-") as tmp:
        workdir = Path(tmp)
        rtsp = RtspProcess(args.clip or camera_clip(workdir), free_port())
        rtsp.start()
        port = free_port()
        proc = serve(workdir, rtsp.url, port, {} if args.backoff_max is None else {"backoff_max_s": args.backoff_max})
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc)
            cycles = asyncio.run(run_cycles(f"http://127.0.0.1:{port}", rtsp, "cam", cycles=args.cycles,
                                            up_s=args.up, down_s=args.down, limit_s=args.limit))
        finally:
            rtsp.kill()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    result = summary(cycles)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps({"cycles": [asdict(c) for c in cycles], "summary": result}, indent=2) + "\n")
    slow = [c for c in cycles if c.recovery_s is None or c.recovery_s > args.max_recovery]
    return 1 if slow or len(cycles) < args.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
