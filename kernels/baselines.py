"""Detectors scored beside the fingerprints, through the same contract (:mod:`kernels.detector`).

A detection figure means little until it beats what needs no fingerprints at all:

- :class:`GrayPixels`: input statistics. On MNIST an L-inf attack turns many pixels gray, so a count
  of gray pixels alone catches strong L-inf attacks.
- :class:`LogitMargin` and :class:`MaxSoftmax`: the classifier's own confidence (Hendrycks & Gimpel,
  2017). Minimal-perturbation attacks (CW-L2 at confidence 0, DeepFool) stop right at the decision
  boundary, so a small top-1 minus top-2 logit margin gives them away for free.
- :class:`Mahalanobis`: a feature-space score (Lee et al., 2018): distance of an input's activations to
  the clean mean of its predicted class under one covariance shared by all classes.

All are class-agnostic scores with one global threshold (low = attacked), calibrated on clean data.
"""
from __future__ import annotations

import numpy as np

from kernels.detector import Detector, Observations
from kernels.errors import InvalidInputError

GRAY_LOW, GRAY_HIGH = 0.1, 0.9


def _nothing_drawn(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(n, bool), np.zeros((n, 0), np.int64)


class GrayPixels(Detector):
    """Minus the number of pixels neither black nor white (between :data:`GRAY_LOW` and :data:`GRAY_HIGH`)."""

    name = "gray_pixels"

    def raw_scores(self, obs: Observations, rng=None):
        images = np.asarray(obs.need("images", self.name))
        flat = images.reshape(len(images), -1)
        return -((flat > GRAY_LOW) & (flat < GRAY_HIGH)).sum(axis=1).astype(np.float64), *_nothing_drawn(len(images))


class LogitMargin(Detector):
    """The top-1 minus top-2 logit: small where an input sits at the decision boundary."""

    name = "margin"

    def raw_scores(self, obs: Observations, rng=None):
        z = np.asarray(obs.need("logits", self.name))
        rows, top = np.arange(len(z)), z.argmax(axis=1)
        rest = z.copy()
        rest[rows, top] = -np.inf  # two max passes: several times faster than a sort or partition
        return z[rows, top].astype(np.float64) - rest.max(axis=1), *_nothing_drawn(len(z))


class MaxSoftmax(Detector):
    """The log of the largest softmax probability."""

    name = "msp"

    def raw_scores(self, obs: Observations, rng=None):
        z = np.asarray(obs.need("logits", self.name), np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return -np.log(np.exp(z).sum(axis=1)), *_nothing_drawn(len(z))


class Mahalanobis(Detector):
    """Minus the squared Mahalanobis distance of ``acts[:, neurons]`` to the clean mean of the predicted
    class, with the clean covariance pooled over classes (Lee et al., 2018, without input
    pre-processing); :meth:`fit` estimates both from clean activations. An input predicted as a class
    the clean data did not hold is not checked (score NaN, never flagged).

    Args:
        neurons: which activation columns (e.g. one layer's slice of the layout); default all.
        ridge: added to the covariance's diagonal, relative to its mean variance.
        channels: the columns are a ``(channels, H, W)`` feature map: each channel's mean is the feature
            (Lee et al.'s pooling of convolutional layers).
    """

    name = "mahalanobis"

    def __init__(self, neurons: slice | None = None, ridge: float = 1e-6, channels: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.neurons, self.ridge, self.channels = neurons if neurons is not None else slice(None), ridge, channels
        self.means = self.precision = None

    def features(self, obs: Observations) -> np.ndarray:
        x = np.asarray(obs.need("acts", self.name))[:, self.neurons].astype(np.float64)
        return x if self.channels is None else x.reshape(len(x), self.channels, -1).mean(axis=2)

    def fit(self, clean: Observations, attacked: Observations | None = None) -> "Mahalanobis":
        x = self.features(clean)
        y = np.asarray(clean.labels, np.int64)
        classes = int(y.max()) + 1
        self.means, self.seen = np.zeros((classes, x.shape[1])), np.zeros(classes, bool)
        self.seen[np.unique(y)] = True
        for c in np.unique(y):
            self.means[c] = x[y == c].mean(axis=0)
        r = x - self.means[y]
        cov = r.T @ r / max(len(r) - classes, 1)
        cov += self.ridge * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
        self.precision = np.linalg.inv(cov)
        return self

    def raw_scores(self, obs: Observations, rng=None):
        if self.means is None:
            raise InvalidInputError("the mahalanobis detector is not fitted: call fit() on clean activations")
        labels = np.asarray(obs.labels, np.int64)
        if labels.min(initial=0) < 0:
            raise InvalidInputError(f"labels must be class indices, got {labels.min()}")
        # a class without clean data has no mean: the input is not checked (never flagged), as the
        # fingerprints leave a class without fingerprints unchecked
        known = labels < len(self.means)
        known[known] = self.seen[labels[known]]
        scores = np.full(len(labels), np.nan)
        d = self.features(obs)[known] - self.means[labels[known]]
        scores[known] = -np.einsum("ij,jk,ik->i", d, self.precision, d)
        return scores, known, np.zeros((len(labels), 0), np.int64)
