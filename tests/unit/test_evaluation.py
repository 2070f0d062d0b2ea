"""The evaluation report counts what a server would see: every successful attack, checked or not."""
import numpy as np

from export.evaluation.report import evaluate_attack, markdown_table
from kernels.bank import Bank
from kernels.baselines import GrayPixels
from kernels.detector import FingerprintDetector, Observations, RandomDraws
from kernels.scoring import METHODS


def two_class_bank_and_a_class_without_fingerprints(bank):
    """The planted two-class bank plus a third class with no fingerprints (a partial bank)."""
    return Bank(*(getattr(bank, n) for n in ("indices", "lengths", "clean_mean", "clean_std", "attacked_mean",
                                             "attacked_std", "cohen_d")),
                np.r_[bank.class_offsets, bank.class_offsets[-1]], bank.meta)


def calibrated(bank, make_rows, fprs, images):
    """The three fingerprint scores and the gray-pixel baseline, calibrated on held-out clean rows."""
    x, y = make_rows(2000, 40, False)
    detectors = {method: FingerprintDetector(bank, RandomDraws(16), method) for method in METHODS}
    for d in detectors.values():
        d.calibrate(Observations(y, acts=x), fprs)
    detectors["gray_pixels"] = GrayPixels()
    detectors["gray_pixels"].calibrate(Observations(np.zeros(len(images), np.int64), images=images), fprs)
    return detectors


def test_attacks_the_bank_cannot_check_are_counted_as_misses(bank, make_rows):
    bank = two_class_bank_and_a_class_without_fingerprints(bank)
    images = lambda n: np.random.default_rng(n).random((n, 1, 2, 2)).astype(np.float32)  # noqa: E731 (the baseline)
    detectors = calibrated(bank, make_rows, (0.01, 0.05), images(400))
    cx, cy = make_rows(400, 41, False)
    ax, ay = make_rows(300, 42, True)
    ay = ay.copy()
    ay[:100] = 2  # a third of the successful attacks land in the class without fingerprints
    clean = Observations(cy, acts=cx, images=images(400))
    attacked = Observations(ay, acts=ax, images=images(300))
    r, curves = evaluate_attack(detectors, clean, attacked, seed=1, spread_draws=3)
    assert r["n_attacked"] == 300 and r["unchecked_attacked"] == 100 and r["unchecked_clean"] == 0
    # the planted attacks are caught whenever they can be checked, so the TPR is the checked share
    assert r["lrt"]["tpr@0.01"] == 200 / 300 and r["lrt"]["tpr@0.05"] == 200 / 300
    assert r["spread"]["tpr_mean"] == 200 / 300 and r["per_class"][2] == {"n_attacked": 100, "unchecked": 100,
                                                                            "tpr@0.01": 0.0}
    assert set(curves) == {"lrt", "vote", "anomaly", "gray_pixels"} and r["detectors"][0] == "lrt"
    table = markdown_table({"fprs": [0.01, 0.05], "attacks": {"planted": r}}).splitlines()
    assert table[2].startswith("| planted | 300 | 100 |") and "gray_pixels TPR@0.01 (AUC)" in table[0]


def test_the_report_takes_whatever_rates_were_calibrated(bank, make_rows):
    images = np.random.default_rng(0).random((200, 1, 2, 2)).astype(np.float32)
    detectors = calibrated(bank, make_rows, (0.05, 0.1), images)  # no 1% threshold
    cx, cy = make_rows(200, 41, False)
    ax, ay = make_rows(200, 42, True)
    r, _ = evaluate_attack(detectors, Observations(cy, acts=cx, images=images), Observations(ay, acts=ax, images=images),
                           seed=1, spread_draws=2)
    assert set(r["lrt"]) == {"auc", "tpr@0.05", "fpr@0.05", "tpr@0.1", "fpr@0.1"} and r["spread"]["fpr"] == 0.05
    assert "TPR@0.05 over draws" in markdown_table({"fprs": [0.05, 0.1], "attacks": {"planted": r}})
