"""Importing the public checkpoints: files in each project's own format (keys, wrapping) with random weights.

The networks are streamguard's plain-torch EfficientNets; that their keys, shapes and outputs match timm 0.4.12 and
efficientnet_pytorch 0.6.3/0.7.1 was checked against those libraries' sources once (see engines/IMPORTING.md),
not here: neither library may be installed in this environment. Here: every kind's file format round-trips through
`import_checkpoint`, the ONNX graph returns the same P(fake) as the torch network with the project's own
preprocessing written out independently, the batch is dynamic, and a broken file fails naming the key.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from streamguard.inference.card import ModelCard  # noqa: E402
from streamguard.inference.classifier import preprocess  # noqa: E402
from streamguard.inference.importers.checkpoints import (  # noqa: E402
    CheckpointError,
    DeepFakeClassifier,
    IcprEfficientNet,
    IcprSiamese,
    SbiDetector,
    default_model_name,
    import_checkpoint,
    load_checkpoint,
)
from streamguard.inference.onnx import OnnxClassifier  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TOLERANCE = 1e-4


def informative(net: nn.Module, seed: int, calibration: torch.Tensor) -> nn.Module:
    """Random weights that keep activations O(1) through 30–55 blocks, so P(fake) is neither 0 nor 1 and the
    comparisons below mean something: scaled normal init, then BN statistics measured on `calibration` (the
    network's input for the test crops; statistics from other inputs let the logits run to ±100)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
        net.train()
        net(calibration)
        for m in norms:
            m.momentum = 0.01
    return net.eval()


def face_crops(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth blobs in a narrow intensity range (so deepware's min–max stretch changes them) plus pixel noise."""
    import cv2

    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        coarse = rng.uniform(70, 170, (6, 6, 3)).astype(np.float32)
        smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        crops.append(np.clip(smooth + rng.normal(0, 6, smooth.shape), 40, 210).astype(np.uint8))
    return np.stack(crops)


def nchw(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0


def imagenet(crops: np.ndarray) -> torch.Tensor:
    return (nchw(crops) - MEAN) / STD


def stretched_imagenet(crops: np.ndarray) -> torch.Tensor:
    """deepware scan.py: cv2.normalize(face, None, 0, 255, NORM_MINMAX), then ToTensor and Normalize(ImageNet)."""
    x = nchw(crops)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (x.amax(dim=(1, 2, 3), keepdim=True) - lo) - MEAN) / STD


def imagenet_sigmoid(net: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """selimsef kernel_utils / icpr2020dfdc: Normalize(ImageNet) on RGB/255, sigmoid of the logit."""
    return lambda crops: torch.sigmoid(net(imagenet(crops))[:, 0]).detach().numpy()


def deepware_reference(net: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """deepware scan.py: min–max stretch, ImageNet normalisation, sigmoid of the logit."""
    return lambda crops: torch.sigmoid(net(stretched_imagenet(crops))[:, 0]).detach().numpy()


def sbi_reference(net: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """SelfBlendedImages inference: tensor / 255 (no mean/std), softmax(1)[:, 1]."""
    return lambda crops: torch.softmax(net(nchw(crops)), dim=1)[:, 1].detach().numpy()


def at_size(card: ModelCard, size: int) -> ModelCard:
    """The card's preprocessing at another crop size (the torch nets run at any size; the graph is fixed)."""
    return card.model_copy(update={"preprocess": card.preprocess.model_copy(update={"input_size": size})})


def check_export(
    onnx_path: Path,
    card: ModelCard,
    reference: Callable[[np.ndarray], np.ndarray],
    crops: np.ndarray,
    batches: tuple[int, ...],
) -> np.ndarray:
    """ONNX P(fake) == the reference on `crops`, the reference is informative, and other batch sizes agree."""
    classifier = OnnxClassifier(onnx_path, card, threads=2)
    assert [d if isinstance(d, int) else "dynamic" for d in classifier._session.get_inputs()[0].shape] == [
        "dynamic",
        3,
        card.preprocess.input_size,
        card.preprocess.input_size,
    ]
    got = classifier.predict(crops)
    with torch.no_grad():
        want = reference(crops)
    assert np.all((want > 1e-3) & (want < 1 - 1e-3)) and np.ptp(want) > 1e-3, f"degenerate reference {want}"
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    for n in batches:
        np.testing.assert_allclose(classifier.predict(crops[:n]), got[:n], atol=TOLERANCE, rtol=0)
    return got


# ----------------------------------------------------------------------------------------- DFDC winner, B7

B7_FORWARD = 64  # the timm net pads for whatever size it gets; a 380 px B7 forward costs ~15 GFLOP on 2 cores


def selimsef_checkpoint(net: DeepFakeClassifier, path: Path) -> Path:
    """As selimsef's train_classifier.py saves it: DataParallel keys under 'state_dict', numpy bce_best."""
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 24, "state_dict": state, "bce_best": np.float64(0.18)}, path)
    return path


def test_selimsef_b7_checkpoint_loads_strictly(tmp_path: Path) -> None:
    calibration = face_crops(8, B7_FORWARD, seed=1)  # at 64 px the last stage is 2×2: BN needs more samples
    crops = calibration[:2]
    net = informative(DeepFakeClassifier("b7"), seed=7, calibration=imagenet(calibration))
    path = selimsef_checkpoint(net, tmp_path / "final_999_DeepFakeClassifier_tf_efficientnet_b7_ns_0_23")
    loaded = load_checkpoint("selimsef", path)
    card = loaded.card
    assert card.preprocess.input_size == 380 and card.preprocess.mean == (0.485, 0.456, 0.406)
    assert card.output == "p_fake" and card.threshold == 0.5 and card.license == "MIT"
    assert "EfficientNet-B7 (timm tf_efficientnet_b7_ns" in card.architecture and "releases/tag/0.0.1" in card.source
    with torch.no_grad():
        got = loaded.module(torch.from_numpy(preprocess(crops, at_size(card, B7_FORWARD)))).numpy()
    want = imagenet_sigmoid(net)(crops)
    assert np.all((want > 1e-3) & (want < 1 - 1e-3)) and np.ptp(want) > 1e-3, f"degenerate reference {want}"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_selimsef_export_gives_the_same_p_fake(tmp_path: Path) -> None:
    """The same file format and export path with a B0 encoder (selimsef's loader takes any width): the full 380 px
    B7 export is test_selimsef_b7_full_export, opt-in because it takes a minute or more on a shared 2-core box."""
    crops = face_crops(3, 380, seed=3)
    net = informative(DeepFakeClassifier("b0"), seed=5, calibration=imagenet(crops))
    path = selimsef_checkpoint(net, tmp_path / "final_555_DeepFakeClassifier_tf_efficientnet_b0_ns_0_19")
    onnx_path, card = import_checkpoint("selimsef", path, output=tmp_path / "dfdc-winner.onnx")
    assert json.loads(onnx_path.with_suffix(".json").read_text())["sha256"] == card.sha256
    assert "EfficientNet-B0" in card.architecture
    check_export(onnx_path, card, imagenet_sigmoid(net), crops, batches=(1, 2))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STREAMGUARD_SLOW_TESTS"), reason="set STREAMGUARD_SLOW_TESTS=1 (≈1 min)")
def test_selimsef_b7_full_export(tmp_path: Path) -> None:
    crops = face_crops(2, 380, seed=1)
    net = informative(DeepFakeClassifier("b7"), seed=7, calibration=imagenet(crops))
    path = selimsef_checkpoint(net, tmp_path / "final_999_DeepFakeClassifier_tf_efficientnet_b7_ns_0_23")
    onnx_path, card = import_checkpoint("selimsef", path, output=tmp_path / "dfdc-winner-b7.onnx")
    check_export(onnx_path, card, imagenet_sigmoid(net), crops, batches=(1,))


def test_deepware_b7_flat_state_dict_loads_strictly(tmp_path: Path) -> None:
    calibration = face_crops(8, B7_FORWARD, seed=2)
    crops = calibration[:2]
    net = informative(DeepFakeClassifier("b7"), seed=8, calibration=stretched_imagenet(calibration))
    path = tmp_path / "deepware.pt"
    torch.save(net.state_dict(), path)  # scan.py: model.load_state_dict(torch.load(path))
    loaded = load_checkpoint("deepware", path)
    assert loaded.card.preprocess.input_size == 380 and loaded.card.preprocess.crop_margin == 1.65
    assert loaded.card.preprocess.mean == (0.0, 0.0, 0.0)  # the stretch and ImageNet normalisation are in the graph
    with torch.no_grad():
        got = loaded.module(torch.from_numpy(preprocess(crops, at_size(loaded.card, B7_FORWARD)))).numpy()
    want = deepware_reference(net)(crops)
    assert np.all((want > 1e-3) & (want < 1 - 1e-3)) and np.ptp(want) > 1e-3, f"degenerate reference {want}"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_deepware_variant_and_config_come_from_the_files(tmp_path: Path) -> None:
    """A B0 ensemble member (fc width 1280) with deepware's config.json one folder up, as in the repo layout."""
    crops = face_crops(3, 96, seed=4)
    net = informative(DeepFakeClassifier("b0"), seed=3, calibration=stretched_imagenet(crops))
    (tmp_path / "weights").mkdir()
    torch.save(net.state_dict(), tmp_path / "weights" / "model_b0.pt")
    (tmp_path / "config.json").write_text(json.dumps({"arch": "b0", "margin": 1.3, "size": 96}))
    onnx_path, card = import_checkpoint("deepware", tmp_path / "weights" / "model_b0.pt", output=tmp_path / "dw.onnx")
    assert (card.preprocess.input_size, card.preprocess.crop_margin) == (96, 1.3)
    assert "EfficientNet-B0" in card.architecture and "min–max" in card.architecture
    check_export(onnx_path, card, deepware_reference(net), crops, batches=(1, 2))


# ------------------------------------------------------------------------------------------- icpr2020dfdc


def test_icpr_autoatt_st_bestval_exports_with_the_same_p_fake(tmp_path: Path) -> None:
    crops = face_crops(3, 224, seed=5)
    net = informative(IcprSiamese(attention=True, padding="global"), seed=11, calibration=imagenet(crops))
    folder = tmp_path / "EfficientNetAutoAttB4ST_DFDC"
    folder.mkdir()
    # train_binclass.py save_model: dict(net=..., opt=..., train_loss=..., iteration=..., ...)
    torch.save({"net": net.state_dict(), "opt": {"state": {}, "param_groups": []}, "val_loss": 0.3, "iteration": 9},
               folder / "bestval.pth")  # fmt: skip
    onnx_path, card = import_checkpoint("icpr2020dfdc", folder / "bestval.pth", output=tmp_path / "icpr.onnx")
    assert card.name == "icpr"
    assert "EfficientNetAutoAttB4ST" in card.architecture and card.license.startswith("GPL-3.0")
    assert (card.preprocess.input_size, card.preprocess.std) == (224, (0.229, 0.224, 0.225))
    check_export(onnx_path, card, imagenet_sigmoid(net), crops, batches=(1,))


def test_icpr_plain_b4_bare_state_dict_is_recognised(tmp_path: Path) -> None:
    """Format and variant recognition only: the forward pass is the one the AutoAttB4ST export test checks."""
    net = IcprEfficientNet(attention=False, padding="global")
    path = tmp_path / "EfficientNetB4_DFDC_bestval-c9f3663e2116d3356d056a0ce6453e0fc412a8df68ebd0902f07104d9129a09a.pth"
    # the S3 files in architectures/weights.py: a bare state dict, saved by torch 1.4 in the pre-zip format
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint("icpr2020dfdc", path)
    assert "EfficientNetB4:" in loaded.card.architecture and "'global' mode" in loaded.card.architecture
    assert loaded.card.name == "icpr2020dfdc-efficientnetb4-dfdc-bestval"
    assert isinstance(loaded.module.net, IcprEfficientNet) and loaded.module.net.efficientnet.attention_after is None
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.module.net.state_dict()[key], value), key


# -------------------------------------------------------------------------------------------------- SBI


@pytest.fixture(scope="module")
def sbi(tmp_path_factory: pytest.TempPathFactory) -> tuple[SbiDetector, Path, dict]:
    net = informative(SbiDetector("per_layer"), seed=21, calibration=nchw(face_crops(2, 380, seed=7)))
    path = tmp_path_factory.mktemp("sbi") / "sbi.tar"
    checkpoint = {"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 99}
    torch.save(checkpoint, path)  # train_sbi.py
    return net, path, checkpoint


def test_sbi_exports_with_the_same_p_fake(sbi: tuple[SbiDetector, Path, dict], tmp_path: Path, monkeypatch) -> None:
    net, path, _ = sbi
    from streamguard.inference import models

    monkeypatch.setattr(models, "ENGINES_DIR", tmp_path / "engines")
    onnx_path, card = import_checkpoint("sbi", path)
    assert onnx_path == tmp_path / "engines" / "sbi.onnx" and onnx_path.with_suffix(".json").exists()
    assert (card.preprocess.input_size, card.preprocess.mean, card.preprocess.crop_margin) == (380, (0, 0, 0), 1.25)
    assert "research" in card.license and "softmax" in card.architecture
    check_export(onnx_path, card, sbi_reference(net), face_crops(2, 380, seed=7), batches=(1,))


# ----------------------------------------------------------------------------------------- broken files


def _save(tmp_path: Path, checkpoint: object, name: str = "broken.tar") -> Path:
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name


def test_missing_renamed_and_misshapen_keys_are_named(sbi: tuple[SbiDetector, Path, dict], tmp_path: Path) -> None:
    _, _, checkpoint = sbi
    state = checkpoint["model"]

    missing = {k: v for k, v in state.items() if k != "net._fc.bias"}
    with pytest.raises(ValueError, match=r"missing key 'net\._fc\.bias'"):
        load_checkpoint("sbi", _save(tmp_path, {"model": missing}))

    renamed = {("net._bn_head.weight" if k == "net._bn1.weight" else k): v for k, v in state.items()}
    both = r"missing key 'net\._bn1\.weight'.*unexpected key 'net\._bn_head\.weight'"
    with pytest.raises(CheckpointError, match=both):
        load_checkpoint("sbi", _save(tmp_path, {"model": renamed}))

    misshapen = dict(state, **{"net._fc.weight": torch.zeros(3, 1792)})
    with pytest.raises(CheckpointError, match=r"'net\._fc\.weight' has shape \(3, 1792\), expected \(2, 1792\)"):
        load_checkpoint("sbi", _save(tmp_path, {"model": misshapen}))

    with pytest.raises(CheckpointError, match="kind sbi"):  # right file, wrong kind: say what it looks like
        load_checkpoint("icpr2020dfdc", _save(tmp_path, {"model": state}))


def test_wrong_wrappers_and_non_checkpoints_fail_clearly(sbi: tuple[SbiDetector, Path, dict], tmp_path: Path) -> None:
    _, path, checkpoint = sbi
    with pytest.raises(CheckpointError, match="kind selimsef"):
        load_checkpoint("deepware", _save(tmp_path, {"state_dict": {"module.fc.weight": torch.zeros(1, 2560)}}))
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'xception'.*sbi"):
        load_checkpoint("xception", path)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_checkpoint("sbi", tmp_path / "nope.tar")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint("sbi", tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="'epoch'.*not a tensor"):
        load_checkpoint("sbi", _save(tmp_path, {"epoch": 3}))
    with pytest.raises(CheckpointError, match=r"must be a path ending in \.onnx"):
        import_checkpoint("sbi", path, output=tmp_path / "model.bin")

    pickled = _save(tmp_path, dict(checkpoint, args=argparse.Namespace(lr=0.001)))
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint("sbi", pickled)
    assert load_checkpoint("sbi", pickled, trust_pickle=True).card.name == "sbi-broken"


def test_default_names() -> None:
    assert default_model_name("sbi", Path("weights/sbi.tar")) == "sbi"
    assert default_model_name("icpr2020dfdc", Path("EfficientNetB4ST_FFPP/bestval.pth")) == (
        "icpr2020dfdc-efficientnetb4st-ffpp-bestval"
    )
    assert default_model_name("selimsef", Path("final_111_DeepFakeClassifier_tf_efficientnet_b7_ns_0_36")) == (
        "selimsef-final-111-deepfakeclassifier-tf-efficientnet-b7-ns-0-36"
    )
