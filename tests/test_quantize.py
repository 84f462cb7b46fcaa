"""CPU INT8 (`streamguard models quantize`): an INT8 model is written only when it holds the float model's scores on
held-out real faces, with the source's thresholds and the parity in its card; otherwise nothing is written. Real
parts: MesoNet's authors' Meso4 (imported from ../shared by conftest), the 64 real photos cut by the face pipeline,
ONNX Runtime's quantiser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from streamguard.cli import app
from streamguard.inference.calibration import load_crop_set, split_holdout
from streamguard.inference.card import ModelCard
from streamguard.inference.models import ENGINES_DIR, file_sha256, load_classifier, resolve_model
from streamguard.inference.quantize import conv_nodes, float_convs, quantize_model

MESO4 = ENGINES_DIR / "mesonet-meso4-df.onnx"
REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_faces"
needs_data = pytest.mark.skipif(not (MESO4.is_file() and REAL_PHOTOS.is_dir()),
                                reason=f"needs {MESO4.name} and {REAL_PHOTOS} (../shared/data)")
runner = CliRunner()


def plain(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


@needs_data
def test_float_convs_picks_the_first_and_last_convolutions():
    graph = onnx.load(str(MESO4))
    convs = conv_nodes(graph)
    assert len(convs) == 4  # Meso4: four convolution blocks
    assert float_convs(graph, 0, 0) == []
    assert float_convs(graph, 1, 1) == [convs[0], convs[-1]]
    assert float_convs(graph, 3, 3) == convs  # overlapping ends: each once
    with pytest.raises(ValueError, match=">= 0"):
        float_convs(graph, -1, 0)


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """A small real ONNX face model with its card: 3x3 conv, ReLU, global pooling, dense, sigmoid (fixed weights);
    smooth enough that INT8 holds its scores, which Meso4 and the default model do not (see the other tests)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
               for name, shape in (("w", (8, 3, 3, 3)), ("b", (8,)), ("fc", (8, 1)), ("fcb", (1,)))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["p_fake"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("p_fake", TensorProto.FLOAT, ["batch", 1])], weights)
    path = tmp_path / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ModelCard(name="small", architecture="conv-pool-dense", source="test", threshold=0.5, sha256=file_sha256(path),
              preprocess={"input_size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
              ).save(path.with_suffix(".json"))
    return path


@needs_data
def test_int8_model_written_with_the_source_card_and_its_parity(tmp_path, small_model):
    out = tmp_path / "int8" / "small-int8.onnx"
    result = quantize_model(str(small_model), REAL_PHOTOS, output=out, cache_dir=tmp_path / "crops")
    assert result.path == out and out.is_file() and result.parity.ok, result.summary()
    assert result.parity.n > 10 and result.calibration_crops >= 3 * result.parity.n - 3
    assert result.float_cpu_ms > 0 and result.int8_cpu_ms > 0 and result.kept_float == ()
    graph = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}

    _, source = resolve_model(str(small_model))
    card = ModelCard.load(out.with_suffix(".json"))
    assert card.name == "small-int8" and card.sha256 == file_sha256(out)
    assert card.threshold == source.threshold and card.preprocess == source.preprocess
    assert card.metrics["int8_parity"]["n"] == result.parity.n
    assert card.metrics["int8_parity"]["max_abs_diff"] == pytest.approx(result.parity.max_abs_diff, abs=1e-5)
    assert "INT8" in card.architecture and small_model.name in card.training

    crops, _ = load_crop_set(REAL_PHOTOS, source, tmp_path / "crops")
    _, holdout = split_holdout(crops)
    int8, reference = load_classifier(str(out)), load_classifier(str(small_model))
    delta = np.abs(int8.predict(holdout) - reference.predict(holdout))
    assert 0 < delta.max() == pytest.approx(result.parity.max_abs_diff, abs=1e-5)  # the card says what it does


@needs_data
def test_int8_model_that_moves_scores_is_not_written(tmp_path):
    out = tmp_path / "meso4-int8.onnx"
    # Meso4 in INT8 moves a held-out real face's score by ~0.17 and flips its decision at any tolerance.
    result = quantize_model(str(MESO4), REAL_PHOTOS, output=out, cache_dir=tmp_path / "crops")
    assert result.path is None and not result.parity.ok
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert "not written" in result.summary() and "FAILS" in result.summary()

    cli = runner.invoke(app, ["models", "quantize", str(MESO4), "--calibration", str(REAL_PHOTOS),
                              "--keep-float-first", "1", "--output", str(out)])
    assert cli.exit_code == 1, cli.output
    assert "not written" in cli.output and "1 convolutions kept in float" in cli.output and not out.exists()


@pytest.mark.parametrize(("args", "option", "says"), [
    ([], "--calibration", "a folder of real face photos is needed"),
    (["--calibration", "/nonexist-calib"], "--calibration", "a folder of real face photos is needed"),
    (["--calibration", ".", "--tolerance", "0"], "--tolerance", "must be > 0"),
    (["--calibration", ".", "--keep-float-first", "-1"], "--keep-float-first", "must be >= 0"),
    (["--calibration", ".", "--keep-float-last", "-2"], "--keep-float-last", "must be >= 0"),
])
def test_quantize_flags_are_checked_first(args, option, says):
    result = runner.invoke(app, ["models", "quantize", "streamguard-sbi", *args])
    assert result.exit_code == 2, result.output
    text = plain(result.output)
    assert f"Invalid value for {option}" in text and says in text, text


def test_quantize_unknown_model_is_a_usage_error():
    result = runner.invoke(app, ["models", "quantize", "nope", "--calibration", "."])
    assert result.exit_code == 2, result.output
    assert "Invalid value for MODEL" in plain(result.output) and "model 'nope' not found" in plain(result.output)
