#!/usr/bin/env python3
"""Decode cost of 1 FPS sampling, on the CPU and on NVDEC: what a many-stream host spends before any face is found.

N streams (threads) each decode the same H.264 clip through `iter_sampled_frames` (skip_frame NONREF, RGB for kept
frames only), as fast as they can, once on the CPU and once on NVDEC when `choose_hwdecode("auto")` finds it works.
Prints, per mode, the host CPU seconds per stream per minute of video (the number that sets streams per host), the
aggregate decode speed in multiples of real time, and wall time.

    python tools/bench_decode.py                      # 720p30, 60 s clip, 1 and 8 streams
    python tools/bench_decode.py --streams 1 4 16 --size 1920x1080 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_test_media  # noqa: E402

from streamguard.ingest.av_source import DecodeStats, iter_sampled_frames, probe  # noqa: E402
from streamguard.ingest.nvdec import choose_hwdecode  # noqa: E402


def make_clip(out: Path, seconds: float, size: tuple[int, int], fps: int) -> Path:
    photos = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "real_faces").glob("*.jp*g"))
    images: list[Any] = photos[:8] or make_test_media.synthetic_images(8, size)
    per_image = seconds / len(images)
    return make_test_media.make_slideshow(images, out, fps=fps, seconds_per_image=per_image, size=size)


def decode_once(clip: Path, hwaccel: Any) -> DecodeStats:
    stats = DecodeStats()
    for _ in iter_sampled_frames(str(clip), fps=1.0, stats=stats, hwaccel=hwaccel):
        pass
    return stats


def run(clip: Path, streams: int, hwaccel: Any) -> dict[str, float]:
    duration = float(probe(str(clip))["duration_s"] or 0.0)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: decode_once(clip, hwaccel), range(streams)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "streams": streams,
        "cpu_s_per_stream_minute": round(cpu / streams / (duration / 60.0), 3),
        "realtime_x": round(streams * duration / wall, 1),
        "wall_s": round(wall, 2),
        "decoded_per_stream": results[0].decoded,
        "sampled_per_stream": results[0].sampled,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=60.0, help="clip length")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--clip", type=Path, help="an H.264 file to use instead of making one")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    choice = choose_hwdecode("auto")
    modes: dict[str, Any] = {"cpu": None}
    if choice.hwaccel is not None:
        modes["nvdec"] = choice.hwaccel
    with tempfile.TemporaryDirectory() as tmp:
        clip = args.clip or make_clip(Path(tmp) / "clip.mp4", args.seconds, (w, h), args.fps)
        info = probe(str(clip))
        print(f"{platform.machine()} {os.cpu_count()} CPUs; clip {info['width']}x{info['height']} {info['codec']} "
              f"{info['fps']:.0f} fps {info['duration_s']:.0f} s; NVDEC: {choice.reason}")
        results = []
        for mode, hwaccel in modes.items():
            for n in args.streams:
                row = {"mode": mode, **run(clip, n, hwaccel)}
                results.append(row)
                print(f"  {mode:5s} {n:3d} streams: {row['cpu_s_per_stream_minute']:6.2f} CPU s per stream-minute, "
                      f"{row['realtime_x']:7.1f}x real time in all, {row['wall_s']:.1f} s wall "
                      f"({row['decoded_per_stream']} decoded, {row['sampled_per_stream']} sampled per stream)")
    if args.json:
        args.json.write_text(json.dumps({"nvdec": choice.reason, "clip": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
