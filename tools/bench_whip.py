#!/usr/bin/env python3
"""WHIP participants under load: N publishers (`streamguard.client.publish`, in a child process) into the live service.

The real app (tests/serve_helpers.LiveServer: the service and its HTTP layer on uvicorn, in this process) receives N
WHIP sessions from one child process that publishes a 30 fps clip of real faces N times (`streamguard.client`, its
CPU not counted: it is the meeting bot's). For each codec x size x send rate, after --warmup seconds, over --seconds:

- server CPU per participant: this process's CPU time / wall time / N, as a fraction of one core (process CPU time
  is what the server spent, whatever else runs on the machine; wall-clock figures are not);
- frames the server decoded per participant per second (streamguard_frames_decoded_total{kind="webrtc"}) and the
  sessions' decode mode: with whip.keyframes_only (the default) the server decodes only the keyframes it asks for
  when a sample is due; without it aiortc decodes every frame received, so the send rate is what it costs;
- what arrives per participant (kbit/s, the peer connections' transport bytes): asked-for keyframes cost bytes;
- time from a session's start to its first sample (median over participants): what a first alert waits for
  besides the scoring window;
- sample-to-score latency p50/p95 (the streamguard_sample_to_score_seconds observations, raw);
- dropped samples: streamguard_frames_dropped_total plus holes in each stream's 1 FPS sample grid (bench_serve);
- the publishers' CPU per participant (the child's CPU time), for what the bot saves by sending fewer frames.

    python tools/bench_whip.py --participants 4 --codecs VP8,H264 --sizes 480,720 --rates 30,5 --seconds 15
    python tools/bench_whip.py --before whip.keyframes_only=false ...   # every case before/after, in one run

--rates: frames a second the publishers send; the clip's own rate (30) means every frame (`max_fps=None`), 5 is the
client's default (`DEFAULT_MAX_FPS`). ICE runs on the machine's own address (aioice gathers no loopback candidate).

--relay: the publishers send a pre-encoded H.264 clip (MPEG-TS at the --rates frame rate, a keyframe every second,
no B-frames: a restreamed IP camera) without decoding or encoding it (aiortc's MediaPlayer(decode=False)), so each
costs a few per cent of a core and the largest N the server holds can be found on one machine: the encoding
publishers need 0.1-0.2 core each. Such a publisher cannot answer keyframe requests; its own keyframes (one a second)
are what the server decodes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import bench_serve  # noqa: E402  (tools/: Samples, quantile, rss_bytes, machine)

log = logging.getLogger("bench_whip")
CLIP_FPS = 30
_DECODED_RE = re.compile(r'^streamguard_frames_decoded_total\{kind="webrtc"\} ([0-9.e+]+)$', re.M)


# --- the publishers (child process) --------------------------------------------------------------------------------


async def publish_all(url: str, clip: str, n: int, codec: str, max_fps: float | None) -> None:
    """N sessions of `clip`; prints READY once all are connected, ends them all when stdin closes. A .ts clip is
    relayed as it is encoded (see --relay)."""
    from aiortc.contrib.media import MediaPlayer

    from streamguard.client import publish

    pubs, players = [], []
    try:
        for i in range(n):
            source: Any = clip
            if clip.endswith(".ts"):
                players.append(MediaPlayer(clip, decode=False))
                source, max_fps = players[-1].video, None
            pubs.append(await publish(url, source, participant_id=f"bench-{i:03d}",
                                      codec=codec, audio=False, max_fps=max_fps,  # type: ignore[arg-type]
                                      connect_timeout_s=30))
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin when it has measured
    finally:
        await asyncio.gather(*(p.close() for p in pubs), return_exceptions=True)
        for player in players:
            if player.video is not None:
                player.video.stop()


def child_cpu_s(pid: int) -> float:
    """utime + stime of a process (its threads included), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Publishers:
    """This script with --publisher in a child process, publishing N sessions to the server at `url`."""

    def __init__(self, url: str, clip: Path, n: int, codec: str, max_fps: float | None) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "--publisher", url, str(clip), str(n), codec,
                     str(max_fps or 0)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Publishers:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = bench_serve.first_line(self.proc, 120)
        if not ready.startswith("READY"):
            self.__exit__()
            raise RuntimeError(f"the publishers did not connect: {ready}")
        return self

    def cpu_s(self) -> float:
        assert self.proc is not None
        return child_cpu_s(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the child DELETEs its sessions and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# --- the server (this process) -------------------------------------------------------------------------------------


@dataclass
class Row:
    codec: str
    height: int
    send_fps: int
    participants: int
    seconds: float
    cpu_per_participant: float  # cores
    decoded_fps: float  # frames the server decoded per participant per second
    p50_ms: float | None
    p95_ms: float | None
    dropped: int
    missing: int
    samples: int
    expected: int
    publisher_cpu_per_participant: float
    rss_per_participant_mb: float
    kbps_in: float  # per participant
    first_sample_s: float | None  # median over participants, from session start
    modes: str  # the sessions' decode modes at the end
    label: str = ""  # "before" (--before overrides) or "after"; empty without --before
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @property
    def ok(self) -> bool:
        return self.dropped == 0 and self.missing == 0


def make_clip(out_dir: Path, height: int, photos_dir: Path) -> Path:
    """A 16:9 30 fps H.264 clip of real faces (20 s; the publishers loop it), cached by its size."""
    import make_test_media

    photos = sorted(photos_dir.glob("img*.jpg"))[:4]
    if not photos:
        sys.exit(f"no photos in {photos_dir} (../shared/data/real_faces; pass --photos)")
    width = round(height * 16 / 9 / 2) * 2
    out = out_dir / f"whip_faces_{width}x{height}_{CLIP_FPS}fps.mp4"
    if not out.exists():
        tmp = out.with_suffix(".part.mp4")
        make_test_media.make_slideshow(photos, tmp, fps=CLIP_FPS, seconds_per_image=5.0, size=(width, height))
        tmp.rename(out)
    return out


def make_relay_clip(out_dir: Path, height: int, fps: int, seconds: float, photos_dir: Path) -> Path:
    """A pre-encoded 16:9 H.264 clip in MPEG-TS (Annex B, what aiortc sends as it is) at `fps`, a keyframe every
    second, no B-frames, long enough for one run (a relay does not loop)."""
    import make_test_media

    photos = sorted(photos_dir.glob("img*.jpg"))
    if not photos:
        sys.exit(f"no photos in {photos_dir} (../shared/data/real_faces; pass --photos)")
    width = round(height * 16 / 9 / 2) * 2
    n = int(seconds / 5.0) + 1
    out = out_dir / f"relay_faces_{width}x{height}_{fps}fps_{n * 5}s.ts"
    if not out.exists():
        tmp = out.with_suffix(".part.ts")
        make_test_media.make_slideshow([photos[i % len(photos)] for i in range(n)], tmp, fps=fps,
                                       seconds_per_image=5.0, size=(width, height), gop=fps, options={"bf": "0"})
        tmp.rename(out)
    return out


def decoded_total(url: str) -> float:
    import httpx

    m = _DECODED_RE.search(httpx.get(f"{url}/metrics", timeout=10).text)
    return float(m[1]) if m else 0.0


@contextlib.contextmanager
def recorded_run(samples: bench_serve.Samples, server: Any) -> Iterator[list[float]]:
    """The live server started with its samples and latencies recorded (bench_serve.recorded), stopped at the end."""
    with bench_serve.recorded(samples, server.service.metrics) as latencies:
        server.start()
        try:
            yield latencies
        finally:
            server.stop()


async def bytes_received(server: Any) -> float:
    """Transport bytes received by every live WHIP session's peer connection (aiortc's getStats)."""
    total = 0.0
    for session in server.service.whip.sessions.values():
        report = await session.pc.getStats()
        total += sum(getattr(s, "bytesReceived", 0) for s in report.values() if s.type == "transport")
    return total


def session_starts(server: Any) -> dict[str, float]:
    """stream id -> session start, on this process's monotonic clock."""
    offset = time.time() - time.monotonic()
    return {s.stream_id: s.created_at - offset for s in server.service.whip.sessions.values()}


def first_sample_s(samples: bench_serve.Samples, starts: dict[str, float]) -> float | None:
    waits = [samples.by_stream[sid][0][1] - t for sid, t in starts.items() if samples.by_stream.get(sid)]
    return round(statistics.median(waits), 2) if waits else None


def run_case(codec: str, height: int, send_fps: int, n: int, args: argparse.Namespace, clip: Path,
             overrides: dict[str, Any]) -> Row:
    from serve_helpers import LiveServer, deep_merge, free_port

    samples = bench_serve.Samples(set())
    with tempfile.TemporaryDirectory(prefix="bench-whip-") as data_dir:
        settings = {"host": "127.0.0.1", "port": free_port(), "data_dir": data_dir, "model": args.model,
                    "log_level": "warning", "whip": {"max_sessions": max(64, n)}}
        server = LiveServer(deep_merge(settings, overrides))
        with recorded_run(samples, server) as latencies:
            base_rss = bench_serve.rss_bytes()
            max_fps = None if send_fps >= CLIP_FPS else float(send_fps)
            with Publishers(f"{server.url}/v1/whip", clip, n, codec, max_fps) as pubs:
                starts = server.call(lambda: session_starts(server))
                time.sleep(args.warmup)
                b0 = server.call(lambda: bytes_received(server))
                d0, lat0, pub0 = decoded_total(server.url), len(latencies), pubs.cpu_s()
                drop0 = dropped(server)
                t0, cpu0 = time.monotonic(), time.process_time()
                time.sleep(args.seconds)
                t1, cpu1 = time.monotonic(), time.process_time()
                d1, window, pub1, drop1 = decoded_total(server.url), latencies[lat0:], pubs.cpu_s(), dropped(server)
                b1 = server.call(lambda: bytes_received(server))
                modes = server.call(lambda: sorted({s.decode_mode for s in server.service.whip.sessions.values()}))
                rss = bench_serve.rss_bytes()
                live = server.call(lambda: sum(s.state == "live" for s in server.service.streams()))
                if live != n:
                    log.warning("%d of %d WHIP streams live at the end", live, n)
    samples.expected_streams = set(samples.by_stream) | {f"missing-{i}" for i in range(n - len(samples.by_stream))}
    got, missing, _ = samples.window(t0, t1, 1.0)

    def ms(q: float) -> float | None:
        v = bench_serve.quantile(window, q)
        return None if v is None else round(v * 1000, 1)

    wall = t1 - t0
    return Row(codec=codec, height=height, send_fps=send_fps, participants=n, seconds=round(wall, 1),
               cpu_per_participant=round((cpu1 - cpu0) / wall / n, 4), decoded_fps=round((d1 - d0) / wall / n, 1),
               p50_ms=ms(0.5), p95_ms=ms(0.95), dropped=int(drop1 - drop0), missing=missing, samples=got,
               expected=int(round(wall * n)), publisher_cpu_per_participant=round((pub1 - pub0) / wall / n, 3),
               rss_per_participant_mb=round((rss - base_rss) / n / 2**20, 1),
               kbps_in=round(8 * (b1 - b0) / wall / n / 1000, 0), first_sample_s=first_sample_s(samples, starts),
               modes="/".join(modes))


def dropped(server: Any) -> float:
    return sum(s.value for m in server.service.metrics.frames_dropped.collect() for s in m.samples
               if s.name.endswith("_total"))


HEADER = ("| run | codec | size | sent fps | participants | server CPU/participant (cores) | decode mode "
          "| decoded fps/participant | kbit/s in/participant | first sample s | p50 ms | p95 ms | dropped "
          "| sampler gaps | samples/expected | publisher CPU/participant | load avg |")


def row_line(r: Row) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    first = "-" if r.first_sample_s is None else f"{r.first_sample_s:.2f}"
    return (f"| {r.label} | {r.codec} | {r.height}p | {r.send_fps} | {r.participants} | {r.cpu_per_participant:.3f} "
            f"| {r.modes} | {r.decoded_fps:.1f} | {r.kbps_in:.0f} | {first} | {f(r.p50_ms)} | {f(r.p95_ms)} "
            f"| {r.dropped} | {r.missing} "
            f"| {r.samples}/{r.expected} | {r.publisher_cpu_per_participant:.3f} | {r.load[0]:.1f} |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--publisher"]:  # the child: URL CLIP N CODEC MAX_FPS (0: every frame)
        url, clip, count, codec_name, rate_cap = argv[1:6]
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(publish_all(url, clip, int(count), codec_name, float(rate_cap) or None))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--participants", default="4", help="N, or a comma-separated list to sweep")
    ap.add_argument("--codecs", default="VP8,H264")
    ap.add_argument("--sizes", default="480,720", help="frame heights (16:9)")
    ap.add_argument("--rates", default="30,5", help="frames a second sent (30: every frame of the 30 fps clip)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window per case")
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds after all publishers connected")
    ap.add_argument("--model", default=None, help="model name or path (default: the service's default model)")
    ap.add_argument("--photos", type=Path, default=SHARED / "real_faces")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "streamguard-bench")
    ap.add_argument("--before", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="also run each case with these overrides first, rows labelled before/after, e.g. --before "
                         "whip.keyframes_only=false (every frame decoded, as before keyframes on request)")
    ap.add_argument("--relay", action="store_true", help="publishers relay a pre-encoded H.264 clip (see above)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    variants = [("before", bench_serve.parse_overrides(args.before)), ("after", {})] if args.before else [("", {})]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GLOG_minloglevel", "2")
    args.cache.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.participants.split(",") if x.strip()]
    codecs = [c.strip().upper() for c in args.codecs.split(",") if c.strip()]
    if set(codecs) - {"VP8", "H264"}:
        sys.exit(f"--codecs: VP8 and/or H264, got {args.codecs!r}")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    rates = [int(x) for x in args.rates.split(",") if x.strip()]
    if args.relay and codecs != ["H264"]:
        sys.exit("--relay sends H.264: use --codecs H264")
    clips = {h: make_clip(args.cache, h, args.photos) for h in sizes}
    relay_clips = {(h, r): make_relay_clip(args.cache, h, r, args.warmup + args.seconds + 60, args.photos)
                   for h in sizes for r in rates} if args.relay else {}
    print(f"machine: {bench_serve.machine()}; load average before: {os.getloadavg()[0]:.1f}")
    kind = "relaying pre-encoded H.264" if args.relay else f"encoding {CLIP_FPS} fps clips"
    print(f"publishers: streamguard.client in a child process, {kind} {[c.name for c in clips.values()]};"
          f" sampling 1 FPS; model {args.model or 'default'}; window {args.seconds:g} s after {args.warmup:g} s")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    rows = []
    for n, codec, height, rate, (label, overrides) in itertools.product(counts, codecs, sizes, rates, variants):
        source_clip = relay_clips.get((height, rate)) or clips[height]
        row = run_case(codec, height, rate, n, args, source_clip, overrides)
        row.label = label
        rows.append(row)
        print(row_line(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": bench_serve.machine(), "rows": [asdict(r) for r in rows]},
                                        indent=2))


if __name__ == "__main__":
    main()
