"""MesoNet importer: the ONNX graph against an independent numpy forward pass, class order, batching, errors.

What the four labelled crops show (P(fake), crops resized to 256 with INTER_AREA; df00204, df01254 | real00240,
real00772):
  Meso4_DF           0.949 0.976 | 0.010 0.003   both fakes flagged, both reals passed
  MesoInception_DF   0.978 0.999 | 0.000 0.000   both fakes flagged, both reals passed
  Meso4_F2F          0.175 0.298 | 0.119 0.051   ranks fakes above reals but calls all four real at 0.5
  MesoInception_F2F  0.001 0.000 | 0.000 0.001   calls all four real; no ranking (scores are ~0)
The crops are Deepfakes-method fakes, so the Face2Face-trained models not catching them is expected, not a bug.
Before the card's p_real → P(fake) flip every model scores the deepfakes *lower*: the authors' sigmoid is P(real).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from streamguard.inference import models
from streamguard.inference.importers import import_mesonet
from streamguard.inference.importers.mesonet import default_model_name
from streamguard.inference.onnx import OnnxClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mesonet_reference  # noqa: E402  (a helper module beside the tests, not a package)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MESONET = SHARED_DATA / "mesonet"

# weight file → (arch, expected default name, both deepfakes flagged at 0.5, deepfakes ranked above reals)
MODELS = {
    "Meso4_DF.h5": ("meso4", "mesonet-meso4-df", True, True),
    "Meso4_F2F.h5": ("meso4", "mesonet-meso4-f2f", False, True),
    "MesoInception_DF.h5": ("mesoinception", "mesonet-inception-df", True, True),
    "MesoInception_F2F.h5": ("mesoinception", "mesonet-inception-f2f", False, False),
}

needs_data = pytest.mark.skipif(not MESONET.is_dir(), reason=f"needs the MesoNet weights and crops at {MESONET}")


def _weights(file: str) -> Path:
    return MESONET / "weights" / file


def _labelled_crops() -> tuple[np.ndarray, np.ndarray]:
    """(4, 256, 256, 3) uint8 RGB, and is_fake (4,) bool, from LABELS.csv. The crops are 208–342 px squares."""
    rows = [line.split(",") for line in (MESONET / "LABELS.csv").read_text().split()[1:]]
    crops, fake = [], []
    for rel, label in rows:
        bgr = cv2.imread(str(MESONET / rel))
        assert bgr is not None, rel
        crops.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (256, 256), interpolation=cv2.INTER_AREA))
        fake.append(label == "fake")
    return np.stack(crops), np.array(fake)


def _smooth_noise(n: int = 3) -> np.ndarray:
    # Blurred noise puts every model's sigmoid mid-range, where a wrong layer would show (real faces saturate).
    noise = np.random.default_rng(0).integers(0, 256, (n, 256, 256, 3), dtype=np.uint8)
    return np.stack([cv2.GaussianBlur(x, (0, 0), 3) for x in noise])


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxClassifier]:
    if not MESONET.is_dir():
        pytest.skip(f"needs the MesoNet weights and crops at {MESONET}")
    out = tmp_path_factory.mktemp("engines")
    classifiers = {}
    for file, (arch, name, *_) in MODELS.items():
        path, card = import_mesonet(_weights(file), arch, output=out / f"{name}.onnx")
        classifiers[file] = OnnxClassifier(path, card)
    return classifiers


@needs_data
@pytest.mark.shared
@pytest.mark.parametrize("file", MODELS)
def test_onnx_matches_numpy_reference(imported: dict[str, OnnxClassifier], file: str) -> None:
    crops, _ = _labelled_crops()
    x = np.concatenate([crops, _smooth_noise()])
    p_fake = imported[file].predict(x)
    p_real_ref = mesonet_reference.forward(_weights(file), MODELS[file][0], x.astype(np.float64) / 255.0)
    assert np.abs(p_fake - (1.0 - p_real_ref)).max() < 1e-4
    # the noise inputs must really be unsaturated, or the comparison above proves little
    assert np.all((p_real_ref[len(crops):] > 0.01) & (p_real_ref[len(crops):] < 0.99))


@needs_data
@pytest.mark.shared
@pytest.mark.parametrize("file", MODELS)
def test_labelled_crops(imported: dict[str, OnnxClassifier], file: str) -> None:
    _, _, flags_fakes, ranks = MODELS[file]
    crops, is_fake = _labelled_crops()
    p = imported[file].predict(crops)
    assert np.all(p[~is_fake] < 0.5), "every model passes both real crops"
    if flags_fakes:
        assert np.all(p[is_fake] >= 0.5)
    else:
        assert np.all(p[is_fake] < 0.5), "the F2F models miss these Deepfakes-method crops"
    if ranks:
        assert p[is_fake].min() > p[~is_fake].max()


@needs_data
@pytest.mark.shared
def test_authors_output_is_p_real(imported: dict[str, OnnxClassifier]) -> None:
    clf = imported["Meso4_DF.h5"]
    crops, is_fake = _labelled_crops()
    session = ort.InferenceSession(str(clf.path), providers=["CPUExecutionProvider"])
    (raw,) = session.run(None, {"input": (crops / 255.0).astype(np.float32).transpose(0, 3, 1, 2)})
    assert session.get_outputs()[0].name == "p_real" and clf.card.output == "p_real"
    assert raw[is_fake].max() < 0.1 and raw[~is_fake].min() > 0.9  # near 1 means real, as df/ < real/ sorts


@needs_data
@pytest.mark.shared
@pytest.mark.parametrize("file", MODELS)
def test_batch_axis_is_dynamic(imported: dict[str, OnnxClassifier], file: str) -> None:
    clf = imported[file]
    dims = onnx.load(str(clf.path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    crops, _ = _labelled_crops()
    batched = clf.predict(crops)
    singles = np.concatenate([clf.predict(c[None]) for c in crops])
    np.testing.assert_allclose(batched, singles, atol=1e-6)


@needs_data
@pytest.mark.shared
def test_card_and_default_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "ENGINES_DIR", tmp_path)
    path, card = import_mesonet(_weights("MesoInception_F2F.h5"), "mesoinception")
    assert path == tmp_path / "mesonet-inception-f2f.onnx" and path.with_suffix(".json").is_file()
    assert models.resolve_model("mesonet-inception-f2f", tmp_path)[1] == card
    assert card.sha256 == models.file_sha256(path)
    assert card.output == "p_real" and card.threshold == 0.5 and card.license == "Apache-2.0"
    assert card.preprocess.input_size == 256 and card.preprocess.layout == "NCHW"
    assert card.preprocess.mean == (0.0, 0.0, 0.0) and card.preprocess.std == (1.0, 1.0, 1.0)
    assert "DariusAf/MesoNet" in card.source and "MesoInception_F2F.h5" in card.source
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17


def test_default_names() -> None:
    for file, (arch, name, *_) in MODELS.items():
        assert default_model_name(Path(file), arch) == name
    assert default_model_name(Path("my weights.h5"), "meso4") == "mesonet-meso4-my-weights"


@needs_data
@pytest.mark.shared
def test_wrong_arch_names_the_layer(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        import_mesonet(_weights("MesoInception_DF.h5"), "meso4", output=tmp_path / "m.onnx")
    msg = str(err.value)
    assert "MesoInception_DF.h5 does not match --arch meso4" in msg
    assert "'conv2d_2'" in msg and "(1, 1, 3, 4)" in msg and "(3, 3, 3, 8)" in msg
    assert "It does fit --arch mesoinception" in msg

    with pytest.raises(ValueError, match=r"Meso4_F2F.h5 does not match --arch mesoinception: .*'conv2d_5'.*"
                                         r"It does fit --arch meso4"):
        import_mesonet(_weights("Meso4_F2F.h5"), "mesoinception", output=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="MesoNet weights file not found: .*nope.h5"):
        import_mesonet(tmp_path / "nope.h5", "meso4", output=tmp_path / "m.onnx")


def test_not_hdf5(tmp_path: Path) -> None:
    bogus = tmp_path / "weights.h5"
    bogus.write_text("not weights\n")
    with pytest.raises(ValueError, match="is not an HDF5 file"):
        import_mesonet(bogus, "meso4", output=tmp_path / "m.onnx")


def test_hdf5_but_not_keras(tmp_path: Path) -> None:
    other = tmp_path / "data.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not Keras weights"):
        import_mesonet(other, "meso4", output=tmp_path / "m.onnx")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown MesoNet architecture 'meso5'"):
        import_mesonet(tmp_path / "x.h5", "meso5", output=tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a path ending in .onnx"):
        import_mesonet(tmp_path / "x.h5", "meso4", output=tmp_path / "m.json")
