"""Plumbing of the white-box experiment and its defences (not their headline numbers)."""
import numpy as np
import pytest

from export.bank.search import bank_overlap
from export.evaluation.report import wilson
from export.adversary.whitebox import bootstrap_mean, request_evasion
from kernels.bank import Bank
from kernels.detector import Detector, Observations, Verdicts
from kernels.errors import InvalidInputError
from kernels.fingerprint_search import decorrelate


class FlagsEvenTags(Detector):
    """A stand-in server: flags the rows whose image tag is even, on every request."""

    def raw_scores(self, obs, rng=None):
        raise AssertionError("not scored")

    def detect(self, obs, fpr=None, rng=None):
        tags = obs.images[:, 0].astype(int)
        return Verdicts(np.zeros(len(tags)), tags % 2 == 0, np.ones(len(tags), bool), np.zeros((len(tags), 0)))


class FlagsEveryOtherRequest(Detector):
    """A stand-in randomized server: flags everything on every second request."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def raw_scores(self, obs, rng=None):
        raise AssertionError("not scored")

    def detect(self, obs, fpr=None, rng=None):
        self.calls += 1
        n = len(obs)
        return Verdicts(np.zeros(n), np.full(n, self.calls % 2 == 0), np.ones(n, bool), np.zeros((n, 0)))


def test_evasion_needs_both_a_wrong_label_and_no_flag():
    obs = Observations(np.array([1, 1, 1, 1]), images=np.arange(4.0)[:, None])
    true = np.array([0, 0, 1, 1])  # rows 0 and 1 misclassified; rows 0 and 2 flagged
    np.testing.assert_array_equal(request_evasion(FlagsEvenTags(), obs, true, 3, np.random.default_rng(0)),
                                  [0, 1, 0, 0])


def test_evasion_per_request_is_the_share_of_requests_that_got_through():
    obs = Observations(np.array([1, 1]), images=np.zeros((2, 1)))
    np.testing.assert_allclose(request_evasion(FlagsEveryOtherRequest(), obs, np.array([0, 1]), 10,
                                               np.random.default_rng(0)), [0.5, 0.0])


def test_intervals_bracket_the_estimate():
    lo, hi = wilson(5, 100)
    assert lo < 0.05 < hi and 0 <= lo and hi <= 1
    assert wilson(0, 0) == (0.0, 1.0)
    values = np.random.default_rng(1).random(200)
    lo, hi = bootstrap_mean(values, seed=0)
    assert lo < values.mean() < hi and hi - lo < 0.2
    assert bootstrap_mean(np.ones(50), seed=0) == (1.0, 1.0)


def correlated_pool() -> tuple[Bank, np.ndarray]:
    """One class, 12 single-neuron fingerprints (strongest first) over two layers of 6 neurons; on the
    attacked rows neurons 0-3 are copies of one signal (plus tiny noise), the rest independent."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(300, 12)).astype(np.float32)
    acts[:, 1:4] = acts[:, :1] + 0.01 * rng.normal(size=(300, 3))
    f = 12
    bank = Bank(np.arange(f, dtype=np.int32)[:, None], np.ones(f, np.int32), np.zeros(f, np.float32),
                np.ones(f, np.float32), np.ones(f, np.float32), np.ones(f, np.float32),
                np.linspace(5, 2, f).astype(np.float32), np.array([0, f], np.int64), {"num_neurons": 12})
    return bank, acts


def test_decorrelation_keeps_no_pair_above_the_limit_and_takes_the_layers_in_turn():
    _, acts = correlated_pool()
    kept = decorrelate(acts, np.repeat([0, 1], 6), keep=6, max_correlation=0.5)
    assert kept.tolist() == [0, 6, 4, 7, 5, 8]  # strongest first, layer a then b; neurons 1-3 copy neuron 0
    r = np.corrcoef(acts[:, kept].T.astype(np.float64))
    assert np.abs(r[np.triu_indices(len(kept), 1)]).max() <= 0.5


def test_a_decorrelated_search_keeps_the_strongest_fingerprints_that_move_apart(make_rows):
    from kernels.fingerprint_search import SearchConfig, search_class

    (clean, cy), (attacked, ay) = make_rows(400, 0, False), make_rows(400, 1, True)
    clean, attacked = clean[cy == 0], attacked[ay == 0]  # class 0: neurons 0-15 shifted when attacked
    attacked[:, 1:8] = attacked[:, :1] + 0.05 * attacked[:, 1:8]  # neurons 0-7 move as one, 8-15 independently
    cfg = SearchConfig(k=(1,), candidates=5000, keep=8)
    plain = search_class(clean, attacked, cfg, seed=0)
    apart = search_class(clean, attacked, SearchConfig(**{**cfg.to_json(), "max_correlation": 0.5}), seed=0)
    chosen = np.concatenate(apart.neurons)
    assert (np.concatenate(plain.neurons) < 8).sum() > 1
    assert len(chosen) == 8 and (chosen < 8).sum() == 1  # of the 8 copies only one, the 8 independent ones kept
    r = np.corrcoef(attacked[:, chosen].T.astype(np.float64))
    assert np.abs(r[np.triu_indices(8, 1)]).max() <= 0.5


def test_bank_overlap_counts_shared_neuron_sets_per_class():
    pool, _ = correlated_pool()
    assert bank_overlap(pool, pool) == 1.0
    half = pool.take([np.arange(6)])
    assert bank_overlap(half, pool) == 1.0 and bank_overlap(pool, half) == 0.5


def test_bank_take_refuses_rows_outside_their_class():
    pool, _ = correlated_pool()
    with pytest.raises(InvalidInputError, match="each inside its class"):
        pool.take([np.array([0, 12])])
