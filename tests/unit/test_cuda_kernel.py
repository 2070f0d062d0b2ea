"""The CUDA kernels: they compile cleanly wherever nvcc is, and on a GPU they match the NumPy path
(the reference, 1e-5), take GPU tensors through DLPack, refuse bad ones per request, and respect
their device and the producers' stream. Run on a GPU machine with ``make test-gpu``."""
import shutil
import subprocess

import numpy as np
import pytest

from kernels.errors import FingerprintError, InvalidInputError
from kernels.gpu import KERNEL_SOURCE, gpu_available, lrt_block_size
from kernels.scoring import lrt_scores, score, subset_means



@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_without_any_warning(tmp_path):
    result = subprocess.run(["nvcc", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
                             "-c", str(KERNEL_SOURCE), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_the_serving_launch_sizes_its_blocks_to_m():
    assert [lrt_block_size(m) for m in (1, 16, 32, 33, 64, 100, 128, 129, 1000)] == [32, 32, 32, 64, 64, 128, 128,
                                                                                      128, 128]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
@pytest.mark.parametrize("batch, m", [(1, 16), (64, 256), (7, 1000)])
def test_three_score_kernel_matches_the_numpy_reference(batch, m, mixed_size_bank):
    import cupy as cp

    from kernels.gpu import GpuScorer

    bank = mixed_size_bank(per_class=1000)  # draws of m up to 1000 need that many per class
    acts = np.random.default_rng(1).normal(size=(batch, 300)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 3, batch)
    cpu = score(acts, labels, bank, m, np.random.default_rng(3))
    gpu = GpuScorer(bank).score(cp.asarray(acts), labels, m, ids=cpu.ids)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-5, atol=1e-5)
    for name in ("lrt", "vote", "anomaly"):
        np.testing.assert_allclose(gpu.get(name), cpu.get(name), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
@pytest.mark.parametrize("batch, m", [(1, 1), (3, 7), (64, 33), (16, 128), (5, 1000)])
def test_serving_lrt_kernel_matches_the_numpy_serving_path(batch, m, mixed_size_bank):
    import cupy as cp

    from kernels.gpu import GpuScorer

    bank = mixed_size_bank(per_class=1000)  # draws of m up to 1000 need that many per class
    acts = np.random.default_rng(4).normal(size=(batch, 300)).astype(np.float32)
    labels = np.random.default_rng(5).integers(0, 3, batch)
    ids = score(acts, labels, bank, m, np.random.default_rng(6)).ids
    want = lrt_scores(subset_means(acts, ids, bank), ids, bank)
    got = GpuScorer(bank).lrt(cp.asarray(acts), labels, m, ids=ids)
    np.testing.assert_allclose(got.lrt, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
def test_gpu_path_refuses_bad_input_by_name(mixed_size_bank):
    import cupy as cp

    from kernels.gpu import GpuScorer

    scorer = GpuScorer(mixed_size_bank())
    good = cp.zeros((4, 300), cp.float32)
    with pytest.raises(InvalidInputError, match="C-contiguous"):
        scorer.score(cp.zeros((300, 4), cp.float32).T, np.zeros(4, int), 4)
    with pytest.raises(InvalidInputError, match="float32"):
        scorer.lrt(good.astype(cp.float64), np.zeros(4, int), 4)
    bad = good.copy()
    bad[2, 5] = cp.nan
    with pytest.raises(InvalidInputError, match=r"rows \[2\]"):
        scorer.lrt(bad, np.zeros(4, int), 4)
    with pytest.raises(InvalidInputError, match="out of range"):
        scorer.score(good, np.zeros(4, int), 4, ids=np.full((4, 2), 149))
    with pytest.raises(FingerprintError, match="CUDA device 99 does not exist"):
        GpuScorer(mixed_size_bank(), device_id=99)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
def test_the_scorer_lives_on_its_device(mixed_size_bank):
    import cupy as cp

    from kernels.gpu import GpuScorer

    last = cp.cuda.runtime.getDeviceCount() - 1
    scorer = GpuScorer(mixed_size_bank(), device_id=last)
    assert scorer.indices.device.id == last and scorer.params.device.id == last


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
def test_scoring_waits_for_the_producers_stream(mixed_size_bank):
    """Activations written by work still queued on the default stream (as a DLPack producer leaves them)
    must be read only once written: the scorer's own stream waits for it."""
    import cupy as cp

    from kernels.gpu import GpuScorer

    bank = mixed_size_bank(per_class=1000)  # draws of m up to 1000 need that many per class
    scorer = GpuScorer(bank)
    rng = np.random.default_rng(7)
    for _ in range(5):
        host = rng.normal(size=(4096, 300)).astype(np.float32)
        labels = rng.integers(0, 3, 4096)
        rows = np.arange(0, 4096, 512)
        ids = score(host[rows], labels[rows], bank, 64, rng).ids
        dev = cp.zeros((4096, 300), cp.float32)
        big = cp.asarray(np.repeat(host[None], 8, axis=0))  # slow work queued ahead on the default stream
        dev[...] = big.sum(axis=0) / 8
        got = scorer.lrt(dev[rows], labels[rows], 64, ids=ids, checked=True).lrt
        want = lrt_scores(subset_means(host[rows], ids, bank), ids, bank)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
@pytest.mark.parametrize("carrier", ["torch __dlpack__", "pb_utils-style to_dlpack()"])
def test_the_gpu_detector_takes_dlpack_tensors_and_fails_only_the_bad_request(carrier, tmp_path, mixed_size_bank):
    import torch
    import torch.utils.dlpack

    from kernels.bank import Bank
    from kernels.calibration import calibrate_threshold
    from model_repository.serving import ServedDetector

    b = mixed_size_bank()
    cal = calibrate_threshold(np.random.default_rng(1).normal(size=400), np.arange(400) % 3, 3, "lrt", 16)
    Bank(b.indices, b.lengths, b.clean_mean, b.clean_std, b.attacked_mean, b.attacked_std, b.cohen_d,
         np.array([0, 50, 150, 150]), {"num_neurons": 300}).with_meta(
        model_sha256="ab" * 32, draws_per_input=16, calibration={"lrt": cal.to_json()}).save(tmp_path / "bank")
    det = ServedDetector(tmp_path / "bank", "ab" * 32, 0.01, gpu=True, device_id=0)

    class TritonLike:  # what pb_utils.Tensor offers: to_dlpack() only
        def __init__(self, t):
            self.t = t

        def to_dlpack(self):
            return torch.utils.dlpack.to_dlpack(self.t)

    wrap = (lambda t: t) if carrier.startswith("torch") else TritonLike
    host = np.random.default_rng(8).normal(size=(5, 300)).astype(np.float32)
    bad = torch.tensor(host[:2], device="cuda")
    bad[1, 3] = float("nan")
    with pytest.raises(FingerprintError, match=r"rows \[1\]"):
        det.check(np.eye(3, dtype=np.float32)[[0, 1]], wrap(bad))
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 1, 0]] * 5
    labels, acts = zip(*[det.check(logits[s], wrap(torch.tensor(host[s], device="cuda")))
                         for s in (slice(0, 3), slice(3, 5))])
    labels = np.concatenate(labels)
    d, _ = det.detect(labels, list(acts), logits)
    assert d.checked.tolist() == [True, True, False, True, True]
    rows = [0, 1, 3, 4]
    offline = score(host[rows], labels[rows], det.bank, 16, ids=d.draws[rows])
    np.testing.assert_allclose(d.score[rows], det.detector.calibration.standardize(offline.lrt, labels[rows]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")
@pytest.mark.parametrize("method", ["lrt", "vote", "anomaly"])
def test_the_cupy_backend_gives_the_detector_the_numpy_backends_verdicts(method, mixed_size_bank):
    """The contract with the backend swapped: same draws (same seed), same scores, same unchecked rows."""
    from kernels.bank import Bank
    from kernels.detector import FingerprintDetector, Observations, RandomDraws
    from kernels.gpu import GpuScorer

    b = mixed_size_bank()
    bank = Bank(b.indices, b.lengths, b.clean_mean, b.clean_std, b.attacked_mean, b.attacked_std, b.cohen_d,
                np.array([0, 50, 150, 150]), {"num_neurons": 300})  # class 2 has no fingerprints
    rng = np.random.default_rng(9)
    cal = Observations(rng.integers(0, 2, 300), acts=rng.normal(size=(300, 300)).astype(np.float32))
    obs = Observations(np.array([0, 2, 1, 1, 0]), acts=rng.normal(size=(5, 300)).astype(np.float32))
    cpu = FingerprintDetector(bank, RandomDraws(16), method)
    gpu = FingerprintDetector(bank, RandomDraws(16), method, backend=GpuScorer(bank))
    cpu.calibrate(cal, (0.05,), repeats=2, seed=1)
    gpu.calibrate(cal, (0.05,), repeats=2, seed=1)
    want, got = cpu.detect(obs, rng=np.random.default_rng(3)), gpu.detect(obs, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(got.checked, [True, False, True, True, True])
    np.testing.assert_array_equal(got.draws, want.draws)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-4, atol=1e-4)
