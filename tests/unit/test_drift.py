"""A window of live scores against the calibration reference: clean traffic like the calibration's
raises no alarm (at most ``alpha`` of the time), shifted traffic does."""
import numpy as np
import pytest

from kernels.calibration import DRIFT_LEVELS, calibrate_threshold
from kernels.drift import ScoreWindow, compare
from kernels.errors import InvalidInputError

FPR = 0.01


def calibration(rng, n=1000):
    return calibrate_threshold(rng.normal(size=n), np.zeros(n, np.int64), 1, "lrt", 8, (FPR,))


def window(cal, scores):
    z = cal.standardize(scores, np.zeros(len(scores), np.int64))
    return ScoreWindow.of_scores(z, cal.is_attacked(scores, np.zeros(len(scores), np.int64), FPR),
                                 np.array(cal.reference["edges"]))


def test_the_reference_is_the_held_out_scores_histogram():
    cal = calibration(np.random.default_rng(0))
    ref = cal.reference
    assert ref["n"] == 500 and len(ref["edges"]) == len(DRIFT_LEVELS)
    np.testing.assert_allclose(np.array(ref["cumulative"]) / ref["n"], DRIFT_LEVELS, atol=2 / ref["n"])


def test_a_window_counts_like_a_loop_over_its_scores():
    rng = np.random.default_rng(1)
    edges = np.array([-1.0, 0.0, 0.5])
    scores = np.r_[rng.normal(size=50), np.nan, 0.0]
    w = ScoreWindow.of_scores(scores, np.arange(52) % 7 == 0, edges)
    brute = [sum(1 for s in scores if not np.isnan(s) and s <= e) for e in edges]
    assert w.cumulative.tolist() == brute and (w.scored, w.inputs, w.flagged) == (51, 52, 8)
    assert (w - w).cumulative.tolist() == [0, 0, 0]


def test_the_score_shift_test_rejects_clean_windows_at_most_alpha_of_the_time():
    """A two-sample test: the reference's own sampling noise (500 held-out scores) is accounted for."""
    rng = np.random.default_rng(2)
    rejected = []
    for _ in range(300):
        cal = calibration(rng)
        rejected.append(compare(cal.reference, window(cal, rng.normal(size=400)), FPR).shift_p_value < 0.01)
    assert np.mean(rejected) <= 0.025  # 1% by design; 2.5% of 300 would be rare (p < 0.01)


def test_the_flag_rate_test_rejects_a_threshold_at_nominal_at_most_alpha_of_the_time():
    """With a threshold whose rate is nominal (set on 20,000 images, so its own error is small), the
    one-sided binomial test alarms on at most ``alpha`` of clean windows. (A threshold set on few images
    can realize more than nominal: the test then rightly says the rate does not hold.)"""
    rng = np.random.default_rng(3)
    cal = calibration(rng, 40_000)
    rejected = [compare(cal.reference, window(cal, rng.normal(size=400)), FPR).flag_p_value < 0.01
                for _ in range(300)]
    assert np.mean(rejected) <= 0.025


@pytest.mark.parametrize("shift, what", [(-0.4, "flag rate"), (0.6, "distribution"), (None, "spread")])
def test_a_shift_of_clean_scores_raises_the_alarm_and_says_why(shift, what):
    rng = np.random.default_rng(3)
    cal = calibration(rng)
    live = rng.normal(size=800) * (1.6 if shift is None else 1.0) + (shift or 0.0)
    report = compare(cal.reference, window(cal, live), FPR)
    assert report.alarm, report.to_text()
    assert "ALARM" in report.to_text()
    if shift is not None and shift > 0:  # scores moved up: fewer flags, a detector gone blind
        assert report.flag_p_value > 0.01 and report.shift_p_value < 0.01


def test_an_unshifted_window_says_the_rate_holds():
    rng = np.random.default_rng(4)
    cal = calibration(rng)
    report = compare(cal.reference, window(cal, rng.normal(size=800)), FPR)
    assert not report.alarm and report.to_text().endswith("the false-positive rate holds (alpha 0.01)")
    assert report.flag_rate_ci95[0] <= report.flag_rate <= report.flag_rate_ci95[1]


def test_an_empty_window_or_another_banks_histogram_is_refused():
    cal = calibration(np.random.default_rng(5))
    with pytest.raises(InvalidInputError, match="no scored inputs"):
        compare(cal.reference, ScoreWindow(np.zeros(len(cal.reference["edges"]), int), 0, 0, 0), FPR)
    with pytest.raises(InvalidInputError, match="not the one whose calibration"):
        compare(cal.reference, ScoreWindow(np.zeros(3, int), 5, 5, 0), FPR)
