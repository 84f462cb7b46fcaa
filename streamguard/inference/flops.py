"""Multiply-accumulates of an ONNX classifier per input, counted from the graph: the model's compute floor.

Conv, ConvTranspose, Gemm and MatMul carry practically all the arithmetic of a CNN classifier; their MACs follow from
the shapes ONNX shape inference gives each tensor once the batch is fixed to 1. Elementwise ops, pooling and
normalisation are left out (memory-bound, a few percent of the FLOPs). FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import shape_inference


@dataclass(frozen=True, slots=True)
class FlopCount:
    macs: int  # per input (batch 1)
    by_op: dict[str, int] = field(default_factory=dict)  # op type -> MACs

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _fix_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.dim_param or (d.dim_value <= 0):
                if i == 0:
                    d.Clear()
                    d.dim_value = batch
                else:
                    raise ValueError(f"input {inp.name} has a symbolic dimension {i} ({d.dim_param}): "
                                     "only the batch axis may be dynamic")
    return m


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _shapes_by_running(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Shapes of `names` from one ONNX Runtime run on zeros (batch 1): exact wherever inference gave up."""
    import numpy as np
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for n in names:
        if n not in present:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    x = np.zeros([int(d) for d in inp.shape], np.float32)
    values = session.run(names, {inp.name: x})
    return {n: list(v.shape) for n, v in zip(names, values, strict=True)}


def count_macs(model: onnx.ModelProto | str | Path) -> FlopCount:
    """MACs for one input of the model (batch axis fixed to 1)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    inferred = shape_inference.infer_shapes(_fix_batch(model), strict_mode=False, data_prop=True)
    g = inferred.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)

    wanted = [n for node in g.node if node.op_type in _COUNTED for n in (*node.input[:2], node.output[0])]
    missing = [n for n in dict.fromkeys(wanted) if n and (n not in shapes or any(d < 0 for d in shapes[n]))]
    if missing:  # shape inference stops at computed shapes (torch's Pad sub-graphs): run the graph once instead
        shapes.update(_shapes_by_running(_fix_batch(model), missing))

    def shape(name: str) -> list[int]:
        s = shapes.get(name)
        if s is None or any(d < 0 for d in s):
            raise ValueError(f"shape of tensor {name!r} unknown")
        return s

    by_op: dict[str, int] = {}
    for node in g.node:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w = shape(node.input[1])  # (Cout, Cin/group, k...) for Conv; (Cin, Cout/group, k...) for ConvTranspose
            if op == "Conv":
                out = shape(node.output[0])  # (N, Cout, spatial...)
                macs = math.prod(out) * math.prod(w[1:])
            else:
                x = shape(node.input[0])
                macs = math.prod(x) * math.prod(w[1:])
        elif op == "Gemm":
            a = shape(node.input[0])
            b = shape(node.input[1])
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            trans_b = next((at.i for at in node.attribute if at.name == "transB"), 0)
            m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
            n = b[0] if trans_b else b[1]
            macs = m * k * n
        elif op == "MatMul":
            a = shape(node.input[0])
            out = shape(node.output[0])
            k = a[-1]
            macs = math.prod(out) * k
        else:
            continue
        by_op[op] = by_op.get(op, 0) + int(macs)
    return FlopCount(sum(by_op.values()), by_op)
