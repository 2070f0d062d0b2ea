"""Feature squeezing is Xu, Evans & Qi's detector, computed the obvious way, through the contract."""
import numpy as np
import pytest
from scipy import ndimage

from kernels.detector import Observations
from kernels.errors import InvalidInputError
from kernels.squeezing import FeatureSqueezing, Squeezer


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_median_squeezer_is_scipys_median_filter(size):
    x = np.random.default_rng(size).random((3, 2, 7, 9)).astype(np.float32)
    x[0, 0, :2] = 0.5  # ties
    want = ndimage.median_filter(x, size=(1, 1, size, size), mode="reflect")
    np.testing.assert_array_equal(Squeezer("median", size)(x), want)


def test_the_bit_depth_squeezer_keeps_two_to_the_bits_levels_pixel_by_pixel():
    x = np.random.default_rng(0).random((2, 1, 5, 5)).astype(np.float32)
    for bits in (1, 2, 3):
        got = Squeezer("bits", bits)(x)
        levels = 2 ** bits - 1
        for v, g in zip(x.ravel(), got.ravel()):
            assert g == pytest.approx(min(range(levels + 1), key=lambda k: abs(k / levels - v)) / levels)
        assert len(np.unique(got)) <= levels + 1


def _linear_classifier(weights):
    return lambda images: np.asarray(images, np.float64).reshape(len(images), -1) @ weights


def test_the_score_is_minus_the_largest_l1_distance_of_the_softmax_outputs():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(16, 3)) * 3
    logits_of = _linear_classifier(weights)
    images = rng.random((6, 1, 4, 4)).astype(np.float32)
    squeezers = (Squeezer("bits", 1), Squeezer("median", 2))
    got, checked, draws = FeatureSqueezing(logits_of, squeezers).raw_scores(Observations(np.zeros(6, np.int64), images=images))
    for i, x in enumerate(images):
        def probabilities(img):
            z = img.astype(np.float64).ravel() @ weights
            return np.exp(z) / np.exp(z).sum()
        bits = np.where(x >= 0.5, 1.0, 0.0)
        median = ndimage.median_filter(x, size=(1, 2, 2), mode="reflect")
        want = max(np.abs(probabilities(x) - probabilities(s)).sum() for s in (bits, median))
        assert got[i] == pytest.approx(-want, rel=1e-6)
    assert checked.all() and draws.shape == (6, 0)


def test_it_flags_a_perturbation_that_squeezing_removes_and_keeps_its_false_positive_rate():
    """Clean images are black and white, which 1-bit depth leaves as they are; the attack adds a small pattern
    aligned with the classifier's weights, enough to move its output, which 1-bit depth erases."""
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(64, 4))
    clean = np.zeros((3000, 1, 8, 8), np.float32)
    for img, col in zip(clean, rng.integers(0, 6, 3000)):
        img[0, :, col:col + 2] = 1.0  # a vertical stroke two pixels wide
    detector = FeatureSqueezing(_linear_classifier(weights), (Squeezer("bits", 1),))
    labels = np.zeros(len(clean), np.int64)
    detector.calibrate(Observations(labels[:2000], images=clean[:2000]), fprs=(0.01,))
    assert detector.detect(Observations(labels[2000:], images=clean[2000:])).is_attacked.mean() <= 0.01
    attacked = np.clip(clean[2000:] + 0.3 * np.sign(weights[:, 0]).reshape(1, 1, 8, 8), 0, 1).astype(np.float32)
    assert detector.detect(Observations(labels[2000:], images=attacked)).is_attacked.mean() > 0.95


def test_bad_squeezers_and_missing_images_are_named():
    with pytest.raises(InvalidInputError, match="squeezer"):
        Squeezer("blur", 2)
    with pytest.raises(InvalidInputError, match="at least one squeezer"):
        FeatureSqueezing(lambda x: x, ())
    with pytest.raises(InvalidInputError, match="needs images"):
        FeatureSqueezing(lambda x: x).raw_scores(Observations(np.zeros(2, np.int64), logits=np.zeros((2, 3))))


@pytest.mark.parametrize("squeezer", [Squeezer("bits", 1), Squeezer("bits", 5), Squeezer("median", 1),
                                      Squeezer("median", 2), Squeezer("median", 3)])
def test_the_torch_squeezers_of_the_exported_graph_and_the_attacker_give_the_numpy_values(squeezer):
    import torch

    from export.models.squeezing import TorchSqueezer

    x = np.random.default_rng(3).random((4, 2, 6, 7)).astype(np.float32)
    x[:, :, 2:4, 2:5] = 0.5  # ties and a value exactly between two grey levels
    np.testing.assert_array_equal(TorchSqueezer(squeezer)(torch.from_numpy(x)).numpy(), squeezer(x))


def test_the_attacker_differentiates_through_the_squeezers_bpda():
    """Rounding passes the gradient straight through (Athalye et al. 2018); the median to the pixel it picks."""
    import torch

    from export.models.squeezing import TorchSqueezer

    x = torch.rand(1, 1, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(TorchSqueezer(Squeezer("bits", 1))(x).sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
    (grad,) = torch.autograd.grad(TorchSqueezer(Squeezer("median", 3))(x)[0, 0, 2, 2], x)
    assert grad.sum() == 1 and grad.abs().max() == 1
    assert x[grad != 0].item() == torch.median(x[0, 0, 1:4, 1:4]).item()


def test_the_greedy_search_flips_only_pixels_within_eps_of_the_rounding_point_once_each():
    """The discrete check beside the gradient attacker: a greedy search over the 1-bit copy, checked on a linear
    classifier where the best flips are known (those of the largest weights toward the wrong class)."""
    import torch

    from export.adversary.attacker import greedy_flips

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(16), torch.linspace(-1, 1, 16)]))
    x = torch.full((1, 1, 4, 4), 0.05)
    x[0, 0, 3, 2:] = 0.35  # only these two pixels (weights 13/15 and 1 toward class 1) can cross 0.5 at eps 0.2
    flipped, fooled = greedy_flips(model, x, torch.tensor([0]), 0.2)
    changed = (flipped != torch.round(x)).flatten()
    assert changed.nonzero().flatten().tolist() == [15] and fooled.tolist() == [True]  # one flip of the best pixel
    flipped, fooled = greedy_flips(model, x, torch.tensor([0]), 0.1)  # nothing within 0.1 of 0.5
    assert torch.equal(flipped, torch.round(x)) and fooled.tolist() == [False]


def test_auto_keeps_only_the_squeezers_that_preserve_clean_accuracy():
    """Xu et al.'s own criterion: a squeezer that changes what the classifier says of clean images would flag
    them. A classifier reading one grey pixel loses its accuracy under 1-bit depth, not under a 1x1 median."""
    from kernels.squeezing import accuracy_preserving

    rng = np.random.default_rng(4)
    images = rng.uniform(0.3, 0.7, size=(200, 1, 2, 2)).astype(np.float32)
    labels = (images[:, 0, 0, 0] > 0.6).astype(np.int64)  # rounding to 0/1 at 0.5 gets the class wrong
    logits_of = lambda x: np.stack([0.6 - x[:, 0, 0, 0], x[:, 0, 0, 0] - 0.6], axis=1)  # noqa: E731
    kept, accuracy = accuracy_preserving(logits_of, images, labels, (Squeezer("bits", 1), Squeezer("median", 1)))
    assert kept == (Squeezer("median", 1),)
    assert accuracy["none"] == 1.0 and accuracy["median1"] == 1.0 and accuracy["bits1"] < 0.9
