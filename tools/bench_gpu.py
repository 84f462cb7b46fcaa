#!/usr/bin/env python
"""Classifier throughput and latency against batch size, on a GPU backend or on the CPU, with the model's floor.

    python tools/bench_gpu.py                                   # default model, best backend here, batch 1..256
    python tools/bench_gpu.py mesonet-meso4-df --backend cuda --json bench.json
    python tools/bench_gpu.py engines/mesonet-meso4-df.onnx --backend onnxruntime --batches 1 2 4 8 --runs 20

For each batch size: call latency p50/p99 (a `predict` call, host crops in and scores out, so copies and
preprocessing count), faces/s at p50, and per-face time. Then:

* participants per GPU at --fps (1 sample per second by default) = faces/s of the best batch whose p99 stays within
  --budget-ms (a sample waits at most one call on top of the batcher's max_wait), divided by --fps;
* the floor: the model's FLOPs per face (Conv/Gemm/MatMul MACs from the ONNX graph) over the device's measured peak
  (an FP16 matrix product on a GPU through PyTorch or CuPy; FP32 on the CPU through PyTorch or NumPy) = the most
  faces/s the arithmetic alone allows, and how far the measured best is from it.

Random crops of the model's input size: timing does not depend on what the faces show. The last line is JSON.

Parity on real faces (the GPU backends must match ONNX Runtime on the CPU: max |dP(fake)| <= 0.02, no decision
flipped at the card's threshold):

    python tools/bench_gpu.py --save-crops crops.npy        # here: real photos -> face crops (needs mediapipe)
    python tools/bench_gpu.py --backend cuda --parity crops.npy   # on the GPU machine (or a folder of photos)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamguard.inference.backends import BACKENDS, BackendOptions, select_backend  # noqa: E402
from streamguard.inference.card import ModelCard  # noqa: E402
from streamguard.inference.classifier import Classifier  # noqa: E402
from streamguard.inference.engine_cache import ParityReport, compare_scores  # noqa: E402
from streamguard.inference.flops import count_macs  # noqa: E402
from streamguard.inference.gpu import Availability, probe_availability  # noqa: E402
from streamguard.inference.models import resolve_model  # noqa: E402

DEFAULT_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def time_batches(classifier: Classifier, batches: list[int], runs: int, warmup: int, seed: int = 0,
                 ) -> list[dict[str, Any]]:
    size = classifier.input_size
    rng = np.random.default_rng(seed)
    rows = []
    for b in batches:
        crops = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
        for _ in range(warmup):
            classifier.predict(crops)
        times = np.empty(runs)
        for i in range(runs):
            t = time.perf_counter()
            classifier.predict(crops)
            times[i] = time.perf_counter() - t
        p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
        rows.append({
            "batch": b,
            "runs": runs,
            "p50_ms": round(float(p50) * 1e3, 3),
            "p99_ms": round(float(p99) * 1e3, 3),
            "faces_per_s": round(b / float(p50), 1),
            "per_face_ms": round(float(p50) * 1e3 / b, 4),
        })
    return rows


def real_crops(card: ModelCard, folders: list[Path] | None) -> np.ndarray:
    """Face crops cut from real photos by the service's own face pipeline (aligned crops are only resized)."""
    from streamguard.inference.calibration import face_crops, image_files

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if folders is None:
        photos = image_files(shared / "real_faces")
        aligned = image_files(shared / "mesonet" / "test_images")
        parts = [face_crops(photos, card), face_crops(aligned, card, images_are_crops=True)]
    else:
        parts = [face_crops(image_files(f), card) for f in folders]
    return np.concatenate([p for p in parts if len(p)])


def check_parity(clf: Classifier, onnx_path: Path, card: ModelCard, source: Path) -> ParityReport:
    from streamguard.inference.onnx import OnnxClassifier

    crops = np.load(source) if source.suffix == ".npy" else real_crops(card, [source])
    reference = OnnxClassifier(onnx_path, card).predict(crops)
    return compare_scores(reference, clf.predict(crops), card.threshold)


def measure_peak(on_gpu: bool, seconds: float = 2.0) -> dict[str, Any]:
    """Measured matrix-product peak: FP16 on a GPU (torch, else CuPy), FP32 on the CPU (torch, else NumPy)."""
    n = 8192 if on_gpu else 2048
    if on_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                a = torch.randn(n, n, device="cuda", dtype=torch.float16)
                b = torch.randn(n, n, device="cuda", dtype=torch.float16)
                return _time_matmul(lambda: a @ b, torch.cuda.synchronize, n, seconds, "fp16", "torch")
        except ImportError:
            pass
        try:
            import cupy as cp

            a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
            b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
            return _time_matmul(lambda: a @ b, cp.cuda.runtime.deviceSynchronize, n, seconds, "fp16", "cupy")
        except Exception as exc:  # ImportError, or CuPy without a usable device (CUDARuntimeError)
            return {"tflops": None, "note": f"no torch or cupy with CUDA to measure the GPU's peak ({exc})"}
    try:
        import torch

        ta = torch.randn(n, n)
        tb = torch.randn(n, n)
        return _time_matmul(lambda: ta @ tb, lambda: None, n, seconds, "fp32", "torch")
    except ImportError:
        na = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        return _time_matmul(lambda: na @ na, lambda: None, n, seconds, "fp32", "numpy")


def _time_matmul(op: Callable[[], object], sync: Callable[[], object], n: int, seconds: float, dtype: str, via: str,
                 windows: int = 5) -> dict[str, Any]:
    """The best of `windows` timed windows: a peak, not an average over whatever else the machine was doing."""
    for _ in range(3):
        op()
    sync()
    best = 0.0
    for _ in range(windows):
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows:
            op()
            count += 1
            if count % 8 == 0:
                sync()
        sync()
        best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return {"tflops": round(best / 1e12, 3), "dtype": dtype, "via": via, "n": n}


def versions() -> dict:
    """The runtimes that produced the numbers: results from another build are not comparable."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "cuda-bindings", "cuda-python", "cupy-cuda12x",
                 "cupy-cuda13x", "tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def device_name(avail: Availability, backend: str) -> str:
    if backend != "onnxruntime" and avail.gpu is not None:
        return f"{avail.gpu.name} ({avail.gpu.sm})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} logical cores"


def summarize(
    rows: list[dict], budget_ms: float, fps: float, gflops_per_face: float, peak_tflops: float | None
) -> dict:
    within = [r for r in rows if r["p99_ms"] <= budget_ms]
    best = max(within, key=lambda r: r["faces_per_s"]) if within else None
    floor = None
    if peak_tflops:
        max_faces = peak_tflops * 1e12 / (gflops_per_face * 1e9)
        floor = {"max_faces_per_s": round(max_faces, 1), "min_ms_per_face": round(1e3 / max_faces, 5)}
        if best:
            floor["best_fraction_of_floor"] = round(best["faces_per_s"] / max_faces, 4)
    return {
        "budget_ms": budget_ms,
        "fps": fps,
        "best_batch": best["batch"] if best else None,
        "best_faces_per_s": best["faces_per_s"] if best else None,
        "participants": int(best["faces_per_s"] / fps) if best else 0,
        "floor": floor,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="name in engines/ or path to an .onnx (default model)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    p.add_argument("--runs", type=int, default=50, help="timed calls per batch size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-ms", type=float, default=100.0, help="p99 call latency allowed for the capacity figure")
    p.add_argument("--fps", type=float, default=1.0, help="samples per second per participant")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time spent measuring the matmul peak (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--parity", type=Path, default=None, help=".npy of face crops or a folder of photos: compare "
                   "the backend with ONNX Runtime on the CPU")
    p.add_argument("--save-crops", type=Path, default=None, help="write real face crops (from --photos) to this "
                   ".npy for --parity on a machine without mediapipe, and stop")
    p.add_argument("--photos", type=Path, nargs="+", default=None,
                   help="photo folders for --save-crops (default: ../shared/data real_faces + mesonet test images)")
    return p.parse_args(argv)


def print_table(rows: list[dict[str, Any]], peak: dict[str, Any], summary: dict[str, Any], fps: float,
                budget_ms: float) -> None:
    print(f"{'batch':>6} {'p50 ms':>9} {'p99 ms':>9} {'faces/s':>10} {'ms/face':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['faces_per_s']:>10.1f} "
              f"{r['per_face_ms']:>9.3f}")
    if peak.get("tflops"):
        print(f"peak: {peak['tflops']} TFLOP/s ({peak['dtype']} matmul, {peak['via']})")
    if summary["floor"]:
        f = summary["floor"]
        print(f"floor: {f['max_faces_per_s']:.0f} faces/s from FLOPs alone ({f['min_ms_per_face']:.4f} ms/face)"
              + (f"; best measured = {100 * f['best_fraction_of_floor']:.1f} % of it" if "best_fraction_of_floor" in f
                 else ""))
    if summary["best_batch"]:
        print(f"capacity: {summary['participants']} participants at {fps:g} FPS (batch {summary['best_batch']},"
              f" {summary['best_faces_per_s']:.0f} faces/s, p99 within {budget_ms:g} ms)")
    else:
        print(f"capacity: no batch size kept p99 within {budget_ms:g} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    onnx_path, card = resolve_model(args.model)
    if args.save_crops is not None:
        crops = real_crops(card, args.photos)
        np.save(args.save_crops, crops)
        print(f"saved {len(crops)} real face crops ({card.preprocess.input_size} px) to {args.save_crops}")
        return 0
    avail = probe_availability()
    opts = BackendOptions(max_batch=max(args.batches), precision=args.precision, threads=args.threads)
    sel = select_backend(onnx_path, args.backend, options=opts, probe=avail)
    for w in sel.warnings:
        print(f"warning: {w}", file=sys.stderr)
    clf = sel.classifier
    engine = getattr(clf, "engine", None)
    backend = sel.backend + (f" ({engine}, {getattr(clf, 'precision', '')})" if engine else "")
    macs = count_macs(onnx_path)
    on_gpu = sel.backend != "onnxruntime"
    print(f"model {card.name}: {macs.gflops:.3f} GFLOPs per face ({macs.macs / 1e6:.1f} M MACs), "
          f"input {card.preprocess.input_size} px")
    print(f"backend {backend} on {device_name(avail, sel.backend)}")

    parity = None
    if args.parity is not None:
        parity = check_parity(clf, onnx_path, card, args.parity)
        print(f"parity with onnxruntime (CPU) on real faces: {parity.summary()}")
    rows = time_batches(clf, args.batches, args.runs, args.warmup)
    peak = measure_peak(on_gpu, args.peak_seconds) if args.peak_seconds > 0 else {"tflops": None}
    summary = summarize(rows, args.budget_ms, args.fps, macs.gflops, peak.get("tflops"))

    print_table(rows, peak, summary, args.fps, args.budget_ms)
    result = {
        "model": card.name,
        "onnx": str(onnx_path),
        "backend": sel.backend,
        "engine": engine,
        "precision": getattr(clf, "precision", "fp32" if sel.backend == "onnxruntime" else None),
        "device": device_name(avail, sel.backend),
        "machine": avail.describe(),
        "versions": versions(),
        "warnings": sel.warnings,
        "gflops_per_face": round(macs.gflops, 4),
        "macs_by_op": macs.by_op,
        "peak": peak,
        "results": rows,
        "summary": summary,
        "parity": None if parity is None else {
            "n": parity.n, "max_abs_diff": parity.max_abs_diff, "mean_abs_diff": parity.mean_abs_diff,
            "decision_flips": parity.decision_flips, "ok": parity.ok},
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    clf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
