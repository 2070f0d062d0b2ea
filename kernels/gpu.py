"""GPU path of randomized fingerprint detection: one CUDA kernel launch through CuPy.

The kernel (``fingerprint_kernel.cu``) computes, for ``B`` images each with its own ``m`` drawn
fingerprints, the ``(B, m)`` fingerprint values and the ``(B, 3)`` LRT / vote / anomaly scores in a
single launch, with no Python loop over images or fingerprints. Activations may arrive as any
DLPack tensor on the GPU (a Triton ``pb_utils.Tensor``, a torch CUDA tensor, a CuPy array) and are
used in place, without a host copy. Draws come from the same generator as on the CPU
(:func:`kernels.scoring.secure_rng` by default) so both paths share their randomness contract;
``kernels.scoring`` is the reference the tests compare against (agreement to 1e-5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels.bank import Bank
from kernels.errors import FingerprintError, InvalidInputError
from kernels.scoring import Scores, check_ids, check_labels, draw_fingerprints, secure_rng

KERNEL_SOURCE = Path(__file__).with_name("fingerprint_kernel.cu")
KERNEL_NAME = "fingerprint_scores"
THREADS_PER_BLOCK = 128


def gpu_available() -> bool:
    """Whether CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU path here"
        return False


class GpuScorer:
    """The bank on the GPU plus the compiled kernel.

    Args:
        bank: the fingerprint bank; its arrays are uploaded once.
    """

    def __init__(self, bank: Bank) -> None:
        try:
            import cupy as cp
        except ImportError as e:
            raise FingerprintError("the GPU path needs CuPy: pip install '.[gpu]'") from e
        self.cp, self.bank = cp, bank
        module = cp.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++17",))
        self.kernel = module.get_function(KERNEL_NAME)
        up = lambda a: cp.asarray(np.ascontiguousarray(a))  # noqa: E731
        self.indices, self.lengths = up(bank.indices), up(bank.lengths)
        self.gaussians = [up(getattr(bank, n)) for n in ("clean_mean", "clean_std", "attacked_mean", "attacked_std")]

    def as_device_array(self, acts):
        """A CuPy view of ``acts`` (CuPy, DLPack-capable GPU tensor, or NumPy, which is uploaded)."""
        cp = self.cp
        if isinstance(acts, np.ndarray):
            acts = cp.asarray(acts)
        elif not isinstance(acts, cp.ndarray):
            acts = cp.from_dlpack(acts)
        if acts.dtype != cp.float32:
            raise InvalidInputError(f"activations must be float32, got {acts.dtype}")
        if acts.ndim != 2 or acts.shape[1] != self.bank.num_neurons:
            raise InvalidInputError(f"activations must have shape (B, {self.bank.num_neurons}), got {acts.shape}")
        if acts.shape[0] == 0:
            raise InvalidInputError("empty batch: no activations to score")
        if not acts.flags.c_contiguous:
            raise InvalidInputError("activations must be C-contiguous (row-major) on the GPU")
        bad = ~cp.isfinite(acts).all(axis=1)
        if bool(bad.any()):
            rows = cp.flatnonzero(bad)[:10].get().tolist()
            raise InvalidInputError(f"activations of rows {rows} hold NaN or infinite values")
        return acts

    def score(self, acts, labels: np.ndarray, m: int, rng: np.random.Generator | None = None,
              ids: np.ndarray | None = None) -> Scores:
        """Same contract as :func:`kernels.scoring.score`; results come back to the host."""
        cp = self.cp
        acts = self.as_device_array(acts)
        b = acts.shape[0]
        labels = check_labels(np.asarray(labels), b, self.bank, m if ids is None else 1)
        ids = draw_fingerprints(labels, self.bank, m, rng or secure_rng()) if ids is None else check_ids(ids, labels, self.bank)
        m = ids.shape[1]
        ids_d = cp.asarray(np.ascontiguousarray(ids, dtype=np.int64))
        values = cp.empty((b, m), cp.float32)
        scores = cp.empty((b, 3), cp.float32)
        self.kernel((b,), (THREADS_PER_BLOCK,),
                    (acts, ids_d, self.indices, self.lengths, *self.gaussians, np.int32(self.bank.num_neurons),
                     np.int32(m), np.int32(self.bank.indices.shape[1]), values, scores),
                    shared_mem=3 * THREADS_PER_BLOCK * 4)
        s = scores.get().astype(np.float64)
        return Scores(ids, values.get(), s[:, 0], s[:, 1], s[:, 2])
