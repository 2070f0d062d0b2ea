"""Detection thresholds for chosen false-positive rates, set on clean calibration images, with a
finite-sample guarantee.

Scores of clean images differ from class to class, so each score is first standardized with its
predicted class's clean mean and standard deviation. The calibration images are **split**
(:func:`calibration_split`): the *reference* half fits the standardization (and, for a fusion, the
members' clean references); the *held-out* half, one fresh draw per image, sets the threshold as a
split-conformal quantile (Vovk et al. 2005; Angelopoulos & Bates 2021, Sec. 1): with ``n`` held-out
scores, the threshold is the ``k``-th smallest, ``k = floor(fpr (n + 1))``, and an input is flagged
when its score is strictly below it. For a clean test input exchangeable with the held-out images this
gives ``P(flagged) <= k / (n + 1) <= fpr`` whatever the score's distribution, ties included (a tied
score is never flagged, so discrete scores such as the vote only make the rate lower).

``confidence`` asks for more: that the realized false-positive rate of *this* calibration stays at or
below ``fpr`` with that probability over calibration draws (training-conditional validity, Vovk 2012).
The rate at the ``k``-th smallest of ``n`` scores is at most a Beta(k, n + 1 - k) variable, so ``k`` is
the largest rank with ``P(Binomial(n, fpr) < k) <= 1 - confidence``; it costs detection (a lower
threshold). :func:`images_needed` says how many held-out images a guarantee needs (1% alone: 99; 1% at
95% confidence: 299). Where the split holds fewer, the lowest held-out score is the threshold and
:attr:`Calibration.fpr_bound` reports the weaker bound it gives.

A class gets a threshold of its own only when it holds enough held-out images for at least
:data:`MIN_EXPECTED_FALSE_POSITIVES` expected false positives; otherwise the global threshold applies.
Measured on MNIST with a LeNet-5: with about 100 calibration images per class, a per-class 1% threshold
is that class's minimum score and noisy, and one global threshold on per-class standardized scores did
as well or better.

Everything counts **images**, not scores: the reference half scores every image under several
independent draws (``image_ids`` says which scores belong to one image), and ten draws of one image say
nothing about how other images of its class score; the held-out half keeps one draw per image, the one
exchangeable with a test input's single draw. A class with fewer than :data:`MIN_CLASS_IMAGES`
reference images is standardized with the statistics of all reference scores (its own mean and spread
would be noise); its false-positive rate is then as good as the assumption that its clean scores look
like the others'.

Scores must be computed under the same random drawing (same ``m``) as at test time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kernels.errors import InvalidInputError

DEFAULT_FPRS = (0.01, 0.02, 0.05)  # the paper reports these
MIN_EXPECTED_FALSE_POSITIVES = 10
MIN_CLASS_IMAGES = 20  # images a class needs for a mean and spread of its own
HELD_OUT_SHARE = 0.5  # calibration images that set thresholds; the rest fit the standardization
DRIFT_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # quantiles that bound the served histogram's buckets


@dataclass(frozen=True)
class Calibration:
    """Standardization and thresholds of one score method at one draw size ``m``.

    Attributes:
        method: ``lrt``, ``vote`` or ``anomaly``.
        m: fingerprints drawn per input when the scores were taken.
        class_mean, class_std: ``(C,)`` clean score statistics per predicted class (reference half).
        thresholds: ``{fpr: (C,) float}``: flag an input when its standardized score is below its class's entry.
        per_class: ``{fpr: (C,) bool}``: whether the entry is the class's own (else the global one).
        counts: ``(C,)`` calibration images (not scores) per predicted class, both halves.
        held_out: ``(C,)`` of them in the held-out half, which set the thresholds.
        confidence: ``None`` (the expected false-positive rate is at most nominal) or the probability
            with which the realized rate is.
        fpr_bound: ``{fpr: float}`` what the global threshold guarantees: ``k / (n + 1)`` (no
            ``confidence``) or the rate not exceeded with probability ``confidence``; above ``fpr``
            only where the held-out half was too small (:func:`images_needed`).
        reference: the held-out clean standardized scores as a histogram, ``{"edges": [...],
            "cumulative": [...], "n": n}`` (how many of the ``n`` scored at most each edge; the edges are
            their :data:`DRIFT_LEVELS` quantiles): the served models' score histogram has these buckets,
            and :mod:`kernels.drift` compares live traffic with it.
    """

    method: str
    m: int
    class_mean: np.ndarray
    class_std: np.ndarray
    thresholds: dict[float, np.ndarray]
    per_class: dict[float, np.ndarray]
    counts: np.ndarray
    held_out: np.ndarray | None = None
    confidence: float | None = None
    fpr_bound: dict[float, float] = field(default_factory=dict)
    reference: dict[str, Any] | None = None

    def standardize(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``(B,)`` scores -> per-class standardized scores."""
        return (scores - self.class_mean[labels]) / self.class_std[labels]

    def threshold(self, fpr: float, labels: np.ndarray) -> np.ndarray:
        if fpr not in self.thresholds:
            raise InvalidInputError(f"no threshold calibrated for FPR {fpr}; calibrated: {sorted(self.thresholds)}")
        return self.thresholds[fpr][labels]

    def is_attacked(self, scores: np.ndarray, labels: np.ndarray, fpr: float) -> np.ndarray:
        """``(B,) bool`` verdicts at the calibrated false-positive rate ``fpr``."""
        return self.standardize(scores, labels) < self.threshold(fpr, labels)

    def guarantee(self, fpr: float) -> str:
        """The guarantee behind the threshold at ``fpr``, in words."""
        n = int(self.held_out.sum()) if self.held_out is not None else 0
        if not self.fpr_bound:
            return "none (thresholds set in-sample by an older version: calibrate again)"
        bound = self.fpr_bound[fpr]
        kind = (f"realized FPR <= {bound:.2%} with probability {self.confidence:g}" if self.confidence
                else f"expected FPR <= {bound:.2%}")
        short = "" if bound <= fpr else f"; {images_needed(fpr, self.confidence)} held-out images would give {fpr:g}"
        return f"split conformal on {n} held-out clean images: {kind}{short}"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "m": self.m, "class_mean": self.class_mean.tolist(),
                "class_std": self.class_std.tolist(), "counts": self.counts.tolist(),
                "thresholds": {str(f): t.tolist() for f, t in self.thresholds.items()},
                "per_class": {str(f): p.tolist() for f, p in self.per_class.items()},
                "held_out": None if self.held_out is None else self.held_out.tolist(),
                "confidence": self.confidence, "fpr_bound": {str(f): b for f, b in self.fpr_bound.items()},
                "reference": self.reference}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibration":
        held_out = d.get("held_out")
        return cls(d["method"], int(d["m"]), np.array(d["class_mean"]), np.array(d["class_std"]),
                   {float(f): np.array(t) for f, t in d["thresholds"].items()},
                   {float(f): np.array(p, bool) for f, p in d["per_class"].items()}, np.array(d["counts"]),
                   None if held_out is None else np.array(held_out), d.get("confidence"),
                   {float(f): float(b) for f, b in d.get("fpr_bound", {}).items()}, d.get("reference"))


def calibration_split(num_images: int, seed: int = 0) -> np.ndarray:
    """``(num_images,) bool``: which calibration images are held out to set thresholds (the others fit
    the standardization). Depends only on the count and ``seed``, so every member of a fusion and the
    fusion itself split the same images the same way."""
    held = np.zeros(num_images, bool)
    held[np.random.default_rng([seed, 24]).permutation(num_images)[:round(num_images * HELD_OUT_SHARE)]] = True
    return held


def conformal_rank(n: int, fpr: float, confidence: float | None = None) -> int:
    """The rank ``k`` (1-based) of the held-out score used as threshold; 0 when ``n`` is too small.

    Without ``confidence``: ``floor(fpr (n + 1))`` (expected rate ``<= k / (n + 1)``). With it: the
    largest ``k`` whose rate, a Beta(k, n + 1 - k) variable, exceeds ``fpr`` with probability at most
    ``1 - confidence``, i.e. ``P(Binomial(n, fpr) <= k - 1) <= 1 - confidence``.
    """
    if confidence is None:
        return int(math.floor(fpr * (n + 1) + 1e-9))
    from scipy.stats import binom

    ks = np.arange(1, n + 1)
    ok = ks[binom.cdf(ks - 1, n, fpr) <= 1 - confidence]
    return int(ok.max()) if len(ok) else 0


def rate_bound(n: int, k: int, confidence: float | None = None) -> float:
    """What rank ``k`` of ``n`` held-out scores guarantees: the expected rate ``k / (n + 1)``, or the rate
    exceeded with probability at most ``1 - confidence`` (the Beta(k, n + 1 - k) quantile)."""
    if confidence is None:
        return k / (n + 1)
    from scipy.stats import beta

    return float(beta.ppf(confidence, k, n + 1 - k))


def images_needed(fpr: float, confidence: float | None = None) -> int:
    """Held-out images the guarantee at ``fpr`` (and ``confidence``) needs: ``ceil(1 / fpr) - 1``
    without, ``ceil(log(1 - confidence) / log(1 - fpr))`` with a confidence level."""
    if confidence is None:
        return int(math.ceil(1 / fpr - 1e-9)) - 1
    return int(math.ceil(math.log(1 - confidence) / math.log(1 - fpr) - 1e-9))


def conformal_threshold(z: np.ndarray, fpr: float, confidence: float | None = None) -> tuple[float, float]:
    """``(threshold, bound)``: the :func:`conformal_rank`-th smallest of the held-out standardized scores
    ``z`` (the smallest where ``z`` is too short for the guarantee) and the rate it guarantees."""
    n = len(z)
    k = max(conformal_rank(n, fpr, confidence), 1)
    return float(np.partition(z, k - 1)[k - 1]), rate_bound(n, k, confidence)


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, num_classes: int, method: str, m: int,
                        fprs: Sequence[float] = DEFAULT_FPRS, image_ids: np.ndarray | None = None,
                        held_out: np.ndarray | None = None, confidence: float | None = None) -> Calibration:
    """Calibrate on clean scores ``(N,)`` with predicted labels ``(N,)``.

    ``image_ids (N,)`` names the image behind each score when an image was scored several times
    (independent draws, the first of each image first); default: every score is its own image.
    ``held_out (N,) bool`` marks the scores of held-out images (default: :func:`calibration_split` of the
    images by id); of those only the first score per image sets the thresholds. Classes with fewer than
    :data:`MIN_CLASS_IMAGES` reference images are standardized with the statistics of all reference
    scores; a class gets a threshold of its own when it has at least
    :data:`MIN_EXPECTED_FALSE_POSITIVES` / ``fpr`` held-out images.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.int64)
    if scores.shape != labels.shape or scores.ndim != 1 or len(scores) < 2:
        raise InvalidInputError(f"need matching (N,) scores and labels with N >= 2, got {scores.shape}, {labels.shape}")
    if not np.isfinite(scores).all():
        raise InvalidInputError("calibration scores hold NaN or infinite values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidInputError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    for f in fprs:
        if not 0 < f < 1:
            raise InvalidInputError(f"false-positive rates must lie in (0, 1), got {f}")
    if confidence is not None and not 0 < confidence < 1:
        raise InvalidInputError(f"the confidence level must lie in (0, 1), got {confidence}")
    image_ids = np.arange(len(scores)) if image_ids is None else np.asarray(image_ids, np.int64)
    if image_ids.shape != scores.shape:
        raise InvalidInputError(f"image_ids must have shape {scores.shape}, got {image_ids.shape}")
    pairs = np.unique(np.stack([labels, image_ids]), axis=1)  # distinct (class, image)
    if (np.unique(pairs[1], return_counts=True)[1] > 1).any():
        raise InvalidInputError("one image id appears under two predicted labels")
    counts = np.bincount(pairs[0], minlength=num_classes)
    held_out = calibration_split(int(image_ids.max()) + 1)[image_ids] if held_out is None else np.asarray(held_out, bool)
    if held_out.shape != scores.shape:
        raise InvalidInputError(f"held_out must have shape {scores.shape}, got {held_out.shape}")
    first = np.zeros(len(scores), bool)
    first[np.unique(image_ids, return_index=True)[1]] = True
    thresholding, reference = held_out & first, ~held_out
    if thresholding.sum() < 1 or reference.sum() < 2:
        raise InvalidInputError(f"the calibration split needs held-out images and two reference scores; got "
                                f"{int(thresholding.sum())} held-out images and {int(reference.sum())} reference scores")
    ref_counts = np.bincount(np.unique(np.stack([labels[reference], image_ids[reference]]), axis=1)[0],
                             minlength=num_classes)
    r = scores[reference]
    mean = np.full(num_classes, r.mean())
    std = np.full(num_classes, max(r.std(ddof=1), 1e-12))
    for c in np.flatnonzero(ref_counts >= MIN_CLASS_IMAGES):
        s = scores[reference & (labels == c)]
        mean[c], std[c] = s.mean(), max(s.std(ddof=1), 1e-12)
    zl = labels[thresholding]
    z = (scores[thresholding] - mean[zl]) / std[zl]
    held_counts = np.bincount(zl, minlength=num_classes)
    thresholds, own, bounds = {}, {}, {}
    for f in fprs:
        t, bounds[f] = conformal_threshold(z, f, confidence)
        t = np.full(num_classes, t)
        own[f] = (held_counts * f >= MIN_EXPECTED_FALSE_POSITIVES) & (held_counts >= images_needed(f, confidence))
        for c in np.flatnonzero(own[f]):
            t[c] = conformal_threshold(z[zl == c], f, confidence)[0]
        thresholds[f] = t
    edges = np.unique(np.quantile(z, DRIFT_LEVELS))
    reference = {"edges": edges.tolist(), "cumulative": (z[None, :] <= edges[:, None]).sum(1).tolist(), "n": len(z)}
    return Calibration(method, m, mean, std, thresholds, own, counts, held_counts, confidence, bounds, reference)
