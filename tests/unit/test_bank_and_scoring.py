"""The bank's format, and randomized detection on a planted signal."""
import json

import os

import numpy as np
import pytest

from kernels.bank import Bank
from kernels.calibration import calibrate_threshold
from kernels.errors import FingerprintError, InvalidInputError, ModelMismatchError
from kernels.scoring import OsEntropy, draw_fingerprints, score, secure_rng, subset_means
from tests.unit.conftest import PLANTED_D as D

def test_a_smaller_bank_keeps_each_classs_strongest_fingerprints(bank):
    small = bank.with_meta(calibration={"lrt": {}}).strongest(50)
    assert small.counts.tolist() == [min(50, n) for n in bank.counts.tolist()]
    for c in range(bank.num_classes):
        d = np.abs(bank.cohen_d[bank.class_slice(c)])
        np.testing.assert_array_equal(np.sort(np.abs(small.cohen_d[small.class_slice(c)])), np.sort(d)[-50:])
    assert "calibration" not in small.meta and small.num_neurons == bank.num_neurons


def test_bank_round_trips_through_npz_and_json(bank, tmp_path):
    bank.with_meta(model_sha256="abc").save(tmp_path)
    back = Bank.load(tmp_path, model_sha256="abc")
    for name in ("indices", "lengths", "clean_mean", "attacked_std", "class_offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(bank, name))
    assert back.meta["class_names"] == ["a", "b"]
    assert set(bank.lengths.tolist()) == {1, 2} and (bank.indices[bank.lengths == 1, 1:] == D).all()


def test_a_bank_for_another_model_or_format_is_refused(bank, tmp_path):
    bank.with_meta(model_sha256="abc").save(tmp_path)
    with pytest.raises(ModelMismatchError, match="built for model sha256 abc"):
        Bank.load(tmp_path, model_sha256="def")
    meta = json.loads((tmp_path / "bank.json").read_text())
    (tmp_path / "bank.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(InvalidInputError, match="format version 99"):
        Bank.load(tmp_path)
    with pytest.raises(InvalidInputError, match="no bank"):
        Bank.load(tmp_path / "missing")


def test_corrupt_bank_arrays_are_named(bank):
    bad = bank.indices.copy()
    bad[0, 0] = D + 5
    with pytest.raises(InvalidInputError, match="neuron indices must lie in"):
        Bank(bad, bank.lengths, bank.clean_mean, bank.clean_std, bank.attacked_mean, bank.attacked_std,
             bank.cohen_d, bank.class_offsets, bank.meta)


@pytest.mark.parametrize("batch, m", [(5, 7), (64, 300)])  # the small take-and-sum path and the sparse one
def test_subset_means_match_a_per_fingerprint_loop(bank, batch, m):
    acts = np.random.default_rng(3).normal(size=(batch, D)).astype(np.float32)
    ids = np.random.default_rng(4).integers(0, bank.num_fingerprints, size=(batch, m))
    expected = [[acts[b, bank.indices[f, : bank.lengths[f]]].mean() for f in row] for b, row in enumerate(ids)]
    np.testing.assert_allclose(subset_means(acts, ids, bank), expected, rtol=1e-6, atol=1e-6)


def test_the_serving_lrt_path_equals_the_full_scoring(bank, make_rows):
    acts, labels = make_rows(64, 5, True)
    ids = draw_fingerprints(labels, bank, 32, np.random.default_rng(6))
    full = score(acts, labels, bank, 32, ids=ids)
    fast = score(acts, labels, bank, 32, ids=ids, lrt_only=True)
    np.testing.assert_allclose(fast.lrt, full.lrt, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="'vote' score was not computed"):
        fast.get("vote")


def test_attacked_rows_score_below_the_calibrated_threshold(bank, make_rows):
    cal_x, cal_y = make_rows(2000, 10, False)
    s = score(cal_x, cal_y, bank, m=16, rng=np.random.default_rng(0))
    cal = calibrate_threshold(s.lrt, cal_y, 2, "lrt", 16, (0.01, 0.05))
    test_x, test_y = make_rows(4000, 11, False)
    att_x, att_y = make_rows(1000, 12, True)
    rng = np.random.default_rng(1)
    fpr = cal.is_attacked(score(test_x, test_y, bank, 16, rng).lrt, test_y, 0.05).mean()
    tpr = cal.is_attacked(score(att_x, att_y, bank, 16, rng).lrt, att_y, 0.05).mean()
    assert abs(fpr - 0.05) < 3 * np.sqrt(0.05 * 0.95 / 2000) + 3 * np.sqrt(0.05 * 0.95 / 4000)
    assert tpr > 0.95


def test_default_draws_read_fresh_os_entropy_and_nothing_else(bank, make_rows, monkeypatch):
    """Without a generator, every draw reads ``os.urandom``: pinning that source pins the draws (so it is
    the only one; no generator state carries over from call to call), and the real source gives other
    draws on every call."""
    acts, y = make_rows(64, 0, False)
    read = []
    monkeypatch.setattr(os, "urandom", lambda k: read.append(k) or bytes(range(256)) * (k // 256) + bytes(k % 256))
    pinned = score(acts, y, bank, 100).ids
    np.testing.assert_array_equal(score(acts, y, bank, 100).ids, pinned)
    assert sum(read) >= 2 * 64 * 100 * 2  # at least 16 fresh bits per draw, on every call
    monkeypatch.undo()
    assert isinstance(secure_rng(), OsEntropy)
    assert not np.array_equal(score(acts, y, bank, 100).ids, pinned)


def test_draws_are_uniform_over_the_class(bank):
    from scipy import stats

    counts = np.bincount(draw_fingerprints(np.zeros(2000, np.int64), bank, 100, secure_rng()).ravel(),
                         minlength=bank.class_offsets[1])
    assert stats.chisquare(counts).pvalue > 1e-4 and counts.sum() == 200_000


@pytest.mark.parametrize("n", [3 << 14, 3 << 30])
def test_secret_draws_have_no_modulo_bias_where_a_naive_mapping_would(n):
    """With n = 3 * 2^14 (16-bit words) or 3 * 2^30 (32-bit words), a plain ``word mod n`` puts half of
    all draws below 2^w / 4 instead of a third; the unbiased draw must not."""
    draws = OsEntropy().below(np.array([n]), 60_000).ravel()
    assert draws.min() >= 0 and draws.max() < n
    assert abs((draws < n // 3).mean() - 1 / 3) < 0.01


def test_each_index_owns_exactly_as_many_accepted_words(monkeypatch):
    """Every 16-bit word once, for a range of 3: 2^16 = 3 * 21845 + 1, so exactly one word (0) must be
    rejected and drawn again (here as 0xFFFF, which maps to 2); without the rejection index 0 would
    own one word more than the others."""
    calls = []

    def source(k):
        calls.append(k)
        return np.arange(1 << 16, dtype=np.uint16).tobytes() if len(calls) == 1 else b"\xff\xff" * (k // 2)

    monkeypatch.setattr(os, "urandom", source)
    draws = OsEntropy().below(np.array([3]), 1 << 16).ravel()
    assert calls == [1 << 17, 2]  # all words, then one redraw of one word
    assert np.bincount(draws).tolist() == [21845, 21845, 21846]
    assert draws[0] == 2  # the rejected word's position got the redraw


def test_a_broken_entropy_source_is_named_instead_of_drawn_from_forever(monkeypatch):
    monkeypatch.setattr(os, "urandom", bytes)  # all zeros: every word of a range of 3 * 2^14 is rejected
    with pytest.raises(FingerprintError, match="not random"):
        OsEntropy().below(np.array([3 << 14]), 2)


def test_secret_draws_refuse_an_empty_class():
    with pytest.raises(InvalidInputError, match="from 1 to 2"):
        OsEntropy().below(np.array([5, 0]), 4)


def test_draws_stay_inside_the_predicted_class(bank, make_rows):
    acts, _ = make_rows(50, 0, False)
    y = np.ones(50, np.int64)
    ids = score(acts, y, bank, 8, np.random.default_rng(0)).ids
    assert (ids >= bank.class_offsets[1]).all() and (ids < bank.class_offsets[2]).all()


@pytest.mark.parametrize("acts, labels, m, message", [
    (np.zeros((2, D), np.float64), [0, 1], 4, "float32"),
    (np.zeros((2, D + 1), np.float32), [0, 1], 4, r"shape \(B, 120\)"),
    (np.zeros((0, D), np.float32), [], 4, "empty batch"),
    (np.full((2, D), np.nan, np.float32), [0, 1], 4, r"rows \[0, 1\] hold NaN"),
    (np.zeros((2, D), np.float32), [0, 2], 4, r"labels must lie in \[0, 2\)"),
    (np.zeros((2, D), np.float32), [0, 1], 10_000, "fewer fingerprints"),
])
def test_bad_input_gets_a_clear_error(bank, acts, labels, m, message):
    with pytest.raises(InvalidInputError, match=message):
        score(acts, np.asarray(labels, np.int64), bank, m)


def test_given_draws_outside_the_class_are_refused(bank, make_rows):
    acts, y = make_rows(2, 0, False)
    with pytest.raises(InvalidInputError, match="out of range"):
        score(acts, np.array([0, 0]), bank, 1, ids=np.full((2, 1), bank.num_fingerprints - 1))


def test_flattened_positions_do_not_wrap_past_int32():
    """Scoring a whole split of an ImageNet-size layer flattens more than 2^31 activations; the gather
    positions must not wrap around (they did in int32: row 2 below pointed at a negative position)."""
    from kernels.scoring import flat_columns

    width = 2**30 + 1
    neurons = np.array([[[0, 5]], [[7, width - 1]], [[3, width - 2]]], np.int32)  # (B=3, m=1, k=2)
    expected = [[[b * width + int(n) for n in row] for row in neurons[b]] for b in range(3)]  # Python ints
    cols = flat_columns(neurons, width)
    assert cols.dtype == np.int64 and cols.tolist() == expected
    small = flat_columns(neurons, 100)
    assert small.dtype == np.int32 and small.tolist() == [[[b * 100 + int(n) for n in r] for r in neurons[b]]
                                                          for b in range(3)]
