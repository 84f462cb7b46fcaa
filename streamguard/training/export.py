"""ONNX export of a trained model (sigmoid baked in, dynamic batch) and its model card."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.models import file_sha256
from streamguard.training.model import FakeDetector, WithSigmoid

OPSET = 17


def export_onnx(model: FakeDetector, path: Path, input_size: int, flip_average: bool = False) -> Path:
    """Write `model` as ONNX: input "input" (N, 3, S, S); outputs "p_fake" (N, 1) first, as the card says, and
    "fake_map" (N, 1, S/32, S/32), the local P(blended) behind it (a coarse heatmap); dynamic batch axis.
    `flip_average`: the graph scores each crop and its mirror image and averages them (`WithSigmoid`), so every
    backend (ONNX Runtime, CUDA, TensorRT, Triton) serves the scores the thresholds were calibrated on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Contiguous weights again (training ran channels-last); torch's stubs lack Module.to's memory_format keyword.
    wrapped = WithSigmoid(model, flip_average).eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    dummy = torch.zeros(1, 3, input_size, input_size)
    # The TorchScript exporter (dynamo=False) is deprecated but gives a plain, static graph every runtime reads.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the top-k count becomes a constant: intended
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1")  # the mirror's Slice: nothing to fold
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["p_fake", "fake_map"],
            dynamic_axes={"input": {0: "batch"}, "p_fake": {0: "batch"}, "fake_map": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    return path


def check_onnx(model: FakeDetector, path: Path, input_size: int, batch: int = 4, seed: int = 0,
               flip_average: bool = False) -> float:
    """Max |onnxruntime − torch| of P(fake) on random inputs at `batch`: the export's numerical check."""

    x = np.random.default_rng(seed).standard_normal((batch, 3, input_size, input_size)).astype(np.float32)
    return onnx_difference(model, path, torch.from_numpy(x), flip_average)


def onnx_difference(model: FakeDetector, path: Path, x: torch.Tensor, flip_average: bool = False) -> float:
    """Max |onnxruntime − torch| of P(fake) on the normalised crops `x`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["p_fake"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = WithSigmoid(model, flip_average).eval()(x)[0].numpy()
    return float(np.abs(got.reshape(-1) - want.reshape(-1)).max())


def write_card(
    onnx_path: Path,
    *,
    name: str,
    architecture: str,
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    threshold: float,
    training: str,
    raise_threshold: float | None = None,
    clear_threshold: float | None = None,
    metrics: dict,
    crop_margin: float = 1.65,
    source: str = "trained by this project (tools/train.py)",
    license: str = "Apache-2.0",
    version: str = "1",
) -> ModelCard:
    """The card beside the ONNX file (same stem, .json), with the file's sha256."""
    card = ModelCard(
        name=name,
        version=version,
        architecture=architecture,
        preprocess=Preprocess(input_size=input_size, mean=mean, std=std, layout="NCHW", crop_margin=crop_margin),
        output="p_fake",
        threshold=threshold,
        raise_threshold=raise_threshold,
        clear_threshold=clear_threshold,
        source=source,
        license=license,
        training=training,
        metrics=metrics,
        sha256=file_sha256(onnx_path),
    )
    card.save(Path(onnx_path).with_suffix(".json"))
    return card
