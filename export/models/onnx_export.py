"""ONNX export of the classifier with the fingerprinted activations as extra graph outputs.

Serving then needs one forward pass: the graph returns ``logits (B, num_classes) float32`` and
``activations (B, D) float32``, laid out exactly as the bank's activation layout (same layers, same
order, same flattening), with a dynamic batch axis; with squeezers (the served default's feature
squeezing member, :mod:`kernels.squeezing`) also ``squeezed_logits (B, S, num_classes)``, the logits of
each squeezed copy, computed in the same batch. The export checks itself: onnxruntime against torch
on real images, max absolute difference at most :data:`PARITY_ATOL` for every output and identical
labels, else it fails.

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
from export.models.squeezing import TorchSqueezer
from kernels.bank import sha256_file
from kernels.errors import InvalidInputError, ModelMismatchError
from kernels.onnx_runtime import ort_session
from kernels.squeezing import Squeezer

INPUT_NAME, LOGITS_NAME, ACTIVATIONS_NAME, SQUEEZED_NAME = "images", "logits", "activations", "squeezed_logits"
PARITY_ATOL = 1e-4


class ClassifierWithActivations(nn.Module):
    """``images -> (logits, activations[, squeezed_logits])``: the model plus its captured layers,
    concatenated, and with ``squeezers`` its logits on each squeezed copy ``(B, S, classes)``, all from one
    forward pass of the ``(S + 1) B`` images (the captured layers are the inputs' own rows).

    Args:
        model: the classifier (eval mode).
        layout: which layers, at input or output, in which order (from the bank's metadata).
        squeezers: feature squeezing's (:mod:`kernels.squeezing`), if the detector has that member.
    """

    def __init__(self, model: nn.Module, layout: ActivationLayout, squeezers: tuple[Squeezer, ...] = ()) -> None:
        super().__init__()
        self.model = model.eval()
        self.layout = layout
        self.squeezers = nn.ModuleList(TorchSqueezer(s) for s in squeezers)
        modules = dict(model.named_modules())
        missing = [s.name for s in layout.slices if s.name not in modules]
        if missing:
            raise ModelMismatchError(f"layers {missing} of the bank's layout are not in {type(model).__name__}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = images.shape[0]
        batch = torch.cat([images, *(s(images) for s in self.squeezers)]) if len(self.squeezers) else images
        with recorded(self.model, [(s.name, s.where) for s in self.layout.slices]) as captured:
            logits = self.model(batch)
        acts = torch.cat([captured[i][:b].flatten(1) for i in range(len(self.layout.slices))], dim=1)
        if not len(self.squeezers):
            return logits, acts
        return logits[:b], acts, logits[b:].reshape(len(self.squeezers), b, -1).transpose(0, 1)


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
    squeezers: list | None = None  # [[kind, value], ...] of the squeezed_logits output, if any
    max_abs_diff_squeezed_logits: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def output_names(wrapped: ClassifierWithActivations) -> list[str]:
    return [LOGITS_NAME, ACTIVATIONS_NAME] + [SQUEEZED_NAME] * bool(len(wrapped.squeezers))


def check_parity(path: Path, wrapped: ClassifierWithActivations, images: np.ndarray,
                 atol: float = PARITY_ATOL) -> tuple[float, ...]:
    """Max |onnxruntime - torch| of each output (logits, activations[, squeezed logits]) on ``images``;
    raise if above ``atol`` or if any label differs."""
    session = ort_session(path)
    names = output_names(wrapped)
    got = session.run(names, {INPUT_NAME: images})
    with torch.no_grad():
        want = [t.numpy() for t in wrapped(torch.from_numpy(images))]
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    logits, ref_logits = got[0], want[0]
    if got[1].shape[1] != wrapped.layout.num_neurons:
        raise ModelMismatchError(f"ONNX activations have {got[1].shape[1]} columns, the layout {wrapped.layout.num_neurons}")
    if max(diffs) > atol or (logits.argmax(1) != ref_logits.argmax(1)).any():
        raise ModelMismatchError(f"ONNX export of {path} disagrees with torch: max |diff| " + ", ".join(
            f"{n} {d:.2e}" for n, d in zip(names, diffs)) + f" (allowed {atol:g}), labels differ on "
            f"{int((logits.argmax(1) != ref_logits.argmax(1)).sum())} images")
    return tuple(diffs)


def export_onnx(model: nn.Module, layout: ActivationLayout, path: Path, parity_images: np.ndarray,
                opset: int = 18, squeezers: tuple[Squeezer, ...] = ()) -> ExportReport:
    """Export ``model`` with ``layout``'s activations as an extra output, then check parity.

    Args:
        model: the classifier.
        layout: the bank's activation layout.
        path: the ``.onnx`` file to write.
        parity_images: ``(N, C, H, W) float32`` real images for the parity check (N >= 2).
        opset: ONNX opset of the export.
        squeezers: also the output ``squeezed_logits`` of these (feature squeezing's).
    """
    if parity_images.ndim != 4 or len(parity_images) < 2:
        raise InvalidInputError(f"parity check needs at least 2 images (N, C, H, W), got {parity_images.shape}")
    wrapped = ClassifierWithActivations(model, layout, squeezers).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.ascontiguousarray(parity_images[:2]))
    start = time.time()
    torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT_NAME],
                      output_names=output_names(wrapped), opset_version=opset,
                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                      external_data=False, verbose=False)
    seconds = time.time() - start
    d_logits, d_acts, *d_squeezed = check_parity(path, wrapped, np.ascontiguousarray(parity_images))
    return ExportReport(str(path), sha256_file(path), opset, f"torch.onnx (dynamo) {torch.__version__}",
                        round(seconds, 2), len(parity_images), d_logits, d_acts,
                        [[s.kind, s.value] for s in squeezers], d_squeezed[0] if d_squeezed else 0.0)


def compare(models: list[Path], repeats: int = 200, batches: tuple[int, ...] = (1, 32)) -> str:
    """p50 latency of several exported graphs (the served settings, :func:`kernels.onnx_runtime.ort_session`),
    timed in turn request by request so that they share the machine's noise, and each one's ratio to the
    first: e.g. the served default's graph with feature squeezing's extra forward passes against one without."""
    sessions = [ort_session(m) for m in models]
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    lines = [f"{'model':<40} {'batch':>5} {'p50 us':>9} {'ratio':>6}"]
    for batch in batches:
        x = np.random.default_rng(0).random([batch] + shape[1:], dtype=np.float32)
        times = [[] for _ in sessions]
        for s in sessions:
            s.run(None, {INPUT_NAME: x})
        for _ in range(repeats if batch == 1 else max(repeats // 10, 10)):
            for s, t in zip(sessions, times):
                start = time.perf_counter()
                s.run(None, {INPUT_NAME: x})
                t.append(time.perf_counter() - start)
        p50 = [float(np.median(t)) for t in times]
        lines += [f"{str(m)[-40:]:<40} {batch:>5} {p * 1e6:>9.0f} {p / p50[0]:>6.2f}" for m, p in zip(models, p50)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure onnxruntime settings on an exported model: latency per batch, side by side; or compare
    several exported models (``--compare``)."""
    import argparse

    import onnxruntime as ort

    p = argparse.ArgumentParser(description="Time onnxruntime settings on an exported classifier (model.onnx), "
                                            "or several exported classifiers side by side (--compare).")
    p.add_argument("model", type=Path, help="the .onnx file (e.g. runs/default/model.onnx)")
    p.add_argument("--compare", type=Path, nargs="+", default=[],
                   help="other .onnx files timed in turn with the first at batch 1 and 32, with their ratio to it")
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args(argv)
    if args.compare:
        print(compare([args.model, *args.compare], args.repeats))
        return
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
