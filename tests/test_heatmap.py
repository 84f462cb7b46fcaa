"""Heatmaps on a real ONNX classifier whose P(fake) depends only on a known region of the crop."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.heatmap import (
    ModelMap,
    OcclusionMap,
    heatmapper_for,
    occlusion_cost,
    occlusion_map,
    occlusion_positions,
    render_overlay,
    save_overlay,
)
from streamguard.inference.onnx import OnnxClassifier

SIZE = 64
HALF = SIZE // 2


def _card() -> ModelCard:
    return ModelCard(
        name="texture-top-left",
        architecture="test: sigmoid(k · (mean((x − 0.5)²) over the top-left quadrant − c))",
        preprocess=Preprocess(input_size=SIZE, crop_margin=1.5),
        source="built in tests/test_heatmap.py",
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> OnnxClassifier:
    """P(fake) rises with the texture energy (variance around mid-grey) of the top-left quadrant only: the
    stand-in for a detector that keys on blending artefacts in one place."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    nodes = [
        helper.make_node("Sub", ["input", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["energy"]),
        helper.make_node("Slice", ["energy", "starts", "ends", "axes"], ["quadrant"]),
        helper.make_node("ReduceMean", ["quadrant"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["mean", "offset"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_fake"]),
    ]
    graph = helper.make_graph(
        nodes,
        "texture_top_left",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("p_fake", TensorProto.FLOAT, ["batch"])],
        initializer=[
            const("half", np.float32(0.5)),
            const("starts", np.array([0, 0], np.int64)),
            const("ends", np.array([HALF, HALF], np.int64)),
            const("axes", np.array([2, 3], np.int64)),
            const("offset", np.float32(0.1)),  # energy of a flat grey quadrant is 0, of ±0.5 noise 0.25
            const("gain", np.float32(20.0)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("heatmap") / "texture.onnx"
    onnx.save(model, str(path))
    return OnnxClassifier(path, _card(), threads=1)


def _crop() -> np.ndarray:
    """Flat grey face with a salt-and-pepper top-left quadrant: the only thing the model reacts to."""
    crop = np.full((SIZE, SIZE, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    crop[:HALF, :HALF] = rng.choice(np.array([0, 255], np.uint8), size=(HALF, HALF, 1))
    return crop


class CountingClassifier:
    def __init__(self, inner: OnnxClassifier):
        self.inner, self.card, self.backend, self.calls = inner, inner.card, inner.backend, 0

    @property
    def input_size(self) -> int:
        return self.inner.input_size

    def predict(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.inner.predict(crops)


@pytest.mark.parametrize("fill", ["grey", "blur"])
def test_occlusion_map_is_hottest_where_the_model_looks(classifier: OnnxClassifier, fill: str) -> None:
    crop = _crop()
    assert classifier.predict(crop[None])[0] > 0.9
    counting = CountingClassifier(classifier)
    heat = occlusion_map(counting, crop, patch=16, stride=8, batch=10, fill=fill)  # type: ignore[arg-type]

    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert peak[0] < HALF and peak[1] < HALF
    inside = heat[: HALF - 8, : HALF - 8].mean()  # away from patches that straddle the quadrant's edge
    outside = heat[HALF + 8 :, :].mean()
    assert inside > 0.02 and outside < 1e-6 and inside > 100 * max(outside, 1e-9)
    # documented cost: 7 positions per side → 1 + 49 crops in batches of 10 → 5 calls
    assert occlusion_positions(SIZE, 16, 8) == [0, 8, 16, 24, 32, 40, 48]
    assert counting.calls == occlusion_cost(SIZE, 16, 8, 10) == 5


def test_occlusion_map_covers_edges_and_resizes_to_the_crop(classifier: OnnxClassifier) -> None:
    assert occlusion_positions(64, 24, 16) == [0, 16, 32, 40]  # the last patch sits flush with the edge
    big = cv2.resize(_crop(), (96, 96), interpolation=cv2.INTER_NEAREST)
    heat = occlusion_map(classifier, big, patch=16, stride=8, fill="grey")
    assert heat.shape == (96, 96)
    assert heat[:40, :40].mean() > 10 * heat[60:, 60:].mean() + 1e-6


def test_occlusion_map_rejects_bad_arguments(classifier: OnnxClassifier) -> None:
    with pytest.raises(ValueError, match="patch"):
        occlusion_map(classifier, _crop(), patch=SIZE + 1)
    with pytest.raises(ValueError, match="uint8"):
        occlusion_map(classifier, _crop().astype(np.float32))
    with pytest.raises(ValueError, match="fill"):
        occlusion_map(classifier, _crop(), fill="pink")  # type: ignore[arg-type]


def test_overlay_png_decodes_at_the_crop_size(classifier: OnnxClassifier, tmp_path: Path) -> None:
    crop = cv2.resize(_crop(), (120, 90))  # not square: the overlay follows the crop, whatever its shape
    heat = np.zeros((90, 120), np.float32)
    heat[:45, :60] = 0.3
    png = render_overlay(crop, heat, score=0.93)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (90, 120, 3)
    # the hot quadrant is tinted warmer (more red in BGR) than the cold one
    assert image[10:40, 5:50, 2].mean() > image[60:85, 60:100, 2].mean()

    written = save_overlay(tmp_path / "nested" / "face.png", crop, heat, 0.93)
    assert written.exists()
    assert cv2.imread(str(written)).shape == (90, 120, 3)
    assert render_overlay(crop, np.zeros((10, 10), np.float32), colormap="inferno")  # flat map, resized: no error


CELL = 16  # the artefact-map model's stride


@pytest.fixture(scope="module")
def map_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A graph shaped like this project's detectors: `fake_map` (N, 1, S/16, S/16) = the texture energy (squared
    distance from mid-grey) averaged over each 16-pixel cell, and P(fake) its largest cell."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    nodes = [
        helper.make_node("Sub", ["input", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["energy"]),
        helper.make_node("ReduceMean", ["energy"], ["grey"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["grey"], ["fake_map"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
        helper.make_node("ReduceMax", ["fake_map"], ["p_fake"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "cell_energy",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("p_fake", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("fake_map", TensorProto.FLOAT, ["batch", 1, SIZE // CELL, SIZE // CELL])],
        initializer=[const("half", np.float32(0.5))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("model-map") / "cells.onnx"
    onnx.save(model, str(path))
    return path


def _speck(top: int, left: int, side: int = 6) -> np.ndarray:
    """Flat grey with one small salt-and-pepper square: its only artefact, smaller than a map cell."""
    crop = np.full((SIZE, SIZE, 3), 128, np.uint8)
    rng = np.random.default_rng(1)
    crop[top : top + side, left : left + side] = rng.choice(np.array([0, 255], np.uint8), size=(side, side, 1))
    return crop


# Specks kept half a cell and more from the edges, where the mirrored border echoes them.
@pytest.mark.parametrize(("top", "left"), [(17, 41), (29, 13), (41, 45)])
def test_model_map_is_finer_than_the_graphs_cells_and_lines_up_with_the_crop(map_model: Path, top: int,
                                                                                left: int) -> None:
    mapper = ModelMap(map_model, _card(), steps=4)
    assert mapper.cells == SIZE // CELL
    heat = mapper(_speck(top, left))
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    # The hottest spot sits on the speck: its middle within a sub-cell (16 / 4 = 4 pixels) of the speck's centre,
    # where the graph's own map could only say which of its 16-pixel cells the speck is in.
    hot = np.argwhere(heat >= 0.95 * heat.max()).mean(axis=0)
    centre = (top + 3, left + 3)
    assert abs(hot[0] - centre[0] + 0.5) <= 4 and abs(hot[1] - centre[1] + 0.5) <= 4, (hot, centre)
    assert heat[centre].max() > 5 * heat[(centre[0] + 32) % SIZE, (centre[1] + 32) % SIZE] + 1e-6
    assert mapper(np.full((SIZE, SIZE, 3), 128, np.uint8)).max() < 1e-5  # nothing to see: a flat map (128 is 0.502)


def test_model_map_with_one_step_is_the_graphs_own_map(map_model: Path) -> None:
    crop = _speck(20, 20)
    mapper = ModelMap(map_model, _card(), steps=1)
    raw = mapper.maps(crop[None])[0]
    assert raw.shape == (SIZE // CELL, SIZE // CELL)
    expected = cv2.resize(raw, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)  # each cell at its centre
    np.testing.assert_allclose(mapper(crop), np.clip(expected, 0, 1), atol=1e-6)
    big = mapper(cv2.resize(crop, (96, 80)))  # any crop size in, the crop's size out
    assert big.shape == (80, 96)


def test_heatmapper_uses_the_models_map_where_the_graph_has_one(map_model: Path, classifier: OnnxClassifier) -> None:
    with_map = OnnxClassifier(map_model, _card(), threads=1)
    assert isinstance(heatmapper_for(with_map, map_model), ModelMap)
    assert heatmapper_for(with_map, map_model).method == "model"
    assert isinstance(heatmapper_for(with_map, map_model, "occlusion"), OcclusionMap)  # asked for
    assert isinstance(heatmapper_for(with_map, None), OcclusionMap)  # no ONNX file to read a map from
    assert isinstance(heatmapper_for(classifier, classifier.path), OcclusionMap)  # a graph without `fake_map`
    occlusion = heatmapper_for(classifier, classifier.path)
    np.testing.assert_allclose(occlusion(_crop()), occlusion_map(classifier, _crop()))
    with pytest.raises(ValueError, match="steps"):
        ModelMap(map_model, _card(), steps=0)


def test_gradcam_map_points_at_the_region_that_drives_the_score() -> None:
    torch = pytest.importorskip("torch")

    class TopLeftEnergy(torch.nn.Module):
        """Texture energy → 1×1 conv (the Grad-CAM layer) → mean over the top-left quadrant only."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            torch.nn.init.constant_(self.conv.weight, 0.25)
            torch.nn.init.zeros_(self.conv.bias)
            self.gradcam_layer = self.conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv((x - 0.5) ** 2)
            return torch.sigmoid(a[:, :, :HALF, :HALF].mean(dim=(1, 2, 3)) * 20 - 2)

    from streamguard.inference.heatmap import gradcam_map

    heat = gradcam_map(TopLeftEnergy(), _crop(), _card())
    assert heat.shape == (SIZE, SIZE) and heat.max() == pytest.approx(1.0)
    assert heat[:HALF, :HALF].mean() > 0.5 and heat[HALF:, HALF:].max() < 1e-3  # grey 128 is 0.502, not 0.5


def test_the_service_draws_alerts_with_the_models_map_unless_told_otherwise(
        tmp_path: Path, map_model: Path, classifier: OnnxClassifier) -> None:
    from streamguard.config import ServiceConfig
    from streamguard.inference.models import load_classifier
    from streamguard.service import Service

    def service(loaded: OnnxClassifier, **settings: object) -> Service:
        s = Service(ServiceConfig(data_dir=tmp_path, **settings))  # type: ignore[arg-type]
        s.classifier = loaded  # what start() loads
        return s

    shipped = load_classifier(None)
    assert isinstance(service(shipped).alert_heatmapper(), ModelMap)  # the default model, the default setting
    assert isinstance(service(shipped, events={"heatmap": "occlusion"}).alert_heatmapper(), OcclusionMap)
    # A classifier other than the configured model's file (injected, another card): its map cannot be read from
    # that file, so occlusion through the classifier itself.
    assert isinstance(service(classifier).alert_heatmapper(), OcclusionMap)
    _card().save(map_model.with_suffix(".json"))
    own = OnnxClassifier(map_model, _card(), threads=1)
    assert isinstance(service(own, model=str(map_model)).alert_heatmapper(), ModelMap)
    # The file going bad after the classifier loaded it (replaced mid-deploy): occlusion maps, not a failed start.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(map_model.read_bytes())
    _card().save(broken.with_suffix(".json"))
    loaded = OnnxClassifier(broken, _card(), threads=1)
    broken.write_bytes(map_model.read_bytes()[:100])
    assert isinstance(service(loaded, model=str(broken)).alert_heatmapper(), OcclusionMap)
