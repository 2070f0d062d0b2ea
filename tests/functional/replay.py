"""The served fused score recomputed from first principles, for tests that replay a server's draws."""
import numpy as np
from scipy.stats import norm

from kernels.bank import Bank
from kernels.calibration import Calibration
from kernels.scoring import score


def replayed_fused_score(bank: Bank, logits: np.ndarray, acts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The default fused score of each image under the draws ``ids`` the server reported: each member's
    standardized score (the vote over those fingerprints, the logit margin) -> its clean p-value by
    interpolation in the stored reference curve -> the smaller one, standardized."""
    stored = bank.meta["calibration"]
    vote, margin, fused = (Calibration.from_json(stored[k]) for k in ("vote", "margin", "fused"))
    labels, one_class = logits.argmax(1), np.zeros(len(logits), np.int64)
    offline = score(acts, labels, bank, vote.m, ids=ids)
    top2 = np.sort(logits.astype(np.float64), 1)[:, -2:]
    members = {"vote": vote.standardize(offline.vote, one_class),
               "margin": margin.standardize(top2[:, 1] - top2[:, 0], one_class)}
    refs = stored["fused"]["references"]
    levels = np.linspace(0, 1, len(refs["vote"]))
    log_p = []
    for k, z in members.items():  # below the lowest clean score a Gaussian tail continues the p-value
        tail = np.log(levels[1] / 2) + np.log(norm.cdf(np.minimum(z, refs[k][0])) / norm.cdf(refs[k][0]))
        log_p.append(np.where(z < refs[k][0], tail, np.log(np.maximum(np.interp(z, refs[k], levels), levels[1] / 2))))
    return fused.standardize(np.min(log_p, axis=0), one_class)
