from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from streamguard.config import ScoringSettings
from streamguard.scoring.live import (
    AlertCleared,
    AlertRaised,
    ParticipantScorer,
    ParticipantState,
    StateChanged,
    Transition,
)

S = ParticipantState


def feed(scorer: ParticipantScorer, scores, t0: float = 0.0, dt: float = 1.0) -> list[tuple[float, Transition]]:
    """Feed per-sample scores at t0, t0 + dt, ...; return (ts, transition) for everything that happened."""
    out = []
    for i, p in enumerate(scores):
        ts = t0 + i * dt
        out += [(ts, tr) for tr in scorer.add_score(ts, float(p))]
    return out


def raised(events) -> list[float]:
    return [ts for ts, tr in events if isinstance(tr, AlertRaised)]


def cleared(events) -> list[float]:
    return [ts for ts, tr in events if isinstance(tr, AlertCleared)]


def instant(**kw) -> ScoringSettings:
    """A 1-sample window: smoothed == the last score, to test the counters alone."""
    return ScoringSettings(window_s=1.0, min_window_samples=1, **kw)


class TestSettings:
    def test_default_thresholds_follow_the_model_card(self):
        s = ScoringSettings()
        assert s.thresholds(0.5) == pytest.approx((0.7, 0.5))  # Frigate's 0.7 for a 0.5 card
        assert s.thresholds(0.3) == pytest.approx((0.58, 0.3))  # 0.3 + 0.4 x 0.7
        assert s.thresholds(0.9) == pytest.approx((0.94, 0.9))  # a strict card still leaves room to raise
        assert ParticipantScorer(s, card_threshold=0.4).raise_threshold == pytest.approx(0.64)

    def test_explicit_thresholds_win(self):
        s = ScoringSettings(raise_threshold=0.8, clear_threshold=0.3)
        assert s.thresholds(0.5) == (0.8, 0.3)

    def test_clear_must_be_below_raise(self):
        with pytest.raises(ValidationError):
            ScoringSettings(raise_threshold=0.6, clear_threshold=0.6)
        with pytest.raises(ValueError, match="clear_threshold"):
            ScoringSettings(clear_threshold=0.95).thresholds(0.9)  # clear above the derived raise (0.94)
        with pytest.raises(ValueError):
            ParticipantScorer(ScoringSettings(raise_threshold=0.4))  # clear defaults to the card's 0.5

    def test_rejects_bad_inputs(self):
        sc = ParticipantScorer()
        with pytest.raises(ValueError):
            sc.add_score(0.0, float("nan"))
        with pytest.raises(ValueError):
            sc.add_score(0.0, 1.2)
        sc.add_score(5.0, 0.1)
        with pytest.raises(ValueError, match="backwards"):
            sc.add_score(4.0, 0.1)
        with pytest.raises(ValueError):
            sc.tick(float("inf"))


class TestWarmingUp:
    def test_no_verdict_until_the_window_holds_min_samples(self):
        sc = ParticipantScorer()
        events = feed(sc, [0.99] * 4)
        assert events == [] and sc.state is S.WARMING_UP and sc.smoothed is None
        assert sc.window == [0.99] * 4
        events = feed(sc, [0.99], t0=4.0)
        assert events == [(4.0, StateChanged(4.0, S.WARMING_UP, S.SUSPICIOUS))]
        assert sc.smoothed == pytest.approx(0.99)

    def test_real_face_becomes_ok(self):
        sc = ParticipantScorer()
        events = feed(sc, [0.1] * 5)
        assert [tr for _, tr in events] == [StateChanged(4.0, S.WARMING_UP, S.OK)]


class TestBadFrames:
    @pytest.mark.parametrize(
        "bad_at",
        [[0], [0, 1], [3, 4], [20], [20, 21], [20, 25], [4, 9]],
        ids=lambda b: "bad@" + ",".join(map(str, b)),
    )
    def test_one_or_two_bad_frames_never_raise(self, bad_at):
        scores = np.full(60, 0.1)
        scores[bad_at] = 0.99
        sc = ParticipantScorer()
        events = feed(sc, scores)
        assert raised(events) == []
        assert S.SUSPICIOUS not in {tr.new for _, tr in events if isinstance(tr, StateChanged)}
        assert sc.state is S.OK

    def test_bad_frames_in_a_fake_stream_do_not_hide_it(self):
        # The median ignores outliers both ways: low frames (turned head, occlusion) in a fake stream don't count.
        scores = np.full(20, 0.9)
        scores[[5, 6]] = 0.01
        assert raised(feed(ParticipantScorer(), scores)) == [6.0]  # as early as without them


class TestRaise:
    def test_sustained_fake_raises_after_exactly_raise_after_samples_once_the_window_allows(self):
        sc = ParticipantScorer()  # min 5 samples, raise_after 3
        events = feed(sc, [0.9] * 10)
        assert [(ts, type(tr)) for ts, tr in events] == [
            (4.0, StateChanged),  # warming_up → suspicious: first sample with a verdict, over 1
            (6.0, AlertRaised),  # over 3
            (6.0, StateChanged),  # suspicious → alert
        ]
        alert = events[1][1]
        assert alert == AlertRaised(6.0, pytest.approx(0.9), pytest.approx(0.9), 7, 0.7)
        assert events[2][1] == StateChanged(6.0, S.SUSPICIOUS, S.ALERT)
        assert sc.alert_active and sc.raised_at == 6.0 and sc.state is S.ALERT

    @pytest.mark.parametrize("raise_after", [1, 2, 5])
    def test_raise_after_is_configurable(self, raise_after):
        events = feed(ParticipantScorer(instant(raise_after=raise_after)), [0.9] * 10)
        assert raised(events) == [float(raise_after - 1)]

    def test_fake_after_a_real_history_needs_half_the_window(self):
        # 20 s real then fake: the 10-sample median is 0.5 with 5 fake samples, 0.9 with 6 (t = 25): +2 → 27.
        events = feed(ParticipantScorer(), [0.1] * 20 + [0.9] * 20)
        assert raised(events) == [27.0]

    def test_interrupted_run_restarts_the_count(self):
        events = feed(ParticipantScorer(instant()), [0.9, 0.9, 0.6, 0.9, 0.9, 0.9])
        assert raised(events) == [5.0]

    def test_raises_once_while_the_fake_continues(self):
        events = feed(ParticipantScorer(), [0.9] * 300)
        assert raised(events) == [6.0] and cleared(events) == []


class TestHysteresis:
    def test_hovering_between_thresholds_neither_clears_nor_reraises(self):
        sc = ParticipantScorer()
        events = feed(sc, [0.9] * 10)
        events += feed(sc, 0.6 + 0.05 * np.sin(np.arange(120)), t0=10.0)  # 0.55..0.65: inside [0.5, 0.7)
        assert raised(events) == [6.0] and cleared(events) == []
        assert sc.state is S.ALERT and sc.alert_active

    def test_hovering_between_thresholds_without_an_alert_is_suspicious_and_never_raises(self):
        # Over the model's threshold (0.5) the model calls the face fake: not an alert yet, but not "ok" either.
        sc = ParticipantScorer()
        events = feed(sc, 0.6 + 0.09 * np.sin(np.arange(120)))  # up to 0.69: never over 0.7
        assert raised(events) == [] and sc.state is S.SUSPICIOUS
        assert {tr.new for _, tr in events if isinstance(tr, StateChanged)} == {S.SUSPICIOUS}
        feed(sc, [0.2] * 10, t0=120.0)
        assert sc.state is S.OK

    def test_clears_after_clear_after_consecutive_low_samples(self):
        sc = ParticipantScorer(instant())  # clear_after 5
        events = feed(sc, [0.9] * 3 + [0.1] * 4 + [0.6] + [0.1] * 5)
        assert raised(events) == [2.0]
        assert cleared(events) == [12.0]  # the 0.6 at t = 7 reset the count: 8..12
        clear = next(tr for _, tr in events if isinstance(tr, AlertCleared))
        assert clear == AlertCleared(12.0, pytest.approx(0.1), 1, 0.5, 2.0, 10.0)
        assert sc.state is S.OK and not sc.alert_active

    def test_clearing_with_the_default_window(self):
        # Fake t = 0..19, real from 20: the median falls under 0.5 at t = 25 (6 real of 10), +4 → 29.
        sc = ParticipantScorer()
        events = feed(sc, [0.9] * 20 + [0.1] * 20)
        assert raised(events) == [6.0] and cleared(events) == [29.0]
        assert [tr.new for _, tr in events if isinstance(tr, StateChanged)] == [S.SUSPICIOUS, S.ALERT, S.OK]

    def test_reraise_after_clear_needs_raise_after_again(self):
        events = feed(ParticipantScorer(instant()), [0.9] * 3 + [0.1] * 5 + [0.9] * 3)
        assert raised(events) == [2.0, 10.0] and cleared(events) == [7.0]


class TestNoFaceAndLowQuality:
    def test_no_face_period_keeps_the_alert_and_adds_no_real_filler(self):
        sc = ParticipantScorer()
        events = feed(sc, [0.9] * 10)
        for t in range(10, 70):
            events += [(t, tr) for tr in sc.add_no_face(float(t))]
        assert cleared(events) == []
        assert sc.alert_active and sc.state is S.NO_FACE
        assert sc.window == [] and sc.smoothed is None  # aged out by time, nothing put in its place
        # stale_after_s = 5: the last face was at t = 9
        assert (14, StateChanged(14.0, S.ALERT, S.NO_FACE)) in events

        # The face comes back real: clearing needs a full verdict window (5) and then clear_after (5) samples.
        back = feed(sc, [0.1] * 12, t0=70.0)
        assert back[0] == (70.0, StateChanged(70.0, S.NO_FACE, S.ALERT))
        assert cleared(back) == [70.0 + 4 + 4]

    def test_face_returning_fake_resumes_the_alert_without_a_second_raise(self):
        sc = ParticipantScorer()
        feed(sc, [0.9] * 10)
        sc.tick(40.0)
        assert sc.state is S.NO_FACE and sc.window == []
        back = feed(sc, [0.9] * 20, t0=41.0)
        assert raised(back) == [] and sc.state is S.ALERT

    def test_low_quality_period_never_counts_as_real(self):
        sc = ParticipantScorer()
        events = feed(sc, [0.9] * 10)
        for t in range(10, 40):
            events += [(t, tr) for tr in sc.add_low_quality(float(t), "too_small")]
        assert cleared(events) == [] and sc.alert_active
        assert sc.state is S.LOW_QUALITY and sc.window == []
        assert sc.low_quality == 30 and sc.last_low_quality_reason == "too_small"

    def test_low_quality_interleaved_is_no_sample(self):
        sc = ParticipantScorer()
        events = []
        for t in range(12):
            if t % 2:
                events += sc.add_low_quality(float(t), "blurry")
            else:
                events += sc.add_score(float(t), 0.9)
        # 6 scored samples in 12 s, none replaced by filler: the window holds the last 10 s of them only.
        assert sc.window == [0.9] * 5 and sc.smoothed == pytest.approx(0.9)
        assert sc.state is S.SUSPICIOUS  # brief rejections do not flip the state to low_quality
        assert not any(isinstance(tr, StateChanged) and tr.new is S.LOW_QUALITY for tr in events)

    def test_low_quality_then_no_face(self):
        sc = ParticipantScorer()
        feed(sc, [0.1] * 6)
        for t in range(6, 12):
            sc.add_low_quality(float(t), "blurry")
        assert sc.state is S.LOW_QUALITY  # faces seen, none scorable since t = 5
        for t in range(12, 18):
            sc.add_no_face(float(t))
        assert sc.state is S.NO_FACE  # no face at all since t = 11
        feed(sc, [0.1] * 5, t0=18.0)
        assert sc.state is S.OK

    def test_a_new_participant_is_warming_up_not_no_face(self):
        sc = ParticipantScorer()
        assert sc.add_no_face(100.0) == [] and sc.state is S.WARMING_UP
        assert sc.tick(105.0) == [StateChanged(105.0, S.WARMING_UP, S.NO_FACE)]
        assert sc.no_face == 1


class TestWindow:
    def test_eviction_by_time(self):
        sc = ParticipantScorer()
        feed(sc, [0.9] * 10)
        assert len(sc.window) == 10
        sc.add_score(10.0, 0.1)  # t = 0 leaves: the window is (0, 10]
        assert len(sc.window) == 10 and sc.sparkline()[0] == (1.0, 0.9)
        sc.add_score(30.0, 0.1)
        assert sc.sparkline() == [(30.0, 0.1)] and sc.smoothed is None

    def test_tick_ages_the_window(self):
        sc = ParticipantScorer()
        feed(sc, [0.1] * 10)
        sc.tick(14.5)  # keeps t in (4.5, 14.5]: 5..9
        assert sc.window == [0.1] * 5 and sc.state is S.NO_FACE
        sc.tick(15.5)
        assert len(sc.window) == 4

    def test_window_is_in_seconds_not_samples(self):
        sc = ParticipantScorer()
        feed(sc, [0.2] * 40, dt=0.5)  # 2 FPS: 20 samples in 10 s
        assert len(sc.window) == 20
        assert [ts for ts, _ in sc.sparkline()] == [10.0 + 0.5 * i for i in range(20)]

    def test_thin_window_resets_the_counts(self):
        # Over twice, a gap that empties the window, then over twice more: no alert (the run was broken).
        sc = ParticipantScorer(ScoringSettings(min_window_samples=1))
        events = feed(sc, [0.9, 0.9])
        events += [(20.0, tr) for tr in sc.tick(20.0)]
        events += feed(sc, [0.9, 0.9], t0=30.0)
        assert raised(events) == []
        assert raised(feed(sc, [0.9], t0=32.0)) == [32.0]


# Replays of real-ish score sequences: one score per second, as the sampler produces them.


def run_call(scores: np.ndarray, settings: ScoringSettings | None = None, jitter: np.ndarray | None = None):
    sc = ParticipantScorer(settings)
    ts = np.arange(len(scores), dtype=float) + (jitter if jitter is not None else 0.0)
    events = [(float(t), tr) for t, p in zip(ts, scores, strict=True) for tr in sc.add_score(float(t), float(p))]
    return sc, events


class TestReplay:
    def test_real_calls_raise_no_alert(self):
        rng = np.random.default_rng(20240601)
        for _ in range(20):  # 20 ten-minute calls, scores ~ Beta(2, 8): mean 0.2
            scores = rng.beta(2, 8, 600)
            jitter = rng.uniform(-0.2, 0.2, 600)  # sampler ticks are not exact
            _, events = run_call(scores, jitter=jitter)
            assert raised(events) == []

    def test_real_calls_with_confident_error_frames_raise_no_alert(self):
        # 7 % of frames replaced by confident mistakes (deepware's real-clip error rate, applied per frame).
        # Simulated over 2,000 calls the defaults alert on 0.3 % of them: allow one call in 100.
        rng = np.random.default_rng(7)
        alerting = 0
        for _ in range(100):
            scores = rng.beta(2, 8, 600)
            bad = rng.random(600) < 0.07
            scores[bad] = rng.uniform(0.7, 1.0, bad.sum())
            assert bad.sum() > 20
            _, events = run_call(scores)
            alerting += bool(raised(events))
            # Without smoothing, every one of these calls would alert on its first bad frame.
            _, raw = run_call(scores, ScoringSettings(window_s=1.0, min_window_samples=1, raise_after=1))
            assert raised(raw)
        assert alerting <= 1

    def test_fake_call_raises_within_seconds(self):
        rng = np.random.default_rng(11)
        latencies = []
        for _ in range(20):  # fake face from the start, scores ~ Beta(8, 2): mean 0.8
            sc, events = run_call(rng.beta(8, 2, 600))
            assert len(raised(events)) == 1 and cleared(events) == []
            latencies.append(raised(events)[0])
            assert sc.state is S.ALERT
        assert min(latencies) == 6.0  # the earliest possible: 5 samples to fill, 3 over
        assert max(latencies) <= 20.0 and np.median(latencies) <= 8.0

    def test_face_turning_fake_mid_call(self):
        rng = np.random.default_rng(5)
        for _ in range(20):
            scores = np.concatenate([rng.beta(2, 8, 120), rng.beta(8, 2, 120)])
            _, events = run_call(scores)
            (t,) = raised(events)
            assert 120 + 5 <= t <= 120 + 20  # at least half the window must turn fake first
