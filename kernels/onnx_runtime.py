"""The onnxruntime session both the export's parity check and the served classifier use.

Settings chosen by measurement (``python -m export.models.onnx_export runs/default/model.onnx``, MNIST CNN,
2-core CPU, 2026-11-24): full graph optimisation with 2 intra-op threads gave batch-1 p50 117 us and
batch-64 3.0 ms, against 172-183 us and 4.5-9.1 ms for basic optimisation or one thread. So: full
optimisation, sequential execution, intra-op threads left to onnxruntime (the physical cores). The
CUDA execution provider goes first when onnxruntime-gpu sees a GPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def image_problem(images: np.ndarray, shape: tuple[int, ...] | None = None, high: float | None = 1.0) -> str | None:
    """Why a request's images ``(B, C, H, W)`` with values in [0, ``high``] (each of ``shape``, if given;
    no range where ``high`` is None, as for UINT8 pixels) cannot be classified, or None. Triton 2.51
    keeps the batch dimension modulo 2^32: a request declaring a batch of 2^32 reaches the model without
    one, which is refused here (2^32 + n arrives as a batch of n)."""
    if images.ndim != 4:
        return (f"images must be a batch (B, C, H, W), got {images.ndim} dimensions {images.shape}; "
                "a batch size of 2^32 or more is not representable")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        return f"images must have shape (B, {', '.join(map(str, shape))}), got {images.shape}"
    if images.shape[0] == 0:
        return "empty batch: the request holds no images"
    if high is None:
        return None
    lo, hi = float(images.min()), float(images.max())  # two passes; NaN propagates, infinities fall outside
    if np.isnan(lo) or np.isnan(hi):
        return "images hold NaN values"
    if lo < 0.0 or hi > high:
        return f"image values must lie in [0, {high:g}], got [{lo:.3g}, {hi:.3g}]"
    return None


def ort_session(path: Path, threads: int = 0, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
