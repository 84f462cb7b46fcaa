"""Backend selection: TensorRT first, then the cuda backend, then ONNX Runtime on the CPU.

    classifier, warnings = load_backend(cfg.model, cfg.backend, max_batch=cfg.batcher.max_batch)
    for w in warnings:            # non-empty: the service runs degraded
        log.warning(w)            # and emits one service.degraded event with the same words

"auto" takes the fastest backend this machine can load. A configured backend that cannot load falls back down the
same chain (tensorrt -> cuda -> onnxruntime) rather than refusing to serve, and the warnings say what failed and
what runs instead, except "triton" (streamguard/inference/triton.py), which handles its server's outages itself
(triton.fallback) and whose load errors (no tritonclient, another model served) are configuration errors;
`strict=True` raises instead. What was merely absent under "auto" (no GPU at all, TensorRT not installed while the
cuda backend runs) is a note, not a warning: that is how the machine was set up, not a fault.
The machine probe and the loaders are injectable, so every branch is tested without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from streamguard.config import TritonSettings
from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import CPU_CALL_BATCH, Classifier
from streamguard.inference.engine_cache import Precision
from streamguard.inference.gpu import Availability, BackendUnavailable, _has_module, probe_availability
from streamguard.inference.models import ENGINES_DIR, resolve_model

log = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "cuda", "tensorrt", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "onnxruntime", "cuda", "tensorrt", "triton")
_CHAINS: dict[str, tuple[str, ...]] = {
    "auto": ("tensorrt", "cuda", "onnxruntime"),
    "tensorrt": ("tensorrt", "cuda", "onnxruntime"),
    "cuda": ("cuda", "onnxruntime"),
    "onnxruntime": ("onnxruntime",),
    # Its outages are handled inside (triton.fallback); a missing tritonclient or a mismatched model is an error.
    "triton": ("triton",),
}


@dataclass(frozen=True, slots=True)
class BackendOptions:
    max_batch: int = 16  # the batcher's max_batch: an engine's profile must reach it
    precision: Precision = "fp16"  # tensorrt engine precision ("int8": a cached engine only); cuda runs fp32
    build_missing: bool = True  # build a TensorRT engine at start when none is cached (minutes for large models)
    threads: int = 0  # ONNX Runtime CPU intra-op threads (0: all cores)
    cpu_call_batch: int = CPU_CALL_BATCH  # faces per ONNX Runtime call on the CPU (batcher.cpu_call_batch)
    device_index: int = 0
    engine_cache_dir: Path | None = None  # default: $STREAMGUARD_ENGINE_CACHE, else engines/cache
    triton: TritonSettings | None = None  # the server, for backend "triton" (default: TritonSettings())


Loader = Callable[[Path, ModelCard, Availability, BackendOptions, Path], Classifier]


@dataclass(slots=True)
class BackendSelection:
    classifier: Classifier
    requested: str
    warnings: list[str] = field(default_factory=list)  # each one a log line; any: emit service.degraded
    notes: list[str] = field(default_factory=list)  # info-level: what was absent and why
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (backend, why it was not used)

    @property
    def backend(self) -> str:
        return self.classifier.backend

    @property
    def degraded(self) -> bool:
        return bool(self.warnings)

    def degraded_event_data(self) -> dict:
        """The data of a `service.degraded` event."""
        return {"component": "inference", "requested": self.requested, "backend": self.backend,
                "reason": "; ".join(self.warnings)}


def unavailable_reason(backend: str, avail: Availability) -> str | None:
    """Why `backend` cannot even be tried here (None: it can)."""
    if backend == "onnxruntime":
        return None
    if backend == "triton":
        from streamguard.inference.triton import TRITONCLIENT_MISSING

        return None if _has_module("tritonclient.grpc") else TRITONCLIENT_MISSING
    if not avail.has_cuda_gpu:
        return avail.why_not("gpu")
    if backend == "tensorrt":
        if not avail.has_tensorrt:
            return avail.why_not("tensorrt")
        if not avail.has_cuda_python:
            return avail.why_not("cuda-python")
        return None
    if backend == "cuda":
        if avail.has_onnxruntime_cuda:
            return None
        return f"the cuda backend needs onnxruntime-gpu: {avail.why_not('onnxruntime-cuda')}"
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _describe(backend: str) -> str:
    return "onnxruntime (CPU)" if backend == "onnxruntime" else backend


def select_backend(
    model: str | Path | None,
    backend: str = "auto",
    *,
    options: BackendOptions | None = None,
    engines_dir: Path = ENGINES_DIR,
    probe: Availability | Callable[[], Availability] | None = None,
    loaders: Mapping[str, Loader] | None = None,
    strict: bool = False,
) -> BackendSelection:
    """Load the first backend of `backend`'s chain that works; see the module doc for warnings vs notes.

    Raises ModelNotFound for a missing model, BackendUnavailable when strict and the configured backend fails,
    and the CPU backend's own error when even that cannot load the model (a corrupt ONNX file).
    """
    if backend not in _CHAINS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    options = options or BackendOptions()
    onnx_path, card = resolve_model(str(model) if model is not None else None, engines_dir)
    avail = probe() if callable(probe) else probe if probe is not None else probe_availability(options.device_index)
    loaders = {**default_loaders(), **(loaders or {})}

    attempts: list[tuple[str, str]] = []
    failed: set[str] = set()  # tried and raised (vs. absent)
    classifier: Classifier | None = None
    last_error: Exception | None = None
    for name in _CHAINS[backend]:
        reason = unavailable_reason(name, avail)
        if reason is None:
            try:
                classifier = loaders[name](onnx_path, card, avail, options, Path(engines_dir))
                break
            except Exception as exc:  # a backend that fails to load must not stop the service
                last_error = exc
                reason = f"failed to load: {exc}"
                failed.add(name)
                log.debug("backend %s failed", name, exc_info=True)
        attempts.append((name, reason))
        if strict and name == backend:
            raise BackendUnavailable(f"backend {backend!r}: {reason}") from last_error
    if classifier is None:
        if last_error is None:  # nothing in the chain could even be tried (triton without tritonclient)
            raise BackendUnavailable("; ".join(f"backend {name!r}: {why}" for name, why in attempts))
        raise last_error

    used = classifier.backend
    sel = BackendSelection(classifier, backend, attempts=attempts)
    started_degraded = getattr(classifier, "degraded_reason", None)  # a remote backend whose server is down
    if started_degraded:
        sel.warnings.append(started_degraded)
    if backend != "auto" and used != backend:
        why = dict(attempts)[backend]
        sel.warnings.append(f"backend {backend!r} is configured but unavailable ({why}); running on {_describe(used)}")
        for name, why in attempts[1:]:
            sel.notes.append(f"{name}: {why}")
    else:
        for name, why in attempts:
            if name in failed:
                sel.warnings.append(f"{name} backend failed to load ({why.removeprefix('failed to load: ')}); "
                                    f"running on {_describe(used)}")
            else:
                sel.notes.append(f"{name}: {why}")
        if backend == "auto" and used == "onnxruntime" and avail.has_cuda_gpu and not failed:
            gpu = avail.gpu.name if avail.gpu else "a CUDA GPU"
            sel.warnings.append(f"{gpu} is present but no GPU backend can run: "
                                + "; ".join(f"{n}: {w}" for n, w in attempts) + "; scoring on the CPU")
    return sel


def load_backend(
    model: str | Path | None,
    backend: str = "auto",
    *,
    max_batch: int = 16,
    options: BackendOptions | None = None,
    engines_dir: Path = ENGINES_DIR,
    probe: Availability | Callable[[], Availability] | None = None,
    loaders: Mapping[str, Loader] | None = None,
) -> tuple[Classifier, list[str]]:
    """(classifier, warnings): the shorthand for the service. Non-empty warnings = degraded."""
    opts = options or BackendOptions(max_batch=max_batch)
    sel = select_backend(model, backend, options=opts, engines_dir=engines_dir, probe=probe, loaders=loaders)
    for note in sel.notes:
        log.info("inference backend: %s", note)
    log.info("inference backend: %s (%s)", sel.backend, type(sel.classifier).__name__)
    return sel.classifier, sel.warnings


# -- the real loaders --------------------------------------------------------------------------------------------------


def _load_onnxruntime(onnx_path: Path, card: ModelCard, avail: Availability, opts: BackendOptions,
                      engines_dir: Path) -> Classifier:
    from streamguard.inference.onnx import OnnxClassifier

    return OnnxClassifier(onnx_path, card, threads=opts.threads, call_batch=opts.cpu_call_batch)


def _load_cuda(onnx_path: Path, card: ModelCard, avail: Availability, opts: BackendOptions,
               engines_dir: Path) -> Classifier:
    from streamguard.inference.cuda import load_cuda_classifier

    return load_cuda_classifier(onnx_path, card, max_batch=opts.max_batch, device_id=opts.device_index)


def _load_tensorrt(onnx_path: Path, card: ModelCard, avail: Availability, opts: BackendOptions,
                   engines_dir: Path) -> Classifier:
    from streamguard.inference.engine_build import build_engine, find_cached_engine
    from streamguard.inference.engine_cache import DEFAULT_MAX_BATCH, EngineCache, default_cache_dir
    from streamguard.inference.tensorrt import TensorRTClassifier

    cache = EngineCache(opts.engine_cache_dir or default_cache_dir(engines_dir))
    path = find_cached_engine(cache, card.name, onnx_path, avail, opts.precision, opts.max_batch)
    if path is None:
        hint = f"`streamguard engine build {onnx_path} --precision {opts.precision} --max-batch {opts.max_batch}`"
        if opts.precision == "int8" or not opts.build_missing:
            raise BackendUnavailable(f"no {opts.precision} TensorRT engine cached for {card.name}: run {hint}")
        log.warning("no TensorRT engine cached for %s: building one now (once per model, TensorRT and GPU)",
                    card.name)
        result = build_engine(onnx_path, precision=opts.precision, max_batch=max(opts.max_batch, DEFAULT_MAX_BATCH),
                              opt_batch=min(opts.max_batch, DEFAULT_MAX_BATCH), engines_dir=engines_dir,
                              cache_dir=cache.directory, availability=avail)
        path = result.path
    return TensorRTClassifier(path, card)


def _load_triton(onnx_path: Path, card: ModelCard, avail: Availability, opts: BackendOptions,
                 engines_dir: Path) -> Classifier:
    from streamguard.inference.triton import load_triton_classifier

    return load_triton_classifier(opts.triton or TritonSettings(), onnx_path, card, max_batch=opts.max_batch,
                                  threads=opts.threads, cpu_call_batch=opts.cpu_call_batch)


def default_loaders() -> dict[str, Loader]:
    return {"onnxruntime": _load_onnxruntime, "cuda": _load_cuda, "tensorrt": _load_tensorrt,
            "triton": _load_triton}
