"""Fine-tune from a shipped model: rebuild `FakeDetector` weights from its exported ONNX graph.

Why: a release keeps only its ONNX file; the run folder with the torch checkpoints does not survive (version 4's was
lost with the machine it trained on). The exporter folds every BatchNorm into the convolution before it
(W' = W·γ/√(σ²+ε), b' = β + (b − μ)·γ/√(σ²+ε)), and that cannot be undone uniquely: many (W, γ, β, μ, σ²) give the same
(W', b'). Any of them computes the same function in eval mode, but the trainable blocks' BatchNorm normalises each
training batch by its own statistics, so the choice matters: we take W = W' and set μ, σ² to the measured statistics
of W'x on real training batches, γ = √(σ²+ε), β = b' + μ. Then eval mode is exact (checked against ONNX Runtime)
and train mode, which normalises by the batch's statistics ≈ μ, σ², starts close to the shipped model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamguard.training.export import onnx_difference
from streamguard.training.model import FakeDetector

# A conv's BatchNorm in `backbone.py`'s naming: which BN follows which conv.
_BN_OF = {"_conv_stem": "_bn0", "_expand_conv": "_bn0", "_depthwise_conv": "_bn1", "_project_conv": "_bn2",
          "_conv_head": "_bn1"}


def conv_pairs(model: FakeDetector) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every convolution in forward order with the BatchNorm after it (None for the head, which has a bias)."""
    b = model.backbone
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = [(b._conv_stem, b._bn0)]
    for block in b._blocks:
        for conv_name in ("_expand_conv", "_depthwise_conv", "_project_conv"):
            if hasattr(block, conv_name):
                pairs.append((getattr(block, conv_name), getattr(block, _BN_OF[conv_name])))
    pairs.append((b._conv_head, b._bn1))
    pairs.append((model.head, None))
    return pairs


def folded_convs(onnx_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of every Conv node of the graph, in graph order (the exporter's order is the forward order)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            raise ValueError(f"{onnx_path}: Conv {node.name!r} has no constant weight and bias (not a folded export)")
        out.append((inits[node.input[1]], inits[node.input[2]]))
    return out


def _running(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(running mean, running variance): always there, as backbone.py's BatchNorms track statistics."""
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean, bn.running_var


def _load_folded(model: FakeDetector, convs: list[tuple[np.ndarray, np.ndarray]], onnx_path: Path) -> None:
    """Folded weights in, each BatchNorm an identity that adds the folded bias."""
    pairs = conv_pairs(model)
    if len(pairs) != len(convs):
        raise ValueError(f"{onnx_path}: {len(convs)} convolutions, this architecture has {len(pairs)}")
    with torch.no_grad():
        for i, ((conv, bn), (w, b)) in enumerate(zip(pairs, convs, strict=True)):
            if tuple(conv.weight.shape) != w.shape:
                want = tuple(conv.weight.shape)
                raise ValueError(f"{onnx_path}: convolution {i} is {w.shape}, the model's is {want}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            if bn is None:
                assert conv.bias is not None
                conv.bias.copy_(torch.from_numpy(np.array(b)))
                continue
            running_mean, running_var = _running(bn)
            running_mean.zero_()
            running_var.fill_(1.0 - bn.eps)  # √(σ²+ε) = 1: the BN only adds β
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(np.array(b)))


def _measure_bn_inputs(model: FakeDetector, batches: Iterable[torch.Tensor]) -> dict[nn.BatchNorm2d, tuple]:
    """Per-channel mean and variance of what reaches each BatchNorm, over `batches` (eval mode: as exported)."""
    sums: dict[nn.BatchNorm2d, list] = {}

    def hook(bn: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        s = sums.setdefault(bn, [0.0, 0.0, 0])  # type: ignore[arg-type]
        s[0] = s[0] + x.sum((0, 2, 3))
        s[1] = s[1] + (x * x).sum((0, 2, 3))
        s[2] += x.shape[0] * x.shape[2] * x.shape[3]

    bns = [bn for _, bn in conv_pairs(model) if bn is not None]
    handles = [bn.register_forward_hook(hook) for bn in bns]
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model.forward_map(x)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError("no batches to measure BatchNorm statistics on")
    stats = {}
    for bn, (s1, s2, n) in sums.items():
        mean = s1 / n
        stats[bn] = (mean.float(), (s2 / n - mean * mean).clamp(min=0.0).float())
    return stats


def _reparametrise(stats: dict[nn.BatchNorm2d, tuple]) -> None:
    """μ, σ² := measured; γ = √(σ²+ε), β = b' + μ: the same eval function, batch statistics ≈ the running ones."""
    with torch.no_grad():
        for bn, (mean, var) in stats.items():
            folded_bias = bn.bias.clone()
            running_mean, running_var = _running(bn)
            running_mean.copy_(mean)
            running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(folded_bias + mean)


def load_from_onnx(model: FakeDetector, onnx_path: Path, batches: list[torch.Tensor], flip_average: bool,
                   tolerance: float = 1e-3) -> float:
    """Load the exported model at `onnx_path` into `model` (same architecture and input size), with BatchNorm
    statistics measured on `batches` (normalised crops as training feeds them). Returns the largest P(fake)
    difference from ONNX Runtime on those crops; over `tolerance` it raises (a different architecture, input size or
    flip averaging)."""
    _load_folded(model, folded_convs(onnx_path), onnx_path)
    _reparametrise(_measure_bn_inputs(model, batches))
    diff = onnx_difference(model, onnx_path, torch.cat(batches)[:16], flip_average)
    if diff > tolerance:
        raise ValueError(f"{onnx_path}: rebuilt weights differ from the graph by {diff:.4g} in P(fake) "
                         f"(architecture, input size or --flip-average not the export's)")
    return diff
