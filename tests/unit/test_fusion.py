"""The default detector fuses the fingerprints with the logit margin: it keeps the chosen false-positive
rate on clean inputs it never saw, and catches what either member catches."""
import numpy as np
import pytest

from kernels.baselines import LogitMargin
from kernels.detector import FingerprintDetector, PValueFusion, Observations, RandomDraws
from kernels.served import served_detector


def logits_with_margin(labels, margin, rng):
    """Logits whose top-1 (the label) beats the runner-up by ``margin``."""
    z = rng.normal(size=(len(labels), 2))
    z[np.arange(len(labels)), labels] = z.max(1) + margin
    return z


def clean(make_rows, n, seed):
    rng = np.random.default_rng(seed)
    x, y = make_rows(n, seed, False)
    return Observations(y, acts=x, logits=logits_with_margin(y, rng.gamma(4, 2, n), rng))


@pytest.fixture
def fused(bank, make_rows):
    fused = PValueFusion({"lrt": FingerprintDetector(bank, RandomDraws(16)), "margin": LogitMargin()})
    fused.calibrate(clean(make_rows, 3000, 50), fprs=(0.01, 0.05), repeats=3, seed=0)
    return fused


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_the_fused_decision_keeps_its_false_positive_rate_on_held_out_clean_inputs(fused, make_rows, fpr):
    held_out = clean(make_rows, 20_000, 51)
    flagged = fused.detect(held_out, fpr, np.random.default_rng(1)).is_attacked.mean()
    # 2.5 standard errors of a quantile set on 3,000 calibration images and measured on 20,000 others
    half = 2.5 * np.sqrt(fpr * (1 - fpr) * (1 / 3000 + 1 / 20_000))
    assert abs(flagged - fpr) < half, flagged


def test_it_catches_what_either_member_catches(fused, make_rows):
    rng = np.random.default_rng(3)
    x, y = make_rows(500, 52, True)  # fingerprints shifted, confident logits: the margin sees nothing
    shifted = Observations(y, acts=x, logits=logits_with_margin(y, rng.gamma(4, 2, 500), rng))
    x, y = make_rows(500, 53, False)  # clean activations at the decision boundary: the fingerprints see nothing
    boundary = Observations(y, acts=x, logits=logits_with_margin(y, rng.uniform(0, 0.01, 500), rng))
    for name, obs in (("shifted", shifted), ("boundary", boundary)):
        flags = {k: m.detect(obs, rng=rng).is_attacked.mean() for k, m in fused.members.items()}
        assert fused.detect(obs, rng=rng).is_attacked.mean() > 0.9, (name, flags)
        assert min(flags.values()) < 0.2, (name, flags)  # one member alone misses this family


def test_the_bank_carries_the_fused_detector_to_the_server(fused, bank):
    stored = bank.with_meta(calibration={"lrt": fused.members["lrt"].calibration.to_json(),
                                         "margin": fused.members["margin"].calibration.to_json(),
                                         "fused": fused.to_json()})
    served = served_detector(stored, fpr=0.05)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 120)).astype(np.float32)
    y = np.arange(40) % 2
    obs = Observations(y, acts=x, logits=logits_with_margin(y, rng.gamma(1, 1, 40), rng))
    want = fused.detect(obs, 0.05, np.random.default_rng(9))
    got = served.detect(obs, rng=np.random.default_rng(9))
    np.testing.assert_allclose(got.score, want.score)
    np.testing.assert_array_equal(got.is_attacked, want.is_attacked)
    np.testing.assert_array_equal(got.draws, want.draws)
    assert served.fpr == 0.05 and got.draws.shape == (40, 16)
