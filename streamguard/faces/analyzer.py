"""The face stage: frame → face crops (detection, square crop at the model's margin, quality gate).

`FaceAnalyzer` does one frame on the calling thread (`scan`, `eval`, calibration); `FacePool` runs analyzers off
the event loop for the live service. Both are built from the classifier's model card, which says the crop's side and
the margin the model was trained on.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from streamguard.config import FaceSettings
from streamguard.faces.crop import square_crop
from streamguard.faces.detector import FaceDetector
from streamguard.faces.quality import DEFAULT_MIN_SHARPNESS, QualityGate
from streamguard.inference.card import ModelCard
from streamguard.types import FaceCrop, SampledFrame


def face_margin(card: ModelCard, settings: FaceSettings) -> float:
    """The crop margin: the config's when set, else the one the model was trained on."""
    return settings.margin or card.preprocess.crop_margin


class FaceAnalyzer:
    """Finds and crops the faces of one frame for the model of `card`. Not thread-safe (mediapipe graph): one per
    thread."""

    def __init__(self, card: ModelCard, settings: FaceSettings | None = None) -> None:
        settings = settings or FaceSettings()
        self.settings = settings
        self.input_size = card.preprocess.input_size
        self.margin = face_margin(card, settings)
        self.detector = FaceDetector(min_confidence=settings.min_confidence)
        sharpness = DEFAULT_MIN_SHARPNESS if settings.min_sharpness is None else settings.min_sharpness
        self.gate = QualityGate(min_face_px=settings.min_face_px, min_sharpness=sharpness,
                                min_confidence=settings.min_confidence)

    def analyze(self, frame: SampledFrame) -> list[FaceCrop]:
        return [
            FaceCrop(
                stream_id=frame.stream_id,
                pts_s=frame.pts_s,
                detection=det,
                quality=self.gate.assess(frame.rgb, det),
                crop=square_crop(frame.rgb, det.box, margin=self.margin, out_size=self.input_size),
            )
            for det in self.detector.detect(frame.rgb)
        ]

    def close(self) -> None:
        self.detector.close()


class FacePool:
    """Face analysis off the event loop: `threads` workers, each with its own FaceAnalyzer (mediapipe graphs are
    not thread-safe). Detection is the per-frame CPU cost after decoding, so it gets its own pool and never
    waits behind model calls."""

    def __init__(self, card: ModelCard, settings: FaceSettings | None = None, *, threads: int = 2) -> None:
        self._card = card
        self._settings = settings or FaceSettings()
        self.margin = face_margin(card, self._settings)
        self._local = threading.local()
        self._all: list[FaceAnalyzer] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faces")

    def _analyzer(self) -> FaceAnalyzer:
        analyzer: FaceAnalyzer | None = getattr(self._local, "analyzer", None)
        if analyzer is None:
            analyzer = self._local.analyzer = FaceAnalyzer(self._card, self._settings)
            with self._lock:
                self._all.append(analyzer)
        return analyzer

    async def analyze(self, frame: SampledFrame) -> list[FaceCrop]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._analyzer().analyze(frame))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for analyzer in self._all:
            analyzer.close()
