"""Thresholds of a bank on the calibration split: the served default fusion (the fingerprints' vote
and the logit margin) and the paper's LRT, split-conformal (:mod:`kernels.calibration`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from export.data.artifacts import load_activation_set
from export.data.workspace import Workspace
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


def default_fusion(bank: Bank, m: int) -> PValueFusion:
    """The served default (``nfp study`` measured it against the alternatives): the fingerprints' vote
    over ``m`` random single-neuron fingerprints and the logit margin, fused by their smallest clean
    p-value, each with one global threshold."""
    return PValueFusion({"vote": FingerprintDetector(bank, RandomDraws(m), "vote"), "margin": LogitMargin()}, "min")


def calibrated_bank(ws: Workspace, bank: Bank, m: int = DEFAULT_M, fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
                    repeats: int = DEFAULT_CALIBRATION_REPEATS, progress: bool = True,
                    confidence: float | None = None) -> tuple[Bank, dict[str, Any]]:
    """``bank`` with the thresholds of the LRT (the paper's score, kept for comparison) and of the served
    default fusion for each false-positive rate, from the calibration split's clean images under the
    same random drawing of ``m`` fingerprints per image used at test time; and a summary.

    Half of the images fit the standardization and the fusion's references, each under ``repeats``
    independent draws pooled; the other half, one draw each, sets split-conformal thresholds
    (:mod:`kernels.calibration`): expected clean false-positive rate at most nominal, or with
    probability ``confidence`` the realized one.
    """
    acts, meta = load_activation_set(ws, "calibration", mmap=False)
    clean = Observations(meta["predicted"], acts=acts, logits=meta["logits"])
    lrt = FingerprintDetector(bank, RandomDraws(m), "lrt")
    lrt.calibrate(clean, fprs, repeats, seed, progress, confidence)
    fused = default_fusion(bank, m)
    fused.calibrate(clean, fprs, repeats, seed, progress, confidence)
    bank = bank.with_meta(calibration={"lrt": lrt.calibration.to_json(), **{
        name: member.calibration.to_json() for name, member in fused.members.items()}, "fused": fused.to_json()},
        draws_per_input=m)
    checked = int(lrt.calibration.counts.sum())
    return bank, {"m": m, "calibration_images": checked, "uncovered_images": len(acts) - checked, "repeats": repeats,
                  "guarantee": {str(f): fused.calibration.guarantee(f) for f in fprs},
                  "global_lrt_thresholds": {str(f): float(np.median(t)) for f, t in lrt.calibration.thresholds.items()}}
