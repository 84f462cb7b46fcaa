#!/usr/bin/env python
"""Per-face CPU latency of a model with ONNX Runtime, at batch 1 and batch 16 (p50 / p95 over repeated runs).

    python tools/bench_model.py                       # the default model (engines/streamguard-sbi)
    python tools/bench_model.py mesonet4-df --threads 2 --runs 200

Inputs are real-sized random crops through the card's preprocessing; the numbers are the classifier call only
(preprocess + session.run), not face detection. Other processes on the machine add noise: compare runs taken
back to back. `rss_mb` is the process's resident memory after each batch size (batches run in the order given):
ONNX Runtime's arena keeps what the largest batch needed, which is what a serving process holds for its model.
A batch runs as calls of `--call-batch` faces, as the service's CPU backend does (batcher.cpu_call_batch); with
several values each has its own session, and the RSS is the process's: all sessions together (measure memory with one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_serve  # noqa: E402  (tools/: this process's RSS)

from streamguard.inference.classifier import CPU_CALL_BATCH
from streamguard.inference.models import resolve_model
from streamguard.inference.onnx import OnnxClassifier


def rss_mb() -> float:
    return bench_serve.rss_bytes() / 2**20


def bench(classifier: OnnxClassifier, batch: int, runs: int, warmup: int, seed: int = 0) -> dict:
    size = classifier.input_size
    crops = np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(warmup):
        classifier.predict(crops)
    times = np.empty(runs)
    cpu_start = time.process_time()
    for i in range(runs):
        t = time.perf_counter()
        classifier.predict(crops)
        times[i] = time.perf_counter() - t
    # CPU time, not wall time: what a model call takes from a busy server (threads that split a call add their
    # synchronisation to it even when they shorten the wait).
    cpu_per_face_ms = (time.process_time() - cpu_start) * 1000.0 / (runs * batch)
    per_face = times * 1000.0 / batch
    return {
        "batch": batch,
        "runs": runs,
        "call_p50_ms": round(float(np.percentile(times * 1000.0, 50)), 3),
        "per_face_p50_ms": round(float(np.percentile(per_face, 50)), 3),
        "per_face_p95_ms": round(float(np.percentile(per_face, 95)), 3),
        "cpu_per_face_ms": round(cpu_per_face_ms, 3),
        "rss_mb": round(rss_mb()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="name in engines/ or path to an .onnx (default model)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0: up to 2; the service's batcher.cpu_threads is 1)")
    p.add_argument("--runs", type=int, default=100, help="timed calls per batch size")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--call-batch", type=int, nargs="+", default=[CPU_CALL_BATCH], metavar="N",
                   help=f"faces per session.run (the service's batcher.cpu_call_batch, default {CPU_CALL_BATCH}); "
                        "several: each is measured back to back at every batch size, a before/after in one run")
    args = p.parse_args(argv)
    if min(args.call_batch) < 1:
        p.error("--call-batch: each value must be at least 1")

    onnx_path, card = resolve_model(args.model)
    before = rss_mb()
    classifiers = {n: OnnxClassifier(onnx_path, card, threads=args.threads, call_batch=n) for n in args.call_batch}
    results = {
        "model": card.name,
        "onnx": str(onnx_path),
        "onnx_bytes": onnx_path.stat().st_size,
        "input_size": card.preprocess.input_size,
        "threads": args.threads,
        "rss_mb_before_model": round(before),
        "results": [{"call_batch": n, **bench(c, b, args.runs, args.warmup)}
                    for b in args.batches for n, c in classifiers.items()],
    }
    for r in results["results"]:
        print(f"{card.name}: batch {r['batch']:>3} in calls of {r['call_batch']}: "
              f"per face p50 {r['per_face_p50_ms']:.2f} ms, "
              f"p95 {r['per_face_p95_ms']:.2f} ms, CPU {r['cpu_per_face_ms']:.2f} ms "
              f"(call p50 {r['call_p50_ms']:.2f} ms, {r['runs']} runs), "
              f"RSS {r['rss_mb']:.0f} MB (before the model {results['rss_mb_before_model']} MB)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
