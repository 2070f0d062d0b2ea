"""The evaluation report counts what a server would see: every successful attack, checked or not."""
import numpy as np

from export.evaluation import ImageSet, calibrate_baseline, evaluate_attack, markdown_table
from kernels.bank import Bank
from kernels.calibration import calibrate_threshold
from kernels.scoring import METHODS, score


def two_class_bank_and_a_class_without_fingerprints(bank):
    """The planted two-class bank plus a third class with no fingerprints (a partial bank)."""
    return Bank(*(getattr(bank, n) for n in ("indices", "lengths", "clean_mean", "clean_std", "attacked_mean",
                                             "attacked_std", "cohen_d")),
                np.r_[bank.class_offsets, bank.class_offsets[-1]], bank.meta)


def calibrations(bank, make_rows, fprs):
    x, y = make_rows(2000, 40, False)
    s = score(x, y, bank, 16, np.random.default_rng(0))
    return {m: calibrate_threshold(s.get(m), y, bank.num_classes, m, 16, fprs) for m in METHODS}


def test_attacks_the_bank_cannot_check_are_counted_as_misses(bank, make_rows):
    bank = two_class_bank_and_a_class_without_fingerprints(bank)
    cals = calibrations(bank, make_rows, (0.01, 0.05))
    images = lambda n: np.zeros((n, 1, 2, 2), np.float32)  # noqa: E731 (the baseline only)
    cx, cy = make_rows(400, 41, False)
    ax, ay = make_rows(300, 42, True)
    ay = ay.copy()
    ay[:100] = 2  # a third of the successful attacks land in the class without fingerprints
    clean = ImageSet.of(cx, cy, images(400), bank, 16)
    attacked = ImageSet.of(ax, ay, images(300), bank, 16)
    r, _ = evaluate_attack(bank, cals, calibrate_baseline(images(400), (0.01, 0.05)), clean, attacked, seed=1,
                           spread_draws=3)
    assert r["n_attacked"] == 300 and r["unchecked_attacked"] == 100 and r["unchecked_clean"] == 0
    # the planted attacks are caught whenever they can be checked, so the TPR is the checked share
    assert r["lrt"]["tpr@0.01"] == 200 / 300 and r["lrt"]["tpr@0.05"] == 200 / 300
    assert r["spread"]["tpr_mean"] == 200 / 300 and r["per_class"][2] == {"n_attacked": 100, "unchecked": 100,
                                                                            "tpr@0.01": 0.0}
    row = markdown_table({"fprs": [0.01, 0.05], "attacks": {"planted": r}}).splitlines()[2]
    assert row.startswith("| planted | 300 | 100 |")


def test_the_report_takes_whatever_rates_were_calibrated(bank, make_rows):
    cals = calibrations(bank, make_rows, (0.05, 0.1))  # no 1% threshold
    images = np.zeros((200, 1, 2, 2), np.float32)
    cx, cy = make_rows(200, 41, False)
    ax, ay = make_rows(200, 42, True)
    r, _ = evaluate_attack(bank, cals, calibrate_baseline(images, (0.05, 0.1)),
                           ImageSet.of(cx, cy, images, bank, 16), ImageSet.of(ax, ay, images, bank, 16),
                           seed=1, spread_draws=2)
    assert set(r["lrt"]) == {"auc", "tpr@0.05", "fpr@0.05", "tpr@0.1", "fpr@0.1"} and r["spread"]["fpr"] == 0.05
    assert "TPR@0.05 over draws" in markdown_table({"fprs": [0.05, 0.1], "attacks": {"planted": r}})
