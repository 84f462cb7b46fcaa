"""The parts of the GPU backends that need no GPU: engine cache keys and files, profiles, CUDA-graph batch buckets,
calibration batches and the parity check. Pure functions and small values, unit-tested without TensorRT or CUDA.

An engine is only valid for the exact inputs it was built from. Its key is (sha256 of the ONNX file, TensorRT version,
the GPU's model and compute capability, precision, optimisation profile min/opt/max batch, and for INT8 the
calibration set's hash);
the file name carries a digest of the key, and a JSON sidecar carries the key itself so that a miss can say *which*
part changed ("TensorRT 10.3.0 -> 10.7.0") instead of silently building again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

DEFAULT_MAX_BATCH = 64
DEFAULT_OPT_BATCH = 16  # the batcher's default max_batch: under load, batches fill up to it
MAX_SUPPORTED_BATCH = 4096
DEFAULT_GRAPH_MAX_BATCH = 32  # CUDA graphs pay where launch overhead rivals kernel time: small batches
KEY_VERSION = 2  # bump when the key's meaning changes: every cached engine becomes stale (2: the GPU model joined)


@dataclass(frozen=True, slots=True)
class Profile:
    """A TensorRT optimisation profile over the batch axis: engines run any batch in [min, max], fastest at opt."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch <= MAX_SUPPORTED_BATCH:
            raise ValueError(
                f"profile needs 1 <= min <= opt <= max <= {MAX_SUPPORTED_BATCH}, got "
                f"min {self.min_batch}, opt {self.opt_batch}, max {self.max_batch}"
            )

    def shapes(self, input_size: int, layout: str = "NCHW") -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for `IOptimizationProfile.set_shape`."""

        def shape(n: int) -> tuple[int, ...]:
            return (n, 3, input_size, input_size) if layout == "NCHW" else (n, input_size, input_size, 3)

        return shape(self.min_batch), shape(self.opt_batch), shape(self.max_batch)

    @property
    def tag(self) -> str:
        return f"b{self.min_batch}-{self.opt_batch}-{self.max_batch}"


def choose_profile(max_batch: int = DEFAULT_MAX_BATCH, typical_batch: int | None = None) -> Profile:
    """Batch 1..max_batch, tuned for the typical batch (default: the batcher's 16, or max_batch if smaller).

    TensorRT picks kernels for `opt` and keeps them valid over [min, max]; choosing opt = the batch the service
    actually forms beats opt = max, whose kernels can be slower at the small batches a lightly loaded service runs.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = DEFAULT_OPT_BATCH if typical_batch is None else typical_batch
    if typical_batch is not None and not 1 <= typical_batch <= max_batch:
        raise ValueError(f"typical batch {typical_batch} must lie in 1..{max_batch}")
    return Profile(1, min(opt, max_batch), max_batch)


# -- CUDA graphs: which batch sizes get one, and how a batch is run ----------------------------------------------------


def graph_batch_sizes(profile: Profile, graph_max_batch: int = DEFAULT_GRAPH_MAX_BATCH) -> tuple[int, ...]:
    """Batch sizes that get a captured CUDA graph: powers of two up to min(graph_max_batch, profile max), plus that
    bound itself when it is no power of two. A batch is padded up to the next of these, so at most half a graph is
    padding; above graph_max_batch the kernels dominate and a batch runs eagerly at its exact size."""
    top = min(graph_max_batch, profile.max_batch)
    if top < profile.min_batch:
        return ()
    sizes = []
    b = 1
    while b <= top:
        if b >= profile.min_batch:
            sizes.append(b)
        b *= 2
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return tuple(sizes)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    run_batch: int  # the batch the engine runs (>= the crops given; the rest is padding)
    use_graph: bool


def plan_batch(n: int, graph_sizes: Sequence[int], profile: Profile) -> BatchPlan:
    """How to run `n` crops (1 <= n <= profile.max_batch): padded into the smallest graph bucket that holds them,
    else eagerly at n (raised to profile.min_batch when the profile starts above 1)."""
    if not 1 <= n <= profile.max_batch:
        raise ValueError(f"batch of {n} outside the engine's profile 1..{profile.max_batch}")
    for g in sorted(graph_sizes):
        if g >= n:
            return BatchPlan(g, True)
    return BatchPlan(max(n, profile.min_batch), False)


def split_batches(n: int, max_batch: int) -> list[tuple[int, int]]:
    """[start, stop) chunks of at most max_batch covering range(n): a batch larger than the engine's profile."""
    return [(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


# -- the engine cache --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything an engine depends on: change any part and the engine must be rebuilt."""

    model_sha256: str
    tensorrt_version: str
    compute_capability: tuple[int, int]
    precision: Precision
    profile: Profile
    calibration_sha256: str | None = None  # INT8 only: the calibration set's hash
    # TensorRT tunes kernels for the exact GPU model: an sm90 engine from an H100 on an H200 is "not recommended and
    # is likely to affect performance or even cause errors" (its warning), so the name joins the compute capability.
    gpu_name: str = ""
    key_version: int = KEY_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.model_sha256):
            raise ValueError("model_sha256 must be 64 lowercase hex digits")
        if self.precision == "int8" and not self.calibration_sha256:
            raise ValueError("an INT8 engine's key needs the calibration set's hash")
        if self.precision != "int8" and self.calibration_sha256:
            raise ValueError("only INT8 engines depend on a calibration set")

    def to_json(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability)
        return d

    @classmethod
    def from_json(cls, d: dict) -> EngineKey:
        return cls(
            model_sha256=d["model_sha256"],
            tensorrt_version=d["tensorrt_version"],
            compute_capability=(int(d["compute_capability"][0]), int(d["compute_capability"][1])),
            precision=d["precision"],
            profile=Profile(**d["profile"]),
            calibration_sha256=d.get("calibration_sha256"),
            gpu_name=str(d.get("gpu_name", "")),
            key_version=int(d.get("key_version", 0)),
        )

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of the key (first 16 hex digits name the file)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def engine_filename(model_name: str, key: EngineKey) -> str:
    """`<model>.<precision>.<profile>.<sm>.trt<version>.<digest16>.engine`: readable, and unique per key."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name) or "model"
    trt = re.sub(r"[^0-9.]", "", key.tensorrt_version) or "unknown"
    return f"{safe}.{key.precision}.{key.profile.tag}.{key.sm}.trt{trt}.{key.digest[:16]}.engine"


def describe_changes(old: EngineKey, new: EngineKey) -> list[str]:
    """Human words for each key part that differs: why a cached engine is stale."""
    changes = []
    if old.model_sha256 != new.model_sha256:
        changes.append(f"model changed (sha256 {old.model_sha256[:12]}… -> {new.model_sha256[:12]}…)")
    if old.tensorrt_version != new.tensorrt_version:
        changes.append(f"TensorRT {old.tensorrt_version} -> {new.tensorrt_version}")
    if old.compute_capability != new.compute_capability:
        changes.append(f"GPU compute capability {old.sm} -> {new.sm}")
    if old.gpu_name != new.gpu_name:
        changes.append(f"GPU {old.gpu_name or 'unknown'} -> {new.gpu_name or 'unknown'}")
    if old.precision != new.precision:
        changes.append(f"precision {old.precision} -> {new.precision}")
    if old.profile != new.profile:
        changes.append(f"profile {old.profile.tag} -> {new.profile.tag}")
    if old.calibration_sha256 != new.calibration_sha256:
        changes.append("calibration set changed")
    if old.key_version != new.key_version:
        changes.append(f"engine key format {old.key_version} -> {new.key_version}")
    return changes


@dataclass(frozen=True, slots=True)
class CacheLookup:
    path: Path  # where the engine for this key lives (or will, once built)
    hit: bool
    stale: tuple[tuple[Path, tuple[str, ...]], ...] = ()  # same model/precision engines built for other keys, and why

    @property
    def reasons(self) -> list[str]:
        """Why a rebuild is needed ([] on a hit): the changes against the closest stale engine, or 'not built'."""
        if self.hit:
            return []
        if not self.stale:
            return ["no engine built yet for this model"]
        closest: tuple[str, ...] = min((r for _, r in self.stale), key=len)
        return list(closest)


@dataclass(frozen=True, slots=True)
class EngineCache:
    """engines/cache/: `<name>.engine` plus `<name>.json` (the key and build facts) side by side."""

    directory: Path

    def path_for(self, model_name: str, key: EngineKey) -> Path:
        return Path(self.directory) / engine_filename(model_name, key)

    def lookup(self, model_name: str, key: EngineKey) -> CacheLookup:
        path = self.path_for(model_name, key)
        if path.is_file() and self.key_of(path) == key:
            return CacheLookup(path, True)
        stale = []
        for other in self.entries(model_name):
            if other == path:
                continue
            old = self.key_of(other)
            if old is not None and old.precision == key.precision:
                stale.append((other, tuple(describe_changes(old, key))))
        return CacheLookup(path, False, tuple(stale))

    def entries(self, model_name: str | None = None) -> list[Path]:
        pattern = "*.engine" if model_name is None else f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model_name)}.*.engine"
        return sorted(Path(self.directory).glob(pattern))

    def store(self, model_name: str, key: EngineKey, engine_bytes: bytes, facts: dict | None = None) -> Path:
        """Write the engine and its sidecar atomically (temp file + rename): a crash never leaves half an engine."""
        path = self.path_for(model_name, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, engine_bytes)
        sidecar = {"key": key.to_json(), "digest": key.digest, "model": model_name, **(facts or {})}
        _atomic_write(path.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
        return path

    def remove_stale(self, lookup: CacheLookup) -> list[Path]:
        removed = []
        for p, _ in lookup.stale:
            for f in (p, p.with_suffix(".json")):
                if f.exists():
                    f.unlink()
                    removed.append(f)
        return removed

    def find_compatible(
        self,
        model_name: str,
        *,
        model_sha256: str,
        tensorrt_version: str,
        compute_capability: tuple[int, int],
        precision: Precision,
        min_max_batch: int,
        gpu_name: str = "",
    ) -> Path | None:
        """A cached engine for this model, TensorRT, GPU and precision whose profile starts at 1 and reaches
        min_max_batch (one built with `engine build --max-batch 64` serves a batcher of 16): the smallest fit."""
        best: tuple[int, Path] | None = None
        for path in self.entries(model_name):
            key = self.key_of(path)
            if key is None:
                continue
            same = (key.model_sha256, key.tensorrt_version, key.compute_capability, key.gpu_name, key.precision,
                    key.key_version) == (model_sha256, tensorrt_version, tuple(compute_capability), gpu_name,
                                         precision, KEY_VERSION)
            if same and key.profile.min_batch == 1 and key.profile.max_batch >= min_max_batch:
                if best is None or key.profile.max_batch < best[0]:
                    best = (key.profile.max_batch, path)
        return best[1] if best else None

    @staticmethod
    def key_of(engine_path: Path) -> EngineKey | None:
        """The key in an engine's sidecar, or None when it is missing or unreadable (such an engine is never used)."""
        try:
            return EngineKey.from_json(json.loads(engine_path.with_suffix(".json").read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no or unreadable sidecar: never trusted


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


CACHE_ENV = "STREAMGUARD_ENGINE_CACHE"


def default_cache_dir(engines_dir: Path, environ: Mapping[str, str] | None = None) -> Path:
    """$STREAMGUARD_ENGINE_CACHE if set (a writable place where engines/ is read-only, as in a container image),
    else engines/cache."""
    env = os.environ if environ is None else environ
    return Path(env[CACHE_ENV]) if env.get(CACHE_ENV) else Path(engines_dir) / "cache"


# -- INT8 calibration data ---------------------------------------------------------------------------------------------


def calibration_batches(crops: np.ndarray, card: ModelCard, batch_size: int) -> list[np.ndarray]:
    """Real face crops (N, S, S, 3) uint8 -> float32 batches in the model's preprocessing, each exactly batch_size
    (TensorRT calibrates at the calibration profile's fixed shape): the last batch wraps around to the first crops
    rather than dropping the tail or padding with blanks that would skew the activation histograms."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(crops)
    if n == 0:
        raise ValueError("no calibration crops: INT8 needs real face crops")
    x = preprocess(crops, card)
    count = -(-n // batch_size)
    idx = np.arange(count * batch_size) % n
    return [np.ascontiguousarray(x[idx[i * batch_size : (i + 1) * batch_size]]) for i in range(count)]


def crops_sha256(crops: np.ndarray) -> str:
    """Hash of a calibration set's pixels and shape: part of an INT8 engine's key."""
    h = hashlib.sha256()
    h.update(str(crops.shape).encode())
    h.update(np.ascontiguousarray(crops, np.uint8).tobytes())
    return h.hexdigest()


# -- parity: does a GPU backend (or an INT8 engine) hold the reference's accuracy? -------------------------------------


@dataclass(frozen=True, slots=True)
class ParityReport:
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    decision_flips: int  # crops on different sides of the threshold
    tolerance: float
    threshold: float
    flipped: tuple[int, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.decision_flips == 0

    def summary(self) -> str:
        verdict = "holds" if self.ok else "FAILS"
        return (f"{verdict}: n={self.n}, max |dP(fake)| {self.max_abs_diff:.4f} (tolerance {self.tolerance}), "
                f"mean {self.mean_abs_diff:.5f}, decisions flipped at {self.threshold}: {self.decision_flips}")


def compare_scores(
    reference: Iterable[float], candidate: Iterable[float], threshold: float, tolerance: float = 0.02
) -> ParityReport:
    """P(fake) of a candidate backend against the reference (ONNX Runtime on CPU): max |delta| and flipped decisions
    (score >= threshold is 'fake', as ModelCard.threshold says)."""
    ref = np.asarray(list(reference), np.float64)
    got = np.asarray(list(candidate), np.float64)
    if ref.shape != got.shape or ref.ndim != 1:
        raise ValueError(f"score arrays differ in shape: {ref.shape} vs {got.shape}")
    if len(ref) == 0:
        raise ValueError("nothing to compare")
    diff = np.abs(ref - got)
    flipped = np.flatnonzero((ref >= threshold) != (got >= threshold))
    return ParityReport(len(ref), float(diff.max()), float(diff.mean()), len(flipped), tolerance, threshold,
                        tuple(int(i) for i in flipped))
