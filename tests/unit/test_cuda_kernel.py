"""The CUDA kernel: it compiles cleanly wherever nvcc is, and matches the NumPy path on a GPU."""
import shutil
import subprocess

import numpy as np
import pytest

from kernels.bank import Bank
from kernels.errors import InvalidInputError
from kernels.gpu import KERNEL_SOURCE, gpu_available
from kernels.scoring import score

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_source_compiles_without_any_warning(tmp_path):
    result = subprocess.run(["nvcc", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
                             "-c", str(KERNEL_SOURCE), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def mixed_size_bank(num_neurons=300, per_class=50, seed=0) -> Bank:
    rng = np.random.default_rng(seed)
    f = 3 * per_class
    lengths = rng.integers(1, 9, f).astype(np.int32)
    indices = np.full((f, 8), num_neurons, np.int32)
    for i, n in enumerate(lengths):
        indices[i, :n] = np.sort(rng.choice(num_neurons, n, replace=False))
    g = lambda lo, hi: rng.uniform(lo, hi, f).astype(np.float32)  # noqa: E731
    return Bank(indices, lengths, g(-1, 1), g(0.5, 2), g(-1, 1), g(0.5, 2), g(1, 3),
                np.arange(0, f + 1, per_class, dtype=np.int64), {"num_neurons": num_neurons})


@needs_gpu
@pytest.mark.parametrize("batch, m", [(1, 16), (64, 256), (7, 1000)])
def test_gpu_kernel_matches_the_numpy_reference(batch, m):
    import cupy as cp

    from kernels.gpu import GpuScorer

    bank = mixed_size_bank()
    acts = np.random.default_rng(1).normal(size=(batch, 300)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 3, batch)
    cpu = score(acts, labels, bank, m, np.random.default_rng(3))
    gpu = GpuScorer(bank).score(cp.asarray(acts), labels, m, ids=cpu.ids)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-5, atol=1e-5)
    for name in ("lrt", "vote", "anomaly"):
        np.testing.assert_allclose(gpu.get(name), cpu.get(name), rtol=1e-5, atol=1e-5)


@needs_gpu
def test_gpu_path_refuses_bad_input_by_name():
    import cupy as cp

    from kernels.gpu import GpuScorer

    scorer = GpuScorer(mixed_size_bank())
    good = cp.zeros((4, 300), cp.float32)
    with pytest.raises(InvalidInputError, match="C-contiguous"):
        scorer.score(cp.zeros((300, 4), cp.float32).T, np.zeros(4, int), 4)
    with pytest.raises(InvalidInputError, match="float32"):
        scorer.score(good.astype(cp.float64), np.zeros(4, int), 4)
    bad = good.copy()
    bad[2, 5] = cp.nan
    with pytest.raises(InvalidInputError, match=r"rows \[2\]"):
        scorer.score(bad, np.zeros(4, int), 4)
    with pytest.raises(InvalidInputError, match="out of range"):
        scorer.score(good, np.zeros(4, int), 4, ids=np.full((4, 2), 149))
