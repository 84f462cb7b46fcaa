"""Finding a model: a name in `engines/` or a path to an ONNX file with its card beside it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from streamguard.inference.card import ModelCard
from streamguard.inference.classifier import Classifier

ENGINES_DIR = Path(os.environ.get("STREAMGUARD_ENGINES", Path(__file__).resolve().parents[2] / "engines"))
DEFAULT_MODEL = "streamguard-sbi"


class ModelNotFound(FileNotFoundError):
    pass


def available_models(engines_dir: Path = ENGINES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(engines_dir).glob("*.onnx") if p.with_suffix(".json").exists())


def resolve_model(name_or_path: str | None, engines_dir: Path = ENGINES_DIR) -> tuple[Path, ModelCard]:
    """Return (onnx path, card). A path may name the .onnx or its .json card; a bare name looks in `engines/`."""
    name = name_or_path or DEFAULT_MODEL
    candidate = Path(name)
    if candidate.suffix in (".onnx", ".json") or candidate.exists():
        onnx_path = candidate.with_suffix(".onnx")
    else:
        onnx_path = Path(engines_dir) / f"{name}.onnx"
    card_path = onnx_path.with_suffix(".json")
    if onnx_path.exists() and not card_path.exists():
        raise ModelNotFound(
            f"model {name!r}: {onnx_path} has no model card: expected {card_path} beside it (the JSON that says how "
            "to feed the model and what its output means; `streamguard models import` writes both)"
        )
    if card_path.exists() and not onnx_path.exists():
        raise ModelNotFound(f"model {name!r}: the card {card_path} has no ONNX model beside it (expected {onnx_path})")
    if not onnx_path.exists() or not card_path.exists():
        known = ", ".join(available_models(engines_dir)) or "none"
        raise ModelNotFound(
            f"model {name!r} not found (looked for {onnx_path} and its card {card_path.name}); "
            f"models in {engines_dir}: {known}. Import one with "
            "`streamguard models import mesonet ../shared/data/mesonet/weights/Meso4_DF.h5 --arch meso4`"
        )
    return onnx_path, ModelCard.load(card_path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_classifier(name_or_path: str | None, engines_dir: Path = ENGINES_DIR) -> Classifier:
    from streamguard.inference.onnx import OnnxClassifier

    onnx_path, card = resolve_model(name_or_path, engines_dir)
    return OnnxClassifier(onnx_path, card)
