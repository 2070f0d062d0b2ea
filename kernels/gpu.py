"""GPU path of randomized fingerprint detection: CUDA kernels launched through CuPy.

``fingerprint_kernel.cu`` holds two kernels, each one launch for ``B`` images with their own ``m``
drawn fingerprints and no Python loop over images or fingerprints:

- ``fingerprint_lrt`` (:meth:`GpuScorer.lrt`, what the server runs): the likelihood-ratio score alone,
  from the packed Gaussians (:attr:`kernels.bank.Bank.lrt_params`), with blocks sized to ``m``;
- ``fingerprint_scores`` (:meth:`GpuScorer.score`, for evaluation): the ``(B, m)`` fingerprint values
  and the LRT, vote and anomaly scores.

Activations may arrive as any DLPack tensor on the GPU (a Triton ``pb_utils.Tensor``, a torch CUDA
tensor, a CuPy array) and are used in place, without a host copy. The scorer owns one CUDA stream on
its device; before each launch that stream waits on the device's legacy default stream, where
producers that do not name a stream (Triton's DLPack hand-over among them) leave their work, so the
kernel never reads activations that are still being written. Draws come from the same generator as
on the CPU (:func:`kernels.scoring.secure_rng` by default); ``kernels.scoring`` is the reference the
tests compare against (agreement to 1e-5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kernels.bank import Bank
from kernels.errors import FingerprintError, InvalidInputError
from kernels.scoring import Scores, check_covered, check_ids, check_labels, draw_fingerprints, secure_rng

KERNEL_SOURCE = Path(__file__).with_name("fingerprint_kernel.cu")
SCORES_KERNEL, LRT_KERNEL = "fingerprint_scores", "fingerprint_lrt"
THREADS_PER_BLOCK = 128  # the three-score kernel; the LRT kernel takes 32-128 threads by m


def gpu_available() -> bool:
    """Whether CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU path here"
        return False


def lrt_block_size(m: int) -> int:
    """Threads per image of the LRT kernel: the power of two covering ``m``, within one to four warps."""
    return int(min(128, max(32, 1 << max(0, int(m - 1).bit_length()))))


class GpuScorer:
    """The bank on one GPU plus the compiled kernels.

    Args:
        bank: the fingerprint bank; its arrays are uploaded once.
        device_id: the CUDA device of this scorer (a Triton model instance's ``model_instance_device_id``).
    """

    def __init__(self, bank: Bank, device_id: int = 0) -> None:
        try:
            import cupy as cp
        except ImportError as e:
            raise FingerprintError("the GPU path needs CuPy: pip install '.[gpu]'") from e
        count = cp.cuda.runtime.getDeviceCount()
        if not 0 <= device_id < count:
            raise FingerprintError(f"CUDA device {device_id} does not exist ({count} visible)")
        self.cp, self.bank, self.device = cp, bank, cp.cuda.Device(device_id)
        with self.device:
            module = cp.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++17",))
            self.scores_kernel = module.get_function(SCORES_KERNEL)
            self.lrt_kernel = module.get_function(LRT_KERNEL)
            up = lambda a: cp.asarray(np.ascontiguousarray(a))  # noqa: E731
            self.indices, self.lengths = up(bank.indices), up(bank.lengths)
            self.gaussians = [up(getattr(bank, n)) for n in ("clean_mean", "clean_std", "attacked_mean", "attacked_std")]
            self.params = up(bank.lrt_params)
            self.stream = cp.cuda.Stream(non_blocking=True)

    def as_device_array(self, acts):
        """A CuPy view of ``acts`` on this scorer's device (CuPy, a DLPack-capable GPU tensor, an object
        with ``to_dlpack()`` such as Triton's ``pb_utils.Tensor``, or NumPy, which is uploaded), checked
        for dtype, shape, layout and finite values; the error names the problem and the bad rows."""
        cp = self.cp
        with self.device:
            if isinstance(acts, np.ndarray):
                acts = cp.asarray(acts)
            elif not isinstance(acts, cp.ndarray):
                acts = cp.from_dlpack(acts if hasattr(acts, "__dlpack__") else acts.to_dlpack())
            if acts.device.id != self.device.id:
                raise InvalidInputError(f"activations live on CUDA device {acts.device.id}, this detector on "
                                        f"{self.device.id}")
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

    check = as_device_array  # the backend contract of kernels.detector.FingerprintDetector

    def take_rows(self, acts, rows: np.ndarray):
        with self.device:
            return self.cp.ascontiguousarray(acts[self.cp.asarray(rows)])

    def scores(self, acts, ids: np.ndarray, method: str) -> np.ndarray:
        """``(B,)`` scores by ``method`` of checked device ``acts (B, D)`` for the fingerprints ``ids (B, m)``
        (drawn inside each input's class): the LRT kernel for ``lrt``, the three-score kernel otherwise."""
        if method == "lrt":
            return self.lrt(acts, None, ids.shape[1], ids=ids, checked=True).lrt
        return self.score(acts, None, ids.shape[1], ids=ids, checked=True).get(method)

    def _draws(self, acts, labels: np.ndarray, m: int, rng, ids, checked: bool = False):
        if not checked:  # the served detector checked its labels already (covered classes only)
            labels = check_labels(labels, acts.shape[0], self.bank)
            check_covered(labels, self.bank, m if ids is None else 1)
        if ids is None:
            ids = draw_fingerprints(labels, self.bank, m, rng or secure_rng())
        elif not checked:
            ids = check_ids(ids, labels, self.bank)
        return ids, self.cp.asarray(np.ascontiguousarray(ids, dtype=np.int64))

    def _after_producers(self) -> None:
        """Make this scorer's stream wait for work queued on the device's legacy default stream."""
        ready = self.cp.cuda.Event(disable_timing=True)
        ready.record(self.cp.cuda.Stream.null)
        self.stream.wait_event(ready)

    def lrt(self, acts, labels: np.ndarray, m: int, rng: np.random.Generator | None = None,
            ids: np.ndarray | None = None, checked: bool = False) -> Scores:
        """The serving path: LRT scores only (``Scores.lrt``; no values, vote or anomaly). ``checked``:
        the caller validated ``acts`` and ``labels`` already (as the served detector does per request)."""
        cp = self.cp
        with self.device:
            acts = self.as_device_array(acts) if not checked else acts
            ids, ids_d = self._draws(acts, labels, m, rng, ids, checked)
            b, m = ids.shape
            threads = lrt_block_size(m)
            out = cp.empty(b, cp.float32)
            self._after_producers()
            with self.stream:
                self.lrt_kernel((b,), (threads,),
                                (acts, ids_d, self.indices, self.lengths, self.params,
                                 np.int32(self.bank.num_fingerprints), np.int32(self.bank.num_neurons), np.int32(m),
                                 np.int32(self.bank.indices.shape[1]), out), shared_mem=threads * 4)
                lrt = out.get(stream=self.stream)
            self.stream.synchronize()
        return Scores(ids, np.zeros((b, 0), np.float32), lrt.astype(np.float64))

    def score(self, acts, labels: np.ndarray, m: int, rng: np.random.Generator | None = None,
              ids: np.ndarray | None = None, checked: bool = False) -> Scores:
        """Same contract as :func:`kernels.scoring.score`; results come back to the host."""
        cp = self.cp
        with self.device:
            acts = self.as_device_array(acts) if not checked else acts
            ids, ids_d = self._draws(acts, labels, m, rng, ids, checked)
            b, m = ids.shape
            values = cp.empty((b, m), cp.float32)
            scores = cp.empty((b, 3), cp.float32)
            self._after_producers()
            with self.stream:
                self.scores_kernel((b,), (THREADS_PER_BLOCK,),
                                   (acts, ids_d, self.indices, self.lengths, *self.gaussians,
                                    np.int32(self.bank.num_neurons), np.int32(m), np.int32(self.bank.indices.shape[1]),
                                    values, scores), shared_mem=3 * THREADS_PER_BLOCK * 4)
                s, v = scores.get(stream=self.stream), values.get(stream=self.stream)
            self.stream.synchronize()
        s = s.astype(np.float64)
        return Scores(ids, v, s[:, 0], s[:, 1], s[:, 2])
