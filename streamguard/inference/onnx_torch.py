"""Run an ONNX graph with PyTorch: the `cuda` backend's engine where ONNX Runtime has no CUDA provider.

A small interpreter, not a general converter: the operators our exported classifiers use (MesoNet, SGNet,
EfficientNet from torch's exporter: Conv, BatchNormalization, pooling, Gemm/MatMul, activations, Pad with its
constant shape sub-graph, Reshape/Flatten/Transpose/Concat) and their shape helpers. At load, every node whose
inputs are all constants is evaluated once (constant folding), so what runs per call is tensor math alone and shape
arithmetic stays on the CPU: nothing forces a device sync, and the forward pass can be captured in a CUDA graph.
An operator outside the list raises `UnsupportedOnnx` at load, naming it, and backend selection falls back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

Tensor = torch.Tensor


class UnsupportedOnnx(NotImplementedError):
    """The graph uses something this interpreter does not run (the message says what)."""


@dataclass(slots=True)
class _Node:
    op: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    name: str


@dataclass(slots=True)
class _Ctx:
    opset: int
    float_dtype: torch.dtype  # what ONNX FLOAT means now: float16 once the module runs in half precision


# ONNX TensorProto data types -> torch
_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _const_input(inputs: Sequence[Tensor | None], i: int) -> Tensor | None:
    return inputs[i] if len(inputs) > i else None


# -- operators ---------------------------------------------------------------------------------------------------------
# Each takes (ctx, inputs, attrs) and returns one tensor or a tuple of them.


def _pads_2d(
    attrs: dict, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """ONNX pads [h_begin, w_begin, h_end, w_end], from `pads` or `auto_pad` (SAME_* from the input's size)."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 4))
    if auto == "VALID":
        return [0] * 4
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX [b0, b1, ..., e0, e1, ...] -> F.pad's (b_last, e_last, ..., b_first, e_first)."""
    n = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(n)):
        out += [int(pads[d]), int(pads[d + n])]
    return out


def _conv(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x, w = inputs[0], inputs[1]
    b = _const_input(inputs, 2)
    if x.dim() != 4:
        raise UnsupportedOnnx(f"Conv on a {x.dim()}-D input (only 2-D convolutions are supported)")
    kernel = attrs.get("kernel_shape", list(w.shape[2:]))
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = _pads_2d(attrs, x, kernel, strides, dilations)
    group = attrs.get("group", 1)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        return F.conv2d(x, w, b, tuple(strides), (pads[0], pads[1]), tuple(dilations), group)
    x = F.pad(x, _torch_pad([0, 0, *pads[:2], 0, 0, *pads[2:]])[:4])
    return F.conv2d(x, w, b, tuple(strides), 0, tuple(dilations), group)


def _max_pool(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    kernel = attrs["kernel_shape"]
    if len(kernel) != 2:
        raise UnsupportedOnnx("MaxPool over other than 2 spatial axes")
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    pads = _pads_2d(attrs, x, kernel, strides, dilations)
    if any(pads):
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]], value=-math.inf)
    return F.max_pool2d(x, tuple(kernel), tuple(strides), 0, tuple(dilations), bool(attrs.get("ceil_mode", 0)))


def _avg_pool(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    kernel = attrs["kernel_shape"]
    if len(kernel) != 2:
        raise UnsupportedOnnx("AveragePool over other than 2 spatial axes")
    strides = attrs.get("strides", [1, 1])
    pads = _pads_2d(attrs, x, kernel, strides, [1, 1])
    include = bool(attrs.get("count_include_pad", 0))
    ceil = bool(attrs.get("ceil_mode", 0))
    if pads[0] == pads[2] and pads[1] == pads[3] and pads[0] <= kernel[0] // 2 and pads[1] <= kernel[1] // 2:
        return F.avg_pool2d(x, tuple(kernel), tuple(strides), (pads[0], pads[1]), ceil, include)
    if not include and any(pads):
        raise UnsupportedOnnx("AveragePool with asymmetric padding excluded from the count")
    x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    return F.avg_pool2d(x, tuple(kernel), tuple(strides), 0, ceil, True)


def _batch_norm(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _gemm(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    a, b = inputs[0], inputs[1]
    c = _const_input(inputs, 2)
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _reduce(kind: str) -> Callable[..., Tensor]:
    def run(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
        x = inputs[0]
        axes = _ints(_const_input(inputs, 1)) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(int(a) % x.dim() for a in axes)
        if kind == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        return x.amax(dim=dims, keepdim=keep)

    return run


def _reshape(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    assert shape is not None
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, -1)


def _transpose(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(*perm)


def _concat(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    parts = [t for t in inputs if t is not None]
    if len(parts) > 1:
        parts = [t for t in parts if t.numel() > 0 or t.dim() > 1] or parts[:1]  # ONNX allows empty 1-D inputs
    devices = {t.device for t in parts}
    if len(devices) > 1:  # a shape sub-graph (CPU) joined with a device tensor: keep it on the device
        dev = next(d for d in devices if d.type != "cpu")
        parts = [t.to(dev) for t in parts]
    return torch.cat(parts, dim=attrs["axis"])


def _pad(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(inputs) > 1:
        pads = _ints(inputs[1])
        value_t = _const_input(inputs, 2)
        value = float(value_t.item()) if value_t is not None and value_t.numel() else 0.0
        axes_t = _const_input(inputs, 3)
    else:  # opset < 11
        pads, value, axes_t = list(attrs["pads"]), float(attrs.get("value", 0.0)), None
    assert pads is not None
    if axes_t is not None:
        axes = [a % x.dim() for a in _ints(axes_t) or []]
        full = [0] * (2 * x.dim())
        for i, a in enumerate(axes):
            full[a], full[a + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    torch_pads = _torch_pad(pads)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:  # F.pad pads the last dims only
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


def _clip(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    lo = _const_input(inputs, 1)
    hi = _const_input(inputs, 2)
    lo_v = float(lo.item()) if lo is not None else attrs.get("min")
    hi_v = float(hi.item()) if hi is not None else attrs.get("max")
    return torch.clamp(x, lo_v, hi_v)


def _shape(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    dims = list(inputs[0].shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)  # on the CPU: shape arithmetic never touches the GPU


def _gather(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    data, idx = inputs[0], inputs[1]
    axis = attrs.get("axis", 0) % data.dim()
    idx = idx.to(data.device).long()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _axes(inputs: list, attrs: dict) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    return attrs.get("axes")


def _unsqueeze(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = sorted(a % (x.dim() + len(_axes(inputs, attrs) or [])) for a in _axes(inputs, attrs) or [])
    for a in axes:
        x = x.unsqueeze(a)
    return x


def _squeeze(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _slice(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    x = inputs[0]
    if len(inputs) > 1:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(_const_input(inputs, 3))
        steps = _ints(_const_input(inputs, 4))
    else:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    assert starts is not None and ends is not None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    backwards: list[tuple[int, int, int, int]] = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        size = x.shape[a]
        s = s + size if s < 0 else s
        e = e + size if e < 0 else e
        if st > 0:
            index[a] = slice(max(0, min(size, s)), max(0, min(size, e)), st)
        elif st < 0:  # ONNX clamps start to [0, size-1] and end to [-1, size-1]; torch slices have no negative step
            backwards.append((a, max(0, min(size - 1, s)), max(-1, min(size - 1, e)), st))
        else:
            raise UnsupportedOnnx("Slice with step 0")
    x = x[tuple(index)]
    for a, s, e, st in backwards:
        x = x.index_select(a, torch.arange(s, e, st, device=x.device))
    return x


def _cast(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    dtype = _DTYPES.get(attrs["to"])
    if dtype is None:
        raise UnsupportedOnnx(f"Cast to ONNX type {attrs['to']}")
    if dtype.is_floating_point and inputs[0].is_floating_point():
        dtype = ctx.float_dtype  # keep the module's precision: a Cast to FLOAT inside an FP16 graph stays FP16
    return inputs[0].to(dtype)


def _constant_of_shape(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    shape = _ints(inputs[0]) or []
    value = attrs.get("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    v = torch.from_numpy(np.array(value).copy())
    return torch.full(shape, v.reshape(-1)[0].item(), dtype=v.dtype)


def _constant(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            return torch.from_numpy(np.array(attrs[key]).copy())
    raise UnsupportedOnnx(f"Constant with attributes {sorted(attrs)}")


def _softmax(log: bool) -> Callable[..., Tensor]:
    def run(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
        axis = attrs.get("axis", -1 if ctx.opset >= 13 else 1)
        if ctx.opset < 13 and axis != -1 and axis != inputs[0].dim() - 1:
            raise UnsupportedOnnx("Softmax before opset 13 over axes other than the last")
        return F.log_softmax(inputs[0], dim=axis) if log else F.softmax(inputs[0], dim=axis)

    return run


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def run(ctx: _Ctx, inputs: list, attrs: dict) -> Tensor:
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out

    return run


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    return lambda ctx, inputs, attrs: fn(inputs[0])


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    return lambda ctx, inputs, attrs: fn(inputs[0], inputs[1])


OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": lambda ctx, i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda ctx, i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Relu": _unary(F.relu),
    "LeakyRelu": lambda ctx, i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "PRelu": lambda ctx, i, a: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": lambda ctx, i, a: torch.clamp(i[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Elu": lambda ctx, i, a: F.elu(i[0], a.get("alpha", 1.0)),
    "Softplus": _unary(F.softplus),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Clip": _clip,
    "Softmax": _softmax(False),
    "LogSoftmax": _softmax(True),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": _concat,
    "Pad": _pad,
    "Identity": _unary(lambda x: x),
    "Dropout": _unary(lambda x: x),  # inference: identity (the mask output is not supported)
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Constant": _constant,
}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        elif isinstance(v, (onnx.GraphProto, list)) and v and isinstance(v[0], onnx.GraphProto):
            raise UnsupportedOnnx(f"{node.op_type} with a sub-graph (control flow)")
        out[a.name] = v
    return out


class OnnxTorchModule(torch.nn.Module):
    """The ONNX graph as a torch module: `module(x)` -> the graph's first output (or all of them with `all_outputs`).

    Float constants the runtime nodes need are buffers (so `.to(device)` and `.half()` move and convert them);
    integer constants stay on the CPU as shape arithmetic. Batch rows are independent for our classifiers, which
    the CUDA-graph padding in the cuda backend relies on.
    """

    def __init__(self, model: onnx.ModelProto | str | Path):
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        ctx = _Ctx(opset, torch.float32)
        consts: dict[str, Tensor] = {
            init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer
        }
        inputs = [i.name for i in graph.input if i.name not in consts]
        if len(inputs) != 1:
            raise UnsupportedOnnx(f"expected one graph input, found {inputs}")
        self.input_name = inputs[0]
        self.output_names = [o.name for o in graph.output]
        nodes: list[_Node] = []
        with torch.no_grad():
            for i, node in enumerate(graph.node):
                if node.domain not in ("", "ai.onnx"):
                    raise UnsupportedOnnx(f"operator {node.domain}.{node.op_type} (custom domain)")
                fn = OPS.get(node.op_type)
                if fn is None:
                    raise UnsupportedOnnx(f"ONNX operator {node.op_type!r} is not supported by the torch backend "
                                          f"(node {node.name or i}); use the tensorrt or onnxruntime backend")
                attrs = _attrs(node)
                ins = tuple(node.input)
                outs = tuple(node.output)
                if all(n == "" or n in consts for n in ins):  # constant folding
                    result = fn(ctx, [consts[n] if n else None for n in ins], attrs)
                    for name, t in zip(outs, result if isinstance(result, tuple) else (result,)):
                        consts[name] = t
                    continue
                nodes.append(_Node(node.op_type, fn, ins, outs, attrs, node.name or f"{node.op_type}_{i}"))
        needed = {n for node in nodes for n in node.inputs if n in consts}
        needed |= {n for n in self.output_names if n in consts}
        self._buffer_of: dict[str, str] = {}
        self._cpu_consts: dict[str, Tensor] = {}
        for j, name in enumerate(sorted(needed)):
            t = consts[name]
            if t.is_floating_point():
                attr = f"c{j}"
                self.register_buffer(attr, t.contiguous())
                self._buffer_of[name] = attr
            else:
                self._cpu_consts[name] = t
        self._nodes = nodes
        self._ctx = ctx
        self.opset = opset
        self.all_outputs = False

    @property
    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self._nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def _apply(self, fn: Callable, recurse: bool = True):  # .half()/.float()/.to(dtype) keep ctx.float_dtype in step
        out = super()._apply(fn, recurse)
        floats = [b.dtype for b in self.buffers() if b.is_floating_point()]
        if floats:
            self._ctx.float_dtype = floats[0]
        return out

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        env: dict[str, Tensor | None] = dict(self._cpu_consts)
        for name, attr in self._buffer_of.items():
            env[name] = getattr(self, attr)
        env[self.input_name] = x
        env[""] = None
        for node in self._nodes:
            args = [env[n] for n in node.inputs]
            result = node.fn(self._ctx, args, node.attrs)
            if isinstance(result, tuple):
                for name, t in zip(node.outputs, result):
                    env[name] = t
            else:
                env[node.outputs[0]] = result
        outs = tuple(env[n] for n in self.output_names)
        return outs if self.all_outputs else outs[0]  # type: ignore[return-value]
