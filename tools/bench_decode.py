#!/usr/bin/env python3
"""Decode cost of 1 FPS sampling, on the CPU and on NVDEC: what a many-stream host spends before any face is found.

N streams (threads) each decode the same H.264 clip through `iter_sampled_frames` (skip_frame NONREF, RGB for kept
frames only), as fast as they can, once on the CPU and once on NVDEC when `choose_hwdecode("auto")` finds it works.
Prints, per mode, the host CPU seconds per stream per minute of video (the number that sets streams per host), the
aggregate decode speed in multiples of real time, and wall time.

    python tools/bench_decode.py                      # 720p30, 60 s clip, 1 and 8 streams
    python tools/bench_decode.py --streams 1 4 16 --size 1920x1080 --json out.json
    python tools/bench_decode.py --require-nvdec      # exit 1 unless NVDEC works and samples the CPU's frames

Needs only PyAV and numpy (it runs on a bare GPU machine): the clip is made here with libx264, a moving textured
pattern whose bitrate (~3-4 Mbit/s at 720p30) is in the range of real cameras.
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

import av
import numpy as np

from streamguard.ingest.av_source import DecodeStats, iter_sampled_frames, probe
from streamguard.ingest.nvdec import choose_hwdecode


def make_clip(out: Path, seconds: float, size: tuple[int, int], fps: int) -> Path:
    """H.264 (libx264, B-frames, 2 s GOP) of a textured pattern panning across the frame."""
    w, h = size
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (h // 8 + 1, (w + 2 * fps * 4) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture, 8, axis=0), 8, axis=1)  # 8 px blocks: detail a codec must spend bits on
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", "g": str(2 * fps)}
        for i in range(int(seconds * fps)):
            x = (4 * i) % (2 * fps * 4)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:h, x : x + w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def compare(clip: Path, hwaccel: Any) -> dict[str, float]:
    """NVDEC against the CPU on the frames the sampler keeps: same times, pixels within YUV->RGB rounding."""
    cpu = list(iter_sampled_frames(str(clip), fps=1.0))
    gpu = list(iter_sampled_frames(str(clip), fps=1.0, hwaccel=hwaccel))
    same_times = [f.pts_s for f in cpu] == [f.pts_s for f in gpu]
    diffs = [float(np.abs(a.rgb.astype(np.int16) - b.rgb.astype(np.int16)).mean())
             for a, b in zip(cpu, gpu, strict=False)]
    return {"same_times": same_times, "frames": len(cpu), "mean_abs_diff": round(max(diffs, default=0.0), 3)}


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
    ap.add_argument("--require-nvdec", action="store_true", help="fail unless NVDEC works and matches the CPU")
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
        parity = compare(clip, choice.hwaccel) if choice.hwaccel is not None else None
        if parity is not None:
            print(f"  NVDEC vs CPU on sampled frames: {parity}")
        results = []
        for mode, hwaccel in modes.items():
            for n in args.streams:
                row = {"mode": mode, **run(clip, n, hwaccel)}
                results.append(row)
                print(f"  {mode:5s} {n:3d} streams: {row['cpu_s_per_stream_minute']:6.2f} CPU s per stream-minute, "
                      f"{row['realtime_x']:7.1f}x real time in all, {row['wall_s']:.1f} s wall "
                      f"({row['decoded_per_stream']} decoded, {row['sampled_per_stream']} sampled per stream)")
    if args.json:
        report = {"nvdec": choice.reason, "parity": parity, "clip": info, "results": results}
        args.json.write_text(json.dumps(report, indent=2))
    if args.require_nvdec and not (parity and parity["same_times"] and parity["mean_abs_diff"] < 2.0):
        sys.exit(f"NVDEC check failed: {choice.reason}; {parity}")


if __name__ == "__main__":
    main()
