"""Public PyTorch deepfake-detector checkpoints (downloaded by the user) → ONNX model + model card.

Kinds, each checked against its project's own loading and inference code (see engines/IMPORTING.md):

* ``deepware``  deepware/deepfake-scanner `weights/*.pt`: a flat state dict (``encoder.*`` = timm
  ``tf_efficientnet_b7_ns`` incl. its unused ImageNet ``classifier``, ``fc`` = Linear(2560, 1)), loaded by scan.py with
  ``load_state_dict(checkpoint)``. scan.py min–max stretches every face crop (``cv2.normalize(..., NORM_MINMAX)``)
  before ImageNet normalisation; the graph does both, so the card feeds it plain RGB/255.
* ``selimsef``  selimsef/dfdc_deepfake_challenge (DFDC winner) release files ``final_*_DeepFakeClassifier_
  tf_efficientnet_b7_ns_*``: ``{"state_dict": {"module.encoder.*", "module.fc.*"}, "epoch", "bce_best"}``, loaded by
  predict_folder.py with ``checkpoint.get("state_dict", checkpoint)`` minus the ``module.`` prefix. ImageNet mean/std.
* ``icpr2020dfdc``  polimi-ispl/icpr2020dfdc EfficientNetB4 / EfficientNetAutoAttB4 and their siamese-tuned ``ST``
  versions (lukemelas EfficientNet-B4): ``{"net": state_dict, "opt", ...}`` (bestval.pth) or a bare state dict (the
  S3 files), logit output, ImageNet mean/std, 224 px.
* ``sbi``  mapooon/SelfBlendedImages: ``{"model": Detector.state_dict(), "optimizer", "epoch"}`` with ``net.*`` =
  lukemelas EfficientNet-B4 with a 2-way ``_fc``; RGB/255 without mean/std, 380 px, P(fake) = softmax[:, 1].

Every graph outputs P(fake) (shape (N,), card ``output="p_fake"``): the sigmoid/softmax is baked in.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnx
import torch
from torch import nn

from streamguard.inference import models
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.importers.efficientnet import (
    VARIANTS,
    LukemelasEfficientNet,
    LukemelasPadding,
    TimmEfficientNet,
    Variant,
    head_channels,
)
from streamguard.inference.importers.output import resolve_output

Kind = Literal["deepware", "selimsef", "icpr2020dfdc", "sbi"]
KINDS: tuple[str, ...] = get_args(Kind)

OPSET = 17
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# icpr2020dfdc EfficientNetAutoAtt: the attention map is taken after block 9 (the last 56-channel block of B4).
ICPR_ATTENTION_BLOCK = 9
# deepware scanner's defaults (its config.json: size 380, margin 1.65); a config.json beside the
# weights (or one folder up, the repo layout) overrides them.
DEEPWARE_SIZE = 380
DEEPWARE_MARGIN = 1.65


class CheckpointError(ValueError):
    """The file is not a checkpoint of the requested kind; the message names the key or field at fault."""


@dataclass(frozen=True)
class _KindInfo:
    title: str
    repo: str
    download: str
    license: str
    training: str


_KIND_INFO: dict[str, _KindInfo] = {
    "deepware": _KindInfo(
        "Deepware scanner",
        "https://github.com/deepware/deepfake-scanner",
        "https://download.deepware.ai/weights.zip (README 'pre-trained model'; ensemble members weights/*.pt)",
        "MIT per the deepware/deepfake-scanner repository (not re-checked; read its LICENSE before redistributing)",
        "DFDC (Deepfake Detection Challenge) per deepware.md; timm tf_efficientnet_b7_ns encoder",
    ),
    "selimsef": _KindInfo(
        "DFDC winner (Selim Seferbekov)",
        "https://github.com/selimsef/dfdc_deepfake_challenge",
        "https://github.com/selimsef/dfdc_deepfake_challenge/releases/tag/0.0.1 (download_weights.sh: 7 B7 models)",
        "MIT",
        "DFDC train set, MTCNN crops with 1/3 of the box added on each side, isotropically resized to 380 and "
        "zero-padded; EfficientNet-B7 NoisyStudent init; private-LB log loss 0.428 (ensemble of 7)",
    ),
    "icpr2020dfdc": _KindInfo(
        "ICPR 2020 'Video Face Manipulation Detection Through Ensemble of CNNs' (Bonettini et al.)",
        "https://github.com/polimi-ispl/icpr2020dfdc",
        "README 'Pretrained weights' Dropbox folder ($NETWORK_$DATASET/bestval.pth) or the S3 files in "
        "architectures/weights.py (https://icpr2020.s3.amazonaws.com/...)",
        "GPL-3.0 (repository licence; the weights carry no separate terms)",
        "DFDC or FF++ (c23) per the file name; BlazeFace crops, 32 frames per video, 224 px 'scale' policy",
    ),
    "sbi": _KindInfo(
        "Self-Blended Images (Shiohara & Yamasaki, CVPR 2022)",
        "https://github.com/mapooon/SelfBlendedImages",
        "README 'Pretrained model': https://drive.google.com/file/d/12sLyqBp0VFwdpA-oZLdIOkOTkz_ZnIhV/view",
        "research only: SBI software licence agreement (academic / non-profit, non-commercial research use; "
        "commercial use needs a licence from the authors)",
        "FF++ real videos only, self-blended fakes; EfficientNet-B4 AdvProp init; Celeb-DF v2 video AUC 93.82 % "
        "(README)",
    ),
}


# ------------------------------------------------------------------------------------------- network wrappers


class DeepFakeClassifier(nn.Module):
    """selimsef `DeepFakeClassifier` / deepware `EffNet`: timm encoder, global average pool, Linear(features, 1)."""

    def __init__(self, variant: Variant = "b7"):
        super().__init__()
        self.encoder = TimmEfficientNet(variant)
        self.fc = nn.Linear(head_channels(variant), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder.forward_features(x).mean((2, 3)))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.encoder.bn2


class IcprEfficientNet(nn.Module):
    """icpr2020dfdc `EfficientNetGen` (`efficientnet` without `_fc`, `classifier` = Linear(1792, 1)); with
    `attention`, `EfficientNetGenAutoAtt` (adds `efficientnet.attconv`)."""

    def __init__(self, attention: bool, padding: LukemelasPadding):
        super().__init__()
        self.efficientnet = LukemelasEfficientNet(
            "b4", num_classes=None, padding=padding, attention_after=ICPR_ATTENTION_BLOCK if attention else None
        )
        self.classifier = nn.Linear(self.efficientnet.num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.efficientnet(x))


class IcprSiamese(nn.Module):
    """icpr2020dfdc `SiameseTuning` (the *ST nets): `feat_ext` features → BatchNorm1d → Linear(1792, 1)."""

    def __init__(self, attention: bool, padding: LukemelasPadding):
        super().__init__()
        self.feat_ext = IcprEfficientNet(attention, padding)
        num = self.feat_ext.efficientnet.num_features
        self.classifier = nn.Sequential(nn.BatchNorm1d(num), nn.Linear(num, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feat_ext.efficientnet(x))


class SbiDetector(nn.Module):
    """SelfBlendedImages `Detector`: `net` = EfficientNet-B4 with a 2-way `_fc` (class 1 = fake)."""

    def __init__(self, padding: LukemelasPadding):
        super().__init__()
        self.net = LukemelasEfficientNet("b4", num_classes=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ImportedDetector(nn.Module):
    """What the ONNX graph computes: the card-preprocessed NCHW batch → P(fake), shape (N,).

    `stretch` reproduces deepware's per-crop min–max stretch (on RGB/255) followed by `normalise` (mean, std); the
    other kinds get their normalisation from the card instead, so `normalise` is None for them.
    """

    mean: torch.Tensor  # buffers (register_buffer in __init__), typed for mypy
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        head: Literal["sigmoid", "softmax1"],
        stretch: bool = False,
        normalise: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
    ):
        super().__init__()
        self.net = net
        self.head = head
        self.stretch = stretch
        self.normalise = normalise is not None
        mean, std = normalise or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stretch:
            # cv2.normalize(NORM_MINMAX) over the whole crop (all channels); a flat crop becomes 0, as in OpenCV.
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
            x = (x - lo) * torch.where(span > 1e-6, 1.0 / span.clamp_min(1e-6), torch.zeros_like(span))
        if self.normalise:
            x = (x - self.mean) / self.std
        y = self.net(x)
        return torch.sigmoid(y[:, 0]) if self.head == "sigmoid" else torch.softmax(y, dim=1)[:, 1]

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last conv block's BN (before pooling): the usual Grad-CAM target for EfficientNets."""
        net = self.net
        if isinstance(net, DeepFakeClassifier):
            return net.gradcam_layer
        if isinstance(net, IcprSiamese):
            return net.feat_ext.efficientnet._bn1
        if isinstance(net, IcprEfficientNet):
            return net.efficientnet._bn1
        if isinstance(net, SbiDetector):
            return net.net._bn1
        raise AttributeError("no Grad-CAM layer known for this network")


# ------------------------------------------------------------------------------------------------ loading


def _load_file(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only refuses arbitrary pickles; numpy scalars appear in some training dicts (e.g. selimsef's bce_best).
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    dtype_classes = [t for t in vars(dtypes).values() if isinstance(t, type)] if dtypes else []
    allowed = [np.core.multiarray.scalar, np.dtype, *dtype_classes]  # type: ignore[attr-defined]  # not in the stubs
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # garbage bytes also fail inside the weights-only unpickler
            raise _not_a_checkpoint(path, e) from e
        if not trust_pickle:
            raise CheckpointError(
                f"{path.name} holds Python objects besides tensors, and unpickling them can run code. If you trust "
                "the file (you downloaded it from the project's own link), import it with trust_pickle=True "
                "(CLI: --trust-pickle)."
            ) from e
    except Exception as e:  # garbage input fails anywhere in the unpickler: KeyError, IndexError, struct.error, ...
        raise _not_a_checkpoint(path, e) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:  # a real pickle of classes from code that is not installed here
        raise CheckpointError(f"{path.name}: its pickled objects need code that is not installed here "
                              f"({type(e).__name__}: {e})") from e
    except Exception as e:
        raise _not_a_checkpoint(path, e) from e


def _not_a_checkpoint(path: Path, exc: BaseException) -> CheckpointError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    reason = f"{type(exc).__name__}: {first}" if first and isinstance(exc, LookupError) else first
    return CheckpointError(f"{path.name} is not a PyTorch checkpoint (it does not unpickle: "
                           f"{reason or type(exc).__name__})")


def _state_dict(obj: Any, path: Path, container_key: str | None) -> dict[str, torch.Tensor]:
    if container_key is not None and isinstance(obj, dict) and container_key in obj:
        obj = obj[container_key]
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()  # a whole pickled module (trust_pickle)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            expected = f"a state dict under {container_key!r} or at the top level" if container_key else "a state dict"
            nested = [k for k, v in obj.items() if isinstance(v, dict) and v and all(map(torch.is_tensor, v.values()))]
            hint = (
                f" Its weights sit under {nested[0]!r}: it looks like {_looks_like(obj[nested[0]])}."
                if nested
                else ""
            )
            raise CheckpointError(
                f"{path.name}: key {key!r} holds a {type(value).__name__}, not a tensor; expected {expected}.{hint}"
            )
    return {str(k): v for k, v in obj.items()}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a DataParallel-style prefix when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(expected: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None when `state` loads into `expected` with strict=True; otherwise what is wrong, naming the keys."""
    want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    # PyTorch fills num_batches_tracked itself for state dicts saved before it existed.
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != want[k]]

    def names(keys: list[str]) -> str:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return ", ".join(repr(k) for k in keys[:3]) + more

    problems = []
    if missing:
        problems.append(f"missing key{'s' * (len(missing) > 1)} {names(missing)}")
    if unexpected:
        problems.append(f"unexpected key{'s' * (len(unexpected) > 1)} {names(unexpected)}")
    for k in wrong[:3]:
        problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, expected {want[k]}")
    if len(wrong) > 3:
        problems.append(f"{len(wrong) - 3} more keys with the wrong shape")
    return "; ".join(problems) or None


def _looks_like(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith(("module.encoder.", "encoder.conv_stem")) for k in keys):
        return "a timm-encoder DeepFakeClassifier (kind selimsef or deepware)"
    if any(k.startswith(("efficientnet._", "feat_ext.efficientnet.")) for k in keys):
        return "an icpr2020dfdc network (kind icpr2020dfdc)"
    if any(k.startswith("net._conv_stem") for k in keys):
        return "a SelfBlendedImages Detector (kind sbi)"
    return f"a state dict whose first keys are {', '.join(repr(k) for k in keys[:3])}"


def _fail(path: Path, what: str, problem: str, state: dict[str, torch.Tensor]) -> CheckpointError:
    return CheckpointError(f"{path.name} does not fit {what}: {problem}. It looks like {_looks_like(state)}.")


def _timm_classifier(state: dict[str, torch.Tensor], path: Path, what: str) -> tuple[DeepFakeClassifier, Variant]:
    fc = state.get("fc.weight")
    guess: Variant = "b7"
    for variant in VARIANTS:
        if fc is not None and fc.ndim == 2 and fc.shape[1] == head_channels(variant):  # type: ignore[arg-type]
            guess = variant  # type: ignore[assignment]
            net = DeepFakeClassifier(guess)
            if _mismatch(net, state) is None:
                return net, guess
    problem = _mismatch(DeepFakeClassifier(guess), state)
    raise _fail(path, f"{what} with an EfficientNet-{guess.upper()} encoder", problem or "unknown", state)


def _deepware_config(path: Path) -> tuple[int, float, str]:
    """(input size, crop margin, where they came from): deepware's config.json if one sits beside the weights."""
    for candidate in (path.parent / "config.json", path.parent.parent / "config.json"):
        try:
            cfg = json.loads(candidate.read_text())
            return int(cfg["size"]), float(cfg["margin"]), f"{candidate} (arch {cfg.get('arch')})"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return DEEPWARE_SIZE, DEEPWARE_MARGIN, "defaults (no deepware config.json beside the weights)"


@dataclass
class LoadedCheckpoint:
    """The torch model the ONNX graph is exported from, and everything the card says about it (sha256 unset)."""

    module: ImportedDetector
    card: ModelCard
    input_size: int


@dataclass
class _Built:
    net: nn.Module  # the project's own network, weights to be loaded
    state: dict[str, torch.Tensor]
    module: ImportedDetector  # net + the preprocessing/head the graph bakes in
    preprocess: Preprocess
    architecture: str
    training: str


def _build_timm(kind: Kind, obj: Any, path: Path) -> _Built:
    info = _KIND_INFO[kind]
    if kind == "deepware":
        if isinstance(obj, dict) and "state_dict" in obj:
            raise CheckpointError(
                f"{path.name} is a training checkpoint with a 'state_dict' entry (the selimsef/dfdc_deepfake_challenge "
                "format); deepware's scan.py loads a bare state dict. Import it with kind selimsef."
            )
        state = _state_dict(obj, path, None)
    else:
        state = _strip(_state_dict(obj, path, "state_dict"), "module.")
    net, variant = _timm_classifier(state, path, f"{info.title} (encoder.*, fc.*)")
    base = (
        f"EfficientNet-{variant.upper()} (timm tf_efficientnet_{variant}_ns, TF-same padding) + avg pool + "
        f"Linear({head_channels(variant)}, 1)"
    )
    if kind == "selimsef":
        return _Built(
            net,
            state,
            ImportedDetector(net, "sigmoid"),
            Preprocess(input_size=380, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_margin=round(5 / 3, 3)),
            f"{base} (DeepFakeClassifier); sigmoid baked in",
            info.training,
        )
    size, margin, from_where = _deepware_config(path)
    return _Built(
        net,
        state,
        ImportedDetector(net, "sigmoid", stretch=True, normalise=(IMAGENET_MEAN, IMAGENET_STD)),
        Preprocess(input_size=size, crop_margin=margin),
        f"{base} (deepware scan.py EffNet); the graph min–max stretches each crop, applies ImageNet mean/std "
        "and a sigmoid",
        f"{info.training}; input size and margin from {from_where}",
    )


def _build_icpr(obj: Any, path: Path, padding: LukemelasPadding) -> _Built:
    state = _strip(_state_dict(obj, path, "net"), "module.")
    siamese = any(k.startswith("feat_ext.") for k in state)
    attention = any(k.endswith("efficientnet.attconv.weight") for k in state)
    net_name = f"EfficientNet{'AutoAtt' if attention else ''}B4{'ST' if siamese else ''}"
    net = IcprSiamese(attention, padding) if siamese else IcprEfficientNet(attention, padding)
    problem = _mismatch(net, state)
    if problem:
        raise _fail(path, f"icpr2020dfdc {net_name}", problem, state)
    return _Built(
        net,
        state,
        ImportedDetector(net, "sigmoid"),
        Preprocess(input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_margin=1.6),
        f"icpr2020dfdc {net_name}: EfficientNet-B4 (efficientnet_pytorch, static padding for 380 px, '{padding}' "
        f"mode) + avg pool + {'BatchNorm1d + ' if siamese else ''}Linear(1792, 1)"
        f"{'; attention gate after block 9' if attention else ''}; sigmoid baked in",
        _KIND_INFO["icpr2020dfdc"].training,
    )


def _build_sbi(obj: Any, path: Path, padding: LukemelasPadding) -> _Built:
    state = _state_dict(obj, path, "model")
    net = SbiDetector(padding)
    problem = _mismatch(net, state)
    if problem:
        raise _fail(path, "the SelfBlendedImages Detector (net = EfficientNet-B4, 2 classes)", problem, state)
    return _Built(
        net,
        state,
        ImportedDetector(net, "softmax1"),
        Preprocess(input_size=380, crop_margin=1.25),
        f"EfficientNet-B4 (efficientnet_pytorch from_pretrained advprop, '{padding}' static padding) with a 2-way "
        "_fc; softmax[:, 1] baked in",
        _KIND_INFO["sbi"].training,
    )


def load_checkpoint(
    kind: Kind,
    file: Path,
    *,
    name: str = "",
    trust_pickle: bool = False,
    lukemelas_padding: LukemelasPadding | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint of `kind` into its torch network (eval mode), strictly: every key and shape must match.

    `lukemelas_padding` overrides the efficientnet_pytorch padding behaviour for icpr2020dfdc (default "global",
    the ≤ 0.6.3 library their 2020 training used) and sbi (default "per_layer", 0.7.1, current for its 2021–22
    training). Raises FileNotFoundError, CheckpointError (a ValueError) naming the key at fault.
    """
    path = Path(file)
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    if lukemelas_padding is not None and lukemelas_padding not in get_args(LukemelasPadding):
        known = ", ".join(get_args(LukemelasPadding))
        raise CheckpointError(f"padding must be one of {known}, got {lukemelas_padding!r}")
    obj = _load_file(path, trust_pickle)
    if kind == "icpr2020dfdc":
        built = _build_icpr(obj, path, lukemelas_padding or "global")
    elif kind == "sbi":
        built = _build_sbi(obj, path, lukemelas_padding or "per_layer")
    else:
        built = _build_timm(kind, obj, path)
    built.net.load_state_dict(built.state, strict=False)  # strictness checked above; num_batches_tracked may be absent
    built.module.eval()
    info = _KIND_INFO[kind]
    card = ModelCard(
        name=name or default_model_name(kind, path),
        architecture=built.architecture,
        preprocess=built.preprocess,
        output="p_fake",
        threshold=0.5,
        source=f"{info.repo} — {info.download}; file {path.name}",
        license=info.license,
        training=built.training,
    )
    return LoadedCheckpoint(built.module, card, built.preprocess.input_size)


# ------------------------------------------------------------------------------------------------- export


def default_model_name(kind: str, path: Path) -> str:
    """sbi.tar → sbi; EfficientNetB4_DFDC/bestval.pth → icpr2020dfdc-efficientnetb4-dfdc-bestval."""
    stem = path.stem if path.stem.lower() != "bestval" else f"{path.parent.name}_{path.stem}"
    stem = re.sub(r"[-_][0-9a-f]{16,}$", "", stem, flags=re.IGNORECASE)  # content hashes in S3 file names
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return slug if slug.startswith(kind) else f"{kind}-{slug}".rstrip("-")


def _export_onnx(module: nn.Module, input_size: int, onnx_path: Path, doc: str) -> None:
    dummy = torch.zeros(1, 3, input_size, input_size)  # tracing costs one forward; the batch axis stays symbolic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on int(shape): the spatial size is fixed on purpose
        torch.onnx.export(
            module,
            (dummy,),
            str(onnx_path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["p_fake"],
            dynamic_axes={"input": {0: "batch"}, "p_fake": {0: "batch"}},
            do_constant_folding=True,
        )
    model = onnx.load(str(onnx_path))
    model.doc_string = doc
    model.producer_name = "streamguard"
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def import_checkpoint(
    kind: Kind,
    file: Path,
    output: Path | None = None,
    name: str | None = None,
    *,
    trust_pickle: bool = False,
    lukemelas_padding: LukemelasPadding | None = None,
) -> tuple[Path, ModelCard]:
    """Convert a checkpoint to `<engines>/<name>.onnx` (or `output`) with its `.json` card beside it.

    The graph takes the card-preprocessed (N, 3, S, S) float batch and returns P(fake) (N,); the batch is dynamic.
    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for everything else: unknown
    kind, not a checkpoint, pickled objects without `trust_pickle`, a missing/unexpected key or a wrong shape (named),
    a bad output path. Needs torch (the `train` extra); the messages are meant to be printed as-is.
    """
    file = Path(file)
    onnx_path, name = resolve_output(output, name, lambda: default_model_name(kind, file), CheckpointError)

    loaded = load_checkpoint(kind, file, name=name, trust_pickle=trust_pickle, lukemelas_padding=lukemelas_padding)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    doc = f"{loaded.card.architecture}. Source: {loaded.card.source}. Licence: {loaded.card.license}. Output: P(fake)."
    with torch.no_grad():
        _export_onnx(loaded.module, loaded.input_size, onnx_path, doc)
    card = loaded.card.model_copy(update={"sha256": models.file_sha256(onnx_path)})
    card.save(onnx_path.with_suffix(".json"))
    return onnx_path, card


__all__ = [
    "KINDS",
    "CheckpointError",
    "ImportedDetector",
    "LoadedCheckpoint",
    "default_model_name",
    "import_checkpoint",
    "load_checkpoint",
]
