"""A pipeline output folder for serving benchmarks of large models, with a synthetic bank.

Speed does not depend on fingerprint values, so a benchmark of an ImageNet-size classifier can serve
a bank of realistic size (1,000 classes x 1,000 fingerprints) without ImageNet: the model is real
(exported to ONNX with its activation outputs and parity-checked), the fingerprints are random
neuron subsets with placeholder Gaussians and a placeholder calibration. Never use it to detect.

    python -m export.bank.synthetic --out runs/efficientnet-lite0
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from export.models.activations import capture_activations
from export.models.classifier import ClassifierSpec
from export.models.onnx_export import export_onnx
from kernels.calibration import calibrate_threshold
from kernels.scoring import METHODS

# the penultimate features and the logits: the "last few layers" of the paper, 2,280 neurons
EFFICIENTNET_LAYERS = ("_avg_pooling", "_fc")


def write_synthetic_out(out: Path, architecture: str = "efficientnet-lite0", input_shape=(3, 224, 224),
                        num_classes: int = 1000, layers=EFFICIENTNET_LAYERS, per_class: int = 1000, k: int = 5,
                        m: int = 128, seed: int = 0) -> Path:
    """Write ``model.onnx``, ``bank/`` and ``data.json`` as :func:`model_repository.writer.write_repository` reads them."""
    from kernels.benchmark import synthetic_bank

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model = ClassifierSpec(architecture, tuple(input_shape), num_classes, {"pretrained": True}).build().eval()
    images = rng.random((4, *input_shape), dtype=np.float32)
    _, layout = capture_activations(model, images, list(layers), progress=False)
    report = export_onnx(model, layout, out / "model.onnx", images)
    bank = synthetic_bank(num_classes, per_class, k, layout.num_neurons, seed)
    labels = rng.integers(0, num_classes, 20_000)
    cal = {method: calibrate_threshold(rng.normal(size=len(labels)), labels, num_classes, method, m).to_json()
           for method in METHODS}
    bank.with_meta(layout=layout.to_json(), class_names=[str(c) for c in range(num_classes)], calibration=cal,
                   draws_per_input=m, model_sha256=report.sha256, onnx=report.to_json(),
                   synthetic="random fingerprints for speed measurements only").save(out / "bank")
    (out / "data.json").write_text(json.dumps({"dataset": "synthetic", "image_shape": list(input_shape),
                                               "class_names": [str(c) for c in range(num_classes)]}))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/efficientnet-lite0"))
    p.add_argument("--per-class", type=int, default=1000)
    args = p.parse_args(argv)
    print(write_synthetic_out(args.out, per_class=args.per_class))


if __name__ == "__main__":
    main()
