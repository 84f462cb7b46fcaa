"""MesoNet (Afchar et al., WIFS 2018): the authors' Keras 2.1.5 weights-only HDF5 files → ONNX model + card.

The architectures follow DariusAf/MesoNet `classifiers.py` (Meso4, MesoInception4): every Conv2D is
'same'-padded, stride 1, with ReLU, and is followed by BatchNormalization (so BN comes *after* the ReLU and cannot
be folded into the conv); MaxPooling2D is 'same' with stride = pool size; the head is Flatten, Dropout, Dense(16),
LeakyReLU(0.1), Dropout, Dense(1, sigmoid). Keras is channels-last; the graph runs NCHW (what ONNX Conv wants)
and transposes back to NHWC just before Flatten so the Dense(1024→16) kernel is used exactly as trained.

The Meso4 files name no `leaky_re_lu` layer (the MesoInception ones do), so the net that saved them may not have
had one. Keras's weights-only load_weights skips weightless layers, so the authors' published code runs these
weights *with* LeakyReLU(0.1); we follow that code. (It does not change any call on the four sample crops.)

Class order: the authors trained with `flow_from_directory` on folders `df/` and `real/`, which Keras numbers
alphabetically (df=0, real=1), so the sigmoid is P(real). The graph keeps it (output tensor `p_real`, card
`output="p_real"`): the ONNX model stays numerically the authors' model, and `to_p_fake` does the 1 − p.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamguard.inference import models
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.importers.output import resolve_output

Arch = Literal["meso4", "mesoinception"]
ARCHS: tuple[Arch, ...] = get_args(Arch)

OPSET = 17
IR_VERSION = 8  # the IR that goes with opset 17: the oldest runtimes/TensorRT parsers that take opset 17 read it
INPUT_SIZE = 256
BN_EPSILON = 1e-3  # Keras 2.1.5 BatchNormalization default; the weights-only file does not record it
LEAKY_ALPHA = 0.1  # classifiers.py: LeakyReLU(alpha=0.1)
# The authors' crops are tight, landmark-aligned faces: side = 2.86 × max(eye–eye, eye–mouth) distance
# (pipeline.py: K=2.2 × l_factor=1.3). Mediapipe's full-range box on their four sample crops gives
# crop side / box side of 1.13–1.48 (median ≈ 1.3), far tighter than the 1.65 our own models use.
CROP_MARGIN = 1.3

_ARCH_TITLE = {"meso4": "Meso4", "mesoinception": "MesoInception4"}


@dataclass(frozen=True)
class _Slot:
    """One layer with weights, as the architecture expects it."""

    role: str  # its name in our graph
    kind: Literal["conv", "bn", "dense"]
    shape: tuple[int, ...]  # conv: kernel (kh, kw, cin, cout); bn: (channels,); dense: kernel (in, out)
    dilation: int = 1


@dataclass(frozen=True)
class _SavedLayer:
    """One layer with weights as the HDF5 file stores it; arrays in its `weight_names` order."""

    name: str
    arrays: tuple[np.ndarray, ...]


def _conv(role: str, k: int, cin: int, cout: int, dilation: int = 1) -> _Slot:
    return _Slot(role, "conv", (k, k, cin, cout), dilation)


def _bn(role: str, channels: int) -> _Slot:
    return _Slot(role, "bn", (channels,))


def _dense(role: str, n_in: int, n_out: int) -> _Slot:
    return _Slot(role, "dense", (n_in, n_out))


def _inception_slots(block: str, cin: int, a: int, b: int, c: int, d: int) -> list[_Slot]:
    # InceptionLayer(a, b, c, d): branch a = 1x1; b = 1x1→3x3; c = 1x1→3x3 dil 2; d = 1x1→3x3 dil 3, concatenated
    # [a, b, c, d]. Listed in the order the saved files list them (Keras's topological order, which its
    # load_weights follows position by position): the three 1x1s that feed a 3x3, the lone 1x1, then the 3x3s.
    return [
        _conv(f"{block}.b1", 1, cin, b),
        _conv(f"{block}.c1", 1, cin, c),
        _conv(f"{block}.d1", 1, cin, d),
        _conv(f"{block}.a", 1, cin, a),
        _conv(f"{block}.b3", 3, b, b),
        _conv(f"{block}.c3", 3, c, c, dilation=2),
        _conv(f"{block}.d3", 3, d, d, dilation=3),
    ]


def _slots(arch: Arch) -> list[_Slot]:
    head = [_dense("dense1", 8 * 8 * 16, 16), _dense("dense2", 16, 1)]
    if arch == "meso4":
        return [
            _conv("conv1", 3, 3, 8), _bn("bn1", 8),
            _conv("conv2", 5, 8, 8), _bn("bn2", 8),
            _conv("conv3", 5, 8, 16), _bn("bn3", 16),
            _conv("conv4", 5, 16, 16), _bn("bn4", 16),
            *head,
        ]  # fmt: skip
    return [
        *_inception_slots("inc1", 3, 1, 4, 4, 2), _bn("bn1", 11),
        *_inception_slots("inc2", 11, 2, 4, 4, 2), _bn("bn2", 12),
        _conv("conv3", 5, 12, 16), _bn("bn3", 16),
        _conv("conv4", 5, 16, 16), _bn("bn4", 16),
        *head,
    ]  # fmt: skip


def _decode(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_saved_layers(h5_path: Path) -> list[_SavedLayer]:
    """The layers that carry weights, in the file's `layer_names` order: the order Keras's load_weights uses."""
    if not h5_path.is_file():
        raise FileNotFoundError(f"MesoNet weights file not found: {h5_path}")
    if not h5py.is_hdf5(h5_path):
        raise ValueError(
            f"{h5_path} is not an HDF5 file; expected the MesoNet authors' Keras weights (e.g. Meso4_DF.h5)"
        )
    try:
        with h5py.File(h5_path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f  # model.save() nests them; save_weights() not
            if "layer_names" not in root.attrs:
                raise ValueError(f"{h5_path} is an HDF5 file but not Keras weights (it has no 'layer_names' attribute)")
            layers = []
            for raw_name in root.attrs["layer_names"]:
                name = _decode(raw_name)
                weight_names = [_decode(w) for w in root[name].attrs.get("weight_names", [])]
                if weight_names:
                    arrays = tuple(np.asarray(root[name][w][()], np.float32) for w in weight_names)
                    layers.append(_SavedLayer(name, arrays))
    except (OSError, KeyError) as e:
        raise ValueError(f"{h5_path} could not be read as Keras weights: {e}") from e
    return layers


def _describe(kind: str, shape: tuple) -> str:
    if kind == "conv":
        return f"conv kernel {shape}"
    if kind == "bn":
        return f"batch norm over {shape[0]} channels"
    if kind == "dense":
        return f"dense kernel {shape}"
    return f"layer with weight shapes {shape}"


def _kind_and_shape(layer: _SavedLayer) -> tuple[str, tuple]:
    shapes = [a.shape for a in layer.arrays]
    main = shapes[0]
    if len(shapes) == 2 and len(main) == 4 and shapes[1] == (main[3],):
        return "conv", main
    if len(shapes) == 2 and len(main) == 2 and shapes[1] == (main[1],):
        return "dense", main
    if len(shapes) == 4 and len(main) == 1 and all(s == main for s in shapes):
        return "bn", main  # gamma, beta, moving mean, moving variance
    return "unknown", tuple(shapes)


def _mismatch(layers: list[_SavedLayer], arch: Arch) -> str | None:
    """None when the saved layers fit `arch`; otherwise what first did not fit, in words."""
    slots = _slots(arch)
    for i, (layer, slot) in enumerate(zip(layers, slots, strict=False), 1):
        kind, shape = _kind_and_shape(layer)
        if (kind, shape) != (slot.kind, slot.shape):
            return (
                f"weighted layer {i} '{layer.name}' is a {_describe(kind, shape)}, "
                f"where {_ARCH_TITLE[arch]} expects a {_describe(slot.kind, slot.shape)}"
            )
    if len(layers) != len(slots):
        return f"it has {len(layers)} layers with weights, {_ARCH_TITLE[arch]} has {len(slots)}"
    return None


def _match(layers: list[_SavedLayer], arch: Arch, h5_path: Path) -> dict[str, tuple[_Slot, tuple[np.ndarray, ...]]]:
    problem = _mismatch(layers, arch)
    if problem is not None:
        fits = [a for a in ARCHS if a != arch and _mismatch(layers, a) is None]
        hint = f" It does fit --arch {fits[0]}." if fits else ""
        raise ValueError(f"{h5_path.name} does not match --arch {arch}: {problem}.{hint}")
    return {slot.role: (slot, layer.arrays) for slot, layer in zip(_slots(arch), layers, strict=True)}


class _Graph:
    """Collects nodes and initializers; each helper returns the name of the tensor it produced."""

    def __init__(self, weights: dict[str, tuple[_Slot, tuple[np.ndarray, ...]]]):
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def _op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def conv_relu(self, x: str, role: str) -> str:
        slot, (kernel, bias) = self.weights[role]
        k, d = kernel.shape[0], slot.dilation
        pad = d * (k - 1) // 2  # 'same' at stride 1 with an odd kernel: symmetric
        w = self._const(f"{role}.weight", kernel.transpose(3, 2, 0, 1))  # (kh, kw, cin, cout) → (cout, cin, kh, kw)
        b = self._const(f"{role}.bias", bias)
        y = self._op("Conv", [x, w, b], f"{role}.conv", kernel_shape=[k, k], pads=[pad] * 4, dilations=[d, d])
        return self._op("Relu", [y], f"{role}.relu")

    def batch_norm(self, x: str, role: str) -> str:
        _, arrays = self.weights[role]  # Keras order: gamma, beta, moving mean, moving variance = ONNX's order
        names = ("gamma", "beta", "mean", "var")
        inputs = [x] + [self._const(f"{role}.{n}", a) for n, a in zip(names, arrays, strict=True)]
        return self._op("BatchNormalization", inputs, role, epsilon=BN_EPSILON)

    def max_pool(self, x: str, size: int, name: str) -> str:
        # Keras 'same' pooling pads only when a side is not a multiple of the pool: 256→128→64→32→8 never is.
        return self._op("MaxPool", [x], name, kernel_shape=[size, size], strides=[size, size])

    def inception(self, x: str, block: str) -> str:
        a = self.conv_relu(x, f"{block}.a")
        b = self.conv_relu(self.conv_relu(x, f"{block}.b1"), f"{block}.b3")
        c = self.conv_relu(self.conv_relu(x, f"{block}.c1"), f"{block}.c3")
        d = self.conv_relu(self.conv_relu(x, f"{block}.d1"), f"{block}.d3")
        return self._op("Concat", [a, b, c, d], f"{block}.concat", axis=1)

    def head(self, x: str) -> str:
        # Keras flattens NHWC; transposing back keeps the trained Dense kernel's row order valid.
        x = self._op("Transpose", [x], "to_nhwc", perm=[0, 2, 3, 1])
        x = self._op("Flatten", [x], "flatten", axis=1)
        for role in ("dense1", "dense2"):
            _, (kernel, bias) = self.weights[role]
            x = self._op("Gemm", [x, self._const(f"{role}.weight", kernel), self._const(f"{role}.bias", bias)], role)
            if role == "dense1":
                x = self._op("LeakyRelu", [x], "dense1.leaky_relu", alpha=LEAKY_ALPHA)
        return self._op("Sigmoid", [x], "p_real")


def _build_model(arch: Arch, weights: dict[str, tuple[_Slot, tuple[np.ndarray, ...]]], doc: str) -> onnx.ModelProto:
    g = _Graph(weights)
    x = "input"
    if arch == "meso4":
        for i, pool in enumerate((2, 2, 2, 4), 1):
            x = g.max_pool(g.batch_norm(g.conv_relu(x, f"conv{i}"), f"bn{i}"), pool, f"pool{i}")
    else:
        x = g.max_pool(g.batch_norm(g.inception(x, "inc1"), "bn1"), 2, "pool1")
        x = g.max_pool(g.batch_norm(g.inception(x, "inc2"), "bn2"), 2, "pool2")
        x = g.max_pool(g.batch_norm(g.conv_relu(x, "conv3"), "bn3"), 2, "pool3")
        x = g.max_pool(g.batch_norm(g.conv_relu(x, "conv4"), "bn4"), 4, "pool4")
    out = g.head(x)
    graph = helper.make_graph(
        g.nodes,
        f"mesonet_{arch}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 1])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="streamguard", doc_string=doc
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def default_model_name(h5_path: Path, arch: Arch) -> str:
    """Meso4_DF.h5 → mesonet-meso4-df; MesoInception_F2F.h5 → mesonet-inception-f2f."""
    slug = re.sub(r"[^a-z0-9]+", "-", h5_path.stem.lower()).strip("-").replace("mesoinception", "inception")
    if not slug.startswith(("meso4", "inception")):
        slug = f"{'meso4' if arch == 'meso4' else 'inception'}-{slug}".rstrip("-")
    return f"mesonet-{slug}"


def _card(name: str, arch: Arch, h5_path: Path, sha256: str) -> ModelCard:
    return ModelCard(
        name=name,
        architecture=(
            f"MesoNet {_ARCH_TITLE[arch]} (Afchar et al., WIFS 2018), imported from Keras 2.1.5 weights; "
            "conv-ReLU-BN-maxpool blocks, Dense(16)+LeakyReLU(0.1), Dense(1)+sigmoid"
        ),
        preprocess=Preprocess(
            input_size=INPUT_SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), layout="NCHW", crop_margin=CROP_MARGIN
        ),
        output="p_real",  # the authors' class 1 is 'real' (folders df/, real/ sorted alphabetically)
        threshold=0.5,
        source=f"DariusAf/MesoNet weights {h5_path.name}, Apache-2.0",
        license="Apache-2.0",
        training=(
            "authors' aligned-face frames, RGB/255 at 256x256; DF: their Deepfakes set of web videos, "
            "F2F: Face2Face (FaceForensics)"
        ),
        sha256=sha256,
    )


def import_mesonet(
    h5_path: Path, arch: Arch, output: Path | None = None, name: str | None = None
) -> tuple[Path, ModelCard]:
    """Convert a MesoNet Keras weights file to `<engines>/<name>.onnx` (or `output`) with its `.json` card beside it.

    Raises FileNotFoundError for a missing file and ValueError for anything else wrong (not HDF5, not Keras
    weights, layers that do not fit `arch`, a bad output path); the messages are meant to be printed as-is.
    """
    h5_path = Path(h5_path)
    if arch not in ARCHS:
        raise ValueError(f"unknown MesoNet architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    onnx_path, name = resolve_output(output, name, lambda: default_model_name(h5_path, arch))

    weights = _match(_read_saved_layers(h5_path), arch, h5_path)
    doc = f"MesoNet {_ARCH_TITLE[arch]} from DariusAf/MesoNet {h5_path.name} (Apache-2.0). Output p_real = P(real)."
    model = _build_model(arch, weights, doc)

    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(onnx_path))
    card = _card(name, arch, h5_path, models.file_sha256(onnx_path))
    card.save(onnx_path.with_suffix(".json"))
    return onnx_path, card
