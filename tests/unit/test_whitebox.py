"""Plumbing of the white-box filter experiment (not its headline number)."""
import numpy as np

from kernels.bank import Bank


def brute_force_static_scores(acts: np.ndarray, labels: np.ndarray, bank: Bank) -> np.ndarray:
    """The static detector's score, written out in float64 per image and fingerprint: the mean over
    every fingerprint of the predicted class of log N(v; clean) - log N(v; attacked)."""
    out = []
    for x, c in zip(acts.astype(np.float64), labels):
        terms = []
        for f in range(bank.class_offsets[c], bank.class_offsets[c + 1]):
            v = x[bank.indices[f, : bank.lengths[f]]].mean()
            cm, cs = float(bank.clean_mean[f]), float(bank.clean_std[f])
            am, as_ = float(bank.attacked_mean[f]), float(bank.attacked_std[f])
            terms.append(-0.5 * ((v - cm) / cs) ** 2 - np.log(cs) + 0.5 * ((v - am) / as_) ** 2 + np.log(as_))
        out.append(np.mean(terms))
    return np.array(out)

from export.whitebox import adaptive_experiment, filter_experiment, static_calibration, static_scores, wilson
from kernels.calibration import calibrate_threshold
from kernels.scoring import score


def test_filter_counts_add_up_and_the_static_filter_truly_filters(bank, make_rows):
    cal_x, cal_y = make_rows(1000, 20, False)
    server = calibrate_threshold(score(cal_x, cal_y, bank, 16, np.random.default_rng(0)).lrt, cal_y, 2, "lrt", 16, (0.05,))
    att_x, att_y = make_rows(400, 21, True)
    att_x = 0.2 * att_x + 0.8 * make_rows(400, 22, False)[0]  # weaker attacks: some pass locally
    r = filter_experiment(bank, server, static_calibration(cal_x, cal_y, bank, 0.05), att_x, att_y, fpr=0.05, seed=3)
    assert r["attacked"] == 400
    for name in ("static", "random"):
        e = r[name]
        assert 0 < e["passed_local"] < 400
        assert e["flagged_by_server"] + e["evaded_server"] == e["passed_local"]
        lo, hi = e["evasion_ci95"]
        assert lo <= e["evasion_rate"] <= hi
    static_cal = calibrate_threshold(brute_force_static_scores(cal_x, cal_y, bank), cal_y, 2, "lrt-static", 0, (0.05,))
    passed = ~static_cal.is_attacked(brute_force_static_scores(att_x, att_y, bank), att_y, 0.05)
    assert abs(int(passed.sum()) - r["static"]["passed_local"]) <= 1  # float32 vs float64 at the threshold


def test_the_server_sees_exactly_the_images_that_passed_locally(bank, make_rows):
    cal_x, cal_y = make_rows(1000, 20, False)
    server = calibrate_threshold(score(cal_x, cal_y, bank, 16, np.random.default_rng(0)).lrt, cal_y, 2, "lrt", 16, (0.05,))
    att_x, att_y = make_rows(400, 21, True)
    att_x = 0.2 * att_x + 0.8 * make_rows(400, 22, False)[0]
    sent = []

    def flags_every_other(rows):  # a stand-in server: flags the even rows it is sent
        sent.append(rows)
        return rows % 2 == 0

    r = filter_experiment(bank, server, static_calibration(cal_x, cal_y, bank, 0.05), att_x, att_y, fpr=0.05, seed=3,
                          server=flags_every_other)
    for name, rows in zip(("static", "random"), sent):
        assert len(rows) == r[name]["passed_local"]
        assert r[name]["flagged_by_server"] == (rows % 2 == 0).sum()
        assert r[name]["evaded_server"] == (rows % 2 == 1).sum()


def test_detector_aware_evasion_needs_both_a_wrong_label_and_no_flag(bank, make_rows):
    x, y = make_rows(8, 31, False)
    true = y.copy()
    true[:4] = 1 - true[:4]  # rows 0-3 misclassified
    static_cal = calibrate_threshold(static_scores(x, y, bank), y, 2, "lrt-static", 0, (0.5,))
    flags = np.array([True, False, True, False, True, False, True, False])
    r = adaptive_experiment(bank, {"server": lambda rows: flags[rows]}, static_cal, x, y, true, fpr=0.5)
    assert r["attacked"] == 8 and r["misclassified"] == 4
    assert r["server"]["evaded"] == 2  # rows 1 and 3
    static_flags = static_cal.is_attacked(brute_force_static_scores(x, y, bank), y, 0.5)
    assert r["static"]["evaded"] == int((~static_flags[:4]).sum())


def test_static_scores_use_every_fingerprint_of_the_class(bank, make_rows):
    x, y = make_rows(6, 30, False)
    np.testing.assert_allclose(static_scores(x, y, bank), brute_force_static_scores(x, y, bank), rtol=1e-5, atol=1e-6)


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson(5, 100)
    assert lo < 0.05 < hi and 0 <= lo and hi <= 1
    assert wilson(0, 0) == (0.0, 1.0)
