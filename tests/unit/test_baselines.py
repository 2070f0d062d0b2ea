"""The baselines are what they claim, computed the obvious way, and answer through the contract."""
import numpy as np
import pytest

from kernels.baselines import GrayPixels, LogitMargin, Mahalanobis, MaxSoftmax
from kernels.detector import Observations
from kernels.errors import InvalidInputError


def test_margin_and_max_softmax_are_the_textbook_quantities():
    logits = np.random.default_rng(0).normal(size=(50, 7)) * 4
    obs = Observations(logits.argmax(1), logits=logits)
    margin, _, _ = LogitMargin().raw_scores(obs)
    msp, _, _ = MaxSoftmax().raw_scores(obs)
    for i, z in enumerate(logits):
        top = sorted(z.tolist())
        assert margin[i] == pytest.approx(top[-1] - top[-2])
        assert msp[i] == pytest.approx(np.log(max(np.exp(z) / np.exp(z).sum())))


def test_mahalanobis_is_the_distance_to_the_predicted_class_mean_under_the_pooled_covariance():
    rng = np.random.default_rng(1)
    y = np.arange(600) % 3
    x = (rng.normal(size=(600, 4)) @ rng.normal(size=(4, 4)) + 3 * y[:, None]).astype(np.float32)
    det = Mahalanobis(ridge=0).fit(Observations(y, acts=x))
    means = np.stack([x[y == c].astype(np.float64).mean(0) for c in range(3)])
    r = x - means[y]
    cov = r.T @ r / (600 - 3)
    q = rng.normal(size=(5, 4)).astype(np.float32)
    want = [-(v - means[c]) @ np.linalg.solve(cov, v - means[c]) for v, c in zip(q.astype(np.float64), [0, 1, 2, 0, 1])]
    got, checked, draws = det.raw_scores(Observations(np.array([0, 1, 2, 0, 1]), acts=q))
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert checked.all() and draws.shape == (5, 0)


def test_mahalanobis_on_a_feature_map_uses_each_channels_mean_pixel_by_pixel():
    """Lee et al.'s pooling of a convolutional layer: a (channels, H, W) slice of the activations becomes
    one mean per channel, computed here with a loop over channels, then the same distance."""
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(300, 3, 2, 2)).astype(np.float32) + np.arange(3)[None, :, None, None]
    acts = np.concatenate([rng.normal(size=(300, 5)), maps.reshape(300, -1)], axis=1).astype(np.float32)
    y = rng.integers(0, 2, 300)
    pooled = np.stack([[maps[i, ch].astype(np.float64).sum() / 4 for ch in range(3)] for i in range(300)])
    want = Mahalanobis(ridge=0).fit(Observations(y, acts=pooled.astype(np.float32)))
    got = Mahalanobis(slice(5, 17), ridge=0, channels=3).fit(Observations(y, acts=acts))
    np.testing.assert_allclose(got.raw_scores(Observations(y[:7], acts=acts[:7]))[0],
                               want.raw_scores(Observations(y[:7], acts=pooled[:7].astype(np.float32)))[0], rtol=1e-5)


def test_mahalanobis_never_flags_a_class_it_has_no_clean_data_for():
    """An ImageNet model whose clean data holds classes 0 and 2: an input predicted as 1 (between them) or
    as 7 (beyond them) has no class mean: it is not checked, as the fingerprints leave such a class."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 2], 50)
    det = Mahalanobis().fit(Observations(y, acts=rng.normal(size=(100, 3)).astype(np.float32)))
    got, checked, _ = det.raw_scores(Observations(np.array([0, 1, 7, 2]), acts=rng.normal(size=(4, 3)).astype(np.float32)))
    assert checked.tolist() == [True, False, False, True]
    assert np.isfinite(got[[0, 3]]).all() and np.isnan(got[[1, 2]]).all()


def test_a_baseline_is_calibrated_and_asked_like_any_detector():
    rng = np.random.default_rng(2)
    images = rng.choice([0.0, 1.0], size=(2000, 1, 8, 8)).astype(np.float32)  # black and white: clean
    gray = GrayPixels()
    gray.calibrate(Observations(np.zeros(2000, np.int64), images=images), fprs=(0.05,))
    attacked = np.clip(images + rng.uniform(-0.3, 0.3, images.shape), 0, 1).astype(np.float32)
    v = gray.detect(Observations(np.zeros(2000, np.int64), images=attacked))
    assert v.is_attacked.mean() > 0.99 and v.checked.all()
    with pytest.raises(InvalidInputError, match="needs logits"):
        LogitMargin().raw_scores(Observations(np.zeros(3, np.int64), acts=np.zeros((3, 2), np.float32)))
