"""Live per-participant scoring: a sliding time window of P(fake), median smoothing, and alert hysteresis.

One `ParticipantScorer` per participant. It is pure and synchronous: every timestamp comes from the caller (media
pts or wall clock, non-decreasing), so the same inputs always give the same transitions and it is tested alone.

How a verdict forms (defaults, at the sampler's 1 FPS):

- Every scored sample enters a window of the last `window_s` = 10 s (10 samples). Low-quality faces and frames
  without the participant's face are *states*, never samples: nothing is written into the window for them, so a
  bad period can neither raise an alert nor count as evidence that a face is real.
- The smoothed score is the window's median (Frigate calls a true positive when the median of the score history
  crosses 0.7). A median only moves when at least half the window moves: k outlier frames cannot lift it above
  the real frames' scores while k < n / 2, so with `min_window_samples` = 5 one or two bad frames never count.
- `alert.raised` needs the median >= `raise_threshold` on `raise_after` = 3 consecutive scored samples;
  `alert.cleared` needs it < `clear_threshold` on `clear_after` = 5 consecutive scored samples. Between the two
  thresholds nothing changes (hysteresis), so a score hovering near one threshold does not flap. Without an alert,
  a smoothed score at or over the model's own (card) threshold reads `suspicious`, below it `ok`.

Numbers behind the defaults (simulated 10-minute calls at 1 FPS, 2,000 per row; the first two are replayed by
`tests/test_live_scoring.py`):

- real face, per-second scores ~ Beta(2, 8) (mean 0.2): 0 % of calls get an alert (raw per-frame 0.7: 23 %);
- real face with 7 % of frames replaced by confident errors ~ U(0.7, 1) (deepware flags ~7 % of real 10 s clips):
  0.3 % of calls (raise_after = 1: 0.9 %; 15 % error frames: 11 %; every raw frame over 0.7 would alert all calls);
- fake face ~ Beta(8, 2) (mean 0.8) from the start: raised at the 7th sample (5 to fill the window + 2); a face
  turning fake mid-call: median 8 s, p90 10 s after the switch; a fake with 25 % dropout frames scoring < 0.1
  (turned away, occluded): median 6 s, where the window's mean needs 24 s, the reason for the median.

Smoothing removes frame noise, not errors that last longer than the window: if a real face's logit drifts with
~10 s correlation (AR(1), rho 0.9, sd 1 around P = 0.2), 32 % of 10-minute calls alert with these defaults;
window_s = 30 brings that to 3 % for ~12 s more latency after a mid-call switch (raise_after = 10 at 10 s: 9 %).
Those are knobs for a model whose errors are known to persist; the default window is 10 s (10 samples at 1 FPS).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from enum import Enum

from streamguard.config import CardThresholds, ScoringSettings


class ParticipantState(str, Enum):
    WARMING_UP = "warming_up"  # fewer than min_window_samples scored samples in the window
    OK = "ok"  # scored, not over the raise threshold
    # Smoothed score at or over the model's own threshold (the card's) but no alert: between the thresholds, or over
    # the raise threshold for fewer than raise_after samples. Not "ok": the model calls this face fake.
    SUSPICIOUS = "suspicious"
    ALERT = "alert"  # alert raised and not cleared
    LOW_QUALITY = "low_quality"  # faces seen, but none scorable for stale_after_s
    NO_FACE = "no_face"  # no face for stale_after_s


@dataclass(frozen=True, slots=True)
class StateChanged:
    ts: float
    old: ParticipantState
    new: ParticipantState


@dataclass(frozen=True, slots=True)
class AlertRaised:
    ts: float
    smoothed: float  # the window's smoothed score at the raising sample
    p_fake: float  # the raising sample's own score
    samples: int  # scored samples in the window
    threshold: float


@dataclass(frozen=True, slots=True)
class AlertCleared:
    ts: float
    smoothed: float
    samples: int
    threshold: float
    raised_at: float
    duration_s: float


Transition = StateChanged | AlertRaised | AlertCleared


class ParticipantScorer:
    """One participant's window, smoothed score, state and alert latch.

    Each call returns the transitions it caused, in order: alert events first, then the state change.
    `alert_active` is the latch: once raised it stays raised (through no-face and low-quality periods, while the
    window is too thin for a verdict) until `clear_after` scored samples say otherwise. `state` says what is seen
    now, so a raised alert whose face is gone reads state no_face with `alert_active` True.
    """

    def __init__(self, settings: ScoringSettings | None = None, *, card_threshold: CardThresholds | float = 0.5):
        self.settings = settings or ScoringSettings()
        self.raise_threshold, self.clear_threshold = self.settings.thresholds(card_threshold)
        card = card_threshold.threshold if isinstance(card_threshold, CardThresholds) else float(card_threshold)
        self.suspicious_threshold = min(card, self.raise_threshold)  # where "ok" ends
        self._window: deque[tuple[float, float]] = deque()
        self._over = 0  # consecutive scored samples with smoothed >= raise threshold
        self._under = 0  # consecutive scored samples with smoothed < clear threshold (while raised)
        self._raised_at: float | None = None
        self._state = ParticipantState.WARMING_UP
        self._start: float | None = None  # first timestamp seen: "stale" is measured from here at the latest
        self._now: float | None = None
        self._last_face: float | None = None  # last scored or low-quality face
        self._last_scored: float | None = None
        self.scored = self.low_quality = self.no_face = 0
        self.last_low_quality_reason: str | None = None

    # -- inputs -----------------------------------------------------------------------------------------------

    def add_score(self, ts: float, p_fake: float) -> list[Transition]:
        if not (0.0 <= p_fake <= 1.0):  # also rejects NaN: a broken model must not read as "real"
            raise ValueError(f"p_fake must be in [0, 1], got {p_fake}")
        self._advance(ts)
        self._window.append((ts, float(p_fake)))
        self._last_face = self._last_scored = ts
        self.scored += 1
        out: list[Transition] = []
        self._reset_if_thin()
        smoothed = self.smoothed
        if smoothed is not None:
            self._over = self._over + 1 if smoothed >= self.raise_threshold else 0
            self._under = self._under + 1 if smoothed < self.clear_threshold else 0
            if self._raised_at is None and self._over >= self.settings.raise_after:
                self._raised_at = ts
                self._under = 0
                out.append(AlertRaised(ts, smoothed, float(p_fake), len(self._window), self.raise_threshold))
            elif self._raised_at is not None and self._under >= self.settings.clear_after:
                out.append(
                    AlertCleared(
                        ts, smoothed, len(self._window), self.clear_threshold, self._raised_at, ts - self._raised_at
                    )
                )
                self._raised_at = None
                self._over = 0
        return out + self._update_state()

    def add_low_quality(self, ts: float, reason: str = "") -> list[Transition]:
        """A face of this participant was found but rejected (too small, blurry...): a state, never a sample."""
        self._advance(ts)
        self._last_face = ts
        self.low_quality += 1
        self.last_low_quality_reason = reason or None
        return self._update_state()

    def add_no_face(self, ts: float) -> list[Transition]:
        """A frame was sampled and this participant's face was not in it."""
        self._advance(ts)
        self.no_face += 1
        return self._update_state()

    def tick(self, now: float) -> list[Transition]:
        """Let time pass without an observation (e.g. once a second): ages the window, may enter no_face."""
        self._advance(now)
        return self._update_state()

    # -- views ------------------------------------------------------------------------------------------------

    @property
    def state(self) -> ParticipantState:
        return self._state

    @property
    def alert_active(self) -> bool:
        return self._raised_at is not None

    @property
    def raised_at(self) -> float | None:
        return self._raised_at

    @property
    def smoothed(self) -> float | None:
        """The window's median (or mean); None until the window holds min_window_samples scored samples."""
        if len(self._window) < self.settings.min_window_samples:
            return None
        p = [p for _, p in self._window]  # ~10 values: plain Python beats numpy's call overhead here
        return statistics.median(p) if self.settings.smoothing == "median" else statistics.fmean(p)

    @property
    def window(self) -> list[float]:
        """The raw scores in the window, oldest first."""
        return [p for _, p in self._window]

    def sparkline(self) -> list[tuple[float, float]]:
        """The window's (ts, p_fake) points, oldest first."""
        return list(self._window)

    # -- internals --------------------------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"timestamp must be finite, got {now}")
        if self._now is not None and now < self._now:
            # A rewound clock would make old samples look new; a stream whose pts restart needs a new scorer.
            raise ValueError(f"timestamps must not go backwards ({now} < {self._now})")
        if self._start is None:
            self._start = now
        self._now = now
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] <= horizon:
            self._window.popleft()

    def _reset_if_thin(self) -> None:
        if len(self._window) < self.settings.min_window_samples:
            # Too little evidence for a verdict: the consecutive counts restart once the window has refilled.
            self._over = self._under = 0

    def _update_state(self) -> list[Transition]:
        self._reset_if_thin()
        new = self._compute_state()
        if new is self._state:
            return []
        old, self._state = self._state, new
        assert self._now is not None
        return [StateChanged(self._now, old, new)]

    def _compute_state(self) -> ParticipantState:
        now, start, stale = self._now, self._start, self.settings.stale_after_s
        assert now is not None and start is not None
        # A participant never seen is measured from the first call, so a new scorer is warming_up, not no_face.
        if now - (self._last_face if self._last_face is not None else start) >= stale:
            return ParticipantState.NO_FACE
        if now - (self._last_scored if self._last_scored is not None else start) >= stale:
            return ParticipantState.LOW_QUALITY
        if self._raised_at is not None:
            return ParticipantState.ALERT
        if len(self._window) < self.settings.min_window_samples:
            return ParticipantState.WARMING_UP
        smoothed = self.smoothed
        over_model = smoothed is not None and smoothed >= self.suspicious_threshold
        return ParticipantState.SUSPICIOUS if self._over > 0 or over_model else ParticipantState.OK
