"""The detector a calibrated bank was calibrated for, as the server runs it: the fusion that
``nfp calibrate`` stores by default (the fingerprints' vote, the logit margin and, for the built-in
classifiers, feature squeezing), else the fingerprints' likelihood ratio. Its own module so that the
detector contract (:mod:`kernels.detector`) and the detectors built on it (:mod:`kernels.baselines`,
:mod:`kernels.squeezing`) import each other in one direction only.
"""
from __future__ import annotations

import numpy as np

from kernels.bank import Bank
from kernels.baselines import LogitMargin
from kernels.calibration import Calibration
from kernels.detector import Detector, FingerprintDetector, PValueFusion
from kernels.errors import InvalidInputError
from kernels.scoring import METHODS
from kernels.squeezing import FeatureSqueezing, Squeezer


def served_detector(bank: Bank, fpr: float | None = None, backend=None, logits_of=None) -> Detector:
    """The detector a calibrated bank was calibrated for: the fusion that ``nfp calibrate`` stores by
    default (the fingerprints' vote, the logit margin and feature squeezing, whose squeezed copies' logits
    the served graph computes), else the fingerprints' likelihood ratio. Offline, ``logits_of`` (the
    classifier: images -> logits) lets feature squeezing squeeze observations' images itself."""
    calibrations = bank.meta.get("calibration", {})
    if "fused" not in calibrations:
        return FingerprintDetector.from_bank(bank, "lrt", fpr, backend)
    d = calibrations["fused"]
    members: dict[str, Detector] = {}
    for name in d["members"]:
        if name in METHODS:
            members[name] = FingerprintDetector.from_bank(bank, name, None, backend)
        elif name == "margin":
            members[name] = LogitMargin(Calibration.from_json(calibrations[name]))
        elif name == "squeeze":
            members[name] = FeatureSqueezing.from_json(calibrations[name], logits_of)
        else:
            raise InvalidInputError(f"the bank's fused detector has a member {name!r} this code does not know")
    return PValueFusion(members, d["rule"], {k: np.array(v) for k, v in d["references"].items()},
                        Calibration.from_json(d), fpr)


def served_squeezers(bank: Bank) -> tuple[Squeezer, ...]:
    """The squeezers whose copies' logits the served graph must return (``squeezed_logits``): those of the
    bank's fused detector's feature-squeezing member; none if it has no such member."""
    calibrations = bank.meta.get("calibration", {})
    if "squeeze" not in calibrations.get("fused", {}).get("members", []):
        return ()
    return FeatureSqueezing.from_json(calibrations["squeeze"]).squeezers
