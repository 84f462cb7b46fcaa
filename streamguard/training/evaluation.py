"""Scoring a shipped model on real media through the serving path (no torch): the card's measured results.

Faces go through `FaceAnalyzer` (detector, square crop at the card's margin and input size, quality gate) exactly as
`streamguard scan` sees them; only faces the gate passes are scored. Aligned crops (MesoNet's test images) are
resized to the input like `scan --images-are-crops`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from streamguard.faces.crop import resize_square
from streamguard.inference.classifier import Classifier

if TYPE_CHECKING:
    from streamguard.faces.analyzer import FaceAnalyzer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(slots=True)
class ScoredFaces:
    """Per-face P(fake) with where each face came from ("file" or "file@pts")."""

    scores: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def extend(self, scores: np.ndarray, sources: Sequence[str]) -> None:
        self.scores += [float(s) for s in scores]
        self.sources += list(sources)

    def mean(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None

    def above(self, threshold: float) -> int:
        return int(sum(s >= threshold for s in self.scores))


def _analyzer(classifier: Classifier) -> FaceAnalyzer:
    from streamguard.faces.analyzer import FaceAnalyzer  # mediapipe: imported when a set is scored

    return FaceAnalyzer(classifier.card)


def _predict(classifier: Classifier, crops: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    out = [classifier.predict(np.stack(crops[i : i + batch_size])) for i in range(0, len(crops), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def image_files(folder: Path, names: Sequence[str] | None = None) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [p for p in files if names is None or p.name in set(names)]


def score_photos(classifier: Classifier, files: Sequence[Path]) -> ScoredFaces:
    """Every face the quality gate passes in each photo."""
    from streamguard.ingest.image import read_image

    analyzer = _analyzer(classifier)
    crops, sources = [], []
    try:
        for path in files:
            frame = read_image(path)
            for k, face in enumerate(analyzer.analyze(frame)):
                if face.quality.ok:
                    crops.append(face.crop)
                    sources.append(f"{Path(path).name}#{k}")
    finally:
        analyzer.close()
    result = ScoredFaces()
    result.extend(_predict(classifier, crops), sources)
    return result


def score_crops(classifier: Classifier, files: Sequence[Path]) -> ScoredFaces:
    """Already-aligned face crops, resized to the input (area when shrinking), one face each."""
    size = classifier.input_size
    crops = []
    for path in files:
        rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        crops.append(resize_square(rgb, size))
    result = ScoredFaces()
    result.extend(_predict(classifier, crops), [Path(p).name for p in files])
    return result


def score_video(classifier: Classifier, path: Path, fps: float = 1.0) -> ScoredFaces:
    """Every gated face of the frames sampled at `fps` (the service's default rate is 1 FPS)."""
    from streamguard.ingest.av_source import iter_sampled_frames

    analyzer = _analyzer(classifier)
    crops, sources = [], []
    try:
        for frame in iter_sampled_frames(str(path), fps=fps):
            for face in analyzer.analyze(frame):
                if face.quality.ok:
                    crops.append(face.crop)
                    sources.append(f"{Path(path).name}@{frame.pts_s:.2f}")
    finally:
        analyzer.close()
    result = ScoredFaces()
    result.extend(_predict(classifier, crops), sources)
    return result


def threshold_for_fpr(real_scores: Sequence[float], max_fpr: float, floor: float = 0.5) -> float:
    """The lowest threshold (>= floor, rounded up to 0.01) at which at most `max_fpr` of these real faces score at or
    above it. Real faces alone decide it: tuning on fakes would be tuning on the test."""
    s = np.sort(np.asarray(real_scores, np.float64))
    if s.size == 0:
        return floor
    allowed = int(np.floor(max_fpr * s.size))  # how many reals may be at or above the threshold
    # Just above the (allowed+1)-th highest real score.
    t = s[-(allowed + 1)] + 1e-9
    return float(min(0.99, max(floor, np.ceil(t * 100) / 100)))
