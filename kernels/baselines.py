"""Trivial detectors scored beside the fingerprints, through the same contract (:mod:`kernels.detector`).

A detection figure means little until it beats what needs no model internals at all: on MNIST an
L-inf attack turns many pixels gray, so a count of gray pixels alone catches strong L-inf attacks.
"""
from __future__ import annotations

import numpy as np

from kernels.detector import Detector, Observations

GRAY_LOW, GRAY_HIGH = 0.1, 0.9


class GrayPixels(Detector):
    """Input statistics: minus the number of pixels neither black nor white (below :data:`GRAY_LOW` or
    above :data:`GRAY_HIGH`), one global threshold. Low = attacked, as for every detector."""

    name = "gray_pixels"

    def raw_scores(self, obs: Observations, rng=None):
        images = np.asarray(obs.need("images", self.name))
        flat = images.reshape(len(images), -1)
        score = -((flat > GRAY_LOW) & (flat < GRAY_HIGH)).sum(axis=1).astype(np.float64)
        return score, np.ones(len(images), bool), np.zeros((len(images), 0), np.int64)
