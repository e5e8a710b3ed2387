import math

import pytest

from huatuo.stats import Estimate, paired_difference, slope, t_coverage, t_critical


def test_a_constant_shift_gives_an_interval_of_exactly_that_shift():
    baseline = [0.0, 0.125, 1.0, 0.5, 0.25, 0.75, 0.0, 1.0]
    gain = paired_difference(baseline, [b + 0.25 for b in baseline], n_resamples=500, seed=3)
    assert (gain.value, gain.low, gain.high) == (0.25, 0.25, 0.25)
    assert gain.above_zero


def test_the_bootstrap_interval_is_seeded_and_brackets_the_mean():
    baseline = [0.1] * 40
    treatment = [1.0 if i % 3 == 0 else 0.1 for i in range(40)]
    first = paired_difference(baseline, treatment, seed=7)
    assert first == paired_difference(baseline, treatment, seed=7)
    assert first.low < first.value < first.high
    assert first.value == pytest.approx(14 * 0.9 / 40)
    # the mean of 0/0.9 differences, 14 of 40 nonzero: its bootstrap spread is about 0.9 * sqrt(p(1-p)/n)
    spread = 0.9 * math.sqrt(14 / 40 * 26 / 40 / 40)
    assert first.high - first.low == pytest.approx(2 * 1.96 * spread, rel=0.15)
    assert first.above_zero


def test_no_gain_gives_an_interval_around_zero():
    baseline = [1.0, 0.1, 0.0, 1.0, 0.1, 0.0] * 5
    treatment = baseline[1:] + baseline[:1]
    gain = paired_difference(baseline, treatment, seed=0)
    assert gain.low < 0 < gain.high and not gain.above_zero


def test_paired_difference_rejects_unpaired_samples():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])


def test_a_noiseless_line_gives_its_slope_with_zero_width():
    xs = list(range(10))
    trend = slope(xs, [2.0 * x + 1.0 for x in xs])
    assert trend.value == pytest.approx(2.0)
    assert trend.high - trend.low == pytest.approx(0.0, abs=1e-12)


def test_slope_interval_matches_a_hand_computed_regression():
    # mean x 3, mean y 4, Sxx 10, Sxy 6: slope 0.6; residuals -0.8 0.6 1 -0.6 -0.2 give SSR 2.4,
    # s^2 = 2.4 / 3, se = sqrt(0.8 / 10); t(0.975, 3) = 3.182446 (tables)
    trend = slope([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    half = 3.182446 * math.sqrt(0.08)
    assert trend.value == pytest.approx(0.6)
    assert trend.low == pytest.approx(0.6 - half, abs=1e-5)
    assert trend.high == pytest.approx(0.6 + half, abs=1e-5)
    assert not trend.above_zero


def test_slope_of_two_points_has_no_bounded_interval():
    trend = slope([0, 1], [0.2, 0.5])
    assert trend.value == pytest.approx(0.3)
    assert (trend.low, trend.high) == (-math.inf, math.inf) and not trend.above_zero
    with pytest.raises(ValueError, match="two distinct"):
        slope([1, 1, 1], [0, 1, 2])


@pytest.mark.parametrize(
    "df, table", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423)]
)
def test_t_critical_matches_the_tables(df, table):
    assert t_critical(0.95, df) == pytest.approx(table, abs=1e-4)
    assert t_coverage(t_critical(0.95, df), df) == pytest.approx(0.95, abs=1e-9)


def test_t_critical_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 4, 7, 12, 51, 200):
        for confidence in (0.8, 0.95, 0.99):
            expected = stats.t.ppf(1 - (1 - confidence) / 2, df)
            assert t_critical(confidence, df) == pytest.approx(expected, rel=1e-8)


def test_estimate_text_names_the_interval():
    assert Estimate(0.1, 0.02, 0.18).text() == "+0.100 (95% CI +0.020 to +0.180)"
