"""The detector contract: one way to fit, calibrate and ask any detector, served or offline.

In the style of IBM ART's detectors (``fit``, then ``detect`` -> per-input flags), with calibration
explicit because every threshold here is set on held-out clean images at a chosen false-positive rate:

    detector = FingerprintDetector(bank, RandomDraws(m=128))     # or .fit(clean, attacked) from nothing
    detector.calibrate(clean_calibration, fprs=(0.01, 0.05), repeats=10)
    verdicts = detector.detect(Observations(labels, acts=acts))  # Verdicts(score, is_attacked, checked, draws)

A detector looks at :class:`Observations` (predicted labels and whatever it needs of activations,
images and logits), turns them into one raw score per input (low = attacked), standardizes it with the
clean statistics of the predicted class and compares it with the calibrated threshold
(:mod:`kernels.calibration`). Every detector of the project implements it: the randomized neural
fingerprints (Fisher, Shahar & Resheff, 2024, Sec. 3.3) with a pluggable draw policy and backend,
their static all-fingerprint variant, the baselines (:mod:`kernels.baselines`) and, in the white-box
experiment, a running Triton server. :class:`PValueFusion` makes several of them one decision; the
served default (:func:`kernels.served.served_detector`, run by :mod:`model_repository.serving`) fuses the fingerprints'
vote with the logit margin.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kernels.bank import Bank
from kernels.calibration import DEFAULT_FPRS, Calibration, calibrate_threshold, calibration_split
from kernels.errors import InvalidInputError
from kernels.scoring import METHODS, NumpyScorer, check_labels, covered, draw_fingerprints, secure_rng

DEFAULT_M = 128  # fingerprints drawn per input (see the README's measurements)
DEFAULT_CALIBRATION_REPEATS = 10  # independent draws per calibration image


@dataclass(frozen=True)
class Observations:
    """What detectors may look at for a batch of ``B`` inputs.

    Attributes:
        labels: ``(B,) int`` the classifier's predicted classes.
        acts: ``(B, D) float32`` activations in the bank's layout (NumPy; on the GPU backend also a
            CuPy array or a DLPack-capable GPU tensor).
        images: ``(B, C, H, W)`` the inputs themselves.
        logits: ``(B, C)`` the classifier's logits.
        squeezed_logits: ``(B, S, C)`` its logits on each squeezed copy of the inputs
            (:mod:`kernels.squeezing`; the served graph's ``squeezed_logits`` output).
        validated: ``acts`` were already checked for dtype, shape and finite values (the server checks
            each request on its own, to answer a bad one with its own error); not checked again.
    """

    labels: np.ndarray
    acts: object = None
    images: np.ndarray | None = None
    logits: np.ndarray | None = None
    squeezed_logits: np.ndarray | None = None
    validated: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "Observations":
        """The observations of ``rows`` (indices or a mask), host arrays only."""
        pick = lambda a: None if a is None else np.asarray(a)[rows]  # noqa: E731
        return Observations(np.asarray(self.labels)[rows], pick(self.acts), pick(self.images), pick(self.logits),
                            pick(self.squeezed_logits), self.validated)

    @staticmethod
    def concat(parts: Sequence["Observations"]) -> "Observations":
        """The rows of ``parts`` in order, host arrays; a field some part lacks is left out."""
        def cat(field: str):
            values = [getattr(p, field) for p in parts]
            return None if any(v is None for v in values) else np.concatenate([np.asarray(v) for v in values])
        return Observations(cat("labels"), cat("acts"), cat("images"), cat("logits"), cat("squeezed_logits"))

    def need(self, field: str, who: str):
        value = getattr(self, field)
        if value is None:
            raise InvalidInputError(f"the {who} detector needs {field}, which these observations lack")
        return value


@dataclass(frozen=True)
class Verdicts:
    """A detector's answer for ``B`` inputs.

    Attributes:
        score: ``(B,) float64`` standardized score, low = attacked; NaN where not checked.
        is_attacked: ``(B,) bool`` score below the threshold of the operating false-positive rate.
        checked: ``(B,) bool`` whether the detector could check the input (a fingerprint detector cannot
            check an input predicted as a class with fewer fingerprints than it draws); an unchecked
            input is never flagged.
        draws: ``(B, m) int64`` the fingerprints drawn for each input, -1 where not checked; ``(B, 0)``
            for detectors that draw nothing.
    """

    score: np.ndarray
    is_attacked: np.ndarray
    checked: np.ndarray
    draws: np.ndarray


class Detector(ABC):
    """A calibrated attack detector. Subclasses compute raw scores; calibration, standardization and
    thresholds are common to all.

    Attributes:
        name: how reports call it.
        num_classes: classes of its per-class statistics (1 for a class-agnostic score).
        randomized: whether two calls on the same input may score it differently (then calibration
            pools several independent draws per image).
        calibration: set by :meth:`calibrate` (or given).
        fpr: the operating false-positive rate of :meth:`detect`; default the lowest calibrated.
    """

    name = "detector"
    num_classes = 1
    randomized = False
    draw_size = 0

    def __init__(self, calibration: Calibration | None = None, fpr: float | None = None) -> None:
        self.calibration, self.fpr = calibration, fpr
        if calibration is not None:
            self._set_operating_fpr(fpr)

    @abstractmethod
    def raw_scores(self, obs: Observations, rng: np.random.Generator | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(score (B,) float64, checked (B,) bool, draws (B, m) int64)``; score NaN and draws -1 where
        not checked; low scores mean attacked."""

    def fit(self, clean: Observations, attacked: Observations) -> "Detector":
        """Learn from clean inputs and inputs attacked into their labels; a detector without
        parameters has nothing to learn."""
        return self

    def class_labels(self, labels: np.ndarray) -> np.ndarray:
        """The class whose statistics and threshold apply to each input."""
        labels = np.asarray(labels, np.int64)
        return labels if self.num_classes > 1 else np.zeros_like(labels)

    def calibrate(self, clean: Observations, fprs: Sequence[float] = DEFAULT_FPRS, repeats: int = 1, seed: int = 0,
                  progress: bool = False, confidence: float | None = None) -> Calibration:
        """Standardization and split-conformal thresholds from clean calibration inputs (never the test
        inputs): :func:`kernels.calibration.calibration_split` of ``seed`` holds half of them out to set
        the thresholds, so that the expected false-positive rate is at most nominal (with probability
        ``confidence`` the realized one, if given).

        A randomized detector scores every image under ``repeats`` independent draws; the reference half
        pools them with the image named (:func:`kernels.calibration.calibrate_threshold` counts images,
        not scores), the held-out half keeps the first.
        """
        from tqdm.auto import tqdm

        rng = np.random.default_rng(seed)
        repeats = repeats if self.randomized else 1
        runs = [self.raw_scores(clean, rng)
                for _ in tqdm(range(repeats), desc=f"calibrate {self.name}", unit="draw", disable=not progress)]
        checked = runs[0][1]
        if not checked.any():
            raise InvalidInputError(f"no calibration image can be checked by the {self.name} detector "
                                    f"(none is predicted as a class it has fingerprints for)")
        labels = self.class_labels(clean.labels[checked])
        self.calibration = calibrate_threshold(
            np.concatenate([s[checked] for s, _, _ in runs]), np.tile(labels, repeats), self.num_classes, self.name,
            self.draw_size, fprs, image_ids=np.tile(np.arange(len(labels)), repeats),
            held_out=np.tile(calibration_split(len(clean), seed)[checked], repeats), confidence=confidence)
        self._set_operating_fpr(self.fpr)
        return self.calibration

    def _set_operating_fpr(self, fpr: float | None) -> None:
        calibrated = sorted(self.calibration.thresholds)
        self.fpr = min(calibrated) if fpr is None or fpr not in calibrated else float(fpr)
        if fpr is not None and fpr not in calibrated:
            raise InvalidInputError(f"no threshold calibrated for FPR {fpr}; calibrated: {calibrated}")

    def threshold(self, fpr: float, labels: np.ndarray) -> np.ndarray:
        """``(B,)`` the threshold on standardized scores at ``fpr`` for inputs predicted as ``labels``."""
        return self._calibrated().threshold(fpr, self.class_labels(labels))

    def _calibrated(self) -> Calibration:
        if self.calibration is None:
            raise InvalidInputError(f"the {self.name} detector is not calibrated: call calibrate() first")
        return self.calibration

    def detect(self, obs: Observations, fpr: float | None = None, rng: np.random.Generator | None = None) -> Verdicts:
        """Verdicts for ``obs`` at the calibrated false-positive rate ``fpr`` (default the operating one);
        ``rng`` draws for a randomized detector (default fresh OS entropy)."""
        cal = self._calibrated()
        raw, checked, draws = self.raw_scores(obs, rng)
        labels = self.class_labels(obs.labels)
        z = np.full(len(raw), np.nan)
        z[checked] = cal.standardize(raw[checked], labels[checked])
        flagged = np.zeros(len(raw), bool)
        flagged[checked] = z[checked] < cal.threshold(self.fpr if fpr is None else fpr, labels[checked])
        return Verdicts(z, flagged, checked, draws)


class RandomDraws:
    """The paper's draw policy: ``m`` fingerprints per input, uniformly with replacement from the bank
    of its predicted class, fresh for every input.

    A class with fewer than ``m`` fingerprints is still checked, with the ``m`` draws taken from what it
    has, as long as it has ``min_fingerprints``; only a class below that is left unchecked.
    """

    randomized = True

    def __init__(self, m: int, min_fingerprints: int = 1) -> None:
        if m < 1 or min_fingerprints < 1:
            raise InvalidInputError(f"m and min_fingerprints must be at least 1, got {m} and {min_fingerprints}")
        self.m, self.min_fingerprints = int(m), int(min_fingerprints)

    def covers(self, labels: np.ndarray, bank: Bank) -> np.ndarray:
        return covered(labels, bank, self.min_fingerprints)

    def groups(self, labels: np.ndarray, bank: Bank, rng: np.random.Generator):
        """``[(rows, ids (len(rows), m))]``: which inputs are scored with which fingerprints."""
        yield np.arange(len(labels)), draw_fingerprints(labels, bank, self.m, rng)


class AllFingerprints:
    """A static policy: every fingerprint of the predicted class, the same for every input (the
    white-box attacker's local copy; the expectation of what random draws estimate)."""

    randomized = False
    m = 0  # as many as the class has

    def covers(self, labels: np.ndarray, bank: Bank) -> np.ndarray:
        return covered(labels, bank, 1)

    def groups(self, labels: np.ndarray, bank: Bank, rng: np.random.Generator):
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            ids = np.arange(bank.class_offsets[c], bank.class_offsets[c + 1])
            yield rows, np.ascontiguousarray(np.broadcast_to(ids, (len(rows), len(ids))))


class FingerprintDetector(Detector):
    """Neural fingerprints (Fisher, Shahar & Resheff, 2024): the values of fingerprints of the predicted
    class's bank, drawn by ``draws``, scored by ``method`` (``lrt``: the Gaussian likelihood ratio;
    ``vote``; ``anomaly``: see :mod:`kernels.scoring`).

    Args:
        bank: the fingerprint bank (:meth:`fit` searches one).
        draws: :class:`RandomDraws` (the paper; what the server runs) or :class:`AllFingerprints`.
        method: which score.
        per_class: standardize and threshold per predicted class (else one global threshold on the raw
            score, which measured better with about 100 calibration images per class).
        backend: the scorer, :class:`kernels.scoring.NumpyScorer` (default) or
            :class:`kernels.gpu.GpuScorer` (the CUDA kernels; activations may live on the GPU).
        calibration, fpr: see :class:`Detector`.
    """

    def __init__(self, bank: Bank | None = None, draws: RandomDraws | AllFingerprints = RandomDraws(DEFAULT_M),
                 method: str = "lrt", backend=None, calibration: Calibration | None = None,
                 fpr: float | None = None, per_class: bool = False) -> None:
        if method not in METHODS:
            raise InvalidInputError(f"unknown score {method!r}; choose one of {', '.join(METHODS)}")
        self.draws, self.method, self.per_class = draws, method, per_class
        self.randomized, self.draw_size = draws.randomized, draws.m
        self.name = method if draws.randomized else f"{method}-static"
        self.backend = backend
        self.bank = None
        if bank is not None:
            self._set_bank(bank)
        if calibration is not None and calibration.m != draws.m:
            raise InvalidInputError(f"the calibration was set for draws of {calibration.m} fingerprints, the "
                                    f"detector draws {draws.m}: calibrate again")
        super().__init__(calibration, fpr)

    def _set_bank(self, bank: Bank) -> None:
        self.bank, self.num_classes = bank, bank.num_classes if self.per_class else 1
        if self.backend is None or isinstance(self.backend, NumpyScorer):
            self.backend = NumpyScorer(bank)
        elif self.backend.bank is not bank:  # a GPU scorer holds its bank's arrays on the device
            raise InvalidInputError("the backend scores another bank: give a GpuScorer of this detector's bank")

    @classmethod
    def from_bank(cls, bank: Bank, method: str = "lrt", fpr: float | None = None, backend=None) -> "FingerprintDetector":
        """The detector the bank was calibrated for (``nfp calibrate`` stores the calibration and its ``m``)."""
        if "calibration" not in bank.meta or method not in bank.meta["calibration"]:
            raise InvalidInputError("the bank is not calibrated: run `nfp calibrate` first")
        cal = Calibration.from_json(bank.meta["calibration"][method])
        return cls(bank, RandomDraws(cal.m), method, backend, cal, fpr, per_class=len(cal.class_mean) > 1)

    def fit(self, clean: Observations, attacked: Observations, config=None, num_classes: int | None = None,
            meta: dict | None = None, progress: bool = False) -> "FingerprintDetector":
        """Search the bank (Sec. 3.1-3.2): ``clean`` holds correctly classified clean inputs labelled with
        their class, ``attacked`` inputs attacked into a class labelled with that class; ``config`` a
        :class:`kernels.fingerprint_search.SearchConfig`; ``num_classes`` the model's (default: the
        largest label + 1); ``meta`` recorded in the bank. Any calibration is dropped."""
        from kernels.fingerprint_search import SearchConfig, search_fingerprints

        c, a = clean.need("acts", self.name), attacked.need("acts", self.name)
        num_classes = num_classes or int(max(clean.labels.max(), attacked.labels.max())) + 1
        per_class = search_fingerprints(np.asarray(c), clean.labels, np.asarray(a), attacked.labels, num_classes,
                                        config or SearchConfig(), progress)
        self._set_bank(Bank.from_fingerprints(per_class, c.shape[1], meta))
        self.calibration = None
        return self

    def raw_scores(self, obs: Observations, rng: np.random.Generator | None = None):
        if self.bank is None:
            raise InvalidInputError("the fingerprint detector has no bank: fit() it or give one")
        acts = obs.need("acts", self.name)
        if not obs.validated:
            acts = self.backend.check(acts)
        labels = check_labels(obs.labels, acts.shape[0], self.bank)
        b = len(labels)
        checked = self.draws.covers(labels, self.bank)
        raw = np.full(b, np.nan)
        draws = np.full((b, self.draws.m), -1, np.int64)
        if not checked.any():
            return raw, checked, draws
        rows = np.flatnonzero(checked)
        acts = acts if len(rows) == b else self.backend.take_rows(acts, rows)
        for group, ids in self.draws.groups(labels[rows], self.bank, rng or secure_rng()):
            part = acts if len(group) == len(rows) else self.backend.take_rows(acts, group)
            raw[rows[group]] = self.backend.scores(part, ids, self.method)
            if self.draws.m:
                draws[rows[group]] = ids
        return raw, checked, draws


class PValueFusion(Detector):
    """Several detectors as one decision, by their clean p-values.

    Each member's standardized score becomes its clean p-value: the share of clean calibration inputs
    that scored lower, interpolated on :data:`REFERENCE_LEVELS` quantiles and, below the lowest clean
    score, extended by a Gaussian tail (so an input far beyond every clean one keeps its distance instead
    of saturating). The fused raw score combines the log p-values by ``rule``:

    - ``"min"``: the smallest (an input is as suspicious as its most surprising member);
    - ``"fisher"``: their sum (Fisher's method: evidence from several members adds up).

    Its own threshold is then calibrated on clean inputs like any other score, so the fused decision
    keeps the chosen false-positive rate. Scale-free, so a likelihood ratio and a logit margin combine
    fairly; each member is a detector of this contract (calibrated first by :meth:`calibrate` if not yet).

    Args:
        members: ``{name: detector}``; the first one that draws fingerprints supplies ``Verdicts.draws``.
        rule: ``"min"`` or ``"fisher"``.
        references: ``{name: (L,) quantiles of its clean standardized scores}`` (set by :meth:`calibrate`).
    """

    name = "fused"

    def __init__(self, members: dict[str, Detector], rule: str = "min", references: dict[str, np.ndarray] | None = None,
                 calibration: Calibration | None = None, fpr: float | None = None) -> None:
        if rule not in FUSION_RULES:
            raise InvalidInputError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")
        self.members, self.rule, self.references = dict(members), rule, references
        self.randomized = any(m.randomized for m in self.members.values())
        self.draw_size = max((m.draw_size for m in self.members.values()), default=0)
        super().__init__(calibration, fpr)

    def calibrate(self, clean: Observations, fprs: Sequence[float] = DEFAULT_FPRS, repeats: int = 1, seed: int = 0,
                  progress: bool = False, confidence: float | None = None) -> Calibration:
        """Members (if not yet calibrated) and their clean references on the reference half of
        :func:`kernels.calibration.calibration_split`, the fused threshold on the held-out half: the
        fused score is fixed before the images that set its threshold are seen."""
        rng = np.random.default_rng([seed, 1])
        reference = clean.take(~calibration_split(len(clean), seed))
        self.references = {}
        for name, member in self.members.items():
            if member.calibration is None:
                member.calibrate(clean, fprs, repeats, seed, progress, confidence)
            runs = [member.detect(reference, rng=rng) for _ in range(repeats if member.randomized else 1)]
            self.references[name] = np.quantile(np.concatenate([v.score[v.checked] for v in runs]), REFERENCE_LEVELS)
        return super().calibrate(clean, fprs, repeats, seed, progress, confidence)

    def raw_scores(self, obs: Observations, rng: np.random.Generator | None = None):
        if self.references is None:
            raise InvalidInputError("the fused detector is not calibrated: call calibrate() first")
        rng = rng or secure_rng()
        log_p, checked, draws = [], np.zeros(len(obs), bool), None
        for name, member in self.members.items():
            v = member.detect(obs, rng=rng)
            log_p.append(np.where(v.checked, clean_log_p_value(np.nan_to_num(v.score), self.references[name]), 0.0))
            checked |= v.checked
            if draws is None and v.draws.shape[1]:
                draws = v.draws
        fused = np.min(log_p, axis=0) if self.rule == "min" else np.sum(log_p, axis=0)
        return fused, checked, draws if draws is not None else np.zeros((len(obs), 0), np.int64)

    def to_json(self) -> dict:
        """Its calibration, rule and references; the members store their own."""
        return {**self._calibrated().to_json(), "members": list(self.members), "rule": self.rule,
                "references": {k: v.tolist() for k, v in self.references.items()}}


FUSION_RULES = ("min", "fisher")
REFERENCE_LEVELS = np.linspace(0.0, 1.0, 2001)


def clean_log_p_value(z: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``log P(clean score <= z)`` from the clean quantiles ``reference`` (at :data:`REFERENCE_LEVELS`),
    the lowest quantile standing for half a level; below it a Gaussian tail continues the curve.

    A score that many clean inputs share (the vote takes at most ``m + 1`` values, so its quantiles hold
    long runs of one value) gets the level at the *end* of its run, ``P(clean <= z)``; between distinct
    values the level is interpolated."""
    from scipy.special import log_ndtr

    floor = REFERENCE_LEVELS[1] / 2
    values, last = np.unique(reference[::-1], return_index=True)  # each value's last level
    inside = np.log(np.maximum(np.interp(z, values, REFERENCE_LEVELS[len(reference) - 1 - last]), floor))
    tail = np.log(floor) + log_ndtr(np.minimum(z, reference[0])) - log_ndtr(reference[0])
    return np.where(z < reference[0], tail, inside)


