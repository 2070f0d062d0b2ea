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


@needs_gpu
@pytest.mark.parametrize("batch, m", [(1, 16), (64, 256), (7, 1000)])
def test_gpu_kernel_matches_the_numpy_reference(batch, m, mixed_size_bank):
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
def test_gpu_path_refuses_bad_input_by_name(mixed_size_bank):
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
