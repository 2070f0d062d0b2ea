"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): a prediction that a coarser copy of the input does
not share is suspicious.

Each *squeezer* removes detail an attacker may have used and a clean image does not need: bit-depth
reduction (Sec. 3.1: round each pixel to ``2**bits`` levels; 1 bit on MNIST) and median smoothing
(Sec. 3.2: each pixel the median of its ``size x size`` window; 2x2 on MNIST). The score of an input is
the largest L1 distance between the softmax output on the input and on any squeezed copy (Sec. 4,
the "joint" detector); low = attacked here, like every detector of the contract, so the score is its
negative. Squeezers work on images in ``[0, 1]``, ``(B, C, H, W)``.

The classifier itself is not part of this package (nothing here imports torch): the detector reads the
logits of the squeezed copies from the observations (``Observations.squeezed_logits``: the served ONNX
graph computes them, :mod:`export.models.squeezing`) or asks a ``logits_of`` function (the torch model
offline). Each squeezed copy costs one more forward pass of the classifier; :data:`MNIST_SQUEEZERS` are
the paper's choice for MNIST.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from kernels.calibration import Calibration
from kernels.detector import Detector, Observations
from kernels.errors import InvalidInputError


@dataclass(frozen=True)
class Squeezer:
    """One squeezer: ``kind`` ``"bits"`` (keep ``2**value`` grey levels) or ``"median"`` (a
    ``value x value`` median filter, windows reaching past the border reflected back, as
    ``scipy.ndimage.median_filter(mode="reflect")``; an even window takes the upper of the two middle
    values, as scipy does)."""

    kind: str
    value: int

    def __post_init__(self) -> None:
        if self.kind not in ("bits", "median") or self.value < 1:
            raise InvalidInputError(f"a squeezer is ('bits', n >= 1) or ('median', n >= 1); got {self.kind!r}, {self.value}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.float32)
        if x.ndim != 4:
            raise InvalidInputError(f"squeezers take (B, C, H, W) images, got shape {x.shape}")
        if self.kind == "bits":
            levels = np.float32(2 ** self.value - 1)
            return np.round(x * levels) / levels
        return median_filter(x, self.value)


def median_filter(x: np.ndarray, size: int) -> np.ndarray:
    """Each pixel of ``x`` (B, C, H, W) the median of its ``size x size`` window, the window's origin
    as scipy's (centred, the extra row and column of an even window before the pixel), the border
    reflected (``d c b a | a b c d``); for an even window the upper middle value."""
    if size == 1:
        return x.copy()
    before = size // 2
    after = size - 1 - before
    padded = np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)), mode="symmetric")
    h, w = x.shape[2:]
    windows = np.stack([padded[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size)], axis=0)
    return np.partition(windows, size * size // 2, axis=0)[size * size // 2]


MNIST_SQUEEZERS = (Squeezer("bits", 1), Squeezer("median", 2))  # Xu et al., 2018, Sec. 5 (MNIST)
COLOR_SQUEEZERS = (Squeezer("bits", 5), Squeezer("median", 2))  # their CIFAR-10/ImageNet pair, no non-local means


MAX_ACCURACY_DROP = 0.01  # a squeezer that costs clean accuracy more than this flags clean images: left out


def accuracy_preserving(logits_of: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
                        squeezers: Sequence[Squeezer], max_drop: float = MAX_ACCURACY_DROP
                        ) -> tuple[tuple[Squeezer, ...], dict[str, float]]:
    """The squeezers that keep the classifier's accuracy on held-out clean ``images`` within ``max_drop``
    of its accuracy on them unsqueezed (Xu et al. 2018 chose their squeezers by that criterion, Sec. 5), and
    every accuracy measured (``{"none": a, "bits1": a1, ...}``). On MNIST-5k 1-bit depth and the 2x2
    median cost 0.1-0.2 points; on Fashion-MNIST 16.7 and 2.6, and squeezing only diluted the fusion."""
    labels = np.asarray(labels)
    accuracy = {"none": float((np.asarray(logits_of(images)).argmax(1) == labels).mean())}
    kept = []
    for s in squeezers:
        accuracy[f"{s.kind}{s.value}"] = float((np.asarray(logits_of(s(images))).argmax(1) == labels).mean())
        if accuracy["none"] - accuracy[f"{s.kind}{s.value}"] <= max_drop:
            kept.append(s)
    return tuple(kept), accuracy


def default_squeezers(channels: int) -> tuple[Squeezer, ...]:
    """The paper's squeezers for grey-level (MNIST's) or colour images (CIFAR-10's and ImageNet's)."""
    return MNIST_SQUEEZERS if channels == 1 else COLOR_SQUEEZERS


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class FeatureSqueezing(Detector):
    """Minus the largest L1 distance between the softmax of the input and of its squeezed copies
    (Xu, Evans & Qi, 2018), one global threshold calibrated on clean images.

    Args:
        logits_of: ``(B, C, H, W) float32 images in [0, 1] -> (B, classes) logits``: the classifier, for
            observations without ``squeezed_logits`` (``None``: they must have them).
        squeezers: default the paper's MNIST pair (1-bit depth, 2x2 median).
        calibration, fpr: see :class:`kernels.detector.Detector`.
    """

    name = "squeeze"

    def __init__(self, logits_of: Callable[[np.ndarray], np.ndarray] | None = None,
                 squeezers: Sequence[Squeezer] = MNIST_SQUEEZERS, calibration: Calibration | None = None,
                 fpr: float | None = None) -> None:
        if not squeezers:
            raise InvalidInputError("feature squeezing needs at least one squeezer")
        self.logits_of, self.squeezers = logits_of, tuple(squeezers)
        super().__init__(calibration, fpr)

    def distances(self, obs: Observations) -> np.ndarray:
        """``(B, S)`` L1 distance of the softmax outputs, input against each squeezed copy."""
        if obs.squeezed_logits is not None:
            squeezed = np.asarray(obs.squeezed_logits)
            if squeezed.ndim != 3 or squeezed.shape[:2] != (len(obs), len(self.squeezers)):
                raise InvalidInputError(f"squeezed_logits must have shape ({len(obs)}, {len(self.squeezers)}, classes), "
                                        f"got {squeezed.shape}")
            p = softmax(obs.need("logits", self.name))
            return np.stack([np.abs(p - softmax(squeezed[:, i])).sum(axis=1) for i in range(len(self.squeezers))], axis=1)
        return self.distances(self.observe(obs))

    def observe(self, obs: Observations) -> Observations:
        """``obs`` with the logits of its images' squeezed copies (and of the images, if missing), computed
        once: a randomized fusion asks its members again for every draw."""
        if obs.squeezed_logits is not None and obs.logits is not None:
            return obs
        if self.logits_of is None:
            raise InvalidInputError("the squeeze detector needs squeezed_logits, which these observations lack")
        images = np.asarray(obs.need("images", self.name), np.float32)
        logits = obs.logits if obs.logits is not None else self.logits_of(images)
        return replace(obs, logits=logits, squeezed_logits=np.stack([self.logits_of(s(images)) for s in self.squeezers], 1))

    def to_json(self) -> dict:
        """Its calibration and squeezers (what a served model needs to rebuild it)."""
        return {**self._calibrated().to_json(), "squeezers": [[s.kind, s.value] for s in self.squeezers]}

    @classmethod
    def from_json(cls, d: dict, logits_of: Callable[[np.ndarray], np.ndarray] | None = None) -> "FeatureSqueezing":
        """The stored member: squeezers and calibration (served: the copies' logits come with the observations)."""
        return cls(logits_of, tuple(Squeezer(k, int(v)) for k, v in d["squeezers"]), Calibration.from_json(d))

    def raw_scores(self, obs: Observations, rng=None):
        d = self.distances(obs)
        return -d.max(axis=1), np.ones(len(d), bool), np.zeros((len(d), 0), np.int64)


def observed(detector: Detector, obs: Observations) -> Observations:
    """``obs`` with the squeezed copies' logits that ``detector`` (or a member of its fusion) needs,
    computed once (:meth:`FeatureSqueezing.observe`) before it is asked many times; unchanged otherwise."""
    for member in getattr(detector, "members", {}).values() or [detector]:
        if isinstance(member, FeatureSqueezing) and member.logits_of is not None:
            return member.observe(obs)
    return obs
