"""The detector a calibrated bank was calibrated for, as the server runs it: the fusion that
``nfp calibrate`` stores by default (the fingerprints' vote and the logit margin), else the
fingerprints' likelihood ratio. Its own module so that the detector contract (:mod:`kernels.detector`)
and the baselines built on it (:mod:`kernels.baselines`) import each other in one direction only.
"""
from __future__ import annotations

import numpy as np

from kernels.bank import Bank
from kernels.baselines import LogitMargin
from kernels.calibration import Calibration
from kernels.detector import Detector, FingerprintDetector, PValueFusion
from kernels.errors import InvalidInputError
from kernels.scoring import METHODS


def served_detector(bank: Bank, fpr: float | None = None, backend=None) -> Detector:
    """The detector a calibrated bank was calibrated for: the fusion that ``nfp calibrate`` stores by
    default (the fingerprints' vote and the logit margin), else the fingerprints' likelihood ratio."""
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
        else:
            raise InvalidInputError(f"the bank's fused detector has a member {name!r} this code does not know")
    return PValueFusion(members, d["rule"], {k: np.array(v) for k, v in d["references"].items()},
                        Calibration.from_json(d), fpr)
