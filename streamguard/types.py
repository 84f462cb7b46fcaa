"""The small typed values that flow between stages: source → sampler → faces → participants → classifier."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np


@dataclass(frozen=True, slots=True)
class Box:
    """A face box in pixel coordinates of its frame (x0, y0 inclusive; x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    @property
    def long_side(self) -> float:
        return max(self.width, self.height)

    def iou(self, other: Box) -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union > 0 else 0.0


@dataclass(slots=True)
class SampledFrame:
    """One frame the sampler kept, already converted to RGB (H, W, 3) uint8."""

    stream_id: str
    pts_s: float
    wall_ts: float
    rgb: np.ndarray


@dataclass(frozen=True, slots=True)
class Detection:
    """A face the detector found: box, detector confidence, and its 6 keypoints (x, y) in pixels."""

    box: Box
    score: float
    keypoints: tuple[tuple[float, float], ...] = ()


class QualityVerdict(str, Enum):
    OK = "ok"
    TOO_SMALL = "too_small"
    BLURRY = "blurry"
    LOW_CONFIDENCE = "low_confidence"


@dataclass(frozen=True, slots=True)
class Quality:
    """Why a face may be scored or not: low-quality faces are reported, never scored."""

    verdict: QualityVerdict
    face_px: float
    sharpness: float

    @property
    def ok(self) -> bool:
        return self.verdict is QualityVerdict.OK


@dataclass(slots=True)
class FaceCrop:
    """A square face crop (RGB uint8, model input size) with where it came from."""

    stream_id: str
    pts_s: float
    detection: Detection
    quality: Quality
    crop: np.ndarray
    participant_id: str | None = None

    @property
    def box(self) -> Box:
        return self.detection.box
