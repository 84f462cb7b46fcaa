#!/usr/bin/env python
"""Build (or reuse) the TensorRT engine of a model into engines/cache/ — the recipe in engines/BUILD.md.

    python tools/build_engine.py mesonet-meso4-df                         # FP16, batch 1..64, tuned for 16
    python tools/build_engine.py engines/mesonet-meso4-df.onnx --max-batch 128 --opt-batch 32
    python tools/build_engine.py mesonet-meso4-df --precision int8 --calibration ../shared/data/real_faces

The engine is keyed by (model sha256, TensorRT version, GPU compute capability, precision, profile[, calibration
set]) and rebuilt only when one of them changes; the output says which. INT8 is kept only if it matches ONNX Runtime
on held-out real faces (max |dP(fake)| <= --tolerance, no decision flipped); otherwise FP16 is built instead.
Exit status: 0 built or reused, 1 the model or the build failed, 2 this machine cannot build (no GPU, TensorRT or
cuda-python), with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamguard.inference.engine_build import (  # noqa: E402
    DEFAULT_CALIBRATION_BATCH,
    DEFAULT_TOLERANCE,
    EngineBuildError,
    build_engine,
)
from streamguard.inference.engine_cache import DEFAULT_MAX_BATCH  # noqa: E402
from streamguard.inference.gpu import BackendUnavailable  # noqa: E402
from streamguard.inference.models import ModelNotFound  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="name in engines/ or path to an .onnx (default model)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="largest batch the engine runs")
    p.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default 16, the batcher's)")
    p.add_argument("--calibration", type=Path, default=None, help="INT8: folder of real face photos")
    p.add_argument("--calibration-are-crops", action="store_true", help="the calibration images are aligned crops")
    p.add_argument("--calibration-batch", type=int, default=DEFAULT_CALIBRATION_BATCH)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="INT8: max |dP(fake)| allowed")
    p.add_argument("--no-int8-fallback", action="store_true", help="fail instead of building FP16 when INT8 is off")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: engines/cache")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching engine is cached")
    p.add_argument("--keep-stale", action="store_true", help="keep engines built for other TensorRT versions/GPUs")
    p.add_argument("--workspace-gb", type=float, default=None, help="TensorRT builder workspace limit")
    args = p.parse_args(argv)

    try:
        result = build_engine(
            args.model,
            precision=args.precision,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            calibration=args.calibration,
            calibration_images_are_crops=args.calibration_are_crops,
            calibration_batch=args.calibration_batch,
            tolerance=args.tolerance,
            int8_fallback=not args.no_int8_fallback,
            cache_dir=args.cache_dir,
            force=args.force,
            keep_stale=args.keep_stale,
            workspace_bytes=int(args.workspace_gb * (1 << 30)) if args.workspace_gb else None,
        )
    except BackendUnavailable as exc:
        print(f"error: cannot build a TensorRT engine here: {exc}", file=sys.stderr)
        return 2
    except (ModelNotFound, EngineBuildError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
