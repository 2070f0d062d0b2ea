"""The served detector: what both detecting Triton models run, checked without a server."""
import numpy as np
import pytest

from kernels.bank import Bank
from kernels.calibration import calibrate_threshold
from kernels.errors import FingerprintError, ModelMismatchError
from kernels.scoring import score
from model_repository.serving import ServedDetector, response_tensors

SHA = "cd" * 32
M = 16


@pytest.fixture
def bank_dir(tmp_path, mixed_size_bank):
    """Three classes over 300 neurons; class 2 has no fingerprints."""
    b = mixed_size_bank()
    rng = np.random.default_rng(1)
    cal = calibrate_threshold(rng.normal(size=400), rng.integers(0, 2, 400), 3, "lrt", M)
    bank = Bank(b.indices, b.lengths, b.clean_mean, b.clean_std, b.attacked_mean, b.attacked_std, b.cohen_d,
                np.array([0, 50, 150, 150]), {"num_neurons": 300})
    bank.with_meta(model_sha256=SHA, draws_per_input=M, calibration={"lrt": cal.to_json()}).save(tmp_path / "bank")
    return tmp_path / "bank"


def logits_for(labels, classes=3):
    z = np.zeros((len(labels), classes), np.float32)
    z[np.arange(len(labels)), labels] = 5.0
    return z


def test_a_bank_bound_to_another_model_is_refused(bank_dir):
    with pytest.raises(ModelMismatchError, match="built for model sha256 cdcd"):
        ServedDetector(bank_dir, "ef" * 32)


@pytest.mark.parametrize("logits, acts, message", [
    (logits_for([0, 1]), np.zeros((2, 299), np.float32), r"shape \(B, 300\)"),
    (logits_for([0, 1]), np.zeros((2, 300), np.float64), "float32"),
    (logits_for([0, 1]), np.array([[0] * 300, [0] * 5 + [np.nan] * 295], np.float32), r"rows \[1\]"),
    (np.full((2, 3), np.nan, np.float32), np.zeros((2, 300), np.float32), "logits hold NaN"),
    (np.zeros((2, 4), np.float32), np.zeros((2, 300), np.float32), r"logits must have shape \(2, 3\)"),
    (logits_for([0]), np.zeros((2, 300), np.float32), r"logits must have shape \(2, 3\)"),
])
def test_each_problem_of_a_request_is_named(bank_dir, logits, acts, message):
    with pytest.raises(FingerprintError, match=message):
        ServedDetector(bank_dir, SHA).check(logits, acts)


def test_a_good_request_gets_its_predicted_labels(bank_dir):
    acts = np.random.default_rng(0).random((2, 300), dtype=np.float32)
    labels, checked_acts = ServedDetector(bank_dir, SHA).check(logits_for([1, 0]), acts)
    np.testing.assert_array_equal(labels, [1, 0])
    assert checked_acts is acts


def test_detection_is_the_offline_score_of_its_own_draws(bank_dir):
    det = ServedDetector(bank_dir, SHA, false_positive_rate=0.05)
    rng = np.random.default_rng(2)
    parts = [rng.random((3, 300), dtype=np.float32), rng.random((2, 300), dtype=np.float32)]
    logits = logits_for([0, 1, 1, 0, 1])
    labels = logits.argmax(1)
    d, kernel_s = det.detect(labels, parts, logits)
    offline = score(np.concatenate(parts), labels, det.bank, M, ids=d.draws)
    cal = det.detector.calibration
    z = cal.standardize(offline.lrt, labels)
    # float32 packed Gaussians vs the float64 reference: an absolute floor, since a draw can land near z = 0
    np.testing.assert_allclose(d.score, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d.is_attacked, z < cal.threshold(0.05, labels))
    assert d.draws.shape == (5, M) and kernel_s > 0 and d.checked.all()
    first, out = response_tensors(logits, labels, d, [3, 2], audit=True)
    np.testing.assert_array_equal(first["fingerprint_ids"], d.draws[:3])
    assert "fingerprint_ids" not in response_tensors(logits, labels, d, [3, 2])[0]  # the draws stay secret
    assert {k: v.shape for k, v in out.items()} == {"label": (2, 1), "probabilities": (2, 3), "score": (2, 1),
                                                     "is_attacked": (2, 1), "checked": (2, 1),
                                                     "fingerprint_ids": (2, M)}
    np.testing.assert_allclose(out["probabilities"].sum(1), 1, rtol=1e-6)


def test_an_image_of_a_class_without_fingerprints_is_answered_unchecked_beside_the_others(bank_dir):
    """A partial bank: one image predicted as class 2 (no fingerprints) must not cost the request's
    other images their verdicts."""
    det = ServedDetector(bank_dir, SHA, false_positive_rate=0.05)
    acts = np.random.default_rng(4).random((3, 300), dtype=np.float32)
    logits = logits_for([0, 2, 1])
    labels, acts = det.check(logits, acts)
    d, _ = det.detect(labels, [acts], logits)
    assert d.checked.tolist() == [True, False, True] and labels.tolist() == [0, 2, 1]
    assert np.isnan(d.score[1]) and not d.is_attacked[1] and (d.draws[1] == -1).all()
    rows = [0, 2]
    offline = score(acts[rows], labels[rows], det.bank, M, ids=d.draws[rows])
    np.testing.assert_allclose(d.score[rows], det.detector.calibration.standardize(offline.lrt, labels[rows]),
                               rtol=1e-5, atol=1e-6)


def test_the_served_detector_draws_from_the_os_csprng_on_every_request(bank_dir, monkeypatch):
    """Two detectors started alike draw alike only when the OS's entropy is pinned; with it real, even
    one detector draws anew for every request (no generator state to recover)."""
    import os

    acts, logits = [np.random.default_rng(3).random((1, 300), dtype=np.float32)], logits_for([1])
    detector = ServedDetector(bank_dir, SHA)
    draw = lambda d: d.detect(np.array([1]), acts, logits)[0].draws  # noqa: E731
    monkeypatch.setattr(os, "urandom", lambda k: bytes(range(256)) * (k // 256) + bytes(range(k % 256)))
    np.testing.assert_array_equal(draw(detector), draw(ServedDetector(bank_dir, SHA)))
    monkeypatch.undo()
    assert not np.array_equal(draw(detector), draw(detector))


def test_the_served_detector_hashes_the_model_it_guards_instead_of_trusting_a_recorded_hash(bank_dir, tmp_path):
    import hashlib

    model = tmp_path / "model.onnx"
    model.write_bytes(b"another model")
    with pytest.raises(FingerprintError, match="refusing to guard another model"):
        ServedDetector(bank_dir, SHA, served_model=model)  # the config and the bank agree; the file does not
    bank = Bank.load(bank_dir)
    sha = hashlib.sha256(b"another model").hexdigest()
    bank.with_meta(model_sha256=sha).save(bank_dir)
    assert ServedDetector(bank_dir, sha, served_model=model).bank.meta["model_sha256"] == sha
