"""Heatmaps: where in a face crop the detector sees the artefacts that make it call the face fake.

* `ModelMap` reads the model's own artefact map, where its graph has one (a `fake_map` output: this project's
  detectors score a face as the top-k mean of that map's cells, so the map *is* where the score comes from). The
  map is coarse (one cell per 32 input pixels), so `ModelMap` runs a few shifted copies of the crop and averages
  their maps (shift-and-average): 16 copies give one step per 8 pixels, ~10× less work than an occlusion map.
* `occlusion_map` works with any model and any backend (ONNX Runtime, TensorRT, ...): it hides one square patch at a
  time and records how much P(fake) drops; every occluded copy goes through `classifier.predict` in batches. It is
  flat for a face scored near 1 when the score pools many regions (hiding one patch changes nothing).
* `gradcam_map` (Grad-CAM) needs the torch module (e.g. `load_checkpoint(...).module`): one forward and one backward
  instead of hundreds of forwards, but coarse (the last conv layer is 1/32 of the input).
* `render_overlay` / `save_overlay` blend a map over the crop as a PNG for reports and the console.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import cv2
import numpy as np

from streamguard.faces.crop import resize_square
from streamguard.inference.classifier import Classifier, preprocess

if TYPE_CHECKING:
    import torch

    from streamguard.inference.card import ModelCard

Fill = Literal["blur", "grey"]
HeatmapMethod = Literal["model", "occlusion"]
MAP_OUTPUT = "fake_map"  # the ONNX output name of a model's artefact map, (N, 1, h, w) of local P(blended)
Colormap = Literal["jet", "inferno"]
_COLORMAPS = {"jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO}


def occlusion_positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch offsets along one side: every `stride`, plus one flush with the far edge so the whole side is covered."""
    if not 0 < patch <= size or stride <= 0:
        raise ValueError(f"need 0 < patch <= {size} and stride > 0, got patch {patch}, stride {stride}")
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


def occlusion_cost(size: int, patch: int, stride: int, batch: int) -> int:
    """`classifier.predict` calls `occlusion_map` makes: ceil((1 + n²) / batch), n = len(occlusion_positions)."""
    n = len(occlusion_positions(size, patch, stride))
    return math.ceil((1 + n * n) / batch)


def _fit(crop: np.ndarray, size: int) -> np.ndarray:
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"crop must be (H, W, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
    return resize_square(crop, size)


def occlusion_map(
    classifier: Classifier,
    crop: np.ndarray,
    patch: int | None = None,
    stride: int | None = None,
    batch: int = 32,
    fill: Fill = "blur",
) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the mean drop in P(fake) over the patches that hid each pixel (rises clipped to 0).

    The crop (any size, uint8 RGB) is resized to the model's input size S; `patch` defaults to S // 8 and `stride`
    to patch // 2. `fill="blur"` replaces the patch by a heavily blurred copy of itself: it removes the fine texture
    and blending seams detectors key on without pasting a flat square, which is itself out of distribution and can
    raise P(fake); `fill="grey"` pastes mid-grey (128). Cost: `occlusion_cost(S, patch, stride, batch)` predict calls,
    i.e. 1 + n² crops with n ≈ (S − patch) / stride + 1 (S = 380, defaults: n = 15, 226 crops, 8 calls of 32).
    The values are not rescaled: a map of a face the model already calls real stays near 0.
    """
    size = classifier.input_size
    x = _fit(crop, size)
    patch = patch or max(1, size // 8)
    stride = stride or max(1, patch // 2)
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    positions = occlusion_positions(size, patch, stride)
    if fill == "blur":
        sigma = max(1.0, patch / 3)
        hidden = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    elif fill == "grey":
        hidden = np.full_like(x, 128)
    else:
        raise ValueError(f"fill must be 'blur' or 'grey', got {fill!r}")

    boxes = [(top, left) for top in positions for left in positions]
    scores: list[np.ndarray] = []
    pending = [x]  # the unoccluded crop rides in the first batch
    for top, left in boxes:
        copy = x.copy()
        copy[top : top + patch, left : left + patch] = hidden[top : top + patch, left : left + patch]
        pending.append(copy)
        if len(pending) == batch:
            scores.append(classifier.predict(np.stack(pending)))
            pending = []
    if pending:
        scores.append(classifier.predict(np.stack(pending)))
    p = np.concatenate(scores).astype(np.float64)
    base, occluded = p[0], p[1:]

    total = np.zeros((size, size), np.float64)
    count = np.zeros((size, size), np.float64)
    for (top, left), score in zip(boxes, occluded, strict=True):
        total[top : top + patch, left : left + patch] += max(base - score, 0.0)
        count[top : top + patch, left : left + patch] += 1.0
    heat = np.clip(total / np.maximum(count, 1.0), 0.0, 1.0).astype(np.float32)
    if heat.shape != crop.shape[:2]:
        heat = cv2.resize(heat, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR)
    return heat


class ModelMap:
    """(H, W) float32 in [0, 1]: the model's own local P(blended) over the crop, from its ONNX graph's `fake_map`.

    ONNX Runtime on the CPU, whatever backend scores the faces: an alert's heatmap is a few small runs, off the
    serving path. The graph's map has one cell per `stride` input pixels (S / h); `steps` shifted copies per axis
    (steps², run one at a time, shifted by (k − (steps − 1) / 2) × stride / steps pixels, edges mirrored) give every
    pixel steps² cells that covered it, offset by stride / steps pixels from each other, and the map is their mean:
    it changes every stride / steps pixels instead of every stride. Within the largest shift (12 pixels at S = 160) of
    the crop's edge the mirrored border can echo what is next to it.
    """

    method: HeatmapMethod = "model"

    def __init__(self, onnx_path: Path, card: ModelCard, steps: int = 4, threads: int = 1) -> None:
        from streamguard.inference.onnx import load_session

        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self._session = load_session(onnx_path, threads)
        self._input = self._session.get_inputs()[0].name
        self.card = card
        self.steps = steps
        size = card.preprocess.input_size
        self.cells = self.maps(np.zeros((1, size, size, 3), np.uint8)).shape[-1]  # map cells per side: S / stride

    @staticmethod
    def has_map(onnx_path: Path) -> bool:
        """Whether the ONNX graph has a `fake_map` output (read without loading its weights)."""
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        return any(o.name == MAP_OUTPUT for o in graph.output)

    def maps(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB → (N, h, w) float32, the graph's own map."""
        (out,) = self._session.run([MAP_OUTPUT], {self._input: preprocess(crops, self.card)})
        return np.asarray(out, np.float32).reshape(len(crops), *np.shape(out)[-2:])

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        size = self.card.preprocess.input_size
        x = _fit(crop, size)
        k = self.steps
        step = size / self.cells / k  # stride / steps pixels
        shifts = [round((i - (k - 1) / 2) * step) for i in range(k)]
        offsets = [(dy, dx) for dy in shifts for dx in shifts]
        copies = [cv2.warpAffine(x, np.array([[1, 0, dx], [0, 1, dy]], np.float32), (size, size),
                                 borderMode=cv2.BORDER_REFLECT_101) for dy, dx in offsets]
        # One copy per run: as fast on one core, and ONNX Runtime's arena keeps what the largest run needed (measured
        # with the default model: +16 MB over the session one at a time, +380 MB in one batch of 16).
        maps = np.concatenate([self.maps(c[None]) for c in copies])
        heat = np.zeros((size, size), np.float32)
        # Copy (dy, dx) shows the crop's pixel p at p + d: each of the crop's pixels takes, from every copy, the value
        # of the cell that covered it there, and their mean (steps² values, from cells offset by a sub-cell each).
        # A mean, not an interleave: the network is not exactly shift-equivariant, and interleaved copies show seams.
        for n, (dy, dx) in enumerate(offsets):
            cells = cv2.resize(maps[n], (size, size), interpolation=cv2.INTER_LINEAR)  # each cell at its centre
            rows, cols = (np.clip(np.arange(size) + d, 0, size - 1) for d in (dy, dx))
            heat += cells[np.ix_(rows, cols)]
        heat /= len(copies)
        return np.clip(cv2.resize(heat, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


class OcclusionMap:
    """`occlusion_map` through the classifier: any model, any backend; 1 + n² crops (226 at the defaults)."""

    method: HeatmapMethod = "occlusion"

    def __init__(self, classifier: Classifier) -> None:
        self._classifier = classifier

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        return occlusion_map(self._classifier, crop)


class Heatmapper(Protocol):
    """A face crop (H, W, 3) uint8 RGB → (H, W) float32 in [0, 1]: where the artefacts behind its score are."""

    method: HeatmapMethod

    def __call__(self, crop: np.ndarray) -> np.ndarray: ...


def heatmapper_for(classifier: Classifier, onnx_path: Path | None, method: HeatmapMethod = "model") -> Heatmapper:
    """The heatmap for a classifier's alerts: the model's own map when asked for and its ONNX graph (the file the
    classifier was loaded from, `onnx_path`) has one, else an occlusion map."""
    if method == "model" and onnx_path is not None and ModelMap.has_map(onnx_path):
        return ModelMap(onnx_path, classifier.card)
    return OcclusionMap(classifier)


def gradcam_map(
    module: torch.nn.Module,
    crop: np.ndarray,
    card: ModelCard,
    target_layer: torch.nn.Module | None = None,
) -> np.ndarray:
    """(H, W) float32 in [0, 1] Grad-CAM of the module's first output (P(fake) for `load_checkpoint` modules).

    `module` takes the card-preprocessed (N, 3, S, S) batch; `target_layer` defaults to `module.gradcam_layer`.
    The map is ReLU(Σ_c mean(∂score/∂A_c) · A_c), upsampled to the crop and divided by its maximum (Grad-CAM
    is relative: compare regions within one map, not maps of different faces). Needs torch.
    """
    import torch
    import torch.nn.functional as F

    layer = target_layer if target_layer is not None else getattr(module, "gradcam_layer", None)
    if layer is None:
        raise ValueError("pass target_layer: the module has no gradcam_layer attribute")
    x = torch.from_numpy(preprocess(_fit(crop, card.preprocess.input_size)[None], card))
    seen: dict[str, torch.Tensor] = {}

    def keep(_: torch.nn.Module, __: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen["a"] = out

    handle = layer.register_forward_hook(keep)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            score = module(x.requires_grad_(True)).reshape(1, -1)[0, 0]
            score.backward()
    finally:
        handle.remove()
        module.train(was_training)
    a = seen["a"]
    if a.grad is None:
        raise ValueError("the target layer's output does not influence the score")
    weights = a.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True)).detach()
    heat = F.interpolate(cam, size=crop.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat).astype(np.float32)


def render_overlay(
    crop: np.ndarray,
    heat: np.ndarray,
    score: float | None = None,
    alpha: float = 0.45,
    colormap: Colormap = "jet",
    normalize: bool = True,
) -> bytes:
    """PNG bytes, the crop's size: the heat map coloured (`colormap`) and blended over the crop, a colour bar
    labelled with the map's maximum at the right edge, and "P(fake) x.xx" bottom left when `score` is given.

    `normalize` stretches the colours to the map's own maximum (the label keeps the true value), so a weak but
    localised signal is still visible.
    """
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"crop must be (H, W, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
    h, w = crop.shape[:2]
    heat = np.nan_to_num(np.asarray(heat, np.float32))
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    peak = float(heat.max()) if heat.size else 0.0
    scale = peak if normalize and peak > 0 else 1.0
    level = np.clip(heat / scale, 0.0, 1.0)
    colours = cv2.applyColorMap((level * 255).astype(np.uint8), _COLORMAPS[colormap])
    image = cv2.addWeighted(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), 1.0 - alpha, colours, alpha, 0.0)

    # Colour bar: a thin ramp inside the right edge, top = the map's maximum.
    bar_w, bar_h = max(4, w // 24), max(8, int(h * 0.5))
    x0, y0 = w - bar_w - max(2, w // 64), (h - bar_h) // 2
    ramp = np.linspace(255, 0, bar_h, dtype=np.float32).astype(np.uint8)[:, None].repeat(bar_w, axis=1)
    image[y0 : y0 + bar_h, x0 : x0 + bar_w] = cv2.applyColorMap(ramp, _COLORMAPS[colormap])
    cv2.rectangle(image, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), (255, 255, 255), 1)
    font_scale = max(0.3, h / 640)
    _text(image, f"{peak:.2f}", (max(0, x0 - int(28 * font_scale / 0.3)), max(10, y0 - 3)), font_scale)
    if score is not None:
        _text(image, f"P(fake) {score:.2f}", (3, h - 4), font_scale)  # bottom left: clear of the bar's label
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    # Dark outline under white text: readable over any part of the colour map.
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def save_overlay(path: Path | str, crop: np.ndarray, heat: np.ndarray, score: float | None = None) -> Path:
    """Write `render_overlay(crop, heat, score)` to `path` (a .png; folders are created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_overlay(crop, heat, score))
    return path
