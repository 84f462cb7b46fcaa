#!/usr/bin/env python3
"""The live service under N concurrent RTSP streams, against the bare decode cost of the same N streams.

One GStreamer RTSP server (tools/rtsp_server.py, Debian's /usr/bin/python3) serves a 720p 30 fps H.264 clip of
real faces from one shared mount, so N clients cost the server one pipeline. For each N the service runs in this
process (the real `Service`: pull sources, face pool, batcher, model, event store; no HTTP layer) for --warmup
seconds, then is measured for --seconds:

- CPU per stream: this process's CPU time / wall time / N, as a fraction of one core;
- sample-to-score latency p50/p95/p99: the values the streamguard_sample_to_score_seconds histogram observes
  (from the sampler keeping a frame to its faces' scores), recorded raw;
- RSS per stream: (RSS at the end - RSS after the service started, before any stream) / N;
- dropped samples: streamguard_frames_dropped_total (a worker still busy with the last sample: latest wins) plus
  sampler gaps (samples missing from the 1/fps grid: the decoder fell behind, or the source stalled), and the
  decode lag (how far media time fell behind wall time over the window);
- the floor: the same N streams through `PullSource` alone (same decode settings, sampled frames converted to RGB
  and dropped): what ingest costs before any face or model work.

    python tools/bench_serve.py --streams 1,5,10,20 --seconds 30 [--model mesonet-meso4-df] [--json out.json]

One shared mount gives every client the same clock and the same first keyframe. The service gives each stream its
own sampling phase (`sampling.stagger`, on by default), so the N streams' samples are spread over the period;
`--set sampling.stagger=false` puts them all on one grid: each tick, N frames reach face detection at once, the
worst case for latency. `--try` patches in candidate changes to code this tool does not own (ONNX Runtime spinning,
decoder threads) to measure them first; `--set section.key=value` overrides settings.

Photos come from ../shared/data/real_faces (--photos to use others). The machine's load average is printed with
each row: on a shared host, other jobs take CPU from the service and show up as latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SYSTEM_PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(REPO / "tools"))

log = logging.getLogger("bench_serve")


# --- media and the RTSP server -------------------------------------------------------------------------------------


def make_clip(out_dir: Path, seconds: float, size: tuple[int, int], fps: int, photos_dir: Path,
              gop_s: float = 2.0, bframes: bool = True) -> Path:
    """A 720p (by default) H.264 slideshow of real faces, long enough that no run reaches its end (the RTSP server
    ends the session at EOF); cached by its parameters. `gop_s`, `bframes`: a keyframe every gop_s, B-frames or none
    (IP cameras: a 1-2 s GOP, no B-frames)."""
    import make_test_media

    photos = sorted(photos_dir.glob("img*.jpg"))
    if not photos:
        sys.exit(f"no photos in {photos_dir} (../shared/data/real_faces; pass --photos)")
    per_image = 5.0
    n = max(1, int(seconds / per_image) + 1)
    gop = max(1, round(gop_s * fps))
    shape = ("" if gop_s == 2.0 and bframes else f"_gop{gop_s:g}s") + ("" if bframes else "_nob")
    out = out_dir / f"faces_{size[0]}x{size[1]}_{fps}fps_{n * per_image:.0f}s{shape}.mp4"
    if not out.exists():
        log.info("making %s", out.name)
        tmp = out.with_suffix(".part.mp4")
        make_test_media.make_slideshow([photos[i % len(photos)] for i in range(n)], tmp, fps=fps,
                                       seconds_per_image=per_image, size=size, gop=gop,
                                       options=None if bframes else {"bf": "0"})
        tmp.rename(out)
    return out


def first_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first line a child process prints ("" if none within timeout_s): how the helpers say they are ready."""
    out = proc.stdout
    assert out is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return ready[0] if ready else ""


class RtspServer:
    def __init__(self, video: Path) -> None:
        self.video = video
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> RtspServer:
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(REPO / "tools" / "rtsp_server.py"), "--port", "0",
                                      f"faces={self.video}"], stdout=subprocess.PIPE, text=True)
        ready = first_line(self.proc, 30)
        if not ready.startswith("READY"):
            self.__exit__()
            sys.exit(f"the RTSP server did not start ({SYSTEM_PYTHON} needs python3-gi and gst-rtsp-server)")
        self.url = f"rtsp://127.0.0.1:{ready.split()[1]}/faces"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# --- measurement ---------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Samples:
    """Every sample a source hands its worker: (pts, wall) per stream, to find gaps and decode lag."""

    def __init__(self, expected_streams: set[str]) -> None:
        self.expected_streams = expected_streams  # a stream that never delivered counts as missing everything
        self.by_stream: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def add(self, stream_id: str, pts_s: float) -> None:
        self.by_stream[stream_id].append((pts_s, time.monotonic()))

    def window(self, t0: float, t1: float, fps: float) -> tuple[int, int, float]:
        """(samples, missing samples, worst decode lag growth in s) of the samples that arrived within [t0, t1].

        Missing, per stream, is the larger of two counts: samples short of the window's length (less one, for its
        edges) — the decoder fell behind real time or the stream stalled — and holes in the media-time grid
        (consecutive samples more than 1.5 periods apart lack round(gap * fps) - 1)."""
        got, missing, lag = 0, 0, 0.0
        expected = int((t1 - t0) * fps) - 1
        for points in self.by_stream.values():
            inside = [(p, w) for p, w in points if t0 <= w <= t1]
            got += len(inside)
            holes = sum(round((b - a) * fps) - 1 for (a, _), (b, _) in itertools.pairwise(inside) if b - a > 1.5 / fps)
            missing += max(expected - len(inside), holes, 0)
            if len(inside) >= 2:  # media time advancing slower than wall time: decoding cannot keep up
                (p0, w0), (p1, w1) = inside[0], inside[-1]
                lag = max(lag, (w1 - w0) - (p1 - p0))
        missing += max(0, len(self.expected_streams - set(self.by_stream))) * max(expected, 0)
        return got, missing, lag


@dataclass
class Row:
    streams: int
    seconds: float
    cpu_per_stream: float  # cores
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    rss_per_stream_mb: float
    dropped: int  # streamguard_frames_dropped_total over the window
    missing: int  # sampler gaps over the window
    decode_lag_s: float
    samples: int
    expected: int
    faces_scored: int
    floor_cpu_per_stream: float | None = None
    floor_missing: int | None = None
    floor_rss_per_stream_mb: float | None = None
    decode_modes: str = ""  # what the streams decoded (/v1/streams decode_mode), e.g. "keyframes x10"
    label: str = ""  # "before" (--before overrides) or "after"; empty without --before
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @property
    def ok(self) -> bool:
        return self.dropped == 0 and self.missing == 0


EXPERIMENTS = {
    "ort-no-spin": "ONNX Runtime sessions without intra-op spin-waiting (session.intra_op.allow_spinning=0)",
    "ort-1-thread": "ONNX Runtime sessions with one intra-op thread",
    "decode-1-thread": "PyAV decoders with thread_count=1 (no idle slice-thread pool per stream)",
}


def apply_experiments(names: list[str]) -> None:
    """Patch in changes to code this tool does not own, to measure them before anyone makes them for real."""
    if "ort-no-spin" in names or "ort-1-thread" in names:
        import onnxruntime as ort

        base = ort.InferenceSession

        class Session(base):  # type: ignore[misc, valid-type]
            def __init__(self, path: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
                sess_options = sess_options or ort.SessionOptions()
                if "ort-no-spin" in names:
                    sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if "ort-1-thread" in names:
                    sess_options.intra_op_num_threads = 1
                super().__init__(path, sess_options, *args, **kwargs)

        ort.InferenceSession = Session
    if "decode-1-thread" in names:
        from streamguard.ingest import pull

        choose = pull._video_stream

        def one_thread(container: Any, url: str) -> Any:
            stream = choose(container, url)
            stream.codec_context.thread_count = 1
            return stream

        pull._video_stream = one_thread  # type: ignore[assignment]


async def wait_for(cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the streams did not all go live within {timeout_s:g} s")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def recorded(samples: Samples, metrics: Any) -> Iterator[list[float]]:
    """Every sample a source delivers goes into `samples` (StreamWorker.put, before the slot's latest-wins), and every
    sample-to-score latency `metrics` observes into the yielded list, raw for exact percentiles."""
    from streamguard.worker import StreamWorker

    latencies: list[float] = []
    original_put, histogram = StreamWorker.put, metrics.sample_to_score

    def put(self: StreamWorker, frame: Any) -> None:
        samples.add(frame.stream_id, frame.pts_s)
        original_put(self, frame)

    class Recording:
        def observe(self, value: float) -> None:
            latencies.append(value)
            histogram.observe(value)

    StreamWorker.put = put  # type: ignore[method-assign]
    metrics.sample_to_score = Recording()
    try:
        yield latencies
    finally:
        StreamWorker.put = original_put  # type: ignore[method-assign]
        metrics.sample_to_score = histogram


async def run_service(url: str, n: int, seconds: float, warmup: float, model: str | None, fps: float,
                      overrides: dict[str, Any]) -> Row:
    from streamguard.config import ServiceConfig, StreamSpec
    from streamguard.service import Service

    samples = Samples({f"s{i:03d}" for i in range(n)})
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as data_dir:
        settings = {**overrides, "sampling": {"fps": fps, **overrides.get("sampling", {})}}  # --set sampling.stagger
        cfg = ServiceConfig(model=model, data_dir=Path(data_dir), log_level="warning", **settings)
        service = Service(cfg)
        with recorded(samples, service.metrics) as latencies:
            try:
                await service.start()
                gc.collect()
                await asyncio.sleep(0.5)
                base_rss = rss_bytes()
                # All clients at once (tools/rtsp_server.py lets them join its shared mount together), then all live.
                for i in range(n):
                    await service.add_stream(StreamSpec(id=f"s{i:03d}", url=url))
                await wait_for(lambda: all(s.state == "live" for s in service.streams()), 30)
                await asyncio.sleep(warmup)

                def dropped() -> float:
                    return sum(s.value for m in service.metrics.frames_dropped.collect() for s in m.samples
                               if s.name.endswith("_total"))

                d0, lat0, faces0 = dropped(), len(latencies), service.batcher.stats.crops
                t0, cpu0 = time.monotonic(), time.process_time()
                await asyncio.sleep(seconds)
                t1, cpu1 = time.monotonic(), time.process_time()
                d1, window_lat, faces1 = dropped(), latencies[lat0:], service.batcher.stats.crops
                rss = rss_bytes()
                modes = Counter(s.decode_mode or "unknown" for s in service.streams())
                not_live = [(s.id, s.state, s.reason) for s in service.streams() if s.state != "live"]
                if not_live:
                    log.warning("%d streams not live at the end: %s", len(not_live), not_live[:3])
            finally:
                await service.stop()
    got, missing, lag = samples.window(t0, t1, fps)

    def ms(q: float) -> float | None:
        v = quantile(window_lat, q)
        return None if v is None else round(v * 1000, 1)

    return Row(streams=n, seconds=round(t1 - t0, 1), cpu_per_stream=round((cpu1 - cpu0) / (t1 - t0) / n, 4),
               p50_ms=ms(0.5), p95_ms=ms(0.95), p99_ms=ms(0.99),
               rss_per_stream_mb=round((rss - base_rss) / n / 2**20, 1), dropped=int(d1 - d0), missing=missing,
               decode_lag_s=round(lag, 2), samples=got, expected=int(round((t1 - t0) * fps * n)),
               faces_scored=faces1 - faces0, decode_modes=", ".join(f"{m} x{k}" for m, k in sorted(modes.items())))


async def run_floor(url: str, n: int, seconds: float, warmup: float, fps: float,
                    sources: dict[str, Any]) -> tuple[float, int, float]:
    """(CPU per stream, missing samples, RSS per stream in MB) of N PullSources whose samples go nowhere."""
    from streamguard.config import SourceSettings
    from streamguard.ingest.pull import PullSource

    samples = Samples({f"f{i:03d}" for i in range(n)})
    gc.collect()
    base_rss = rss_bytes()
    settings = SourceSettings(**sources)  # the service run's `sources` overrides: the same decoding
    pulls = [PullSource(f"f{i:03d}", url, settings=settings, fps=fps,
                          on_frame=lambda f: samples.add(f.stream_id, f.pts_s), on_state=lambda s, i: None)
             for i in range(n)]
    tasks = [asyncio.create_task(source.run()) for source in pulls]  # all clients at once
    try:
        await wait_for(lambda: all(s.state is not None and s.state.value == "live" for s in pulls), 30)
        await asyncio.sleep(warmup)
        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.sleep(seconds)
        t1, cpu1 = time.monotonic(), time.process_time()
        rss = rss_bytes()
    finally:
        await asyncio.gather(*(s.close() for s in pulls))
        await asyncio.gather(*tasks, return_exceptions=True)
    _, missing, _ = samples.window(t0, t1, fps)
    return round((cpu1 - cpu0) / (t1 - t0) / n, 4), missing, round((rss - base_rss) / n / 2**20, 1)


# --- output --------------------------------------------------------------------------------------------------------

HEADER = ("| run | streams | decoded | CPU/stream (cores) | decode floor CPU/stream | p50 ms | p95 ms | p99 ms "
          "| RSS/stream MB | floor RSS/stream MB | dropped | sampler gaps | floor gaps | decode lag s "
          "| samples/expected | faces scored | load avg |")


def row_line(r: Row) -> str:
    def f(v: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    return (f"| {r.label or '-'} | {r.streams} | {r.decode_modes} | {r.cpu_per_stream:.3f} "
            f"| {f(r.floor_cpu_per_stream, '{:.3f}')} | {f(r.p50_ms)} "
            f"| {f(r.p95_ms)} | {f(r.p99_ms)} | {r.rss_per_stream_mb:.1f} | {f(r.floor_rss_per_stream_mb, '{:.1f}')} "
            f"| {r.dropped} | {r.missing} "
            f"| {f(r.floor_missing)} | {r.decode_lag_s:.2f} | {r.samples}/{r.expected} | {r.faces_scored} "
            f"| {r.load[0]:.1f} |")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set SECTION.KEY=VALUE items as nested settings (values parsed as JSON where they are)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not (section and name and _):
            sys.exit(f"bad override {item!r}: SECTION.KEY=VALUE")
        try:
            parsed: Any = json.loads(value)  # numbers, true/false, null, lists
        except ValueError:
            parsed = value
        overrides.setdefault(section, {})[name] = parsed
    return overrides


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,5,10,20", help="N, or a comma-separated list to sweep")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (connect, models, threads)")
    ap.add_argument("--model", default=None, help="model name or path (default: the service's default model)")
    ap.add_argument("--fps", type=float, default=1.0, help="samples per second per stream")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--video-fps", type=int, default=30)
    ap.add_argument("--gop", type=float, default=2.0, help="seconds between the clip's keyframes")
    ap.add_argument("--no-bframes", action="store_true", help="a clip without B-frames (as IP cameras send)")
    ap.add_argument("--before", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="also run each N with these overrides first, rows labelled before/after, e.g. --before "
                         "sources.keyframes_only=false (the decoding before keyframes-only)")
    ap.add_argument("--photos", type=Path, default=SHARED / "real_faces")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "streamguard-bench")
    ap.add_argument("--no-floor", action="store_true", help="skip the decode-floor runs")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="service setting override, e.g. --set sources.skip_nonref=false --set batcher.max_wait_ms=5")
    ap.add_argument("--try", dest="experiments", default="", metavar="NAMES",
                    help="comma-separated experiments patched into this process: " + "; ".join(
                        f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("GLOG_minloglevel", "2")

    experiments = [x.strip() for x in args.experiments.split(",") if x.strip()]
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        sys.exit(f"unknown experiments {sorted(unknown)}; known: {', '.join(EXPERIMENTS)}")
    apply_experiments(experiments)
    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    w, h = (int(x) for x in args.size.lower().split("x"))
    overrides = parse_overrides(args.set)
    variants = [("", overrides)]
    if args.before:
        before = parse_overrides(args.set + args.before)
        variants = [("before", before), ("after", overrides)]
    args.cache.mkdir(parents=True, exist_ok=True)
    clip = make_clip(args.cache, args.warmup + args.seconds + 15, (w, h), args.video_fps, args.photos,
                     gop_s=args.gop, bframes=not args.no_bframes)

    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"clip: {clip.name} over RTSP (one shared mount); sampling {args.fps:g} FPS; model "
          f"{args.model or 'default'}; window {args.seconds:g} s after {args.warmup:g} s warm-up; "
          f"overrides {dict(variants)}; experiments {experiments or 'none'}")
    rows: list[Row] = []
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for n, (label, settings) in itertools.product(counts, variants):
        # A fresh server per run: its shared pipeline starts with the first client, and ends at the clip's end.
        with RtspServer(clip) as rtsp:
            row = asyncio.run(run_service(rtsp.url, n, args.seconds, args.warmup, args.model, args.fps, settings))
        row.label = label
        if not args.no_floor:
            with RtspServer(clip) as rtsp:
                row.floor_cpu_per_stream, row.floor_missing, row.floor_rss_per_stream_mb = asyncio.run(
                    run_floor(rtsp.url, n, args.seconds, args.warmup, args.fps, settings.get("sources", {})))
        rows.append(row)
        print(row_line(row), flush=True)
    for label, _ in variants:
        good = [r.streams for r in rows if r.ok and r.label == label]
        fast = [r.streams for r in rows if r.ok and r.label == label and r.p95_ms is not None and r.p95_ms <= 250]
        print(f"{label or 'all runs'}: largest N with no dropped samples: {max(good) if good else 'none'}; "
              f"with p95 <= 250 ms too: {max(fast) if fast else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "clip": clip.name, "overrides": overrides,
                                         "experiments": experiments,
                                         "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
