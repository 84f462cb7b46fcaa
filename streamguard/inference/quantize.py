"""INT8 for the CPU: ONNX Runtime's static quantisation (QDQ), kept only where it holds the model's scores.

A CPU-only server spends much of its per-stream budget in the model, and ONNX Runtime runs INT8 convolutions about
twice as fast as FP32 on CPUs with VNNI. Quantisation is not free for a deepfake detector: what it looks for are
pixel-level artefacts, and the first layers that see them are the ones rounding hurts most. So, as for TensorRT's
INT8 (`engine_build`), the quantised model is checked against the float one on real faces it was not calibrated on
and written only when every score stays within `tolerance` with no decision flipped at the card's threshold; the
first and last convolutions can be kept in float (`keep_float_first` / `keep_float_last`: their weights and
arithmetic stay FP32, though a tensor they share with an INT8 neighbour is still rounded) to buy accuracy back.
The card is the source model's (its thresholds stay valid because the scores do), renamed, with the parity in its
metrics.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import preprocess
from streamguard.inference.engine_cache import ParityReport, compare_scores
from streamguard.inference.models import ENGINES_DIR, file_sha256, resolve_model
from streamguard.inference.onnx import OnnxClassifier

CALIBRATION_BATCH = 16  # ONNX Runtime's histogram calibrators need equal batches: the remainder is left out


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    """What `quantize_model` found; `path` is None when the INT8 model was not kept."""

    source: Path
    path: Path | None
    parity: ParityReport
    calibration_crops: int
    kept_float: tuple[str, ...]
    float_cpu_ms: float  # per face, one thread, batch 16, on the held-out crops
    int8_cpu_ms: float

    def summary(self) -> str:
        speed = (f"CPU per face (1 thread, batch 16) {self.float_cpu_ms:.2f} ms float, {self.int8_cpu_ms:.2f} ms "
                 f"INT8 ({self.float_cpu_ms / self.int8_cpu_ms:.2f}x)")
        kept = f"{len(self.kept_float)} convolutions kept in float" if self.kept_float else "every convolution INT8"
        where = f"wrote {self.path}" if self.path else "not written: the INT8 model does not hold the float scores"
        return (f"{where}\n  parity on held-out real faces: {self.parity.summary()}\n  {speed}\n  "
                f"{kept}; calibrated on {self.calibration_crops} real crops")


def conv_nodes(model: onnx.ModelProto) -> list[str]:
    """The graph's Conv nodes in order (their names are what the quantiser excludes)."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


def float_convs(model: onnx.ModelProto, first: int, last: int) -> list[str]:
    convs = conv_nodes(model)
    if first < 0 or last < 0:
        raise ValueError("the counts of convolutions kept in float must be >= 0")
    return list(dict.fromkeys(convs[:first] + (convs[len(convs) - last:] if last else [])))


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node named (exported graphs may leave names empty, and exclusion goes by name)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def _reader(inputs: np.ndarray, input_name: str):  # type: ignore[no-untyped-def]  # ORT's reader base is untyped
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            usable = len(inputs) // CALIBRATION_BATCH * CALIBRATION_BATCH or len(inputs)
            self._batches = iter(np.split(inputs[:usable], max(1, usable // CALIBRATION_BATCH)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return Batches()


def quantize_onnx(source: Path, target: Path, calibration: np.ndarray, card: ModelCard,
                  keep_float_first: int = 0, keep_float_last: int = 0) -> list[str]:
    """Write `source` as a QDQ INT8 model (per-channel INT8 weights, UINT8 activations, percentile ranges), the
    first and last convolutions as many as asked left in float; returns those convolutions' names."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's quantiser prints its progress and warns through the root logger: keep both off our output.
    with tempfile.TemporaryDirectory(prefix="streamguard-quantize-") as tmp, _quiet():
        named, prepared = Path(tmp) / "named.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(_named(onnx.load(str(source))), str(named))
        # Its pre-processing folds a BatchNormalization that directly follows a convolution into it, so the two
        # quantise as one op (Meso4's follow ReLUs and stay); the convolutions kept in float are named from the
        # graph it writes, the one quantised.
        quant_pre_process(str(named), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        keep = float_convs(model, keep_float_first, keep_float_last)
        quantize_static(
            str(prepared), str(target), _reader(preprocess(calibration, card), model.graph.input[0].name),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=keep,
        )
    return keep


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def cpu_ms_per_face(classifier: OnnxClassifier, crops: np.ndarray, runs: int = 5) -> float:
    """CPU time (this process) per face of `classifier` on batches of 16 `crops`, after one warm-up call."""
    batch = crops[:16]
    classifier.predict(batch)
    t = time.process_time()
    for _ in range(runs):
        classifier.predict(batch)
    return (time.process_time() - t) / (runs * len(batch)) * 1000


def _int8_card(card: ModelCard, name: str, path: Path, source: Path, parity: ParityReport,
               kept: Sequence[str]) -> ModelCard:
    note = (f"INT8 (ONNX Runtime static quantisation, QDQ, per-channel weights, percentile activation ranges; "
            f"{len(kept)} convolutions kept in float) of {source.name} (sha256 {file_sha256(source)[:16]}). ")
    return card.model_copy(update={
        "name": name,
        "architecture": f"{card.architecture}, INT8",
        "training": note + card.training,
        "metrics": {**card.metrics, "int8_parity": {
            "what": "P(fake) against the float model on held-out real faces",
            "n": parity.n, "max_abs_diff": round(parity.max_abs_diff, 5),
            "mean_abs_diff": round(parity.mean_abs_diff, 5), "decision_flips": parity.decision_flips,
            "tolerance": parity.tolerance}},
        "sha256": file_sha256(path),
    })


def quantize_model(
    model: str | None, calibration: Path, *, images_are_crops: bool = False, keep_float_first: int = 0,
    keep_float_last: int = 0, tolerance: float = 0.02, output: Path | None = None, cache_dir: Path | None = None,
) -> QuantizeResult:
    """Quantise `model` (a name in engines/ or an .onnx path) on real face photos in `calibration` (3 crops in 4
    calibrate, the 4th checks) and write `<name>-int8.onnx` and its card (to `output`, default engines/) only when
    the INT8 scores hold the float ones."""
    from streamguard.inference.calibration import load_crop_set, split_holdout

    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if keep_float_first < 0 or keep_float_last < 0:
        raise ValueError("the counts of convolutions kept in float must be >= 0")
    source, card = resolve_model(model)
    crops, _ = load_crop_set(calibration, card, cache_dir, images_are_crops=images_are_crops)
    calib, holdout = split_holdout(crops)
    name = f"{card.name}-int8"
    target = Path(output) if output else ENGINES_DIR / f"{name}.onnx"
    with tempfile.TemporaryDirectory(prefix="streamguard-int8-") as tmp:
        candidate = Path(tmp) / target.name
        keep = quantize_onnx(source, candidate, calib, card, keep_float_first, keep_float_last)
        reference, quantised = OnnxClassifier(source, card, threads=1), OnnxClassifier(candidate, card, threads=1)
        parity = compare_scores(reference.predict(holdout), quantised.predict(holdout), card.threshold, tolerance)
        float_ms, int8_ms = cpu_ms_per_face(reference, holdout), cpu_ms_per_face(quantised, holdout)
        written = None
        if parity.ok:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(candidate.read_bytes())
            _int8_card(card, name, target, source, parity, keep).save(target.with_suffix(".json"))
            written = target
    return QuantizeResult(source, written, parity, len(calib), tuple(keep), float_ms, int8_ms)
