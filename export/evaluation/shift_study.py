"""What a shift of clean images does to the served detector's false-positive rate, and whether
``nfp drift`` sees it (README, section "Drift").

Every clean test image of a pipeline output folder goes through the served detector offline (the
calibrated bank's default, fresh draws) unshifted and under small brightness, contrast and noise
shifts; each set is then one window for :func:`kernels.drift.compare` against the calibration
reference. Run: ``python -m export.evaluation.shift_study --out runs/default``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHIFTS = {  # name: image -> shifted image, in [0, 1]
    "unshifted": lambda x, rng: x,
    "brightness +0.01 (2.5/255)": lambda x, rng: x + 0.01,
    "brightness +0.02": lambda x, rng: x + 0.02,
    "brightness +0.05": lambda x, rng: x + 0.05,
    "contrast x0.95": lambda x, rng: 0.95 * x + 0.025,
    "contrast x0.5": lambda x, rng: 0.5 * x + 0.25,
    "Gaussian noise sigma 0.02": lambda x, rng: x + 0.02 * rng.normal(size=x.shape),
}


def shift_table(out: Path, fpr: float = 0.01, seed: int = 0) -> str:
    """The markdown table of :data:`SHIFTS` on the test split of ``out``."""
    from export.models.activations import ActivationLayout, capture_activations
    from export.data.artifacts import bank_dir, load_prepared
    from export.models.classifier import load_classifier, predict
    from export.data.workspace import Workspace
    from kernels.bank import Bank
    from kernels.detector import Observations
    from kernels.served import served_detector
    from kernels.drift import ScoreWindow, compare

    ws = Workspace(out)
    ds, splits, _ = load_prepared(ws)
    model, bank = load_classifier(ws), Bank.load(bank_dir(ws))
    detector = served_detector(bank, fpr, logits_of=lambda images: predict(model, images))
    reference, layers = detector.calibration.reference, ActivationLayout.from_json(bank.meta["layout"]).layers
    x, y = ds.x[splits.test], ds.y[splits.test]
    rng = np.random.default_rng(seed)
    lines = [f"| clean test images (n = {len(x)}) | classifier accuracy | flagged at {fpr:g} | flag-rate p | "
             "score-shift p | drift |", "|---|---|---|---|---|---|"]
    for name, shift in SHIFTS.items():
        shifted = np.clip(shift(x, rng), 0, 1).astype(np.float32)
        acts, _, logits = capture_activations(model, shifted, layers, progress=False, return_logits=True)
        v = detector.detect(Observations(logits.argmax(1), acts=acts, logits=logits, images=shifted),
                            rng=np.random.default_rng(seed))
        r = compare(reference, ScoreWindow.of_scores(v.score, v.is_attacked, np.array(reference["edges"])), detector.fpr)
        lines.append(f"| {name} | {(logits.argmax(1) == y).mean():.1%} | {r.flag_rate:.1%} | {r.flag_p_value:.2g} | "
                     f"{r.shift_p_value:.2g} | {'ALARM' if r.alarm else 'ok'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="pipeline output folder (default: %(default)s)")
    p.add_argument("--fpr", type=float, default=0.01, help="operating false-positive rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the draws (default: %(default)s)")
    args = p.parse_args()
    print(shift_table(args.out, args.fpr, args.seed))


if __name__ == "__main__":
    main()
