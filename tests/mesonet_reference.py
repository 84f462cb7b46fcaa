"""An independent numpy forward pass of the MesoNet Keras 2.1.5 weights, to check the ONNX importer against.

Deliberately shares nothing with `streamguard.inference.importers.mesonet`: it reads the HDF5 datasets by name
(not through the `weight_names` attributes), orders layers by the number Keras appended to their names (creation
order in the authors' `classifiers.py`, not the saved topological order the importer uses), computes in float64
and NHWC, and does its own dilated 'same' convolution with stride tricks. Agreement therefore checks the layer
mapping, the layout handling and the arithmetic, not one implementation against itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

BN_EPSILON = 1e-3  # Keras 2.1.5 BatchNormalization default
LEAKY_ALPHA = 0.1  # classifiers.py: LeakyReLU(alpha=0.1) after Dense(16)

Weights = dict[str, dict[str, np.ndarray]]


def _suffix(name: str) -> int:
    return int(re.search(r"_(\d+)$", name).group(1))


def read_weights(h5_path: Path) -> Weights:
    """{layer name: {'kernel': ..., 'bias': ..., 'gamma': ...}} straight from the datasets, as float64."""
    out: Weights = {}
    with h5py.File(h5_path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for layer in root:
            group = root[layer]
            if layer not in group:
                continue  # weightless layer (input, pooling, dropout, ...)
            out[layer] = {key.split(":")[0]: np.asarray(ds[()], np.float64) for key, ds in group[layer].items()}
    return out


def _by_kind(weights: Weights, prefix: str) -> list[dict[str, np.ndarray]]:
    names = sorted((n for n in weights if re.fullmatch(rf"{prefix}_\d+", n)), key=_suffix)
    return [weights[n] for n in names]


def conv_same(x: np.ndarray, layer: dict[str, np.ndarray], dilation: int = 1) -> np.ndarray:
    """Keras Conv2D(padding='same', strides=1, activation='relu') on NHWC input; kernel is (kh, kw, cin, cout)."""
    kernel, bias = layer["kernel"], layer["bias"]
    kh, kw = kernel.shape[:2]
    span_h, span_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    # TF 'same' at stride 1 pads (span - 1) in total, the smaller half before.
    ph, pw = span_h - 1, span_w - 1
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    # windows: (N, H, W, C, span_h, span_w); keep every `dilation`-th tap of each window.
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(1, 2))[..., ::dilation, ::dilation]
    y = np.einsum("nhwcij,ijco->nhwo", win, kernel, optimize=True) + bias
    return np.maximum(y, 0.0)


def batch_norm(x: np.ndarray, layer: dict[str, np.ndarray]) -> np.ndarray:
    scale = layer["gamma"] / np.sqrt(layer["moving_variance"] + BN_EPSILON)
    return (x - layer["moving_mean"]) * scale + layer["beta"]


def max_pool_same(x: np.ndarray, size: int) -> np.ndarray:
    """Keras MaxPooling2D(pool_size=size, padding='same'), stride = size."""
    n, h, w, c = x.shape
    oh, ow = -(-h // size), -(-w // size)
    xp = np.pad(x, ((0, 0), (0, oh * size - h), (0, ow * size - w), (0, 0)), constant_values=-np.inf)
    return xp.reshape(n, oh, size, ow, size, c).max(axis=(2, 4))


def _head(x: np.ndarray, dense: list[dict[str, np.ndarray]]) -> np.ndarray:
    y = x.reshape(len(x), -1)  # Keras Flatten of NHWC: row-major over (H, W, C)
    y = y @ dense[0]["kernel"] + dense[0]["bias"]
    y = np.where(y >= 0, y, LEAKY_ALPHA * y)
    y = y @ dense[1]["kernel"] + dense[1]["bias"]
    return 1.0 / (1.0 + np.exp(-y[:, 0]))


def _inception(x: np.ndarray, convs: list[dict[str, np.ndarray]]) -> np.ndarray:
    # Creation order in InceptionLayer: a 1x1 | b 1x1, b 3x3 | c 1x1, c 3x3 dil 2 | d 1x1, d 3x3 dil 3.
    a = conv_same(x, convs[0])
    b = conv_same(conv_same(x, convs[1]), convs[2])
    c = conv_same(conv_same(x, convs[3]), convs[4], dilation=2)
    d = conv_same(conv_same(x, convs[5]), convs[6], dilation=3)
    return np.concatenate([a, b, c, d], axis=-1)


def forward(h5_path: Path, arch: Literal["meso4", "mesoinception"], x: np.ndarray) -> np.ndarray:
    """x: (N, 256, 256, 3) float in [0, 1], RGB → (N,) the Keras model's sigmoid output."""
    w = read_weights(h5_path)
    convs, bns, dense = _by_kind(w, "conv2d"), _by_kind(w, "batch_normalization"), _by_kind(w, "dense")
    h = np.asarray(x, np.float64)
    if arch == "meso4":
        for conv, bn, pool in zip(convs, bns, (2, 2, 2, 4), strict=False):
            h = max_pool_same(batch_norm(conv_same(h, conv), bn), pool)
    else:
        h = max_pool_same(batch_norm(_inception(h, convs[0:7]), bns[0]), 2)
        h = max_pool_same(batch_norm(_inception(h, convs[7:14]), bns[1]), 2)
        h = max_pool_same(batch_norm(conv_same(h, convs[14]), bns[2]), 2)
        h = max_pool_same(batch_norm(conv_same(h, convs[15]), bns[3]), 4)
    return _head(h, dense)
