"""How far can an attacker move feature squeezing's 1-bit copy? A discrete check beside the gradient attacker.

The served default's squeezing member compares the classifier on the input with the classifier on its
1-bit copy (Xu et al., 2018). Within an L-inf ball of ``eps`` only pixels with ``|x - 0.5| <= eps`` can
cross the rounding point, so an attack on the 1-bit copy is a search over which of them to flip, where
the gradient attacker's straight-through estimate (BPDA) may mislead. This probe searches greedily:
flip, one pixel at a time, the flippable pixel whose flip most raises the best wrong logit over the true
one (the gradient at the binary point), until the copy is misclassified or every flippable pixel is
flipped; then the flipped copy projected into the ball is judged by the served default (20 requests).

``python -m export.adversary.bit_depth_probe --out runs/default`` (about a minute on 2 cores). A greedy
search is not a bound: the share it fools is a floor on what an attacker can do to the copy. The joint
search, flips into a target class and then PGD locked to them, is the white-box attacker's bit-locked
runs (:mod:`export.adversary.attacker`, ``nfp whitebox``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from export.adversary.attacker import greedy_flips


def main(argv: list[str] | None = None) -> None:
    from export.data.artifacts import bank_dir, load_prepared
    from export.data.workspace import Workspace
    from export.models.activations import ActivationLayout, capture_activations
    from export.models.classifier import correctly_classified, load_classifier, predict
    from kernels.bank import Bank
    from kernels.detector import Observations
    from kernels.served import served_detector

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/default"), help="pipeline output folder (default: %(default)s)")
    p.add_argument("--count", type=int, default=100, help="correctly classified test images (default: %(default)s)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="L-inf budgets (default: %(default)s)")
    args = p.parse_args(argv)
    ws = Workspace(args.out)
    ds, splits, _ = load_prepared(ws)
    model, bank = load_classifier(ws).eval(), Bank.load(bank_dir(ws))
    test = correctly_classified(model, ds, splits.test)[: args.count]
    x, y = torch.from_numpy(ds.x[test]), torch.from_numpy(ds.y[test])
    served = served_detector(bank, 0.01, logits_of=lambda images: predict(model, images))
    layers = ActivationLayout.from_json(bank.meta["layout"]).layers
    print(f"{len(test)} test images; the 1-bit copies of the clean ones are classified correctly: "
          f"{float((model(torch.round(x)).argmax(1) == y).float().mean()):.1%}")
    print("| eps | flippable pixels (median) | 1-bit copy fooled by greedy flips | flips projected into the ball: "
          "misclassified / evade the served default |\n|---|---|---|---|")
    for eps in args.eps:
        flipped, fooled = greedy_flips(model, x, y, eps)
        adv = torch.minimum(torch.maximum(flipped, x - eps), x + eps).clamp(0, 1).numpy()
        acts, _, logits = capture_activations(model, adv, layers, progress=False, return_logits=True)
        obs = Observations(logits.argmax(1), acts=acts, logits=logits, images=adv)
        wrong, rng = logits.argmax(1) != y.numpy(), np.random.default_rng(0)
        passed = np.mean([wrong & ~served.detect(obs, rng=rng).is_attacked for _ in range(20)], axis=0)
        print(f"| {eps:g} | {int(((x - 0.5).abs() <= eps).flatten(1).sum(1).median())} | "
              f"{float(fooled.float().mean()):.1%} | {wrong.mean():.1%} / {passed.mean():.1%} |")


if __name__ == "__main__":
    main()
