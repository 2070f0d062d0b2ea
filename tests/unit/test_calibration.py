import numpy as np
import pytest

from kernels.calibration import Calibration, calibrate_threshold
from kernels.errors import InvalidInputError


def test_thresholds_hit_their_false_positive_rate_on_fresh_clean_scores():
    rng = np.random.default_rng(0)
    shift = np.array([0.0, 5.0, -3.0])  # classes score differently; standardization removes that
    labels = rng.integers(0, 3, 20_000)
    cal = calibrate_threshold(rng.normal(size=20_000) + shift[labels], labels, 3, "lrt", 8, (0.01, 0.05))
    fresh = rng.integers(0, 3, 50_000)
    for fpr in (0.01, 0.05):
        observed = cal.is_attacked(rng.normal(size=50_000) + shift[fresh], fresh, fpr).mean()
        assert abs(observed - fpr) < 4 * np.sqrt(fpr * (1 - fpr) / 20_000)


def test_classes_with_few_images_share_the_global_threshold():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(5000, int), np.ones(100, int)]
    cal = calibrate_threshold(rng.normal(size=5100), labels, 2, "lrt", 8, (0.01,))
    assert cal.per_class[0.01].tolist() == [True, False]  # 5000 * 1% = 50 expected; 100 * 1% = 1


def test_calibration_round_trips_through_json():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500)
    cal = calibrate_threshold(rng.normal(size=500), labels, 2, "vote", 16)
    back = Calibration.from_json(cal.to_json())
    scores = rng.normal(size=50)
    np.testing.assert_array_equal(back.is_attacked(scores, labels[:50], 0.02), cal.is_attacked(scores, labels[:50], 0.02))


def test_uncalibrated_rates_and_nan_scores_are_refused():
    cal = calibrate_threshold(np.arange(10.0), np.zeros(10, int), 1, "lrt", 4, (0.05,))
    with pytest.raises(InvalidInputError, match="no threshold calibrated for FPR 0.01"):
        cal.is_attacked(np.zeros(1), np.zeros(1, int), 0.01)
    with pytest.raises(InvalidInputError, match="NaN"):
        calibrate_threshold(np.array([0.0, np.nan]), np.zeros(2, int), 1, "lrt", 4)
