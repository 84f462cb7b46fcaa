"""Thresholds from real faces and real calls held out of training: the card's threshold and the live raise/clear.

Only real footage decides them (tuning on fakes would be tuning on the test). What each must hold:

- the card `threshold` calls a face or a file fake. `scan` compares a file's score (deepware's id_strategy over a
  person's 1 FPS scores) with it, so it sits above every held-out real call's file score (+ `margin`) and above all
  but `max_face_fpr` of held-out real photo faces;
- `raise_threshold` is what the smoothed (10 s median) live score must reach for 3 samples running: above the highest
  smoothed score any held-out real call reaches at any sampling phase (+ `margin`), and above the card threshold;
- `clear_threshold` is the card threshold: a participant whose median falls back under what one face would be
  called fake at is clear again.

A 1 FPS sampler can start anywhere in the first second of a call, so every clip is scored at `sampled_fps` (5) and
cut into that many 1 FPS sequences, one per phase: 5 times the evidence from the same few clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from streamguard.scoring.live import ParticipantScorer, ScoringSettings
from streamguard.scoring.verdicts import id_strategy


@dataclass(frozen=True, slots=True)
class ClipScores:
    """One real clip's per-face P(fake) at `fps` samples per second, in time order (one face per frame)."""

    name: str
    times: Sequence[float]
    scores: Sequence[float]
    fps: float

    def phases(self, rate: float = 1.0) -> list[list[tuple[float, float]]]:
        """The 1 FPS (`rate`) sequences a live sampler could have taken, one per starting phase."""
        step = max(1, round(self.fps / rate))
        pairs = list(zip(self.times, self.scores, strict=True))
        return [pairs[k::step] for k in range(step) if pairs[k::step]]


@dataclass(slots=True)
class ClipReport:
    name: str
    faces: int
    mean: float
    max_face: float
    file_score: float  # the highest id_strategy over phases: what `scan` would score it at worst
    max_smoothed: float | None  # the highest 10 s median over phases; None when no window filled


@dataclass(slots=True)
class Calibration:
    threshold: float
    raise_threshold: float
    clear_threshold: float
    rule: str
    real_faces: int
    real_face_quantile: float
    clips: list[ClipReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _ceil(x: float, step: float = 0.01) -> float:
    return round(math.ceil(x / step - 1e-9) * step, 4)


def max_smoothed(sequence: Sequence[tuple[float, float]], settings: ScoringSettings) -> float | None:
    """The highest smoothed score the live scorer shows over this 1 FPS sequence (None: the window never filled)."""
    scorer = ParticipantScorer(settings.model_copy(update={"raise_threshold": 0.999, "clear_threshold": 0.998}))
    best: float | None = None
    for ts, p in sequence:
        scorer.add_score(ts, p)
        s = scorer.smoothed
        if s is not None:
            best = s if best is None else max(best, s)
    return best


def report_clip(clip: ClipScores, settings: ScoringSettings) -> ClipReport:
    phases = clip.phases()
    smoothed = [m for m in (max_smoothed(p, settings) for p in phases) if m is not None]
    scores = np.asarray(clip.scores, np.float64)
    return ClipReport(
        name=clip.name, faces=int(scores.size), mean=round(float(scores.mean()), 4),
        max_face=round(float(scores.max()), 4),
        file_score=round(max(id_strategy([p for _, p in ph]) for ph in phases), 4),
        max_smoothed=round(max(smoothed), 4) if smoothed else None,
    )


def calibrate(
    real_face_scores: Sequence[float],
    clips: Sequence[ClipScores],
    *,
    settings: ScoringSettings | None = None,
    max_face_fpr: float = 0.01,
    margin: float = 0.05,
    floor: float = 0.5,
    ceiling: float = 0.97,
) -> Calibration:
    """The card threshold and live thresholds from held-out real photo faces and held-out real call clips."""
    settings = settings or ScoringSettings()
    faces = np.sort(np.asarray(real_face_scores, np.float64))
    if faces.size == 0 and not clips:
        raise ValueError("calibration needs held-out real faces or real clips")
    q = float(np.quantile(faces, 1.0 - max_face_fpr)) if faces.size else 0.0
    reports = [report_clip(c, settings) for c in clips if len(c.scores)]
    worst_file = max((r.file_score for r in reports), default=0.0)
    worst_smoothed = max((r.max_smoothed for r in reports if r.max_smoothed is not None), default=0.0)
    # round(): the cap 0.97 - 0.05 is 0.9199999... in floating point, and the card would carry that.
    threshold = min(round(ceiling - margin, 4), max(floor, _ceil(q), _ceil(worst_file + margin)))
    raise_at = min(ceiling, max(_ceil(threshold + margin), _ceil(worst_smoothed + margin)))
    rule = (
        f"threshold = max({floor}, {1 - max_face_fpr:.0%} quantile of held-out real photo faces, highest held-out "
        f"real call file score + {margin}); raise = max(threshold + {margin}, highest held-out real call 10 s median "
        f"+ {margin}), capped at {ceiling}; clear = threshold"
    )
    return Calibration(threshold, raise_at, threshold, rule, int(faces.size), round(q, 4), reports)
