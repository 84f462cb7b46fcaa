import math

import pytest

from streamguard.scoring.verdicts import Verdict, boost, id_strategy, is_confident, strategy, verdict_for


class TestIdStrategy:
    def test_mostly_fake_returns_mean_of_fake_scores(self):
        scores = [0.9] * 9 + [0.1]  # exactly 90 % >= 0.8
        assert id_strategy(scores) == pytest.approx(0.9)

    def test_mostly_real_returns_mean_of_real_scores(self):
        scores = [0.05] * 18 + [0.15] * 1 + [0.7]  # 19 of 20 <= 0.2
        assert id_strategy(scores) == pytest.approx((0.05 * 18 + 0.15) / 19)

    def test_mixed_returns_plain_mean(self):
        scores = [0.9] * 8 + [0.1] * 2  # 80 % fake: below 90 %
        assert id_strategy(scores) == pytest.approx(0.74)

    def test_threshold_boundaries_are_inclusive(self):
        assert id_strategy([0.8] * 10) == pytest.approx(0.8)
        assert id_strategy([0.2] * 10) == pytest.approx(0.2)

    def test_single_score_is_its_own_mean_not_nan(self):
        # deepware's int(len * 0.9) truncation returns NaN here; the rule as stated returns the score.
        assert id_strategy([0.5]) == 0.5
        assert id_strategy([0.95]) == 0.95

    def test_custom_t(self):
        assert id_strategy([0.7] * 10, t=0.6) == pytest.approx(0.7)
        assert id_strategy([0.7] * 9 + [0.0], t=0.9) == pytest.approx(0.63)

    @pytest.mark.parametrize("bad", [[], [float("nan")], [1.2], [-0.1]])
    def test_rejects_bad_input(self, bad):
        with pytest.raises(ValueError):
            id_strategy(bad)


class TestStrategy:
    def test_fake_person_confident_is_boosted_and_clipped(self):
        # both people far from 0.5: confident; max 0.95 → 0.95 - log10(0.95) = 0.972
        assert strategy([0.95, 0.02]) == pytest.approx(0.95 - math.log10(0.95))
        assert strategy([0.99, 0.99]) == 0.99  # boost above 0.99 is clipped

    def test_fake_person_not_confident_returns_max(self):
        assert strategy([0.85, 0.5]) == pytest.approx(0.85)

    def test_all_real_confident_returns_min(self):
        assert strategy([0.1, 0.05, 0.12]) == pytest.approx(0.05)

    def test_all_real_not_confident_returns_mean(self):
        assert strategy([0.3, 0.5]) == pytest.approx(0.4)

    def test_max_exactly_at_fake_threshold(self):
        # 0.8 with 0.2: mean |p - .5| * 2 = 0.6 < 0.7, not confident → the max itself
        assert strategy([0.8, 0.2]) == pytest.approx(0.8)

    def test_clip_low(self):
        assert strategy([0.0, 0.001]) == 0.01

    def test_confidence_boundary(self):
        assert is_confident([0.85, 0.15])  # exactly 0.7
        assert not is_confident([0.84, 0.16])

    def test_boost(self):
        assert boost(0.8) == pytest.approx(0.8 - math.log10(0.8))
        assert boost(0.9) > 0.9

    def test_single_person(self):
        assert strategy([0.3]) == pytest.approx(0.3)
        assert strategy([0.9]) == pytest.approx(0.9 - math.log10(0.9))

    def test_rejects_empty(self):
        with pytest.raises(ValueError):
            strategy([])


def test_verdict_for():
    assert verdict_for(None, 0.5) is Verdict.NO_FACE
    assert verdict_for(0.5, 0.5) is Verdict.FAKE
    assert verdict_for(0.49, 0.5) is Verdict.REAL
