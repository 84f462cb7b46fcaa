"""`streamguard engine build`: a cached TensorRT engine for a model, rebuilt only when its key changes.

    result = build_engine("mesonet-meso4-df", precision="fp16", max_batch=64)

Steps: check the machine (a clear error without a GPU, TensorRT or cuda-python, or for a precision this TensorRT
cannot build), compute the key (model sha256, TensorRT version, GPU model and compute capability, precision, profile,
calibration set), reuse a cached engine on a hit, else
build and store it. INT8 is kept only where it holds accuracy: the engine's scores on held-out real face crops must
match ONNX Runtime on the CPU within `tolerance` with no decision flipped at the card's threshold; otherwise the
build falls back to FP16 (or fails with `int8_fallback=False`), and the result says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.engine_cache import (
    DEFAULT_MAX_BATCH,
    MAX_SUPPORTED_BATCH,
    EngineCache,
    EngineKey,
    ParityReport,
    Precision,
    Profile,
    calibration_batches,
    choose_profile,
    compare_scores,
    crops_sha256,
    default_cache_dir,
)
from streamguard.inference.gpu import (
    CUDA_PYTHON_MISSING,
    NO_GPU,
    TENSORRT_MISSING,
    Availability,
    BackendUnavailable,
    precision_problem,
    probe_availability,
    tensorrt_precision_problem,
)
from streamguard.inference.models import ENGINES_DIR, file_sha256, resolve_model
from streamguard.inference.onnx import OnnxClassifier
from streamguard.inference.tensorrt import EngineBuildError, engine_facts  # one error type for cli.py to catch

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_BATCH = 16
DEFAULT_TOLERANCE = 0.02


@dataclass(slots=True)
class EngineBuildResult:
    path: Path
    key: EngineKey
    built: bool  # False: a cached engine was reused
    precision: Precision  # what the engine is (int8 may have fallen back to fp16)
    reasons: list[str] = field(default_factory=list)  # why it was (re)built
    seconds: float = 0.0
    parity: ParityReport | None = None  # INT8: on held-out real crops against ONNX Runtime on the CPU
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = "built" if self.built else "reused"
        why = f" ({'; '.join(self.reasons)})" if self.built and self.reasons else ""
        lines = [f"{what} {self.precision} engine {self.path}{why}"]
        if self.parity is not None:
            lines.append(f"INT8 accuracy on held-out real faces: {self.parity.summary()}")
        lines += self.notes
        return "\n".join(lines)


class BuildArgumentError(ValueError):
    """A build argument out of range; `argument` names it (the keyword of build_engine, the CLI flag with dashes)."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


def check_build_args(
    *,
    precision: str = "fp16",
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    calibration: Path | None = None,
    calibration_batch: int = DEFAULT_CALIBRATION_BATCH,
    tolerance: float = DEFAULT_TOLERANCE,
    workspace_bytes: int | None = None,
    require_calibration: bool = False,
) -> None:
    """Check build_engine's arguments without touching the GPU: BuildArgumentError naming the first bad one.

    require_calibration: INT8 without `calibration` is an error here too (the CLI; build_engine itself first says
    whether this machine can build INT8 at all).
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise BuildArgumentError("precision", f"use fp32, fp16 or int8, got {precision!r}")
    if not 1 <= max_batch <= MAX_SUPPORTED_BATCH:
        raise BuildArgumentError("max_batch", f"must lie in 1..{MAX_SUPPORTED_BATCH}, got {max_batch}")
    if opt_batch is not None and not 1 <= opt_batch <= max_batch:
        raise BuildArgumentError("opt_batch", f"must lie in 1..max_batch ({max_batch}), got {opt_batch}")
    if not 0.0 <= tolerance <= 1.0:
        raise BuildArgumentError("tolerance", f"must lie in 0..1 (a difference of P(fake)), got {tolerance}")
    if calibration_batch < 1:
        raise BuildArgumentError("calibration_batch", f"must be >= 1, got {calibration_batch}")
    if workspace_bytes is not None and workspace_bytes <= 0:
        raise BuildArgumentError("workspace_bytes", f"must be > 0, got {workspace_bytes}")
    if calibration is not None:
        if precision != "int8":
            raise BuildArgumentError("calibration", f"only used with precision int8, not {precision}")
        if not Path(calibration).is_dir():
            what = "is not a folder" if Path(calibration).exists() else "no such folder"
            raise BuildArgumentError("calibration", f"{calibration}: {what} (it must hold real face photos)")
    elif precision == "int8" and require_calibration:
        raise BuildArgumentError("calibration", "INT8 needs a folder of real face photos (see engines/BUILD.md)")


def require_tensorrt(avail: Availability) -> tuple[str, tuple[int, int], str]:
    """(TensorRT version, compute capability, GPU name), or BackendUnavailable saying what is missing."""
    if not avail.has_cuda_gpu or avail.gpu is None:
        raise BackendUnavailable(avail.reasons.get("gpu", NO_GPU) + ": TensorRT engines are built on the GPU they "
                                 "will run on")
    if not avail.has_tensorrt or avail.tensorrt_version is None:
        raise BackendUnavailable(avail.reasons.get("tensorrt", TENSORRT_MISSING))
    if not avail.has_cuda_python:
        raise BackendUnavailable(CUDA_PYTHON_MISSING)
    return avail.tensorrt_version, avail.gpu.compute_capability, avail.gpu.name


def engine_key(
    onnx_path: Path,
    avail: Availability,
    precision: Precision,
    profile: Profile,
    calibration_sha256: str | None = None,
    model_sha256: str | None = None,
) -> EngineKey:
    version, cc, gpu_name = require_tensorrt(avail)
    return EngineKey(model_sha256 or file_sha256(onnx_path), version, cc, precision, profile,
                     calibration_sha256 if precision == "int8" else None, gpu_name=gpu_name)


def find_cached_engine(
    cache: EngineCache, model_name: str, onnx_path: Path, avail: Availability, precision: Precision, min_max_batch: int
) -> Path | None:
    """A cached engine that serves batches up to min_max_batch on this machine (EngineCache.find_compatible)."""
    version, cc, gpu_name = require_tensorrt(avail)
    return cache.find_compatible(model_name, model_sha256=file_sha256(onnx_path), tensorrt_version=version,
                                 compute_capability=cc, precision=precision, min_max_batch=min_max_batch,
                                 gpu_name=gpu_name)


def build_engine(
    model: str | Path | None,
    *,
    precision: Precision = "fp16",
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    calibration: Path | None = None,
    calibration_images_are_crops: bool = False,
    calibration_batch: int = DEFAULT_CALIBRATION_BATCH,
    tolerance: float = DEFAULT_TOLERANCE,
    int8_fallback: bool = True,
    engines_dir: Path = ENGINES_DIR,
    cache_dir: Path | None = None,
    force: bool = False,
    keep_stale: bool = False,
    workspace_bytes: int | None = None,
    availability: Availability | None = None,
    builder: Callable[..., bytes] | None = None,
    int8_checker: Callable[[bytes, Path, ModelCard, np.ndarray], np.ndarray] | None = None,
) -> EngineBuildResult:
    """Build (or reuse) the TensorRT engine of `model` (a name in engines/ or a path to its .onnx).

    `calibration` (INT8 only, required there): a folder of real face photos (or aligned crops with
    calibration_images_are_crops). `builder` replaces the TensorRT build call and `int8_checker` the scoring of the
    held-out crops with a fresh INT8 engine (tests). Stale engines of the same model and precision are removed
    unless keep_stale.
    """
    check_build_args(precision=precision, max_batch=max_batch, opt_batch=opt_batch, calibration=calibration,
                     calibration_batch=calibration_batch, tolerance=tolerance, workspace_bytes=workspace_bytes)
    onnx_path, card = resolve_model(str(model) if model is not None else None, engines_dir)
    avail = availability if availability is not None else probe_availability()
    version, cc, gpu_name = _require_precision(avail, precision)
    profile = choose_profile(max_batch, opt_batch)
    cache = EngineCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(engines_dir))
    model_sha = file_sha256(onnx_path)
    notes: list[str] = []

    crops = holdout = None
    calib_sha = None
    if precision == "int8":
        crops, holdout = _calibration_crops(calibration, card, cache, calibration_images_are_crops)
        calib_sha = crops_sha256(crops)
        notes.append(f"INT8 calibration on {len(crops)} real face crops, {len(holdout)} held out")

    key = EngineKey(model_sha, version, cc, precision, profile, calib_sha, gpu_name=gpu_name)
    lookup = cache.lookup(card.name, key)
    if lookup.hit and not force:
        return EngineBuildResult(lookup.path, key, False, precision, notes=notes)
    reasons = ["--force"] if force and lookup.hit else lookup.reasons

    build = builder or _tensorrt_builder
    t0 = time.perf_counter()
    parity = None
    if precision == "int8":
        assert crops is not None and holdout is not None
        batches = calibration_batches(crops, card, min(calibration_batch, profile.max_batch))
        data = build(onnx_path, card, profile, "int8", calibration=batches,
                     calibration_cache=lookup.path.with_suffix(".calib"), workspace_bytes=workspace_bytes)
        check = int8_checker or partial(_score_with_engine, where=lookup.path)
        parity = _int8_parity(data, onnx_path, card, holdout, check, tolerance)
        if not parity.ok:
            msg = f"INT8 does not hold accuracy on held-out real faces: {parity.summary()}"
            if not int8_fallback:
                raise EngineBuildError(msg)
            notes.append(msg + "; built FP16 instead")
            fp16 = build_engine(onnx_path, precision="fp16", max_batch=max_batch, opt_batch=opt_batch,
                                engines_dir=engines_dir, cache_dir=cache.directory, force=force,
                                keep_stale=keep_stale, workspace_bytes=workspace_bytes, availability=avail,
                                builder=builder)
            fp16.notes = notes + fp16.notes
            fp16.parity = parity
            return fp16
    else:
        data = build(onnx_path, card, profile, precision, workspace_bytes=workspace_bytes)
    seconds = time.perf_counter() - t0
    path = cache.store(card.name, key, data, _facts(version, gpu_name, seconds, precision, onnx_path, parity))
    notes += [] if keep_stale else [f"removed stale {p.name}" for p in cache.remove_stale(lookup)]
    return EngineBuildResult(path, key, True, precision, reasons, seconds, parity, notes)


def _require_precision(avail: Availability, precision: Precision) -> tuple[str, tuple[int, int], str]:
    """(TensorRT version, compute capability, GPU name), or why this GPU or TensorRT cannot build `precision`."""
    version, cc, gpu_name = require_tensorrt(avail)
    problem = precision_problem(precision, cc) or tensorrt_precision_problem(version, precision)
    if problem:
        raise BackendUnavailable(problem)
    return version, cc, gpu_name


def _int8_parity(data: bytes, onnx_path: Path, card: ModelCard, holdout: np.ndarray,
                 check: Callable[[bytes, Path, ModelCard, np.ndarray], np.ndarray], tolerance: float) -> ParityReport:
    """The INT8 engine's scores on held-out real faces against ONNX Runtime on the CPU."""
    reference = OnnxClassifier(onnx_path, card).predict(holdout)
    return compare_scores(reference, check(data, onnx_path, card, holdout), card.threshold, tolerance)


def _calibration_crops(calibration: Path | None, card: ModelCard, cache: EngineCache,
                       images_are_crops: bool) -> tuple[np.ndarray, np.ndarray]:
    """(calibration crops, held-out crops) from real face photos, through the cache's crop set."""
    if calibration is None:
        raise ValueError("INT8 needs --calibration: a folder of real face photos (see engines/BUILD.md)")
    from streamguard.inference.calibration import load_crop_set, split_holdout

    all_crops, _ = load_crop_set(calibration, card, cache.directory, images_are_crops=images_are_crops)
    return split_holdout(all_crops)


def _facts(version: str, gpu_name: str, seconds: float, precision: Precision, onnx_path: Path,
           parity: ParityReport | None) -> dict[str, Any]:
    facts = engine_facts(version, gpu_name, seconds, precision, onnx_path)
    if parity is not None:
        facts["int8_parity"] = {"max_abs_diff": parity.max_abs_diff, "decision_flips": parity.decision_flips,
                                "n": parity.n, "tolerance": parity.tolerance}
    return facts


def _tensorrt_builder(onnx_path: Path, card: ModelCard, profile: Profile, precision: Precision, **kw: object) -> bytes:
    from streamguard.inference import tensorrt

    kw = {k: v for k, v in kw.items() if v is not None}
    return tensorrt.build_serialized_engine(onnx_path, card, profile, precision, **kw)  # type: ignore[arg-type]


def _score_with_engine(engine_bytes: bytes, onnx_path: Path, card: ModelCard, crops: np.ndarray, *,
                       where: Path) -> np.ndarray:
    """P(fake) of `crops` from a freshly built engine (written beside its final place, then removed)."""
    from streamguard.inference.tensorrt import TensorRTClassifier

    tmp = where.with_name(f".{where.name}.check")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(engine_bytes)
    try:
        clf = TensorRTClassifier(tmp, card, cuda_graphs=False)
        try:
            return clf.predict(crops)
        finally:
            clf.close()
    finally:
        tmp.unlink(missing_ok=True)
