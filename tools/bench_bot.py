#!/usr/bin/env python3
"""examples/meeting_bot.py publishing a file for minutes: does it keep one session, scored every second?

    python tools/bench_bot.py ../shared/data/ffpp_smoke/fake_deepfakes_519_515.mp4 --seconds 180 [--json out.json]

Starts `streamguard serve` (default settings, plus events.publish_scores so the bot has per-second scores to print)
on a free loopback port, runs the bot as a process publishing the file (30 s for the FF++ clip: it loops six times in
3 minutes), records every line it prints with the time, then sends it SIGTERM. Reports: WHIP sessions used (one is
the goal: no republish), score lines and the longest gap between two, participant.left lines before the SIGTERM (none
is the goal), how the session ended after the SIGTERM (the server's reason: "deleted by client"), and the bot's exit
status. ICE pairs on the machine's own address (aioice offers no 127.0.0.1 candidate); `--loopback` makes both
sides use 127.0.0.1 for a machine without one. Exit status 1 unless every goal was met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
BOT = REPO / "examples" / "meeting_bot.py"
# --loopback: aioice gathers 127.0.0.1 only, in the bot (runs the script named next) and in the server.
_PATCH = "import aioice.ice; aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ['127.0.0.1']\n"
LOOPBACK = _PATCH + "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"
SERVER_LOOPBACK = _PATCH + "import sys; sys.argv[0] = 'streamguard'; from streamguard.cli import app; app()\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(workdir: Path, loopback: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = workdir / "streamguard.yaml"
    config.write_text(yaml.safe_dump({"port": port, "data_dir": str(workdir / "data"), "log_level": "info",
                                      "events": {"publish_scores": True}}))
    cli = ["-c", SERVER_LOOPBACK] if loopback else ["-m", "streamguard.cli"]
    proc = subprocess.Popen([sys.executable, *cli, "serve", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "serve.log", "wb"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.3)
    raise RuntimeError(f"streamguard serve did not start: {(workdir / 'serve.log').read_text()[-2000:]}")


def run_bot(url: str, video: Path, seconds: float, loopback: bool) -> tuple[list[tuple[float, str]], int, float]:
    """The bot's stdout lines as (seconds since its start, line), its exit status and how long the SIGTERM took."""
    command = ([sys.executable, "-c", LOOPBACK, str(BOT)] if loopback else [sys.executable, str(BOT)])
    proc = subprocess.Popen([*command, url, str(video), "--participant", "bench", "--name", "Bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    started = time.monotonic()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while time.monotonic() - started < seconds and proc.poll() is None:
        time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(30)
    reader.join(5)
    return lines, status, time.monotonic() - sent


def report(lines: list[tuple[float, str]], status: int, stop_s: float, left_reason: str | None,
           seconds: float) -> dict[str, Any]:
    before = [(t, line) for t, line in lines if not line.startswith("stopped by")]
    joined = next((t for t, line in before if "participant.joined" in line), None)
    scores = [t for t, line in before if " score bench: " in line]
    gaps = [b - a for a, b in zip(scores, scores[1:], strict=False)]
    return {
        "seconds": seconds,
        "sessions": sum(1 for _, line in before if line.startswith("publishing ")),
        "joined_after_s": None if joined is None else round(joined, 1),
        "score_lines": len(scores),
        "scores_per_s": round(len(scores) / (scores[-1] - scores[0]), 2) if len(scores) > 1 else 0.0,
        "longest_gap_s": round(max(gaps), 2) if gaps else None,
        "participant_left_lines": sum(1 for _, line in before if "participant.left" in line),
        "republished": sum(1 for _, line in before if "republishing" in line),
        "exit_status": status,
        "sigterm_to_exit_s": round(stop_s, 2),
        "server_leave_reason": left_reason,
    }


def leave_reason(url: str) -> str | None:
    """The reason of the bot's participant.left, read from the feed's store through the event feed."""
    import asyncio

    from streamguard.client import events

    async def read() -> str | None:
        async def first() -> str | None:
            async for event in events(url, since=0, participant_id="bench", types=["participant.left"]):
                return str(event["data"].get("reason"))
            return None

        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(first(), 10)
        return None

    return asyncio.run(read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("video", type=Path)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--loopback", action="store_true", help="ICE on 127.0.0.1 (a machine without an interface)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-bot-") as tmp:
        server, url = start_server(Path(tmp), args.loopback)
        try:
            lines, status, stop_s = run_bot(url, args.video, args.seconds, args.loopback)
            result = report(lines, status, stop_s, leave_reason(url), args.seconds)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "lines": lines[-50:]}, indent=2) + "\n")
    goals = (result["sessions"] == 1 and result["participant_left_lines"] == 0 and result["republished"] == 0
             and result["longest_gap_s"] is not None and result["longest_gap_s"] < 3.0 and status == 0
             and result["server_leave_reason"] == "deleted by client")
    return 0 if goals else 1


if __name__ == "__main__":
    sys.exit(main())
