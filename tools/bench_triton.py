#!/usr/bin/env python
"""Latency per batch size: the local ONNX Runtime backend against the triton backend (one gRPC request per batch).

    python tools/bench_triton.py                          # starts nvidia-pytriton's tritonserver here (CPU)
    python tools/bench_triton.py --url triton:8001        # a running server (e.g. a GPU one) serving the model
    python tools/bench_triton.py --batches 1 4 16 64 --runs 50 --json out/bench_triton.json
    TRITON_SERVER_DIR=/opt/tritonserver python tools/bench_triton.py --runtime onnxruntime --tensorrt \
        --parity crops.npy --tolerance 0.02      # a GPU Triton (tools/gpu_check.sh)

Both run the same crops through the same classifier call the batcher makes (`predict`: preprocessing, then the
model). Triton's side is split with its own statistics: time in its queue and in the model, per request; the rest
is the client (serialisation, gRPC on loopback). On one CPU machine Triton cannot be faster than the local
backend (the same ONNX Runtime work plus the transport): what it buys is a shared GPU for many instances.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from streamguard.config import TritonSettings  # noqa: E402
from streamguard.inference.models import resolve_model  # noqa: E402
from streamguard.inference.onnx import OnnxClassifier  # noqa: E402


def timed(fn: Callable[[np.ndarray], object], crops: np.ndarray, runs: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn(crops)
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        fn(crops)
        times[i] = time.perf_counter() - t
    return times * 1000.0


def summary(ms: np.ndarray, batch: int) -> dict:
    p50, p95 = (round(float(np.percentile(ms, q)), 3) for q in (50, 95))
    return {"call_p50_ms": p50, "call_p95_ms": p95, "per_face_p50_ms": round(p50 / batch, 3)}


def server_split(before: dict, after: dict) -> dict:
    """Triton's own mean queue and compute time per request between two statistics snapshots."""
    def get(stats: dict, part: str) -> tuple[int, int]:
        d = stats["inference_stats"].get(part, {})
        return int(d.get("count", 0)), int(d.get("ns", 0))

    out = {}
    for part in ("queue", "compute_infer", "compute_input", "compute_output"):
        (c0, ns0), (c1, ns1) = get(before, part), get(after, part)
        out[f"{part}_ms"] = round((ns1 - ns0) / max(1, c1 - c0) / 1e6, 3)
    return out


def stats(url: str, model: str) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()


def bench_model(local: OnnxClassifier, remote: Any, url: str, name: str, args: argparse.Namespace) -> list[dict]:
    size = local.input_size
    rows = []
    for batch in args.batches:
        crops = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        ms_local = timed(local.predict, crops, args.runs, args.warmup)
        timed(remote.predict, crops, args.warmup, 0)  # warm up outside the server statistics
        before = stats(url, name)
        ms_triton = timed(remote.predict, crops, args.runs, 0)
        split = server_split(before, stats(url, name))
        r = {"model": name, "batch": batch, "local": summary(ms_local, batch), "triton": summary(ms_triton, batch),
             "triton_server": split}
        rows.append(r)
        print(f"{name} batch {batch:>3}: local p50 {r['local']['call_p50_ms']:8.2f} ms  triton p50 "
              f"{r['triton']['call_p50_ms']:8.2f} ms (server: queue {split['queue_ms']:.2f}, model "
              f"{split['compute_infer_ms']:.2f} ms)  per face {r['local']['per_face_p50_ms']:.2f} / "
              f"{r['triton']['per_face_p50_ms']:.2f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="name in engines/ or path to an .onnx (default model)")
    p.add_argument("--url", default=None, help="a running Triton's gRPC host:port (default: start one here)")
    p.add_argument("--model-name", default=None, help="the model's name on that server (default: the card's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="local ONNX Runtime threads (0: the backend's 2)")
    p.add_argument("--max-queue-delay-ms", type=float, default=10.0, help="the local server's dynamic batching "
                   "delay (a lone request waits this long for others unless its batch is full)")
    p.add_argument("--runtime", choices=["python", "onnxruntime"], default=None, help="the local server's "
                   "repository (default: python for nvidia-pytriton's server, onnxruntime with TRITON_SERVER_DIR)")
    p.add_argument("--model-config-name", default=None, help="e.g. cpu: the local server uses configs/cpu.pbtxt")
    p.add_argument("--tensorrt", action="store_true", help="also the <model>-tensorrt plan (from the engine cache)")
    p.add_argument("--parity", type=Path, default=None, help="real crops (.npy, tools/bench_gpu.py --save-crops): "
                   "Triton's scores against the local backend's")
    p.add_argument("--tolerance", type=float, default=1e-5, help="--parity: max |dP(fake)| (GPU: 0.02)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from streamguard.inference.triton import load_triton_classifier

    onnx_path, card = resolve_model(args.model)
    server = None
    url = args.url
    runtime: str = "remote"
    if url is None:
        from triton_local import LocalTriton, find_distribution

        from streamguard.inference.triton_repository import LayoutOptions, layout

        why = LocalTriton.unavailable()
        if why:
            print(f"cannot start a local Triton: {why}", file=sys.stderr)
            return 2
        dist, _ = find_distribution()
        served: Literal["onnxruntime", "python"] = args.runtime or (
            "onnxruntime" if dist is not None and dist.full else "python")
        runtime = served
        repo = Path(tempfile.mkdtemp(prefix="bench-triton-"))
        layout(repo, args.model, LayoutOptions(runtime=served, max_batch=max(64, *args.batches),
                                               max_queue_delay_ms=args.max_queue_delay_ms, tensorrt=args.tensorrt))
        server = LocalTriton(repo, model_config_name=args.model_config_name)
        server.start(timeout_s=300)  # a GPU server may take a while to load
        url = server.url
    where = args.url or (f"local tritonserver ({'TRITON_SERVER_DIR' if runtime == 'onnxruntime' else 'nvidia-pytriton'}"
                         f", {runtime} repository)")
    failed = False
    local = OnnxClassifier(onnx_path, card, threads=args.threads)
    names = [args.model_name or card.name] + ([f"{card.name}-tensorrt"] if args.tensorrt else [])
    rows: list[dict] = []
    parity: dict[str, str] = {}
    try:
        for name in names:
            settings = TritonSettings(url=url, model_name=name, timeout_s=30.0, fallback="unscored")
            remote = load_triton_classifier(settings, onnx_path, card, max_batch=max(args.batches))
            try:
                if not remote.healthy:
                    print(f"Triton is not serving {name}: {remote.degraded_reason}", file=sys.stderr)
                    return 2
                if args.parity is not None:
                    from streamguard.inference.engine_cache import compare_scores

                    crops = np.load(args.parity)
                    step = max(args.batches)
                    got = np.concatenate([remote.predict(crops[i:i + step]) for i in range(0, len(crops), step)])
                    report = compare_scores(local.predict(crops), got, card.threshold, args.tolerance)
                    parity[name] = report.summary()
                    failed |= not report.ok
                    print(f"{name} parity: {report.summary()}", flush=True)
                rows += bench_model(local, remote, url, name, args)
            finally:
                remote.close()
    finally:
        if server is not None:
            server.close()
    result = {"model": card.name, "input_size": card.preprocess.input_size, "runs": args.runs,
              "max_queue_delay_ms": args.max_queue_delay_ms if args.url is None else None,
              "triton": where,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "parity": parity, "results": rows}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
