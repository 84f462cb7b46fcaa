"""The shipped default model (engines/streamguard-sbi.onnx + card) works out of the box, without torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from streamguard.inference.models import (
    DEFAULT_MODEL,
    ENGINES_DIR,
    file_sha256,
    load_classifier,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_FACES = SHARED / "real_faces"
ONNX_PATH = ENGINES_DIR / f"{DEFAULT_MODEL}.onnx"

# Measured when the model was trained (card metrics "real_photos_all"): faces of the 64 real photos at or above the
# card threshold. The photos are partly training data, so this is a floor on the real-world false-positive rate, not
# an estimate of it; the margin absorbs ONNX Runtime version differences.
MEASURED_REAL_PHOTO_FPR = 1 / 68  # one face of 68 (img26.jpg, 0.89) at threshold 0.88
FPR_MARGIN = 0.05


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(None)


def test_default_model_is_the_shipped_sbi_model(classifier):
    card = classifier.card
    assert classifier.card.name == DEFAULT_MODEL == "streamguard-sbi"
    assert Path(classifier.path) == ONNX_PATH
    assert card.sha256 == file_sha256(ONNX_PATH), "the card's sha256 is not the ONNX file's: re-export both"
    assert ONNX_PATH.stat().st_size <= 30 * 1024 * 1024


def test_card_fields(classifier):
    card = classifier.card
    p = card.preprocess
    assert card.output == "p_fake"
    assert p.layout == "NCHW" and p.crop_margin == pytest.approx(1.65)
    assert 128 <= p.input_size <= 192 and classifier.input_size == p.input_size
    assert all(s > 0 for s in p.std) and len(p.mean) == 3
    assert 0.5 <= card.threshold < 1.0
    assert card.architecture.startswith("sgnet")
    assert "tools/train.py" in card.training and "Self-blended" in card.training
    for key in ("heldout_sbi", "real_photos_heldout", "real_photos_all", "mesonet_crops", "videos_1fps"):
        assert key in card.metrics, key
    assert 0.0 <= card.metrics["heldout_sbi"]["auc"] <= 1.0


def test_graph_has_dynamic_batch():
    graph = onnx.load(str(ONNX_PATH)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    assert graph.output[0].name == "p_fake"


@pytest.mark.parametrize("batch", [1, 16])
def test_accepts_batches(classifier, batch: int):
    size = classifier.input_size
    crops = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    p = classifier.predict(crops)
    assert p.shape == (batch,) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    # A face's score does not depend on what else is in its batch.
    np.testing.assert_allclose(classifier.predict(crops[:1]), p[:1], atol=1e-5)


@pytest.mark.shared
@pytest.mark.skipif(not REAL_FACES.is_dir(), reason=f"needs the shared test data at {SHARED}")
def test_real_photos_mostly_score_below_threshold(classifier):
    from streamguard.training.evaluation import image_files, score_photos

    scored = score_photos(classifier, image_files(REAL_FACES))
    assert len(scored.scores) >= 60
    fpr = scored.above(classifier.card.threshold) / len(scored.scores)
    worst = sorted(zip(scored.scores, scored.sources, strict=True))[-5:]
    assert fpr <= MEASURED_REAL_PHOTO_FPR + FPR_MARGIN, (fpr, worst)
    card_fpr = classifier.card.metrics["real_photos_all"]["rate_at_or_above_threshold"]
    assert fpr == pytest.approx(card_fpr, abs=0.02)
