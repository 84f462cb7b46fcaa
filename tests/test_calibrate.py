"""Thresholds from held-out real faces and real calls (streamguard.training.calibrate)."""

from __future__ import annotations

import numpy as np
import pytest

from streamguard.scoring.live import ParticipantScorer, ScoringSettings
from streamguard.training.calibrate import ClipScores, calibrate, max_smoothed


def _clip(name: str, scores: list[float], fps: float = 5.0) -> ClipScores:
    return ClipScores(name, [i / fps for i in range(len(scores))], scores, fps)


def test_phases_cut_one_fps_sequences_at_every_start():
    clip = _clip("c", list(np.linspace(0, 1, 20)))
    phases = clip.phases()
    assert len(phases) == 5 and all(len(p) == 4 for p in phases)
    assert [t for t, _ in phases[1]] == pytest.approx([0.2, 1.2, 2.2, 3.2])


def test_thresholds_sit_above_every_real_call_and_the_photo_quantile():
    rng = np.random.default_rng(0)
    photos = rng.beta(2, 8, 2000)  # mean 0.2
    calm = _clip("calm", list(rng.uniform(0.1, 0.3, 60)))
    # A real call with a stretch that scores high: its 10 s median reaches ~0.6.
    hot = _clip("hot", list(np.r_[rng.uniform(0.55, 0.65, 40), rng.uniform(0.1, 0.2, 30)]))
    cal = calibrate(photos, [calm, hot])
    assert cal.threshold >= np.quantile(photos, 0.99)
    hot_report = next(c for c in cal.clips if c.name == "hot")
    assert cal.threshold >= hot_report.file_score + 0.05 - 1e-9
    assert cal.raise_threshold >= hot_report.max_smoothed + 0.05 - 1e-9
    assert cal.clear_threshold == cal.threshold < cal.raise_threshold <= 0.97
    # Replayed live with these thresholds, neither real call raises an alert at any phase.
    for clip in (calm, hot):
        for phase in clip.phases():
            scorer = ParticipantScorer(card_threshold=0.5)
            scorer.raise_threshold, scorer.clear_threshold = cal.raise_threshold, cal.clear_threshold
            assert not any(type(t).__name__ == "AlertRaised" for ts, p in phase for t in scorer.add_score(ts, p))


def test_floor_and_short_clips():
    cal = calibrate([0.01, 0.02], [_clip("short", [0.1, 0.1, 0.1])])  # 3 samples: the window never fills
    assert cal.threshold == 0.5 and cal.raise_threshold == 0.55
    assert cal.clips[0].max_smoothed is None
    assert max_smoothed([(0.0, 0.9)], ScoringSettings()) is None
    with pytest.raises(ValueError):
        calibrate([], [])


def test_a_capped_threshold_is_the_round_cap():
    """A real call that scores high hits the cap (ceiling - margin): the card gets 0.92, not 0.9199999999999999."""
    cal = calibrate([0.1, 0.2], [_clip("hot", [0.95] * 60)])
    assert cal.threshold == 0.92 and repr(cal.threshold) == "0.92" and cal.raise_threshold == 0.97
