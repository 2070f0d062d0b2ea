"""Write ``mnist_clean_scores.npz``: raw detector scores of the real clean images of a `make run` output,
the score set of ``tests/unit/test_false_positive_guarantee.py``.

For the calibration and test splits' clean images (2,000 on MNIST-5k) it stores the predicted label,
the fingerprints' vote and LRT raw scores under ``--draws`` independent draws of ``m`` fingerprints
each (the served draw policy), and the logit margin. Run from the repository root:

    .venv/bin/python tests/data/make_clean_scores.py runs/default
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    from export.data.artifacts import bank_dir, load_activation_set
    from export.data.workspace import Workspace
    from kernels.bank import Bank
    from kernels.baselines import LogitMargin
    from kernels.detector import DEFAULT_M, FingerprintDetector, Observations, RandomDraws

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a `make run` output folder")
    p.add_argument("--draws", type=int, default=12, help="independent draws per image (default: %(default)s)")
    p.add_argument("--m", type=int, default=DEFAULT_M, help="fingerprints per draw (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ws = Workspace(args.run)
    bank = Bank.load(bank_dir(ws))
    parts = [load_activation_set(ws, name, mmap=False) for name in ("calibration", "test")]
    acts = np.concatenate([a for a, _ in parts])
    labels = np.concatenate([m["predicted"] for _, m in parts])
    logits = np.concatenate([m["logits"] for _, m in parts])
    obs = Observations(labels, acts=acts, logits=logits)
    rng = np.random.default_rng(args.seed)
    out = {"label": labels, "margin": LogitMargin().raw_scores(obs)[0].astype(np.float32)}
    for method in ("vote", "lrt"):
        detector = FingerprintDetector(bank, RandomDraws(args.m), method)
        out[method] = np.stack([detector.raw_scores(obs, rng)[0] for _ in range(args.draws)], 1).astype(np.float32)
    path = Path(__file__).with_name("mnist_clean_scores.npz")
    np.savez_compressed(path, m=args.m, **out)
    print(f"{path}: {len(labels)} images, {args.draws} draws of m = {args.m}")


if __name__ == "__main__":
    main()
