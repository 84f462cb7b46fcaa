"""EfficientNet B0–B7 in plain torch, state-dict compatible with the two libraries the public deepfake detectors use.

* `TimmEfficientNet` matches timm's ``tf_efficientnet_b*`` / ``tf_efficientnet_b*_ns`` (timm 0.4.12 as pinned by
  selimsef/dfdc_deepfake_challenge, and current timm: the key names did not change). TF "SAME" padding is computed
  from the input each conv actually sees (timm `Conv2dSame`/`pad_same`: the smaller half before, the larger after).
* `LukemelasEfficientNet` matches ``efficientnet_pytorch.EfficientNet`` (lukemelas). Its padding is *static*: worked
  out once from the model's ``image_size`` (380 for B4, whatever size is later fed), which changes results when the
  real input is another size (icpr2020dfdc feeds 224 px). The library changed how, so `padding` names the version:
  ``"per_layer"`` = 0.7.1 (each conv padded for its own input size; the TF result at `image_size`),
  ``"global"`` = ≤ 0.6.3 (every conv padded as if its input were `image_size`).

Both: SiLU (swish) everywhere, squeeze-excite reducing to ``in_chs × 0.25`` of the *block input* channels, BN
eps 1e-3 (timm's BN_EPS_TF_DEFAULT; lukemelas batch_norm_epsilon), BN momentum 0.01 (inference ignores it),
drop-connect / dropout are identity at inference and have no weights, so they are left out.
Block table, width/depth rounding (round_filters / round_repeats) and the (width, depth, resolution) coefficients
are the ones both libraries copy from the TF reference (tensorflow/tpu efficientnet_builder.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"]
VARIANTS: tuple[str, ...] = get_args(Variant)
LukemelasPadding = Literal["per_layer", "global"]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention for TF's decay 0.99
SE_RATIO = 0.25
DIVISOR = 8

# (width multiplier, depth multiplier, native resolution)
COEFFICIENTS: dict[str, tuple[float, float, int]] = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
}

# B0 stages: (repeats, kernel, stride, expansion, output channels); the stem gives 32 channels, the head 1280.
_B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def round_filters(channels: int, width: float, divisor: int = DIVISOR) -> int:
    """Scale a channel count by `width` to the nearest multiple of `divisor`, never more than 10 % below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockSpec:
    stage: int
    index: int  # within the stage
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    expand: int

    @property
    def mid_chs(self) -> int:
        return self.in_chs * self.expand

    @property
    def se_chs(self) -> int:
        return max(1, int(self.in_chs * SE_RATIO))

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_chs == self.out_chs


def stem_channels(variant: Variant) -> int:
    return round_filters(32, COEFFICIENTS[variant][0])


def head_channels(variant: Variant) -> int:
    return round_filters(1280, COEFFICIENTS[variant][0])


def block_specs(variant: Variant) -> list[list[BlockSpec]]:
    """The blocks of each stage; only the first block of a stage strides or changes the channel count."""
    if variant not in COEFFICIENTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    width, depth, _ = COEFFICIENTS[variant]
    stages: list[list[BlockSpec]] = []
    in_chs = stem_channels(variant)
    for stage, (repeats, kernel, stride, expand, out) in enumerate(_B0_STAGES):
        out_chs = round_filters(out, width)
        blocks = []
        for i in range(round_repeats(repeats, depth)):
            blocks.append(BlockSpec(stage, i, in_chs, out_chs, kernel, stride if i == 0 else 1, expand))
            in_chs = out_chs
        stages.append(blocks)
    return stages


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME': output ceil(size / stride); (before, after) with the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


# --------------------------------------------------------------------------------------------------- timm flavour


class TfSameConv2d(nn.Conv2d):
    """timm `Conv2dSame` (and its static-padded nn.Conv2d, identical at stride 1): TF 'SAME' for the actual input."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_chs, out_chs, kernel, stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(int(x.shape[-2]), k, s)
        left, right = same_padding(int(x.shape[-1]), k, s)
        if top == bottom and left == right:  # stride 1 (odd kernel): the conv pads itself, no Pad node in ONNX
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TimmSqueezeExcite(nn.Module):
    def __init__(self, chs: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(s))


class TimmDepthwiseSeparable(nn.Module):
    """timm `DepthwiseSeparableConv` (the expansion-1 first stage): dw, BN, SiLU, SE, pw, BN."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.has_skip = spec.has_skip
        self.conv_dw = TfSameConv2d(spec.in_chs, spec.in_chs, spec.kernel, spec.stride, groups=spec.in_chs)
        self.bn1 = _bn(spec.in_chs)
        self.se = TimmSqueezeExcite(spec.in_chs, spec.se_chs)
        self.conv_pw = TfSameConv2d(spec.in_chs, spec.out_chs, 1)
        self.bn2 = _bn(spec.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return y + x if self.has_skip else y


class TimmInvertedResidual(nn.Module):
    """timm `InvertedResidual` (MBConv): pw expand, BN, SiLU, dw, BN, SiLU, SE, pw linear, BN."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        mid = spec.mid_chs
        self.has_skip = spec.has_skip
        self.conv_pw = TfSameConv2d(spec.in_chs, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = TfSameConv2d(mid, mid, spec.kernel, spec.stride, groups=mid)
        self.bn2 = _bn(mid)
        self.se = TimmSqueezeExcite(mid, spec.se_chs)
        self.conv_pwl = TfSameConv2d(mid, spec.out_chs, 1)
        self.bn3 = _bn(spec.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = self.se(F.silu(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y


class TimmEfficientNet(nn.Module):
    """timm `EfficientNet` as built by ``tf_efficientnet_<variant>[_ns]()``: keys conv_stem, bn1, blocks.S.B.*,
    conv_head, bn2, classifier (the ImageNet head stays: checkpoints that wrap the whole timm model carry it)."""

    def __init__(self, variant: Variant, num_classes: int = 1000):
        super().__init__()
        self.variant = variant
        stem = stem_channels(variant)
        self.conv_stem = TfSameConv2d(3, stem, 3, 2)
        self.bn1 = _bn(stem)
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(*(TimmDepthwiseSeparable(s) if s.expand == 1 else TimmInvertedResidual(s) for s in stage))
                for stage in block_specs(variant)
            )
        )
        self.num_features = head_channels(variant)
        self.conv_head = TfSameConv2d(block_specs(variant)[-1][-1].out_chs, self.num_features, 1)
        self.bn2 = _bn(self.num_features)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return F.silu(self.bn2(self.conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x).mean((2, 3)))


# ----------------------------------------------------------------------------------------------- lukemelas flavour


class StaticSameConv2d(nn.Conv2d):
    """lukemelas `Conv2dStaticSamePadding`: TF 'SAME' padding fixed at construction for `image_size`.

    An asymmetric pad is a parameterless ZeroPad2d (`static_padding`), so the state-dict keys stay weight/bias.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel: int,
        image_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ):
        before, after = same_padding(image_size, kernel, stride)
        symmetric = before == after  # then the conv pads itself (no Pad node in ONNX)
        super().__init__(in_chs, out_chs, kernel, stride, padding=before if symmetric else 0, groups=groups, bias=bias)
        self.static_padding: nn.Module = nn.Identity() if symmetric else nn.ZeroPad2d((before, after, before, after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LukemelasMBConv(nn.Module):
    """lukemelas `MBConvBlock`: keys _expand_conv/_bn0 (absent at expansion 1), _depthwise_conv, _bn1,
    _se_reduce, _se_expand, _project_conv, _bn2."""

    def __init__(self, spec: BlockSpec, image_size: int):
        super().__init__()
        mid = spec.mid_chs
        self.has_skip = spec.has_skip
        self.expand = spec.expand != 1
        if self.expand:
            self._expand_conv = StaticSameConv2d(spec.in_chs, mid, 1, image_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = StaticSameConv2d(mid, mid, spec.kernel, image_size, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._se_reduce = StaticSameConv2d(mid, spec.se_chs, 1, 1, bias=True)
        self._se_expand = StaticSameConv2d(spec.se_chs, mid, 1, 1, bias=True)
        self._project_conv = StaticSameConv2d(mid, spec.out_chs, 1, image_size)
        self._bn2 = _bn(spec.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.silu(self._bn1(self._depthwise_conv(y)))
        s = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(y, 1))))
        y = self._bn2(self._project_conv(torch.sigmoid(s) * y))
        return y + x if self.has_skip else y


class LukemelasEfficientNet(nn.Module):
    """lukemelas `EfficientNet.from_name/from_pretrained(f"efficientnet-{variant}")`: keys _conv_stem, _bn0,
    _blocks.N.*, _conv_head, _bn1 and, unless `num_classes` is None (a wrapper deleted it), _fc.

    `attention_after` inserts icpr2020dfdc's EfficientNetAutoAtt gate: after block N, x *= sigmoid(attconv(x))
    with a 1×1 conv (key attconv.*).
    """

    def __init__(
        self,
        variant: Variant,
        num_classes: int | None = 1000,
        image_size: int | None = None,
        padding: LukemelasPadding = "per_layer",
        attention_after: int | None = None,
    ):
        super().__init__()
        if padding not in get_args(LukemelasPadding):
            raise ValueError(f"padding must be one of {get_args(LukemelasPadding)}, got {padding!r}")
        self.variant = variant
        size = image_size or COEFFICIENTS[variant][2]
        self.image_size = size
        self.padding = padding
        stem = stem_channels(variant)
        self._conv_stem = StaticSameConv2d(3, stem, 3, size, 2)
        self._bn0 = _bn(stem)
        current = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for spec in (s for stage in block_specs(variant) for s in stage):
            blocks.append(LukemelasMBConv(spec, current if padding == "per_layer" else size))
            current = math.ceil(current / spec.stride)
        self._blocks = nn.ModuleList(blocks)
        self.num_features = head_channels(variant)
        last = block_specs(variant)[-1][-1].out_chs
        self._conv_head = StaticSameConv2d(last, self.num_features, 1, current if padding == "per_layer" else size)
        self._bn1 = _bn(self.num_features)
        self.attention_after = attention_after
        if attention_after is not None:
            specs = [s for stage in block_specs(variant) for s in stage]
            self.attconv = nn.Conv2d(specs[attention_after].out_chs, 1, 1)
        if num_classes is not None:
            self._fc = nn.Linear(self.num_features, num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.attention_after:
                x = x * torch.sigmoid(self.attconv(x))
        return F.silu(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.extract_features(x).mean((2, 3))
        return self._fc(x) if hasattr(self, "_fc") else x
