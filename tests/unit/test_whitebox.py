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

from export.whitebox import adaptive_experiment, filter_experiment, static_detector, wilson
from kernels.calibration import calibrate_threshold
from kernels.detector import AllFingerprints, Detector, FingerprintDetector, Observations, RandomDraws, Verdicts


def setting(bank, make_rows):
    """A randomized server calibrated at 5% and weakened attacks, some of which pass locally."""
    cal_x, cal_y = make_rows(1000, 20, False)
    server = FingerprintDetector(bank, RandomDraws(16))
    server.calibrate(Observations(cal_y, acts=cal_x), (0.05,), repeats=1)
    att_x, att_y = make_rows(400, 21, True)
    att_x = 0.2 * att_x + 0.8 * make_rows(400, 22, False)[0]
    static = static_detector(bank, Observations(cal_y, acts=cal_x), 0.05)
    return (cal_x, cal_y), server, static, Observations(att_y, acts=att_x)


def test_filter_counts_add_up_and_the_static_filter_truly_filters(bank, make_rows):
    (cal_x, cal_y), server, static, attacked = setting(bank, make_rows)
    r = filter_experiment({"static": static, "random": server}, server, attacked, seed=3)
    assert r["attacked"] == 400
    for name in ("static", "random"):
        e = r[name]
        assert 0 < e["passed_local"] < 400
        assert e["flagged_by_server"] + e["evaded_server"] == e["passed_local"]
        lo, hi = e["evasion_ci95"]
        assert lo <= e["evasion_rate"] <= hi
    one_class = np.zeros_like  # the static detector's threshold is global, like the served one's
    static_cal = calibrate_threshold(brute_force_static_scores(cal_x, cal_y, bank), one_class(cal_y), 1, "lrt-static",
                                     0, (0.05,))
    passed = ~static_cal.is_attacked(brute_force_static_scores(attacked.acts, attacked.labels, bank),
                                     one_class(attacked.labels), 0.05)
    assert abs(int(passed.sum()) - r["static"]["passed_local"]) <= 1  # float32 vs float64 at the threshold


class EveryOtherRow(Detector):
    """A stand-in server: flags the rows whose activation row starts with an even index tag."""

    def __init__(self):
        super().__init__()
        self.sent = []

    def raw_scores(self, obs, rng=None):
        raise AssertionError("not scored")

    def detect(self, obs, fpr=None, rng=None):
        tags = obs.images[:, 0].astype(int)
        self.sent.append(tags)
        return Verdicts(np.zeros(len(tags)), tags % 2 == 0, np.ones(len(tags), bool), np.zeros((len(tags), 0)))


def test_the_server_sees_exactly_the_images_that_passed_locally(bank, make_rows):
    _, server, static, attacked = setting(bank, make_rows)
    attacked = Observations(attacked.labels, acts=attacked.acts, images=np.arange(400.0)[:, None])
    stand_in = EveryOtherRow()
    r = filter_experiment({"static": static, "random": server}, stand_in, attacked, seed=3)
    passed_static = np.flatnonzero(~static.detect(attacked).is_attacked)
    np.testing.assert_array_equal(stand_in.sent[0], passed_static)
    for name, rows in zip(("static", "random"), stand_in.sent):
        assert len(rows) == r[name]["passed_local"]
        assert r[name]["flagged_by_server"] == (rows % 2 == 0).sum()
        assert r[name]["evaded_server"] == (rows % 2 == 1).sum()


def test_detector_aware_evasion_needs_both_a_wrong_label_and_no_flag(bank, make_rows):
    x, y = make_rows(8, 31, False)
    true = y.copy()
    true[:4] = 1 - true[:4]  # rows 0-3 misclassified
    static = FingerprintDetector(bank, AllFingerprints())
    static.calibrate(Observations(y, acts=x), (0.5,))
    stand_in = EveryOtherRow()
    attacked = Observations(y, acts=x, images=np.arange(8.0)[:, None])
    r = adaptive_experiment({"static": static, "server": stand_in}, attacked, true)
    assert r["attacked"] == 8 and r["misclassified"] == 4
    assert r["server"]["evaded"] == 2  # rows 1 and 3
    static_flags = static.calibration.is_attacked(brute_force_static_scores(x, y, bank), static.class_labels(y), 0.5)
    assert r["static"]["evaded"] == int((~static_flags[:4]).sum())


def test_the_static_detector_uses_every_fingerprint_of_the_class(bank, make_rows):
    x, y = make_rows(6, 30, False)
    raw, checked, draws = FingerprintDetector(bank, AllFingerprints()).raw_scores(Observations(y, acts=x))
    np.testing.assert_allclose(raw, brute_force_static_scores(x, y, bank), rtol=1e-5, atol=1e-6)
    assert checked.all() and draws.shape == (6, 0)


def test_wilson_interval_brackets_the_proportion():
    lo, hi = wilson(5, 100)
    assert lo < 0.05 < hi and 0 <= lo and hi <= 1
    assert wilson(0, 0) == (0.0, 1.0)
