"""Model cards: the JSON file beside each ONNX model that says how to feed it and what its output means."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class Preprocess(BaseModel):
    """How a uint8 RGB crop becomes the model's input tensor: x = (rgb / 255 - mean) / std."""

    input_size: int = Field(gt=0, description="square input side in pixels")
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    crop_margin: float = Field(1.65, gt=1.0, description="crop side / face box long side the model was trained on")


class ModelCard(BaseModel):
    name: str
    version: str = "1"
    architecture: str
    preprocess: Preprocess
    # The ONNX graph's first output, shape (N,) or (N, 1): what it means before we turn it into P(fake).
    output: Literal["p_fake", "p_real", "logit_fake"] = "p_fake"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="P(fake) at or above which a face/file is called fake")
    raise_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="live: smoothed P(fake) that raises an alert, calibrated on real calls; "
        "None: derived from `threshold` (see ScoringSettings)"
    )
    clear_threshold: float | None = Field(
        None, gt=0.0, lt=1.0, description="live: smoothed P(fake) under which an alert clears; None: `threshold`"
    )
    source: str = Field(description="where the weights came from")
    license: str = "unknown"
    training: str = ""
    metrics: dict = Field(default_factory=dict, description="measured results, keyed by data set")
    sha256: str | None = Field(None, description="sha256 of the ONNX file")

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
