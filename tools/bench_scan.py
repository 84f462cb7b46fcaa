#!/usr/bin/env python3
"""Scan speed against the decode floor.

For each video: the bare decode cost (every frame decoded, nothing converted: the floor any full-decode scanner
pays), the decode cost with non-reference frames skipped (what a 1 FPS sampler really needs), then a full
`Scanner.scan` with its time per stage per sampled frame, and the scan's speed as a multiple of real time.

    python tools/bench_scan.py ../shared/data/ffpp_smoke/*.mp4 [--model NAME] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import av

from streamguard.inference.models import load_classifier
from streamguard.ingest.av_source import probe
from streamguard.scan import FileReport, Scanner, ScanSettings


def decode_floor(path: Path, skip_nonref: bool) -> tuple[float, float, int]:
    """(wall s, CPU s, frames decoded) for decoding every frame (or every reference frame), no conversion."""
    wall, cpu = time.perf_counter(), time.process_time()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if skip_nonref:
            stream.codec_context.skip_frame = "NONREF"
        n = sum(1 for _ in container.decode(stream))
    return time.perf_counter() - wall, time.process_time() - cpu, n


def bench(path: Path, scanner: Scanner, repeat: int) -> None:
    info = probe(str(path))
    duration = info["duration_s"] or 0.0
    floors = {mode: min((decode_floor(path, mode == "nonref") for _ in range(repeat)), key=lambda r: r[1])
              for mode in ("full", "nonref")}
    best: tuple[float, float, dict[str, float], FileReport] | None = None
    for _ in range(repeat):
        scanner.timings = dict.fromkeys(scanner.timings, 0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        result = scanner.scan(path)
        run = (time.perf_counter() - wall, time.process_time() - cpu, dict(scanner.timings), result.report)
        best = run if best is None or run[1] < best[1] else best
    assert best is not None, "--repeat must be at least 1"
    wall, cpu, stages, report = best
    n = max(report.sampled_frames, 1)
    print(f"\n{path.name}: {info['width']}x{info['height']} {info['codec']} {info['fps']:.2f} fps, {duration:.1f} s")
    for mode, (fw, fc, frames) in floors.items():
        print(f"  decode floor ({mode:6s}): {frames:4d} frames  wall {fw*1000:7.0f} ms  CPU {fc*1000:7.0f} ms"
              f"  ({fc/frames*1000:.2f} ms CPU/frame, {duration/fw:.0f}x real time)")
    print(f"  scan: {report.sampled_frames} samples, {sum(p.samples for p in report.participants)} scored faces,"
          f" verdict {report.verdict.value} {report.score}")
    for stage, seconds in stages.items():
        print(f"    {stage:9s} {seconds/n*1000:7.2f} ms per sampled frame  ({seconds*1000:7.0f} ms total)")
    model_s = stages["classify"]
    full_floor_cpu = floors["full"][1]
    print(f"  scan total: wall {wall*1000:.0f} ms, CPU {cpu*1000:.0f} ms = {duration/wall:.0f}x real time")
    print(f"  scan CPU / full-decode floor CPU = {cpu/full_floor_cpu:.2f}"
          f"  (goal <= 1.5 + model {model_s/full_floor_cpu:.2f}); "
          f"without the model: {(cpu-model_s)/full_floor_cpu:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="+", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-skip-nonref", action="store_true", help="decode every frame in the scan too")
    args = ap.parse_args()
    classifier = load_classifier(args.model)
    settings = ScanSettings(fps=args.fps, skip_nonref=not args.no_skip_nonref)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {classifier.card.name}"
          f" ({classifier.backend}, {classifier.input_size} px); fps {args.fps}; skip_nonref {settings.skip_nonref};"
          f" best of {args.repeat}")
    scanner = Scanner(classifier, settings)
    try:
        for video in args.videos:
            bench(video, scanner, args.repeat)
    finally:
        scanner.close()


if __name__ == "__main__":
    main()
