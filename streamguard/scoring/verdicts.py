"""Per-person and per-file verdicts: deepware scanner's `id_strategy` and `strategy`.

Per person, `id_strategy(t=0.8)`: if at least 90 % of the scores are >= 0.8, their mean; elif at least 90 % are
<= 0.2, their mean; else the plain mean. Per file, `strategy` over people: "confident" when mean(|p - 0.5| * 2) >= 0.7;
if the most suspicious person scores >= 0.8 that score decides (boosted when confident), elif confident the least
suspicious does, else the mean; clipped to [0.01, 0.99].

Deepware computes "90 %" as `len(fake) >= int(len(pred) * 0.9)`: with fewer than two scores the truncation makes
the test pass on an empty selection and return NaN. We compare with the real fraction (count >= 0.9 * n), which is
what the rule says and agrees with deepware whenever it returns a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np

CLIP_LOW, CLIP_HIGH = 0.01, 0.99


class Verdict(str, Enum):
    FAKE = "fake"
    REAL = "real"
    NO_FACE = "no_face"
    ERROR = "error"


def id_strategy(scores: Sequence[float], t: float = 0.8) -> float:
    """One participant's score from their per-sample P(fake).

    If at least 90 % of the scores are >= t, the mean of those; elif at least 90 % are <= 1 - t, the mean of those;
    else the plain mean. A person whose samples agree is scored by the agreeing samples, so a few outliers do not
    pull a confident verdict towards 0.5.
    """
    p = _as_scores(scores)
    fake, real = p[p >= t], p[p <= 1.0 - t]
    if len(fake) >= 0.9 * len(p):
        return float(fake.mean())
    if len(real) >= 0.9 * len(p):
        return float(real.mean())
    return float(p.mean())


def is_confident(person_scores: Sequence[float] | np.ndarray) -> bool:
    """Deepware's "confident": the mean distance from 0.5, scaled to [0, 1], is at least 0.7."""
    p = _as_scores(person_scores)
    return bool(np.mean(np.abs(p - 0.5) * 2) >= 0.7)


def boost(p: float) -> float:
    """Deepware's label spread for a confident fake: p − log10(p) (0.8 → 0.897, 0.9 → 0.946)."""
    return p - float(np.log10(p))


def strategy(person_scores: Sequence[float], fake_at: float = 0.8) -> float:
    """A file's score from its participants' scores, clipped to [0.01, 0.99].

    If any person scores >= 0.8 the file is as fake as its most suspicious person (boosted when the people's
    scores are confident); elif confident, the minimum (everyone clearly real); else the mean.
    """
    p = _as_scores(person_scores)
    p_max = float(p.max())
    if p_max >= fake_at:
        score = boost(p_max) if is_confident(p) else p_max
    elif is_confident(p):
        score = float(p.min())
    else:
        score = float(p.mean())
    return float(np.clip(score, CLIP_LOW, CLIP_HIGH))


def verdict_for(score: float | None, threshold: float) -> Verdict:
    if score is None:
        return Verdict.NO_FACE
    return Verdict.FAKE if score >= threshold else Verdict.REAL


def _as_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(scores, dtype=np.float64).ravel()
    if p.size == 0:
        raise ValueError("no scores: a verdict needs at least one scored sample")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("scores must be probabilities in [0, 1]")
    return p
