"""Strategy 2 of the white-box experiment: a detector-aware L-inf PGD.

The attacker owns the classifier and the whole bank, so they can push an image across the decision
boundary *and* make its fingerprints look clean at once: projected gradient ascent on

    -max(margin, -kappa) + weight * [misclassified] * mean over the predicted class's fingerprints
    of [log N(v; clean) - log N(v; attacked)]

where margin = true-class logit minus the best other logit. Until an image is misclassified only the
margin term acts; once it is past the boundary by ``kappa``, the expected likelihood-ratio score of
its new class (what a random draw estimates) is raised while it stays misclassified. ART has
no attack with a detector term in its loss, so this loop is ours: the standard PGD of Madry et al.
(2018), sign-gradient steps projected on the eps-ball and [0, 1], with the extra term above.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.activations import ActivationLayout
from export.onnx_export import ClassifierWithActivations
from kernels.bank import Bank
from kernels.scoring import log_likelihood_ratio


class ExpectedLikelihoodRatio(nn.Module):
    """Differentiable mean log-likelihood ratio over all fingerprints of each input's class (the
    static detector's raw score), through the one definition :func:`kernels.scoring.log_likelihood_ratio`."""

    def __init__(self, bank: Bank) -> None:
        super().__init__()
        self.bank = bank
        t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
        self.indices = t(np.minimum(bank.indices, bank.num_neurons - 1), torch.long)  # padding masked below
        self.mask = t(np.arange(bank.indices.shape[1])[None, :] < bank.lengths[:, None])
        self.lengths = t(bank.lengths)
        self.params = t(bank.lrt_params)  # (5, F): the Gaussians as the served scorer packs them

    def forward(self, acts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(acts), dtype=acts.dtype)
        for c in labels.unique().tolist():
            rows = labels == c
            f = slice(int(self.bank.class_offsets[c]), int(self.bank.class_offsets[c + 1]))
            v = (acts[rows][:, self.indices[f]] * self.mask[f]).sum(-1) / self.lengths[f]  # (n, F_c)
            out = out.index_put((rows.nonzero().squeeze(1),), log_likelihood_ratio(v, *self.params[:, f]).mean(1))
        return out


@dataclass(frozen=True)
class PGDConfig:
    """Settings of :func:`detector_aware_pgd`.

    Attributes:
        eps: L-inf budget.
        steps: gradient steps.
        step_size: per-step size (default ``2.5 * eps / steps``, Madry et al.).
        weight: weight of the expected likelihood-ratio term; 0 is plain PGD (needs no bank).
        kappa: margin past the decision boundary beyond which the classification term stops pushing.
        seed: seed of the random start.
    """

    eps: float
    steps: int = 40
    step_size: float | None = None
    weight: float = 1.0
    kappa: float = 5.0
    seed: int = 0


def detector_aware_pgd(model: nn.Module, layout: ActivationLayout, bank: Bank, x: np.ndarray, y: np.ndarray,
                       cfg: PGDConfig) -> np.ndarray:
    """Untargeted L-inf PGD that also raises the expected LRT score. ``x (N, C, H, W)`` in [0, 1]."""
    torch.manual_seed(cfg.seed)
    eps = cfg.eps
    wrapped = ClassifierWithActivations(model, layout).eval()
    score = ExpectedLikelihoodRatio(bank)
    x0 = torch.from_numpy(np.ascontiguousarray(x))
    target = torch.from_numpy(np.asarray(y, np.int64))
    step = cfg.step_size or 2.5 * eps / cfg.steps
    adv = (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(cfg.steps):
        adv.requires_grad_(True)
        logits, acts = wrapped(adv)
        true = logits.gather(1, target[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf")).max(1).values
        pred = logits.argmax(1).detach()
        loss = (-(true - other).clamp(min=-cfg.kappa) + cfg.weight * (pred != target) * score(acts, pred)).sum()
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = torch.minimum(torch.maximum(adv + step * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return adv.detach().numpy()
