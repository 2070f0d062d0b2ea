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
from kernels.errors import InvalidInputError
from kernels.squeezing import FeatureSqueezing, Squeezer, accuracy_preserving, default_squeezers, observed


def default_fusion(bank: Bank, m: int, squeeze: FeatureSqueezing | None = None) -> PValueFusion:
    """The served default (``nfp study`` measured it against the alternatives): the fingerprints' vote
    over ``m`` random single-neuron fingerprints, the logit margin and, given ``squeeze``, feature
    squeezing (Xu et al., 2018), fused by their smallest clean p-value, each with one global threshold."""
    members = {"vote": FingerprintDetector(bank, RandomDraws(m), "vote"), "margin": LogitMargin()}
    return PValueFusion({**members, **({"squeeze": squeeze} if squeeze is not None else {})}, "min")


SQUEEZE_MODES = ("auto", "on", "off")


def workspace_squeezing(ws: Workspace, mode: str = "on", squeezers: tuple[Squeezer, ...] | None = None
                        ) -> tuple[FeatureSqueezing | None, dict[str, Any]]:
    """Feature squeezing on the workspace's classifier, and what decided it. ``mode`` ``"on"``: the
    paper's squeezers for its images (or ``squeezers``); ``"auto"``: those of them that keep the
    classifier's accuracy on the calibration split (:func:`kernels.squeezing.accuracy_preserving`), none
    if no squeezer does; ``"off"``: none. Always none for an imported ONNX model (the served graph of a
    user's model returns no squeezed copies)."""
    if mode not in SQUEEZE_MODES:
        raise InvalidInputError(f"squeeze mode must be one of {', '.join(SQUEEZE_MODES)}, got {mode!r}")
    if mode == "off" or (ws.root / USER_MODEL).is_file():
        return None, {"mode": mode, "squeezers": []}
    model = load_classifier(ws)
    ds, splits, _ = load_prepared(ws)
    logits_of = lambda images: predict(model, images)  # noqa: E731
    chosen, info = squeezers or default_squeezers(ds.image_shape[0]), {"mode": mode}
    if mode == "auto":
        cal = splits.calibration
        chosen, info["accuracy"] = accuracy_preserving(logits_of, ds.x[cal], ds.y[cal], chosen)
    info["squeezers"] = [[s.kind, s.value] for s in chosen]
    return (FeatureSqueezing(logits_of, chosen) if chosen else None), info


def calibrated_bank(ws: Workspace, bank: Bank, m: int = DEFAULT_M, fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
                    repeats: int = DEFAULT_CALIBRATION_REPEATS, progress: bool = True,
                    confidence: float | None = None, squeeze: str = "auto",
                    squeezers: tuple[Squeezer, ...] | None = None) -> tuple[Bank, dict[str, Any]]:
    """``bank`` with the thresholds of the LRT (the paper's score, kept for comparison) and of the served
    default fusion for each false-positive rate, from the calibration split's clean images under the
    same random drawing of ``m`` fingerprints per image used at test time; and a summary.

    Half of the images fit the standardization and the fusion's references, each under ``repeats``
    independent draws pooled; the other half, one draw each, sets split-conformal thresholds
    (:mod:`kernels.calibration`): expected clean false-positive rate at most nominal, or with
    probability ``confidence`` the realized one. ``squeeze`` and ``squeezers`` decide feature squeezing's
    membership (:func:`workspace_squeezing`; an imported ONNX model never has it).
    """
    ds, _, _ = load_prepared(ws)
    acts, meta = load_activation_set(ws, "calibration", mmap=False)
    clean = Observations(meta["predicted"], acts=acts, logits=meta["logits"], images=ds.x[meta["source"]])
    lrt = FingerprintDetector(bank, RandomDraws(m), "lrt")
    lrt.calibrate(clean, fprs, repeats, seed, progress, confidence)
    squeezing, squeeze_info = workspace_squeezing(ws, squeeze, squeezers)
    fused = default_fusion(bank, m, squeezing)
    clean = observed(fused, clean)
    fused.calibrate(clean, fprs, repeats, seed, progress, confidence)
    bank = bank.with_meta(calibration={"lrt": lrt.calibration.to_json(), **{
        name: (member.to_json() if isinstance(member, FeatureSqueezing) else member.calibration.to_json())
        for name, member in fused.members.items()}, "fused": fused.to_json()}, draws_per_input=m)
    checked = int(lrt.calibration.counts.sum())
    return bank, {"m": m, "squeezing": squeeze_info, "calibration_images": checked,
                  "uncovered_images": len(acts) - checked, "repeats": repeats,
                  "guarantee": {str(f): fused.calibration.guarantee(f) for f in fprs},
                  "global_lrt_thresholds": {str(f): float(np.median(t)) for f, t in lrt.calibration.thresholds.items()}}
