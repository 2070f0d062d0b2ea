"""Thresholds of a bank on the calibration split: the served default fusion (the fingerprints' vote,
the logit margin and feature squeezing) and the paper's LRT, split-conformal (:mod:`kernels.calibration`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from export.data.artifacts import load_activation_set, load_prepared
from export.data.workspace import Workspace
from export.models.classifier import load_classifier, predict
from export.models.onnx_import import USER_MODEL
from kernels.bank import Bank
from kernels.baselines import LogitMargin
from kernels.calibration import DEFAULT_FPRS
from kernels.detector import (
    DEFAULT_CALIBRATION_REPEATS,
    DEFAULT_M,
    FingerprintDetector,
    Observations,
    PValueFusion,
    RandomDraws,
)
from kernels.squeezing import FeatureSqueezing, default_squeezers, observed


def default_fusion(bank: Bank, m: int, squeeze: FeatureSqueezing | None = None) -> PValueFusion:
    """The served default (``nfp study`` measured it against the alternatives): the fingerprints' vote
    over ``m`` random single-neuron fingerprints, the logit margin and, given ``squeeze``, feature
    squeezing (Xu et al., 2018), fused by their smallest clean p-value, each with one global threshold."""
    members = {"vote": FingerprintDetector(bank, RandomDraws(m), "vote"), "margin": LogitMargin()}
    return PValueFusion({**members, **({"squeeze": squeeze} if squeeze is not None else {})}, "min")


def workspace_squeezing(ws: Workspace) -> FeatureSqueezing | None:
    """Feature squeezing on the workspace's classifier with the paper's squeezers for its images, or
    ``None`` for an imported ONNX model (the served graph of a user's model returns no squeezed copies)."""
    if (ws.root / USER_MODEL).is_file():
        return None
    model = load_classifier(ws)
    ds, _, _ = load_prepared(ws)
    return FeatureSqueezing(lambda images: predict(model, images), default_squeezers(ds.image_shape[0]))


def calibrated_bank(ws: Workspace, bank: Bank, m: int = DEFAULT_M, fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
                    repeats: int = DEFAULT_CALIBRATION_REPEATS, progress: bool = True,
                    confidence: float | None = None, squeeze: bool = True) -> tuple[Bank, dict[str, Any]]:
    """``bank`` with the thresholds of the LRT (the paper's score, kept for comparison) and of the served
    default fusion for each false-positive rate, from the calibration split's clean images under the
    same random drawing of ``m`` fingerprints per image used at test time; and a summary.

    Half of the images fit the standardization and the fusion's references, each under ``repeats``
    independent draws pooled; the other half, one draw each, sets split-conformal thresholds
    (:mod:`kernels.calibration`): expected clean false-positive rate at most nominal, or with
    probability ``confidence`` the realized one. ``squeeze=False`` leaves feature squeezing out of the
    fusion (an imported ONNX model never has it: its served graph returns no squeezed copies).
    """
    ds, _, _ = load_prepared(ws)
    acts, meta = load_activation_set(ws, "calibration", mmap=False)
    clean = Observations(meta["predicted"], acts=acts, logits=meta["logits"], images=ds.x[meta["source"]])
    lrt = FingerprintDetector(bank, RandomDraws(m), "lrt")
    lrt.calibrate(clean, fprs, repeats, seed, progress, confidence)
    fused = default_fusion(bank, m, workspace_squeezing(ws) if squeeze else None)
    clean = observed(fused, clean)
    fused.calibrate(clean, fprs, repeats, seed, progress, confidence)
    bank = bank.with_meta(calibration={"lrt": lrt.calibration.to_json(), **{
        name: (member.to_json() if isinstance(member, FeatureSqueezing) else member.calibration.to_json())
        for name, member in fused.members.items()}, "fused": fused.to_json()}, draws_per_input=m)
    checked = int(lrt.calibration.counts.sum())
    return bank, {"m": m, "calibration_images": checked, "uncovered_images": len(acts) - checked, "repeats": repeats,
                  "guarantee": {str(f): fused.calibration.guarantee(f) for f in fprs},
                  "global_lrt_thresholds": {str(f): float(np.median(t)) for f, t in lrt.calibration.thresholds.items()}}
