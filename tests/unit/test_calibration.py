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


def binomial_interval(p: float, n: int) -> tuple[float, float]:
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    return p - half, p + half


def clean_scores(rng, images_per_class, repeats, draw_noise=0.2):
    """Scores of clean images, each scored under ``repeats`` independent draws: a per-image level
    (N(0, 1)) plus a smaller per-draw term, as randomized fingerprints give."""
    labels = np.repeat(np.arange(len(images_per_class)), images_per_class)
    level = rng.normal(size=len(labels))
    ids = np.tile(np.arange(len(labels)), repeats)
    scores = level[ids] + draw_noise * rng.normal(size=len(ids))
    return scores, labels[ids], ids


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_every_class_keeps_its_nominal_rate_on_held_out_images_even_with_one_calibration_image(fpr):
    """Repeated draws of one image are not more images: a class seen through 1 or 5 images must not get
    a mean and spread (or a threshold) of its own, else its held-out false-positive rate explodes."""
    rng = np.random.default_rng(7)
    sizes = [5000, 2000, 1, 5]
    scores, labels, ids = clean_scores(rng, sizes, repeats=10)
    cal = calibrate_threshold(scores, labels, 4, "lrt", 8, (fpr,), image_ids=ids)
    assert cal.counts.tolist() == sizes
    held_out = 2000
    for c in range(4):
        fresh, fresh_labels, _ = clean_scores(rng, [held_out], repeats=1)
        realized = cal.is_attacked(fresh, np.full(held_out, c), fpr).mean()
        lo, hi = binomial_interval(fpr, held_out)
        assert lo <= realized <= hi, f"class {c} ({sizes[c]} calibration images): FPR {realized:.4f} at nominal {fpr}"


def test_a_class_counts_its_images_not_its_draws():
    rng = np.random.default_rng(3)
    scores, labels, ids = clean_scores(rng, [300, 300], repeats=10)
    cal = calibrate_threshold(scores, labels, 2, "lrt", 8, (0.01,), image_ids=ids)
    # 300 images x 1% = 3 expected false positives: too few for a class's own threshold,
    # although 3,000 scores x 1% would be 30
    assert cal.counts.tolist() == [300, 300] and not cal.per_class[0.01].any()
