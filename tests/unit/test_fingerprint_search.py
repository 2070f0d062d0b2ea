"""The search finds a planted signal, and its two statistics paths agree."""
import numpy as np
import pytest

from kernels.fingerprint_search import (
    SearchConfig,
    SubsetStatistics,
    sample_subsets,
    search_class,
    search_fingerprints,
    separation,
)
from kernels.errors import InvalidInputError

SIGNAL = np.arange(10)  # the only neurons that separate clean from attacked


def planted(n=300, d=200, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, d)).astype(np.float32)
    attacked = rng.normal(size=(n, d)).astype(np.float32)
    attacked[:, SIGNAL] += shift
    return clean, attacked


def test_kept_fingerprints_are_drawn_from_the_planted_neurons():
    clean, attacked = planted()
    fp = search_class(clean, attacked, SearchConfig(k=(2,), candidates=50_000, keep=20, d_min=1.5), seed=0)
    assert len(fp.neurons) == 20 and fp.passed >= 20
    assert all(set(n.tolist()) <= set(SIGNAL.tolist()) for n in fp.neurons)
    assert (fp.p_value < 1e-3).all() and (np.abs(fp.cohen_d) >= 1.5).all()
    assert (np.diff(np.abs(fp.cohen_d)) <= 0).all(), "ranked by |d|, best first"
    assert len({tuple(n) for n in fp.neurons}) == 20, "each subset kept once"


def test_pure_noise_yields_no_fingerprint():
    rng = np.random.default_rng(1)
    clean, attacked = rng.normal(size=(2, 200, 100)).astype(np.float32)
    assert search_class(clean, attacked, SearchConfig(k=(3,), candidates=20_000), seed=0).passed == 0


def test_covariance_and_gather_paths_give_the_same_statistics():
    clean, attacked = planted(n=50, d=60)
    subsets = sample_subsets(np.random.default_rng(0), 500, 60, 7)
    cov = SubsetStatistics(clean, attacked, "covariance")(subsets)
    gat = SubsetStatistics(clean, attacked, "gather")(subsets)
    for a, b in zip(cov, gat):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    direct = clean[:, subsets[0]].mean(1)
    assert cov[0][0] == pytest.approx(direct.mean(), rel=1e-5)
    assert cov[1][0] == pytest.approx(direct.var(ddof=1), rel=1e-4)


def test_cohens_d_and_welch_p_match_scipy():
    from scipy import stats

    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 40), rng.normal(0.8, 2, 60)
    d, p = separation(np.array([a.mean()]), np.array([a.var(ddof=1)]), 40, np.array([b.mean()]),
                      np.array([b.var(ddof=1)]), 60)
    assert p[0] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-6)
    pooled = np.sqrt((39 * a.var(ddof=1) + 59 * b.var(ddof=1)) / 98)
    assert d[0] == pytest.approx((b.mean() - a.mean()) / pooled)


def test_search_is_reproducible_with_a_seed_and_mixes_sizes():
    clean, attacked = planted()
    cfg = SearchConfig(k=(2, 4), candidates=20_000, keep=30, d_min=1.0)
    one, two = search_class(clean, attacked, cfg, seed=5), search_class(clean, attacked, cfg, seed=5)
    assert [n.tolist() for n in one.neurons] == [n.tolist() for n in two.neurons]
    assert {len(n) for n in one.neurons} <= {2, 4}


def test_subsets_have_no_repeated_neuron():
    s = sample_subsets(np.random.default_rng(0), 10_000, 30, 6)
    assert (np.diff(s, axis=1) > 0).all()


def test_a_class_without_attacked_rows_gets_no_fingerprints_and_is_refused_at_scoring():
    from kernels.bank import Bank
    from kernels.scoring import score

    clean, attacked = planted(n=40, d=20)
    fps = search_fingerprints(clean, np.repeat([0, 1], 20), attacked, np.zeros(40, int), 2,
                              SearchConfig(k=(2,), candidates=2000, d_min=1.0), progress=False)
    assert len(fps[0].neurons) > 0 and fps[1].neurons == []
    bank = Bank.from_fingerprints(fps, 20)
    with pytest.raises(InvalidInputError, match=r"class\(es\) \[1\] have fewer fingerprints \(\[0\]\)"):
        score(clean[:2], np.array([0, 1]), bank, 4)
    with pytest.raises(InvalidInputError, match="nothing to search"):
        search_fingerprints(clean, np.zeros(40, int), attacked, np.ones(40, int), 2, SearchConfig(k=(2,)))


def test_nan_activations_are_refused():
    clean, attacked = planted(n=20, d=20)
    clean[3, 4] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        search_class(clean, attacked, SearchConfig(k=(2,)), seed=0)


def float32_hostile(n=200, d=24, seed=5):
    """Activations that break float32 accumulation: every neuron sits at a mean of 10^4 with unit
    spread, and neurons come in anti-correlated pairs (2j, 2j+1) whose sum varies by 10^-2 only, so a
    subset holding a pair has a variance far below its neurons'. Attacked rows move every neuron."""
    rng = np.random.default_rng(seed)

    def rows(shift):
        base = rng.normal(size=(n, d // 2))
        x = np.empty((n, d))
        x[:, 0::2] = base
        x[:, 1::2] = -base + 1e-2 * rng.normal(size=(n, d // 2))
        x += shift
        return (1e4 + x).astype(np.float32)

    return rows(0.0), rows(0.3)


@pytest.mark.parametrize("method", ["covariance", "gather"])
def test_kept_fingerprints_report_the_float64_brute_force_gaussians(method):
    clean, attacked = float32_hostile()
    fp = search_class(clean, attacked, SearchConfig(k=(2, 3, 4), candidates=30_000, keep=200, d_min=0.5,
                                                    method=method), seed=0)
    assert len(fp.neurons) >= 50, "the planted signal must yield fingerprints to check"
    c64, a64 = clean.astype(np.float64), attacked.astype(np.float64)
    for i, neurons in enumerate(fp.neurons):
        cv, av = c64[:, neurons].mean(1), a64[:, neurons].mean(1)
        for got, want in ((fp.clean_mean[i], cv.mean()), (fp.attacked_mean[i], av.mean()),
                          (fp.clean_std[i], cv.std(ddof=1)), (fp.attacked_std[i], av.std(ddof=1))):
            assert np.isfinite(got) and abs(got - want) <= 1e-3 * abs(want), (neurons, got, want)
