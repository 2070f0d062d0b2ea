"""Randomized fingerprint detection: draw, gather-reduce, score (NumPy path, the reference).

Fisher, Shahar & Resheff (2024), Sec. 3.3: for an input with predicted class ``c``, draw ``m``
fingerprints at random from the bank of ``c``, compute each fingerprint's value (the mean of the
input's activations over its neurons) and score the input with

- ``lrt``: the mean over the draws of the Gaussian log-likelihood ratio
  ``log N(v; clean) - log N(v; attacked)`` (the paper sums; the mean is the sum divided by ``m``);
- ``vote``: the fraction of drawn fingerprints whose value is closer, in z-units, to clean than to attacked;
- ``anomaly``: the mean clean log-likelihood (needs no attack data).

Low scores mean attacked. Draws at serving time come straight from the operating system's
cryptographic source (:class:`OsEntropy`, unbiased), so nobody can predict which fingerprints a
request meets; a seeded generator is accepted only for reproducible evaluation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from kernels.bank import Bank
from kernels.errors import FingerprintError, InvalidInputError

METHODS = ("lrt", "vote", "anomaly")
HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)
MAX_REDRAWS = 64  # of one rejected draw, each rejected with probability below 1/2
SMALL_GATHER = 32_768  # gathered values below which a plain take-and-sum is faster (kernels.benchmark)


class OsEntropy:
    """Draws straight from the operating system's cryptographically secure generator (``os.urandom``,
    i.e. ``getrandom(2)`` on Linux), fresh bytes for every draw: unlike a seeded PCG64, whose state can
    be recovered from enough of its outputs, nothing observed about earlier draws predicts the next.

    Indices are unbiased (Lemire, 2019, "Fast random integer generation in an interval"): a ``w``-bit
    word ``v`` maps to ``floor(v * n / 2^w)``, and is drawn again when the low ``w`` bits of ``v * n``
    fall below ``2^w mod n``, so every index owns equally many accepted words. Words are 16 bits while
    every class holds at most 2^16 fingerprints (half the entropy read; a share below ``n / 2^16`` is
    redrawn), else 32 bits; classes above 2^32 fingerprints are refused.
    """

    def below(self, counts: np.ndarray, m: int) -> np.ndarray:
        """``(B, m) int64``: row ``b`` holds ``m`` independent uniform integers in ``[0, counts[b])``."""
        counts = np.asarray(counts, np.uint64)
        if not counts.size:
            return np.zeros((0, m), np.int64)
        if counts.min() < 1 or counts.max() > 1 << 32:
            raise InvalidInputError(f"can draw from 1 to 2^32 fingerprints, got a class of "
                                    f"{counts.min() if counts.min() < 1 else counts.max()}")
        bits, word = (16, np.uint16) if counts.max() <= 1 << 16 else (32, np.uint32)
        n = np.repeat(counts, m)  # per draw; the checks and 2^bits mod n once per row
        floor = np.repeat((np.uint64(1 << bits) - counts) % counts, m)
        low, shift = np.uint64((1 << bits) - 1), np.uint64(bits)
        out = np.empty(n.size, np.uint64)
        todo = slice(None)  # every position on the first pass; afterwards the rejected ones
        for _ in range(MAX_REDRAWS):
            size = n[todo].size
            product = np.frombuffer(os.urandom(size * bits // 8), word).astype(np.uint64) * n[todo]
            ok = (product & low) >= floor[todo]
            if ok.all():
                out[todo] = product >> shift
                return out.astype(np.int64).reshape(-1, m)
            positions = np.arange(n.size)[todo]
            out[positions[ok]] = product[ok] >> shift
            todo = positions[~ok]
        raise FingerprintError(f"the OS entropy source gave {MAX_REDRAWS} rejected words in a row for one draw (a "
                               f"chance below 2^-{MAX_REDRAWS}): it is not random")


def secure_rng() -> OsEntropy:
    """The source of every serving draw (and of any draw not given a seeded generator): :class:`OsEntropy`."""
    return OsEntropy()


@dataclass(frozen=True)
class Scores:
    """Per-image scores and the draws behind them.

    Attributes:
        ids: ``(B, m) int64`` drawn fingerprint rows of the bank.
        values: ``(B, m) float32`` each drawn fingerprint's value (subset mean).
        lrt, vote, anomaly: ``(B,) float64`` scores; low = attacked (vote and anomaly are None when
            only the LRT was asked for).
    """

    ids: np.ndarray
    values: np.ndarray
    lrt: np.ndarray
    vote: np.ndarray | None = None
    anomaly: np.ndarray | None = None

    def get(self, method: str) -> np.ndarray:
        if method not in METHODS:
            raise InvalidInputError(f"unknown score {method!r}; choose one of {', '.join(METHODS)}")
        if getattr(self, method) is None:
            raise InvalidInputError(f"the {method!r} score was not computed (scored with lrt_only)")
        return getattr(self, method)


def check_activations(acts: np.ndarray, num_neurons: int) -> np.ndarray:
    """Validate ``acts (B, D) float32``; name the problem otherwise."""
    if not isinstance(acts, np.ndarray):
        raise InvalidInputError(f"activations must be a NumPy array, got {type(acts).__name__}")
    if acts.dtype != np.float32:
        raise InvalidInputError(f"activations must be float32, got {acts.dtype}")
    if acts.ndim != 2 or acts.shape[1] != num_neurons:
        raise InvalidInputError(f"activations must have shape (B, {num_neurons}), got {acts.shape}")
    if acts.shape[0] == 0:
        raise InvalidInputError("empty batch: no activations to score")
    if np.isfinite(acts).all():
        return acts
    bad = ~np.isfinite(acts).all(axis=1)
    if bad.any():
        raise InvalidInputError(f"activations of rows {np.flatnonzero(bad)[:10].tolist()} hold NaN or infinite values")
    return acts


def check_labels(labels: np.ndarray, batch: int, bank: Bank) -> np.ndarray:
    """``(B,) int64`` predicted classes, each a class of the bank; names the problem otherwise."""
    labels = np.asarray(labels)
    if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"labels must be ({batch},) integers, got {labels.dtype} {labels.shape}")
    if batch and (labels.min() < 0 or labels.max() >= bank.num_classes):
        raise InvalidInputError(f"labels must lie in [0, {bank.num_classes}) (the bank's classes), "
                                f"got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def check_covered(labels: np.ndarray, bank: Bank, m: int) -> None:
    """Every label's class must hold at least ``m`` fingerprints to draw from."""
    short = np.unique(labels[~covered(labels, bank, m)]).tolist()
    if short:
        raise InvalidInputError(f"class(es) {short} have fewer fingerprints ({bank.counts[short].tolist()}) than the "
                                f"{m} drawn per input; search more candidates or draw fewer")


def covered(labels: np.ndarray, bank: Bank, m: int) -> np.ndarray:
    """``(B,) bool``: whether each predicted class has at least ``m`` fingerprints to draw from."""
    return bank.counts[np.asarray(labels, np.int64)] >= m


def draw_fingerprints(labels: np.ndarray, bank: Bank, m: int, rng: "np.random.Generator | OsEntropy") -> np.ndarray:
    """``(B, m) int64`` fingerprint ids, each row drawn uniformly (with replacement) from the bank
    of that row's class, from :class:`OsEntropy` (serving) or a seeded generator (reproducible
    evaluation). ``labels (B,)`` must already be checked."""
    if m < 1:
        raise InvalidInputError(f"m (fingerprints per input) must be at least 1, got {m}")
    counts = bank.counts[labels]
    if isinstance(rng, OsEntropy):
        return bank.class_offsets[labels][:, None] + rng.below(counts, m)
    return bank.class_offsets[labels][:, None] + (rng.random((len(labels), m)) * counts[:, None]).astype(np.int64)


def check_ids(ids: np.ndarray, labels: np.ndarray, bank: Bank) -> np.ndarray:
    """Given draws must be ``(B, m)`` integers inside each row's class."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != len(labels) or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"fingerprint ids must be ({len(labels)}, m>0) integers, got {ids.dtype} {ids.shape}")
    lo, hi = bank.class_offsets[labels][:, None], bank.class_offsets[labels + 1][:, None]
    if ((ids < lo) | (ids >= hi)).any():
        raise InvalidInputError("fingerprint ids out of range: each row's ids must belong to that row's class")
    return ids.astype(np.int64)


@lru_cache(maxsize=16)
def _csr_constants(rows: int, kmax: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry values and row pointers of the gather matrix; they depend only on its shape."""
    data = np.full(rows * kmax, weight, np.float32)
    indptr = np.arange(0, rows * kmax + 1, kmax, dtype=np.int32)
    data.flags.writeable = indptr.flags.writeable = False
    return data, indptr


def flat_columns(neurons: np.ndarray, width: int) -> np.ndarray:
    """Positions in a flattened ``(B, width)`` batch of the neuron ids ``neurons (B, ...)`` of each row:
    ``neurons[b] + b * width``, int32 while every position fits, int64 past ``2^31 - 1`` (whole splits
    of ImageNet-size layers get there)."""
    b = neurons.shape[0]
    dtype = np.int32 if b * width <= np.iinfo(np.int32).max else np.int64
    offsets = np.arange(b, dtype=dtype) * dtype(width)
    return neurons.astype(dtype, copy=False) + offsets.reshape((b,) + (1,) * (neurons.ndim - 1))


def subset_means(acts: np.ndarray, ids: np.ndarray, bank: Bank) -> np.ndarray:
    """``(B, m) float32`` mean of ``acts[b]`` over the neurons of fingerprint ``ids[b, j]``.

    One gather-reduce: a sparse matrix with one row per (image, draw) and ``Kmax`` entries per row,
    pointing into the flattened batch, times the flattened activations (SciPy's CSR mat-vec, a
    single pass over the gathered values). When fingerprints differ in size, padding slots point at
    an extra zero column ``D`` of a padded copy, so a plain sum over ``Kmax`` slots stays exact.
    """
    b, d = acts.shape
    kmax = bank.indices.shape[1]
    uniform = bank.uniform_length
    if uniform:
        src, width = np.ascontiguousarray(acts).ravel(), d
    else:
        padded = np.zeros((b, d + 1), np.float32)
        padded[:, :d] = acts
        src, width = padded.ravel(), d + 1
    cols = flat_columns(bank.indices[ids], width)  # (B, m, Kmax)
    if cols.size <= SMALL_GATHER:  # building the sparse matrix costs more than it saves
        sums = src.take(cols).sum(axis=2, dtype=np.float32)
        return sums / np.float32(kmax) if uniform else sums / bank.lengths[ids]
    data, indptr = _csr_constants(ids.size, kmax, 1.0 / kmax if uniform else 1.0)
    w = sp.csr_matrix((data, cols.ravel(), indptr), shape=(ids.size, b * width))
    sums = (w @ src).reshape(ids.shape)
    return sums if uniform else sums / bank.lengths[ids]


def log_likelihood_ratio(values, clean_mean, inv_clean_std, attacked_mean, inv_attacked_std, log_std_ratio):
    """The paper's per-fingerprint statistic, ``log N(v; clean) - log N(v; attacked)`` (Sec. 3.3), from a
    fingerprint's value and its two Gaussians (``log_std_ratio = log(attacked_std / clean_std)``).

    The one definition of the LRT: NumPy, CuPy and torch tensors all go through it (the white-box
    attack differentiates it), and the CUDA kernels are tested against it. Elementwise, broadcasting.
    """
    zc = (values - clean_mean) * inv_clean_std
    za = (values - attacked_mean) * inv_attacked_std
    return 0.5 * (za * za - zc * zc) + log_std_ratio


def lrt_scores(values: np.ndarray, ids: np.ndarray, bank: Bank) -> np.ndarray:
    """``(B,)`` the LRT score, mean of :func:`log_likelihood_ratio` over the drawn fingerprints, of
    fingerprint values ``(B, m)``; one gather of their packed Gaussians
    (:attr:`kernels.bank.Bank.lrt_params`)."""
    return log_likelihood_ratio(values, *bank.lrt_params.take(ids, axis=1)).mean(axis=1, dtype=np.float64)


def vote_scores(values: np.ndarray, ids: np.ndarray, bank: Bank) -> np.ndarray:
    """``(B,)`` the vote score alone: the fraction of the drawn fingerprints whose value lies closer, in
    z-units, to its clean Gaussian than to its attacked one (a robust aggregate: one fingerprint with
    an extreme likelihood ratio moves it by at most ``1 / m``)."""
    cm, inv_cs, am, inv_as, _ = bank.lrt_params.take(ids, axis=1)
    return (np.abs((values - cm) * inv_cs) < np.abs((values - am) * inv_as)).mean(axis=1, dtype=np.float64)


def score_values(values: np.ndarray, ids: np.ndarray, bank: Bank) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LRT, vote and anomaly scores ``(B,)`` of fingerprint values ``(B, m)``."""
    params = bank.lrt_params.take(ids, axis=1)  # one gather for the three scores
    cm, inv_cs, am, inv_as, _ = params
    zc, za = (values - cm) * inv_cs, (values - am) * inv_as
    clean_ll = -0.5 * zc * zc + np.log(inv_cs)
    return (log_likelihood_ratio(values, *params).mean(axis=1, dtype=np.float64),
            (np.abs(zc) < np.abs(za)).mean(axis=1, dtype=np.float64),
            clean_ll.mean(axis=1, dtype=np.float64) - HALF_LOG_2PI)


def score(acts: np.ndarray, labels: np.ndarray, bank: Bank, m: int, rng: np.random.Generator | None = None,
          ids: np.ndarray | None = None, checked: bool = False, lrt_only: bool = False) -> Scores:
    """Draw ``m`` fingerprints per input from its class's bank and score it: raw scores, no thresholds.

    The NumPy reference that the backends are tested against; detection (standardization, thresholds,
    unchecked inputs) goes through :class:`kernels.detector.FingerprintDetector`.

    Args:
        acts: ``(B, D) float32`` activations laid out as the bank's ``layout``.
        labels: ``(B,) int`` predicted classes.
        bank: the fingerprint bank.
        m: fingerprints drawn per input.
        rng: generator of the draws; default :func:`secure_rng` (fresh OS entropy).
        ids: ``(B, m)`` draws to use instead of drawing (replaying a server's draws in tests).
        checked: the caller already validated ``acts`` and ``labels`` as :func:`check_activations` and
            :func:`check_labels` do (the server checks each request on its own, to answer a bad one
            with its own error).
        lrt_only: compute the likelihood-ratio score only (what the server flags on).
    """
    if not checked:
        check_activations(acts, bank.num_neurons)
        labels = check_labels(labels, len(acts), bank)
        check_covered(labels, bank, m if ids is None else 1)
    if ids is None:
        ids = draw_fingerprints(labels, bank, m, rng or secure_rng())
    else:
        ids = check_ids(ids, labels, bank)
    values = subset_means(acts, ids, bank)
    if lrt_only:
        return Scores(ids, values, lrt_scores(values, ids, bank))
    return Scores(ids, values, *score_values(values, ids, bank))


class NumpyScorer:
    """The NumPy backend of :class:`kernels.detector.FingerprintDetector` (the reference);
    :class:`kernels.gpu.GpuScorer` is the CUDA one, with the same three methods."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank

    def check(self, acts: np.ndarray) -> np.ndarray:
        return check_activations(acts, self.bank.num_neurons)

    def take_rows(self, acts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return acts[rows]

    def scores(self, acts: np.ndarray, ids: np.ndarray, method: str) -> np.ndarray:
        """``(B,)`` scores by ``method`` of checked ``acts (B, D)`` for the drawn fingerprints ``ids (B, m)``."""
        values = subset_means(acts, ids, self.bank)
        if method == "lrt":
            return lrt_scores(values, ids, self.bank)
        if method == "vote":
            return vote_scores(values, ids, self.bank)
        return dict(zip(METHODS, score_values(values, ids, self.bank)))[method]
