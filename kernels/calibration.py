"""Detection thresholds for chosen false-positive rates, set on clean calibration images.

Scores of clean images differ from class to class, so each score is first standardized with its
predicted class's clean mean and standard deviation; a threshold on the standardized score is then the
``fpr`` quantile of the clean calibration scores. A class gets a threshold of its own only when it holds
enough calibration images for that quantile to be more than its minimum (at least
:data:`MIN_EXPECTED_FALSE_POSITIVES` expected false positives); otherwise the global threshold applies.
Measured on MNIST with a LeNet-5: with about 100 calibration images per class, a per-class 1% threshold
is that class's minimum score and noisy, and one global threshold on per-class standardized scores did
as well or better.

Everything counts **images**, not scores: calibration scores every image under several independent
draws (``image_ids`` says which scores belong to one image), and ten draws of one image say nothing
about how other images of its class score. A class with fewer than :data:`MIN_CLASS_IMAGES`
calibration images is standardized with the statistics of all calibration scores (its own mean and
spread would be noise); its false-positive rate is then as good as the assumption that its clean
scores look like the others'.

Scores must be computed under the same random drawing (same ``m``) as at test time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kernels.errors import InvalidInputError

DEFAULT_FPRS = (0.01, 0.02, 0.05)  # the paper reports these
MIN_EXPECTED_FALSE_POSITIVES = 10
MIN_CLASS_IMAGES = 20  # images a class needs for a mean and spread of its own


@dataclass(frozen=True)
class Calibration:
    """Standardization and thresholds of one score method at one draw size ``m``.

    Attributes:
        method: ``lrt``, ``vote`` or ``anomaly``.
        m: fingerprints drawn per input when the scores were taken.
        class_mean, class_std: ``(C,)`` clean score statistics per predicted class.
        thresholds: ``{fpr: (C,) float}``: flag an input when its standardized score is below its class's entry.
        per_class: ``{fpr: (C,) bool}``: whether the entry is the class's own (else the global one).
        counts: ``(C,)`` calibration images (not scores) per predicted class.
    """

    method: str
    m: int
    class_mean: np.ndarray
    class_std: np.ndarray
    thresholds: dict[float, np.ndarray]
    per_class: dict[float, np.ndarray]
    counts: np.ndarray

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

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "m": self.m, "class_mean": self.class_mean.tolist(),
                "class_std": self.class_std.tolist(), "counts": self.counts.tolist(),
                "thresholds": {str(f): t.tolist() for f, t in self.thresholds.items()},
                "per_class": {str(f): p.tolist() for f, p in self.per_class.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibration":
        return cls(d["method"], int(d["m"]), np.array(d["class_mean"]), np.array(d["class_std"]),
                   {float(f): np.array(t) for f, t in d["thresholds"].items()},
                   {float(f): np.array(p, bool) for f, p in d["per_class"].items()}, np.array(d["counts"]))


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray, num_classes: int, method: str, m: int,
                        fprs: Sequence[float] = DEFAULT_FPRS, image_ids: np.ndarray | None = None) -> Calibration:
    """Calibrate on clean scores ``(N,)`` with predicted labels ``(N,)``.

    ``image_ids (N,)`` names the image behind each score when an image was scored several times
    (independent draws); default: every score is its own image. Classes with fewer than
    :data:`MIN_CLASS_IMAGES` images are standardized with the statistics of all scores; a class gets a
    threshold of its own when it has at least :data:`MIN_EXPECTED_FALSE_POSITIVES` / ``fpr`` images.
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
    image_ids = np.arange(len(scores)) if image_ids is None else np.asarray(image_ids)
    if image_ids.shape != scores.shape:
        raise InvalidInputError(f"image_ids must have shape {scores.shape}, got {image_ids.shape}")
    pairs = np.unique(np.stack([labels, image_ids.astype(np.int64)]), axis=1)  # distinct (class, image)
    counts = np.bincount(pairs[0], minlength=num_classes)
    if (np.unique(pairs[1], return_counts=True)[1] > 1).any():
        raise InvalidInputError("one image id appears under two predicted labels")
    mean = np.full(num_classes, scores.mean())
    std = np.full(num_classes, max(scores.std(ddof=1), 1e-12))
    for c in np.flatnonzero(counts >= MIN_CLASS_IMAGES):
        s = scores[labels == c]
        mean[c], std[c] = s.mean(), max(s.std(ddof=1), 1e-12)
    z = (scores - mean[labels]) / std[labels]
    thresholds, own = {}, {}
    for f in fprs:
        t = np.full(num_classes, np.quantile(z, f))
        own[f] = counts * f >= MIN_EXPECTED_FALSE_POSITIVES
        for c in np.flatnonzero(own[f]):
            t[c] = np.quantile(z[labels == c], f)
        thresholds[f] = t
    return Calibration(method, m, mean, std, thresholds, own, counts)
