"""Fingerprint search: random neuron subsets whose mean separates clean from attacked images.

Implements the search of Fisher, Shahar & Resheff (2024), "Neural Fingerprints for Adversarial
Attack Detection", Sec. 3: for a focal class ``c``, the *clean* set holds images of ``c`` that the
model classifies as ``c``; the *attacked* set holds images of other classes attacked (targeted) into
``c``. A candidate fingerprint is a random subset ``S`` of ``k`` neurons of the activation vector; its
value on an image is the mean of the activations over ``S``. A candidate is kept when a two-sample
(Welch) t-test between clean and attacked values gives ``p < p_max`` **and** ``|Cohen's d| >= d_min``;
survivors are ranked by ``|d|`` and the top ``keep`` form the class's part of the bank, each with a
Gaussian of its clean values and one of its attacked values.

Two exact ways to get each candidate's per-set mean and variance, vectorized over thousands of
candidates at a time with bounded memory (``chunk`` candidates):

- ``"covariance"``: mean and variance of a subset mean follow from the per-neuron means and the
  ``(D, D)`` covariance: ``mean = mu[S].mean()``, ``var = Sigma[S, S].sum() / k**2``. ``O(k^2)``
  gathers per candidate whatever the number of images; needs ``D^2`` memory.
- ``"gather"``: subset means of every image via one sparse-matrix product ``W @ X.T``
  (``W`` is ``chunk x D`` with ``k`` entries ``1/k`` per row), then mean and variance over images.
  ``O(k N)`` streamed work per candidate; works for convolutional feature maps (``D ~ 10^5``).

``"auto"`` takes the covariance path when ``D`` is moderate and ``k`` small against ``N`` (where it is
faster, measured by ``python -m export.evaluation.search_benchmark``), the gather path otherwise.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy import stats
from tqdm.auto import tqdm

from kernels.errors import InvalidInputError

# The authors' settings (paper, Sec. 4): k = 50 neurons, p < 0.001, |d| > 1.5.
PAPER_K, PAPER_P_MAX, PAPER_D_MIN = 50, 1e-3, 1.5
COVARIANCE_MAX_D = 4096  # the (D, D) complex128 pair of covariances stays at 256 MiB
THREADS = 2


@dataclass(frozen=True)
class SearchConfig:
    """Parameters of :func:`search_fingerprints`.

    Attributes:
        k: neurons per fingerprint; several sizes may be given, candidates are split evenly.
        candidates: random candidates tried per focal class.
        p_max: keep a candidate only if its Welch t-test p-value is below this.
        d_min: ... and its |Cohen's d| is at least this.
        keep: at most this many fingerprints per class, the largest |d| first.
        chunk: candidates evaluated at once (bounds memory: ``chunk * N`` floats on the gather path).
        method: ``"auto"``, ``"covariance"`` or ``"gather"``.
        seed: seed of the candidate draws.
        max_correlation: if set, each class keeps its fingerprints from a pool of ``10 * keep``
            strongest, greedily (:func:`decorrelate`): strongest first, the layers in turn, each
            correlating with every one kept before by at most this |r| on the class's attacked rows.
        layer_starts: first activation column of each captured layer (for the layers-in-turn rule).
    """

    # Single neurons, the 300 strongest per class: on MNIST-5k they caught small-eps L-inf attacks
    # far better than the paper's subsets (TPR at 1% FPR 0.96-0.98 against 0.60-0.74 for k = 5,
    # `nfp study`); k = 50 (the paper's) and mixtures stay one option away.
    k: tuple[int, ...] = (1,)
    candidates: int = 100_000
    p_max: float = PAPER_P_MAX
    d_min: float = PAPER_D_MIN
    keep: int = 300
    chunk: int = 8192
    method: str = "auto"
    seed: int = 0
    max_correlation: float | None = None
    layer_starts: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        k = (self.k,) if isinstance(self.k, int) else tuple(int(v) for v in self.k)
        object.__setattr__(self, "k", k)
        if not k or min(k) < 1:
            raise InvalidInputError(f"fingerprint sizes k must be positive integers, got {self.k}")
        if self.candidates < 1 or self.keep < 1 or self.chunk < 1:
            raise InvalidInputError(f"candidates, keep and chunk must be positive: {self}")
        if not 0 < self.p_max <= 1 or self.d_min < 0:
            raise InvalidInputError(f"need 0 < p_max <= 1 and d_min >= 0, got {self.p_max}, {self.d_min}")
        if self.max_correlation is not None and not 0 < self.max_correlation <= 1:
            raise InvalidInputError(f"max_correlation must lie in (0, 1], got {self.max_correlation}")
        object.__setattr__(self, "layer_starts", tuple(int(v) for v in self.layer_starts))
        if self.method not in ("auto", "covariance", "gather"):
            raise InvalidInputError(f"method must be auto, covariance or gather, got {self.method!r}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassFingerprints:
    """The fingerprints kept for one focal class, best first.

    Attributes:
        neurons: list of ``(k,) int32`` sorted neuron indices, one per fingerprint.
        clean_mean, clean_std, attacked_mean, attacked_std: ``(F,) float64`` Gaussians of the values.
        cohen_d, p_value: ``(F,) float64`` separation statistics (``d`` = attacked minus clean).
        tried: candidates evaluated; ``passed``: how many met both thresholds.
    """

    neurons: list[np.ndarray]
    clean_mean: np.ndarray
    clean_std: np.ndarray
    attacked_mean: np.ndarray
    attacked_std: np.ndarray
    cohen_d: np.ndarray
    p_value: np.ndarray
    tried: int
    passed: int


def sample_subsets(rng: np.random.Generator, count: int, num_neurons: int, k: int) -> np.ndarray:
    """``(count, k) int64`` random subsets of ``range(num_neurons)``, each sorted and without repeats."""
    if k > num_neurons:
        raise InvalidInputError(f"fingerprints of k={k} neurons need at least {k} neurons, the layers have {num_neurons}")
    if k * 4 > num_neurons:  # dense draws: a random permutation per row
        return np.sort(np.argsort(rng.random((count, num_neurons)), axis=1)[:, :k], axis=1)
    s = np.sort(rng.integers(0, num_neurons, size=(count, k)), axis=1)
    bad = np.flatnonzero((np.diff(s, axis=1) == 0).any(axis=1))
    while len(bad):  # redraw the rows that hold a repeat (rare for k << D)
        s[bad] = np.sort(rng.integers(0, num_neurons, size=(len(bad), k)), axis=1)
        bad = bad[(np.diff(s[bad], axis=1) == 0).any(axis=1)]
    return s


class SubsetStatistics:
    """Mean and variance (over images, ddof=1) of subset means, for the clean and the attacked set.

    Args:
        clean: ``(Nc, D) float32`` activations; attacked: ``(Na, D) float32``.
        method: ``"covariance"`` or ``"gather"`` (see the module docstring).
    """

    def __init__(self, clean: np.ndarray, attacked: np.ndarray, method: str) -> None:
        self.method, self.n_clean, self.n_attacked = method, len(clean), len(attacked)
        self.num_neurons = clean.shape[1]
        clean_mu, attacked_mu = clean.mean(0, dtype=np.float64), attacked.mean(0, dtype=np.float64)
        self.mean_pair = np.stack([clean_mu, attacked_mu])  # (2, D) float64
        if method == "covariance":
            if self.num_neurons > COVARIANCE_MAX_D:
                raise InvalidInputError(f"covariance path needs D <= {COVARIANCE_MAX_D}, got {self.num_neurons}; use gather")
            # one complex128 gather fetches both float64 covariances: real = clean, imag = attacked
            cov = np.empty((self.num_neurons, self.num_neurons), np.complex128)
            cov.real, cov.imag = _covariance(clean, clean_mu), _covariance(attacked, attacked_mu)
            self.cov_flat = cov.ravel()
        else:
            # each set centred per neuron in float64 before the float32 product: a subset mean of
            # large-mean neurons would otherwise lose its variance to float32 rounding
            rows = np.concatenate([clean - clean_mu, attacked - attacked_mu]).astype(np.float32)
            self.rows_t = np.ascontiguousarray(rows.T)  # (D, N): each neuron's values contiguous

    def __call__(self, subsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``subsets (B, k)`` -> clean mean, clean var, attacked mean, attacked var, each ``(B,) float64``."""
        b, k = subsets.shape
        d = self.num_neurons
        means = self.mean_pair[:, subsets].mean(axis=2)
        if self.method == "covariance":
            iu0, iu1 = np.triu_indices(k, 1)
            off = self.cov_flat.take(subsets[:, iu0] * d + subsets[:, iu1]).sum(axis=1)
            diag = self.cov_flat.take(subsets * (d + 1)).sum(axis=1)
            var = (diag + 2 * off) / (k * k)
            return means[0], np.maximum(var.real, 0.0), means[1], np.maximum(var.imag, 0.0)
        w = sp.csr_matrix((np.full(b * k, 1.0 / k, np.float32), subsets.ravel(), np.arange(0, b * k + 1, k)),
                          shape=(b, d))
        values = w @ self.rows_t  # (B, N) centred subset means of every image
        c, a = values[:, : self.n_clean], values[:, self.n_clean :]
        return (means[0] + c.mean(1, dtype=np.float64), c.var(1, ddof=1, dtype=np.float64),
                means[1] + a.mean(1, dtype=np.float64), a.var(1, ddof=1, dtype=np.float64))


def _covariance(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(D, D) float64`` sample covariance (ddof=1), accumulated in float64."""
    centered = x.astype(np.float64) - mean
    return (centered.T @ centered) / (len(x) - 1)


def choose_method(num_neurons: int, k: Sequence[int], num_rows: int) -> str:
    """The faster exact path (measured on 2 cores): covariance gathers ``k(k+1)/2`` entries per
    candidate at about 1/50 the rate the sparse product streams ``k * N`` values."""
    return "covariance" if num_neurons <= COVARIANCE_MAX_D and (max(k) + 1) * 50 < 2 * num_rows else "gather"


def separation(cm: np.ndarray, cv: np.ndarray, nc: int, am: np.ndarray, av: np.ndarray, na: int):
    """Cohen's d (pooled sd; attacked minus clean) and the two-sided Welch t-test p-value."""
    cv, av = np.maximum(cv, 1e-12), np.maximum(av, 1e-12)
    pooled = np.sqrt(((nc - 1) * cv + (na - 1) * av) / (nc + na - 2))
    d = (am - cm) / pooled
    se2 = cv / nc + av / na
    t = (am - cm) / np.sqrt(se2)
    df = se2**2 / ((cv / nc) ** 2 / (nc - 1) + (av / na) ** 2 / (na - 1))
    return d, 2 * stats.t.sf(np.abs(t), df)


def search_class(clean: np.ndarray, attacked: np.ndarray, config: SearchConfig, seed: int,
                 progress: bool = False, desc: str = "search") -> ClassFingerprints:
    """Search fingerprints separating ``clean (Nc, D)`` from ``attacked (Na, D)`` activations."""
    if clean.ndim != 2 or attacked.ndim != 2 or clean.shape[1] != attacked.shape[1]:
        raise InvalidInputError(f"clean {clean.shape} and attacked {attacked.shape} must be (N, D) with one D")
    if len(clean) < 3 or len(attacked) < 3:
        raise InvalidInputError(f"need at least 3 clean and 3 attacked rows, got {len(clean)} and {len(attacked)}")
    if not (np.isfinite(clean).all() and np.isfinite(attacked).all()):
        raise InvalidInputError("activations contain NaN or infinite values")
    method = choose_method(clean.shape[1], config.k, len(clean) + len(attacked)) if config.method == "auto" else config.method
    statistics = SubsetStatistics(clean, attacked, method)
    rng = np.random.default_rng(seed)
    kmax = max(config.k)
    per_size = np.array_split(np.arange(config.candidates), len(config.k))
    chunks = [(k, min(config.chunk, len(part) - i)) for k, part in zip(config.k, per_size)
              for i in range(0, len(part), config.chunk)]

    def evaluate(subsets: np.ndarray) -> dict[str, np.ndarray]:
        cm, cv, am, av = statistics(subsets)
        d, p = separation(cm, cv, len(clean), am, av, len(attacked))
        ok = (p < config.p_max) & (np.abs(d) >= config.d_min)
        padded = np.full((int(ok.sum()), kmax), -1, np.int32)
        padded[:, : subsets.shape[1]] = subsets[ok]
        return {"neurons": padded, "clean_mean": cm[ok], "clean_std": np.sqrt(cv[ok]),
                "attacked_mean": am[ok], "attacked_std": np.sqrt(av[ok]), "cohen_d": d[ok], "p_value": p[ok]}

    keep = config.keep * (DECORRELATION_POOL if config.max_correlation is not None else 1)
    best: dict[str, np.ndarray] | None = None
    passed = 0
    with ThreadPoolExecutor(THREADS) as pool:  # NumPy and SciPy release the GIL in these loops
        draws = (sample_subsets(rng, n, clean.shape[1], k) for k, n in chunks)
        for out in tqdm(pool.map(evaluate, draws), total=len(chunks), desc=desc, unit="chunk", disable=not progress):
            passed += len(out["cohen_d"])
            best = out if best is None else {key: np.concatenate([best[key], out[key]]) for key in out}
            if len(best["cohen_d"]) > 2 * keep:  # keep memory bounded
                best = _top(best, keep)
    assert best is not None
    best = _top(best, keep)
    if config.max_correlation is not None and len(best["cohen_d"]):
        values = np.stack([attacked[:, row[row >= 0]].mean(axis=1) for row in best["neurons"]], axis=1)
        layers = np.searchsorted(np.asarray(config.layer_starts), best["neurons"][:, 0], side="right") - 1
        best = {key: v[decorrelate(values, layers, config.keep, config.max_correlation)] for key, v in best.items()}
    return ClassFingerprints(neurons=[row[row >= 0] for row in best.pop("neurons")], **best,
                             tried=config.candidates, passed=passed)


DECORRELATION_POOL = 10  # candidates per kept fingerprint that the decorrelated selection chooses from


def decorrelate(values: np.ndarray, layers: np.ndarray, keep: int, max_correlation: float) -> np.ndarray:
    """Positions of at most ``keep`` columns of ``values (N, F)`` (candidates ordered strongest first,
    each of layer ``layers[f]``), chosen greedily: the layers take turns, each giving its strongest
    candidate whose |Pearson r| with every column chosen before is at most ``max_correlation``.

    Fingerprints that all separate the same clean and attacked sets move together, so a random draw
    of them lands near their mean and an image that passes one passes most (issue 14); kept apart,
    an attacker has to move many independent directions at once."""
    z = (values - values.mean(axis=0)) / np.maximum(values.std(axis=0), 1e-12)
    corr = np.abs(z.T @ z) / max(len(z), 1)
    queues = [list(np.flatnonzero(layers == layer)) for layer in np.unique(layers)]
    kept: list[int] = []
    while len(kept) < keep and any(queues):
        for q in queues:
            while q:
                j = q.pop(0)
                if not kept or corr[j, kept].max() <= max_correlation:
                    kept.append(j)
                    break
            if len(kept) == keep:
                break
    return np.array(kept, np.int64)


def _top(rows: dict[str, np.ndarray], keep: int) -> dict[str, np.ndarray]:
    """The ``keep`` distinct subsets of largest |Cohen's d| (ties in draw order)."""
    _, first = np.unique(rows["neurons"], axis=0, return_index=True)  # a subset drawn twice counts once
    first = np.sort(first)
    order = first[np.argsort(-np.abs(rows["cohen_d"][first]), kind="stable")[:keep]]
    return {key: value[order] for key, value in rows.items()}


def search_focal_class(clean: np.ndarray, attacked: np.ndarray, c: int, config: SearchConfig = SearchConfig(),
                       progress: bool = False) -> ClassFingerprints:
    """Class ``c``'s fingerprints from its clean rows and the rows attacked into it, under the class's own
    seed ``config.seed * 1_000_003 + c`` (so a class searched alone, on another machine, gets the same
    fingerprints); none below 3 rows of either kind."""
    if len(clean) < 3 or len(attacked) < 3:
        return ClassFingerprints([], *(np.zeros(0) for _ in range(6)), tried=0, passed=0)
    return search_class(clean, attacked, config, config.seed * 1_000_003 + c, progress, desc=f"class {c}")


def search_fingerprints(clean: np.ndarray, clean_labels: np.ndarray, attacked: np.ndarray,
                        attacked_labels: np.ndarray, num_classes: int, config: SearchConfig = SearchConfig(),
                        progress: bool = True) -> list[ClassFingerprints]:
    """Run :func:`search_class` for every focal class.

    Args:
        clean: ``(Nc, D) float32`` activations of correctly classified clean images.
        clean_labels: ``(Nc,) int`` their class.
        attacked: ``(Na, D) float32`` activations of successful targeted attacks.
        attacked_labels: ``(Na,) int`` the focal class each was attacked into (= the model's prediction).
        num_classes: number of classes; every class needs clean and attacked rows.

    Each class is searched by :func:`search_focal_class`. A class with fewer than 3 clean or 3 attacked
    rows gets no fingerprints (an ImageNet model served with a bank for a few classes); inputs predicted
    as such a class are answered unchecked.
    """
    out = [search_focal_class(clean[clean_labels == c], attacked[attacked_labels == c], c, config, progress)
           for c in range(num_classes)]
    if not any(fp.neurons for fp in out):
        raise InvalidInputError("no class has at least 3 clean and 3 attacked rows: nothing to search")
    return out
