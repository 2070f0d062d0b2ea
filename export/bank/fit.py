"""The detector from a model, images and labels: the offline pipeline in one call.

Fisher, Shahar & Resheff (2024), Sec. 3: the clean set of a class is its images the model classifies
correctly; the attacked set, images of other classes attacked (targeted) into it; the bank is searched
on their activations and calibrated on held-out clean images. ``nfp pipeline`` runs the same stages
with files in between; this is the short way for your own model::

    detector, layout = fit_detector(model, images, labels, calibration_images)
    acts, _, logits = capture_activations(model, new_images, layout.layers, return_logits=True)
    verdicts = detector.detect(Observations(logits.argmax(1), acts=acts, logits=logits, images=new_images))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import nn

from export.models.activations import ActivationLayout, capture_activations
from export.attacks.art_attacks import AttackDefaults, BankAttacks, attack_defaults, attack_into_classes, merge_results
from export.models.classifier import predict
from kernels.calibration import DEFAULT_FPRS
from export.bank.calibrate import default_fusion
from kernels.detector import (
    DEFAULT_CALIBRATION_REPEATS,
    DEFAULT_M,
    FingerprintDetector,
    Observations,
    PValueFusion,
    RandomDraws,
)
from kernels.errors import InvalidInputError
from kernels.fingerprint_search import SearchConfig
from kernels.squeezing import FeatureSqueezing, default_squeezers


@dataclass(frozen=True)
class FitConfig:
    """How :func:`fit_detector` builds the detector.

    Attributes:
        layers: modules whose activations the fingerprints read (default: the last four weighted layers).
        attacks: the targeted training attacks' budgets (default: MNIST's, eps 0.2 then 0.3).
        per_class: images attacked into each class.
        search: the fingerprint search (:class:`kernels.fingerprint_search.SearchConfig`).
        m: fingerprints drawn per input; fprs: false-positive rates calibrated; repeats: independent
            draws per calibration image; seed: of the attacks and the calibration.
    """

    layers: Sequence[str] | None = None
    attacks: AttackDefaults | None = None
    per_class: int = 300
    search: SearchConfig = SearchConfig()
    m: int = DEFAULT_M
    fprs: Sequence[float] = DEFAULT_FPRS
    repeats: int = DEFAULT_CALIBRATION_REPEATS
    seed: int = 0


def fit_detector(model: nn.Module, images: np.ndarray, labels: np.ndarray, calibration_images: np.ndarray,
                 cfg: FitConfig = FitConfig(), progress: bool = False) -> tuple[PValueFusion, ActivationLayout]:
    """Attack, capture, search and calibrate: the served default for ``model``, randomized fingerprints
    (their vote) fused with the logit margin and feature squeezing (:func:`export.bank.calibrate.default_fusion`),
    calibrated.

    Args:
        model: an ``nn.Module`` mapping ``(B, C, H, W)`` images in [0, 1] to logits.
        images, labels: the fit images and their true classes (only correctly classified ones are used).
        calibration_images: held-out clean images for the thresholds (their predicted labels are used).
        cfg: the rest (:class:`FitConfig`).

    Returns the detector (its ``members["vote"].bank`` is the bank) and the activation layout to capture
    new inputs with; it reads ``Observations.acts``, ``.logits`` and ``.images`` (squeezed and classified
    again by ``model``).
    """
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int64)
    num_classes = int(predict(model, images[:1]).shape[1])
    right = np.flatnonzero(predict(model, images).argmax(1) == labels)
    if len(right) == 0:
        raise InvalidInputError("the model classifies none of the fit images correctly")
    results = attack_into_classes(model, images[right], labels[right], right, num_classes,
                                  BankAttacks(cfg.attacks or attack_defaults("mnist"), cfg.per_class, cfg.seed), progress)
    adv = merge_results(results)
    ok = adv["success"]
    if not ok.any():
        raise InvalidInputError("no targeted attack succeeded: raise the budgets (attacks.train_eps)")
    clean_acts, layout = capture_activations(model, images[right], cfg.layers, progress=progress)
    attacked_acts, _ = capture_activations(model, adv["x_adv"][ok], layout.layers, progress=progress)
    bank = FingerprintDetector(draws=RandomDraws(cfg.m)).fit(
        Observations(labels[right], acts=clean_acts), Observations(adv["target"][ok], acts=attacked_acts), cfg.search,
        num_classes, {"layout": layout.to_json(), "search": cfg.search.to_json()}, progress).bank
    cal_acts, _, cal_logits = capture_activations(model, calibration_images, layout.layers, progress=progress,
                                                  return_logits=True)
    squeeze = FeatureSqueezing(lambda x: predict(model, x), default_squeezers(images.shape[1]))
    detector = default_fusion(bank, cfg.m, squeeze)
    detector.calibrate(Observations(cal_logits.argmax(1), acts=cal_acts, logits=cal_logits, images=calibration_images),
                       cfg.fprs, cfg.repeats, cfg.seed)
    return detector, layout
