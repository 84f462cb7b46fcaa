"""Offline scan of videos and images: the same stages as the live service, run to the end of each file."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from streamguard import __version__
from streamguard.config import FaceSettings
from streamguard.faces.analyzer import FaceAnalyzer
from streamguard.faces.crop import resize_square
from streamguard.faces.tracker import ParticipantTracker
from streamguard.inference.classifier import Classifier
from streamguard.inference.heatmap import Heatmapper
from streamguard.ingest.av_source import DecodeStats, SourceError, iter_sampled_frames
from streamguard.ingest.image import is_image, is_video, read_image
from streamguard.ingest.nvdec import choose_hwdecode
from streamguard.scoring.verdicts import Verdict, id_strategy, strategy, verdict_for
from streamguard.types import FaceCrop, SampledFrame


class ScanSettings(BaseModel):
    fps: float = Field(1.0, gt=0.0, le=30.0, description="samples per second of video")
    min_samples: int = Field(3, ge=1, description="scored samples a person needs in a video; fewer is noise")
    batch_size: int = Field(16, ge=1, le=256, description="face crops per classifier call")
    skip_nonref: bool = Field(True, description="skip decoding non-reference frames (never needed at low fps)")
    id_threshold: float = Field(0.8, gt=0.5, lt=1.0, description="deepware id_strategy t")
    images_are_crops: bool = Field(
        False, description="images are already aligned face crops (e.g. MesoNet's test set): no detection, one face"
    )
    hwdecode: Literal["off", "auto", "nvdec"] = Field(
        "off", description="decode videos on NVDEC (auto: when it works here). Off by default: scores then do not "
        "depend on the machine (NVDEC's frames differ from the CPU decoder's by YUV rounding)"
    )
    faces: FaceSettings = Field(default_factory=FaceSettings)


class ParticipantReport(BaseModel):
    id: str
    samples: int = Field(description="scored face samples")
    low_quality: int = Field(description="samples rejected by the quality gate, never scored")
    score: float | None = Field(description="P(fake) of this person (id_strategy); null when no sample was scored")
    first_seen_s: float
    last_seen_s: float
    sample_scores: list[float] = Field(default_factory=list)
    face_px: float | None = Field(None, description="median long side of this person's scored face boxes, pixels "
                                  "(null: none scored, or aligned crops): small faces score unreliably (README)")
    heatmap: str | None = Field(None, description="artefact heatmap PNG of this person's most suspicious face")


class FileReport(BaseModel):
    path: str
    kind: str = Field(description="video, image or unknown")
    score: float | None = Field(description="P(fake) of the file; null when no face was scored")
    verdict: Verdict
    error: str | None = None
    duration_s: float | None = None
    sampled_frames: int = 0
    corrupt_packets: int = 0
    noise_faces: int = Field(0, description="face samples of one-off detections dropped as noise")
    participants: list[ParticipantReport] = Field(default_factory=list)


class ModelInfo(BaseModel):
    name: str
    architecture: str
    backend: str
    threshold: float
    input_size: int
    sha256: str | None = None


class ScanReport(BaseModel):
    streamguard: str = __version__
    model: ModelInfo
    settings: ScanSettings
    files: list[FileReport]


@dataclass
class ScanResult:
    report: FileReport
    # Each confirmed participant's most suspicious scored crop: (P(fake), crop), for heatmaps and evidence.
    evidence: dict[str, tuple[float, np.ndarray]] = field(default_factory=dict)

    def write_heatmaps(self, heatmapper: Heatmapper, threshold: float, out_dir: Path) -> list[Path]:
        """A heatmap overlay (`heatmapper_for`) for each participant flagged at `threshold`, on their most
        suspicious face (DuckDuckGoose's "where are the artefacts"); records each file's path in the report."""
        from streamguard.inference.heatmap import save_overlay

        written = []
        for person in self.report.participants:
            if person.score is None or person.score < threshold or person.id not in self.evidence:
                continue
            p_fake, crop = self.evidence[person.id]
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{Path(self.report.path).stem}_{person.id}.png"
            save_overlay(path, crop, heatmapper(crop), p_fake)
            person.heatmap = str(path)
            written.append(path)
        return written


def model_info(classifier: Classifier) -> ModelInfo:
    card = classifier.card
    return ModelInfo(
        name=card.name,
        architecture=card.architecture,
        backend=classifier.backend,
        threshold=card.threshold,
        input_size=classifier.input_size,
        sha256=card.sha256,
    )


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given (even unsupported ones, so they get an error entry) and media files found in folders."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and (is_video(p) or is_image(p)))
        else:
            yield path


class _ParticipantLog:
    def __init__(self, first_seen_s: float):
        self.first_seen_s = self.last_seen_s = first_seen_s
        self.scores: list[float] = []
        self.face_px: list[float] = []  # of the scored faces
        self.low_quality = 0
        self.best: tuple[float, np.ndarray] | None = None


class Scanner:
    """Runs sampler → faces → participants → classifier batches → verdicts over one file at a time."""

    def __init__(self, classifier: Classifier, settings: ScanSettings | None = None):
        self.classifier = classifier
        self.settings = settings or ScanSettings()
        self.hwdecode = choose_hwdecode(self.settings.hwdecode)
        if self.hwdecode.degraded:  # asked for NVDEC explicitly: a scan must not quietly run otherwise
            raise SourceError(f"--hwdecode nvdec: {self.hwdecode.reason.removeprefix('CPU decoding: ')}")
        self.analyzer = FaceAnalyzer(classifier.card, self.settings.faces)
        self.timings: dict[str, float] = {"decode": 0.0, "faces": 0.0, "track": 0.0, "classify": 0.0}

    def close(self) -> None:
        self.analyzer.close()

    def scan(self, path: Path, on_sample: Callable[[float], None] | None = None) -> ScanResult:
        path = Path(path)
        kind = "video" if is_video(path) else "image" if is_image(path) else "unknown"
        try:
            if not path.exists():
                raise SourceError(f"{path}: no such file")
            if kind == "unknown":
                raise SourceError(f"{path}: unsupported file type {path.suffix!r} (not a known video or image)")
            if kind == "image" and self.settings.images_are_crops:
                return self._scan_crop_image(path)
            if kind == "image":
                return self._scan_frames(path, kind, [read_image(path)], min_samples=1, stats=None)
            stats = DecodeStats()
            frames = iter_sampled_frames(
                str(path), fps=self.settings.fps, stream_id=path.name, skip_nonref=self.settings.skip_nonref,
                stats=stats,
                hwaccel=self.hwdecode.hwaccel,
            )
            return self._scan_frames(path, kind, frames, self.settings.min_samples, stats, on_sample)
        except SourceError as exc:
            return ScanResult(FileReport(path=str(path), kind=kind, score=None, verdict=Verdict.ERROR, error=str(exc)))

    def _scan_frames(
        self,
        path: Path,
        kind: str,
        frames: Iterable[SampledFrame],
        min_samples: int,
        stats: DecodeStats | None,
        on_sample: Callable[[float], None] | None = None,
    ) -> ScanResult:
        tracker = ParticipantTracker(crop_margin=self.analyzer.margin)
        logs: dict[str, _ParticipantLog] = {}
        pending: list[tuple[str, FaceCrop]] = []
        sampled = 0
        t = time.perf_counter()
        for frame in frames:
            now = time.perf_counter()
            self.timings["decode"] += now - t
            sampled += 1
            crops = self.analyzer.analyze(frame)
            t_faces = time.perf_counter()
            self.timings["faces"] += t_faces - now
            ids = tracker.update(frame.pts_s, [(c.detection, c.crop) for c in crops])
            self.timings["track"] += time.perf_counter() - t_faces
            for pid, crop in zip(ids, crops, strict=True):
                log = logs.setdefault(pid, _ParticipantLog(frame.pts_s))
                log.last_seen_s = frame.pts_s
                if crop.quality.ok:
                    pending.append((pid, crop))
                else:
                    log.low_quality += 1
            if len(pending) >= self.settings.batch_size:
                self._classify(pending, logs)
            if on_sample:
                on_sample(frame.pts_s)
            t = time.perf_counter()
        self._classify(pending, logs)
        report = self._report(path, kind, logs, tracker.participants(min_samples), sampled, stats)
        best = {p.id: logs[p.id].best for p in report.participants}
        return ScanResult(report, {pid: b for pid, b in best.items() if b is not None})

    def _scan_crop_image(self, path: Path) -> ScanResult:
        rgb = read_image(path).rgb
        size = self.classifier.input_size
        crop = resize_square(rgb, size)
        p = float(self.classifier.predict(crop[None])[0])
        person = ParticipantReport(
            id="p1", samples=1, low_quality=0, score=p, first_seen_s=0.0, last_seen_s=0.0, sample_scores=[round(p, 5)]
        )
        score = strategy([p])
        report = FileReport(
            path=str(path), kind="image", score=score, verdict=verdict_for(score, self.classifier.card.threshold),
            sampled_frames=1, participants=[person],
        )
        return ScanResult(report, {"p1": (p, crop)})

    def _classify(self, pending: list[tuple[str, FaceCrop]], logs: dict[str, _ParticipantLog]) -> None:
        if not pending:
            return
        t = time.perf_counter()
        scores = self.classifier.predict(np.stack([c.crop for _, c in pending]))
        self.timings["classify"] += time.perf_counter() - t
        for (pid, crop), p in zip(pending, scores, strict=True):
            log = logs[pid]
            log.scores.append(float(p))
            log.face_px.append(crop.quality.face_px)
            if log.best is None or p > log.best[0]:
                log.best = (float(p), crop.crop)
        pending.clear()

    def _report(
        self,
        path: Path,
        kind: str,
        logs: dict[str, _ParticipantLog],
        confirmed: list[str],
        sampled: int,
        stats: DecodeStats | None,
    ) -> FileReport:
        people = []
        for pid in confirmed:
            log = logs[pid]
            people.append(
                ParticipantReport(
                    id=pid,
                    samples=len(log.scores),
                    low_quality=log.low_quality,
                    score=id_strategy(log.scores, self.settings.id_threshold) if log.scores else None,
                    first_seen_s=log.first_seen_s,
                    last_seen_s=log.last_seen_s,
                    sample_scores=[round(s, 5) for s in log.scores],
                    face_px=round(float(np.median(log.face_px)), 1) if log.face_px else None,
                )
            )
        noise = sum(len(log.scores) + log.low_quality for pid, log in logs.items() if pid not in confirmed)
        scored = [p.score for p in people if p.score is not None]
        score = strategy(scored) if scored else None
        return FileReport(
            path=str(path),
            kind=kind,
            score=score,
            verdict=verdict_for(score, self.classifier.card.threshold),
            duration_s=stats.duration_s if stats else None,
            sampled_frames=sampled,
            corrupt_packets=stats.corrupt if stats else 0,
            noise_faces=noise,
            participants=people,
        )
