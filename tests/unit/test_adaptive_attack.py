"""The detector-aware PGD: its differentiable score is the bank's, and it stays in the eps-ball."""
import numpy as np
import torch

from export.activations import capture_activations
from export.adaptive_attack import ExpectedLikelihoodRatio, PGDConfig, detector_aware_pgd
from kernels.benchmark import synthetic_bank
from kernels.detector import AllFingerprints, FingerprintDetector, Observations


def test_differentiable_score_equals_the_static_detectors(bank, make_rows):
    acts, labels = make_rows(12, 40, True)
    torch_score = ExpectedLikelihoodRatio(bank)(torch.from_numpy(acts), torch.from_numpy(labels)).numpy()
    static = FingerprintDetector(bank, AllFingerprints()).raw_scores(Observations(labels, acts=acts))[0]
    np.testing.assert_allclose(torch_score, static, rtol=1e-4, atol=1e-4)


def test_attack_stays_in_the_eps_ball_and_fools_the_classifier(small_model, mnist_subset):
    x, y = mnist_subset[0][:16], mnist_subset[1][:16]
    _, layout = capture_activations(small_model, x[:1], ["fc2", "fc3"], progress=False)
    fake = synthetic_bank(10, 20, 5, layout.num_neurons)
    adv = detector_aware_pgd(small_model, layout, fake, x, y, PGDConfig(eps=0.3, steps=20, weight=0.5))
    assert np.abs(adv - x).max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (small_model(torch.from_numpy(adv)).argmax(1).numpy() != y).mean() > 0.8
