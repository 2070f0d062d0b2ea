"""The adaptive white-box attacker: detector-aware PGD through the expectation over the server's draws.

Randomized and secret-key defences fell to attacks that optimize the *expected* decision over the
randomness (Athalye, Carlini & Wagner, 2018, "expectation over transformation"; Tramèr et al., 2020,
Sec. 4: a randomized statistical-test detector went from 99.5% to 0%). For neural fingerprints the
expectation is exact and cheap: a draw of ``m`` fingerprints from a class's bank estimates the mean
over the whole bank, and the draw-to-draw spread of that estimate is predictable too. So the attacker
here (:func:`eot_pgd`) works on :class:`ExpectedDetector`, its differentiable copy of the served
detector: for every member of the fused decision (the fingerprints' vote or likelihood ratio, the
logit margin) the expected standardized score of the predicted class, its spread over draws, and the
score below which that member alone makes the fusion flag. It maximizes

    min(best other logit - true logit, kappa) - weight * sum_members relu(threshold + k * spread - E[z])

(a capped misclassification margin plus a hinge that pushes every member above its threshold by ``k``
draw spreads) with L-inf PGD (Madry et al., 2018: random start, sign steps, projection), for several
weights and ``k``, and keeps for each image the iterate its own exact expected decision rates best.
ART has no attack with a detector term in its loss, so this loop is ours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from export.activations import ActivationLayout
from export.onnx_export import ClassifierWithActivations
from kernels.baselines import LogitMargin
from kernels.detector import Detector, FingerprintDetector, PValueFusion, clean_log_p_value
from kernels.errors import InvalidInputError
from kernels.scoring import log_likelihood_ratio

MIN_SPREAD = 0.05  # the rating's unit for a member whose score does not vary over draws
UNCHECKED_SCORE = 1e6  # the raw score of a class the detector cannot check: far above every threshold


def member_thresholds(fusion: PValueFusion, fpr: float) -> dict[str, float]:
    """For a min-p fusion: the standardized score of each member below which the fusion flags.

    The fusion flags when ``min_i log p_i(z_i) < L`` (``L`` its threshold mapped back to log p-values);
    each ``log p_i`` is non-decreasing in ``z_i``, so that is ``z_i < t_i`` for some member, with ``t_i``
    the smallest ``z`` whose clean log p-value reaches ``L`` (found by bisection).
    """
    if fusion.rule != "min":
        raise InvalidInputError(f"the attacker's copy splits a min-p fusion into member thresholds; "
                                f"this one fuses by {fusion.rule!r}")
    cal = fusion.calibration
    level = float(cal.class_mean[0] + cal.class_std[0] * cal.threshold(fpr, np.zeros(1, np.int64))[0])
    out = {}
    for name, reference in fusion.references.items():
        lo, hi = -1e3, float(reference[-1]) + 1.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if clean_log_p_value(np.array([mid]), reference)[0] < level else (lo, mid)
        out[name] = hi
    return out


class ExpectedDetector(nn.Module):
    """The attacker's differentiable copy of a calibrated detector: a min-p :class:`PValueFusion` of
    fingerprint and logit-margin members, or one such member alone.

    :meth:`forward` gives, per input and member, the expected standardized score over the detector's
    random draws (exact, or for the vote sigmoid-smoothed with a ``temperature``) and its standard
    deviation over draws; :attr:`thresholds` ``(C, M)`` the score below which that member makes the
    detector flag an input of class ``c``.
    """

    def __init__(self, detector: Detector, fpr: float) -> None:
        super().__init__()
        if isinstance(detector, PValueFusion):
            members, per_member = detector.members, member_thresholds(detector, fpr)
        else:
            members, per_member = {detector.name: detector}, None
        names, self.members = list(members), list(members.values())
        num_classes = max([m.bank.num_classes for m in self.members if isinstance(m, FingerprintDetector)] or [1])
        labels = np.arange(num_classes)
        self.thresholds = torch.tensor(np.stack(
            [np.full(num_classes, per_member[n]) if per_member else m.threshold(fpr, labels)
             for n, m in zip(names, self.members)], axis=1), dtype=torch.float32)
        self.banks = []
        for m in self.members:
            if isinstance(m, FingerprintDetector):
                if m.method not in ("lrt", "vote"):
                    raise InvalidInputError(f"the attacker's copy knows the lrt and vote scores, not {m.method!r}")
                self.banks.append(self._bank_tensors(m))
            elif isinstance(m, LogitMargin):
                self.banks.append(None)
            else:
                raise InvalidInputError(f"the attacker's copy has no differentiable form of the {m.name} detector")

    @staticmethod
    def _bank_tensors(member: FingerprintDetector) -> dict:
        bank = member.bank
        t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
        return {"bank": bank, "indices": t(np.minimum(bank.indices, bank.num_neurons - 1), torch.long),
                "mask": t(np.arange(bank.indices.shape[1])[None, :] < bank.lengths[:, None]),
                "lengths": t(bank.lengths), "params": t(bank.lrt_params)}

    def forward(self, logits: torch.Tensor, acts: torch.Tensor, labels: torch.Tensor, temperature: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z (B, M), spread (B, M))`` for inputs predicted as ``labels``; with ``temperature > 0`` the
        vote counts each fingerprint by ``sigmoid(d / temperature)`` (``d``: how much closer, in z-units,
        its value lies to its clean Gaussian than to its attacked one) instead of ``d > 0``, so that it
        has a gradient."""
        zs, spreads = [], []
        for member, tensors in zip(self.members, self.banks):
            if tensors is None:
                top2 = logits.topk(2, dim=1).values
                raw, spread = top2[:, 0] - top2[:, 1], torch.zeros(len(logits))
            else:
                raw, spread = self._fingerprints(member, tensors, acts, labels, temperature)
            cal = member.calibration
            c = torch.as_tensor(member.class_labels(labels.numpy()))
            mean, std = (torch.as_tensor(cal.class_mean, dtype=torch.float32)[c],
                         torch.as_tensor(cal.class_std, dtype=torch.float32)[c])
            zs.append((raw - mean) / std)
            spreads.append(spread / std)
        return torch.stack(zs, 1), torch.stack(spreads, 1)

    def _fingerprints(self, member: FingerprintDetector, t: dict, acts: torch.Tensor, labels: torch.Tensor,
                      temperature: float):
        bank = t["bank"]
        raw, spread = torch.zeros(len(acts)), torch.zeros(len(acts))
        m = member.draws.m  # 0: every fingerprint, no spread
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().squeeze(1)
            if not member.draws.covers(np.array([c]), bank)[0]:  # never checked, so never flagged
                raw = raw.index_put((rows,), torch.tensor(UNCHECKED_SCORE))
                continue
            f = slice(int(bank.class_offsets[c]), int(bank.class_offsets[c + 1]))
            v = (acts[rows][:, t["indices"][f]] * t["mask"][f]).sum(-1) / t["lengths"][f]  # (n, F_c)
            cm, inv_cs, am, inv_as, log_ratio = t["params"][:, f]
            if member.method == "lrt":
                each = log_likelihood_ratio(v, cm, inv_cs, am, inv_as, log_ratio)
                var = each.var(1, unbiased=False)
            else:
                closer = ((v - am) * inv_as).abs() - ((v - cm) * inv_cs).abs()
                each = torch.sigmoid(closer / temperature) if temperature else (closer > 0).float()
                p = (closer > 0).float().mean(1)
                var = p * (1 - p)
            raw = raw.index_put((rows,), each.mean(1))
            if m:
                spread = spread.index_put((rows,), (var / m).sqrt().detach())
        return raw, spread

    def threshold(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` each member's threshold for inputs predicted as ``labels``."""
        return self.thresholds[labels if len(self.thresholds) > 1 else torch.zeros_like(labels)]

    def rating(self, logits: torch.Tensor, acts: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """``(B,)`` how well each input evades in its attacker's eyes: ``-inf`` unless misclassified, else
        the smallest member slack ``(E[z] - threshold) / spread`` (positive: the expected decision passes;
        the probability that one draw flags falls with it)."""
        labels = logits.argmax(1)
        z, spread = self(logits, acts, labels)
        slack = ((z - self.threshold(labels)) / spread.clamp(min=MIN_SPREAD)).min(1).values
        return torch.where(labels != true, slack, torch.full_like(slack, -torch.inf))


@dataclass(frozen=True)
class EOTConfig:
    """Settings of :func:`eot_pgd`.

    Attributes:
        eps: L-inf budget.
        steps: gradient steps per configuration.
        weights: weights of the detector hinge tried (0 is plain PGD on the capped margin).
        spreads: how many draw spreads above each threshold the hinge aims (``k``).
        temperatures: of the smoothed vote (:meth:`ExpectedDetector.forward`).
        kappa: cap of the misclassification margin (logits).
        step_size: per-step size (default ``2.5 * eps / steps``, Madry et al.).
        seed: seed of the random starts (one per configuration).
    """

    eps: float
    steps: int = 200
    weights: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    spreads: tuple[float, ...] = (2.0, 4.0)
    temperatures: tuple[float, ...] = (1.0, 10.0)
    kappa: float = 10.0
    step_size: float | None = None
    seed: int = 0

    def configurations(self) -> list[tuple[float, float, float]]:
        """``(weight, k, temperature)`` of every run; plain PGD once."""
        return [(0.0, 0.0, 0.0)] * (0.0 in self.weights) + [
            (w, k, t) for w in self.weights if w > 0 for k in self.spreads for t in self.temperatures]


@dataclass(frozen=True)
class AttackResult:
    """Per image: the kept adversarial image, its rating (:meth:`ExpectedDetector.rating`), which
    configuration produced it (-1: none misclassified it), and every configuration's final image (the
    filter strategy's pool; ``pool[0]`` is plain PGD when ``plain``)."""

    x_adv: np.ndarray
    rating: np.ndarray
    configuration: np.ndarray
    pool: np.ndarray  # (configurations, N, C, H, W)
    plain: bool


def misclassification(logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``(B,)`` best other logit minus the true class's: positive once misclassified."""
    return logits.scatter(1, true[:, None], -torch.inf).max(1).values - logits.gather(1, true[:, None]).squeeze(1)


def eot_pgd(model: nn.Module, layout: ActivationLayout, copy: ExpectedDetector | None, x: np.ndarray,
            y: np.ndarray, cfg: EOTConfig, progress: bool = False) -> AttackResult:
    """Detector-aware L-inf PGD against ``copy`` for every configuration of ``cfg``; ``x (N, C, H, W)``
    in [0, 1], ``y`` the true labels. Keeps per image the best-rated iterate of all steps and configurations
    (without a copy, which only plain PGD runs with: the most misclassified one)."""
    wrapped = ClassifierWithActivations(model, layout).eval()
    x0 = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    true = torch.from_numpy(np.asarray(y, np.int64))
    step = cfg.step_size or 2.5 * cfg.eps / cfg.steps
    configs = cfg.configurations()
    best, best_rating = x0.clone(), torch.full((len(x0),), -torch.inf)
    which = torch.full((len(x0),), -1, dtype=torch.long)
    pool = []
    bar = tqdm(total=len(configs) * cfg.steps, desc=f"EOT PGD eps {cfg.eps}", unit="step", disable=not progress)
    for i, (weight, k, temperature) in enumerate(configs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
        adv = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * cfg.eps).clamp(0, 1)
        for done in range(cfg.steps + 1):
            adv.requires_grad_(True)
            logits, acts = wrapped(adv)
            with torch.no_grad():  # the iterate as it stands: keep it where it rates best so far
                r = copy.rating(logits, acts, true) if copy is not None else misclassification(logits, true)
                better = r > best_rating
                best[better], best_rating[better], which[better] = adv.detach()[better], r[better], i
            if done == cfg.steps:
                break
            objective = misclassification(logits, true).clamp(max=cfg.kappa)
            if weight:
                z, spread = copy(logits, acts, logits.argmax(1).detach(), temperature)
                hinge = (copy.threshold(logits.argmax(1)) + k * spread - z).clamp(min=0).sum(1)
                objective = objective - weight * hinge
            (grad,) = torch.autograd.grad(objective.sum(), adv)
            with torch.no_grad():
                adv = torch.minimum(torch.maximum(adv + step * grad.sign(), x0 - cfg.eps), x0 + cfg.eps).clamp(0, 1)
            bar.update()
        pool.append(adv.detach().numpy())
    bar.close()
    return AttackResult(best.numpy(), best_rating.numpy(), which.numpy(), np.stack(pool), configs[0][0] == 0)
