"""ONNX export of the classifier with the fingerprinted activations as extra graph outputs.

Serving then needs one forward pass: the graph returns ``logits (B, num_classes) float32`` and
``activations (B, D) float32``, laid out exactly as the bank's activation layout (same layers, same
order, same flattening), with a dynamic batch axis. The export checks itself: onnxruntime against
torch on real images, max absolute difference at most :data:`PARITY_ATOL` for logits and activations
and identical labels, else it fails.

onnxruntime settings live in :mod:`kernels.onnx_runtime`; ``python -m export.models.onnx_export model.onnx``
times the alternatives side by side.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.models.activations import ActivationLayout, recorded
from kernels.bank import sha256_file
from kernels.errors import InvalidInputError, ModelMismatchError
from kernels.onnx_runtime import ort_session

INPUT_NAME, LOGITS_NAME, ACTIVATIONS_NAME = "images", "logits", "activations"
PARITY_ATOL = 1e-4


class ClassifierWithActivations(nn.Module):
    """``images -> (logits, activations)``: the model plus its captured layers, concatenated.

    Args:
        model: the classifier (eval mode).
        layout: which layers, at input or output, in which order (from the bank's metadata).
    """

    def __init__(self, model: nn.Module, layout: ActivationLayout) -> None:
        super().__init__()
        self.model = model.eval()
        self.layout = layout
        modules = dict(model.named_modules())
        missing = [s.name for s in layout.slices if s.name not in modules]
        if missing:
            raise ModelMismatchError(f"layers {missing} of the bank's layout are not in {type(model).__name__}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with recorded(self.model, [(s.name, s.where) for s in self.layout.slices]) as captured:
            logits = self.model(images)
        return logits, torch.cat([captured[i].flatten(1) for i in range(len(self.layout.slices))], dim=1)


@dataclass(frozen=True)
class ExportReport:
    """What the export produced and how it checked it."""

    path: str
    sha256: str
    opset: int
    exporter: str
    seconds: float
    parity_images: int
    max_abs_diff_logits: float
    max_abs_diff_activations: float

    def to_json(self) -> dict:
        return asdict(self)


def check_parity(path: Path, wrapped: ClassifierWithActivations, images: np.ndarray,
                 atol: float = PARITY_ATOL) -> tuple[float, float]:
    """Max |onnxruntime - torch| of logits and activations on ``images``; raise if above ``atol``
    or if any label differs."""
    session = ort_session(path)
    logits, acts = session.run([LOGITS_NAME, ACTIVATIONS_NAME], {INPUT_NAME: images})
    with torch.no_grad():
        ref_logits, ref_acts = (t.numpy() for t in wrapped(torch.from_numpy(images)))
    d_logits = float(np.abs(logits - ref_logits).max())
    d_acts = float(np.abs(acts - ref_acts).max())
    if acts.shape[1] != wrapped.layout.num_neurons:
        raise ModelMismatchError(f"ONNX activations have {acts.shape[1]} columns, the layout {wrapped.layout.num_neurons}")
    if d_logits > atol or d_acts > atol or (logits.argmax(1) != ref_logits.argmax(1)).any():
        raise ModelMismatchError(f"ONNX export of {path} disagrees with torch: max |diff| logits {d_logits:.2e}, "
                                 f"activations {d_acts:.2e} (allowed {atol:g}), labels differ on "
                                 f"{int((logits.argmax(1) != ref_logits.argmax(1)).sum())} images")
    return d_logits, d_acts


def export_onnx(model: nn.Module, layout: ActivationLayout, path: Path, parity_images: np.ndarray,
                opset: int = 18) -> ExportReport:
    """Export ``model`` with ``layout``'s activations as an extra output, then check parity.

    Args:
        model: the classifier.
        layout: the bank's activation layout.
        path: the ``.onnx`` file to write.
        parity_images: ``(N, C, H, W) float32`` real images for the parity check (N >= 2).
        opset: ONNX opset of the export.
    """
    if parity_images.ndim != 4 or len(parity_images) < 2:
        raise InvalidInputError(f"parity check needs at least 2 images (N, C, H, W), got {parity_images.shape}")
    wrapped = ClassifierWithActivations(model, layout).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.ascontiguousarray(parity_images[:2]))
    start = time.time()
    torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT_NAME],
                      output_names=[LOGITS_NAME, ACTIVATIONS_NAME], opset_version=opset,
                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                      external_data=False, verbose=False)
    seconds = time.time() - start
    d_logits, d_acts = check_parity(path, wrapped, np.ascontiguousarray(parity_images))
    return ExportReport(str(path), sha256_file(path), opset, f"torch.onnx (dynamo) {torch.__version__}",
                        round(seconds, 2), len(parity_images), d_logits, d_acts)


def main(argv: list[str] | None = None) -> None:
    """Measure onnxruntime settings on an exported model: latency per batch, side by side."""
    import argparse

    import onnxruntime as ort

    p = argparse.ArgumentParser(description="Time onnxruntime settings on an exported classifier (model.onnx).")
    p.add_argument("model", type=Path, help="the .onnx file (e.g. runs/default/model.onnx)")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    session = ort_session(args.model)
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    print(f"{'optimisation':>12} {'threads':>7} {'batch':>5} {'p50 us':>9} {'images/s':>10}")
    for batch in (1, 64):
        x = np.random.default_rng(0).random([batch] + shape[1:], dtype=np.float32)
        for level_name, level in levels.items():
            for threads in (1, 2):
                opts = ort.SessionOptions()
                opts.graph_optimization_level, opts.intra_op_num_threads = level, threads
                s = ort.InferenceSession(str(args.model), sess_options=opts, providers=["CPUExecutionProvider"])
                s.run(None, {INPUT_NAME: x})
                times = []
                for _ in range(args.repeats if batch == 1 else args.repeats // 10):
                    t = time.perf_counter()
                    s.run(None, {INPUT_NAME: x})
                    times.append(time.perf_counter() - t)
                p50 = float(np.median(times))
                print(f"{level_name:>12} {threads:>7} {batch:>5} {p50 * 1e6:>9.0f} {batch / p50:>10,.0f}")


if __name__ == "__main__":
    main()
