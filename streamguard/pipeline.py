"""Frame → face crops: detection, square crop at the model's margin, quality gate. Shared by `scan` and `serve`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from streamguard.types import FaceCrop, SampledFrame


class FaceSettings(BaseModel):
    """How faces are found and gated. Defaults follow DESIGN.md's facts from the field."""

    model_config = ConfigDict(extra="forbid")  # a typo in the config file is an error, not a default

    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="mediapipe full-range detector score to keep a face")
    margin: float | None = Field(
        None, gt=1.0, description="crop side / face box long side; None: the model card's (1.65 for ours)"
    )
    min_face_px: float = Field(40.0, ge=0.0, description="faces whose box long side is smaller are low quality")
    min_sharpness: float | None = Field(None, ge=0.0, description="Laplacian-variance floor; None: the gate's default")


class FaceAnalyzer:
    """Finds and crops the faces of one frame. Not thread-safe (mediapipe graph): one per worker thread."""

    def __init__(self, settings: FaceSettings, input_size: int, card_margin: float = 1.65):
        # Imported here, not at the top: config imports FaceSettings from this module, and mediapipe (with cv2)
        # takes ~1 s to import, which a bad config must not wait for.
        from streamguard.faces.detector import FaceDetector
        from streamguard.faces.quality import QualityGate

        self.settings = settings
        self.input_size = input_size
        self.margin = settings.margin or card_margin
        self.detector = FaceDetector(min_confidence=settings.min_confidence)
        gate_kwargs = {"min_face_px": settings.min_face_px, "min_confidence": settings.min_confidence}
        if settings.min_sharpness is not None:
            gate_kwargs["min_sharpness"] = settings.min_sharpness
        self.gate = QualityGate(**gate_kwargs)

    def analyze(self, frame: SampledFrame) -> list[FaceCrop]:
        from streamguard.faces.crop import square_crop  # cv2: see __init__

        crops = []
        for det in self.detector.detect(frame.rgb):
            crops.append(
                FaceCrop(
                    stream_id=frame.stream_id,
                    pts_s=frame.pts_s,
                    detection=det,
                    quality=self.gate.assess(frame.rgb, det),
                    crop=square_crop(frame.rgb, det.box, margin=self.margin, out_size=self.input_size),
                )
            )
        return crops

    def close(self) -> None:
        self.detector.close()


class FacePool:
    """Face analysis off the event loop: `threads` workers, each with its own FaceAnalyzer (mediapipe graphs are
    not thread-safe). Detection is the per-frame CPU cost after decoding, so it gets its own pool and never
    waits behind model calls."""

    def __init__(self, settings: FaceSettings, input_size: int, card_margin: float, threads: int = 2):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._local = threading.local()
        self._all: list[FaceAnalyzer] = []
        self._lock = threading.Lock()
        self._args = (settings, input_size, card_margin)
        self.margin = settings.margin or card_margin
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="faces")

    def _analyzer(self) -> FaceAnalyzer:
        analyzer = getattr(self._local, "analyzer", None)
        if analyzer is None:
            analyzer = self._local.analyzer = FaceAnalyzer(*self._args)
            with self._lock:
                self._all.append(analyzer)
        return analyzer

    async def analyze(self, frame: SampledFrame) -> list[FaceCrop]:
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._analyzer().analyze(frame))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for analyzer in self._all:
            analyzer.close()
