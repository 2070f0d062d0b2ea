"""The served fused score recomputed from first principles, for tests that replay a server's draws."""
import numpy as np
from scipy import ndimage
from scipy.stats import norm

from kernels.bank import Bank
from kernels.calibration import Calibration
from kernels.onnx_runtime import ort_session
from kernels.scoring import score


def squeezed_copies(images: np.ndarray, squeezers: list) -> list[np.ndarray]:
    """Xu et al.'s squeezers the obvious way: rounding to 2^bits levels, scipy's median filter."""
    out = []
    for kind, n in squeezers:
        if kind == "bits":
            out.append((np.round(images * (2 ** n - 1)) / (2 ** n - 1)).astype(np.float32))
        else:
            out.append(ndimage.median_filter(images, size=(1, 1, n, n), mode="reflect"))
    return out


def served_outputs(out, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and activations of the exported graph (onnxruntime) for ``images``."""
    return tuple(ort_session(out / "model.onnx").run(["logits", "activations"], {"images": images}))


def replayed_fused_score(bank: Bank, logits: np.ndarray, acts: np.ndarray, ids: np.ndarray, out=None,
                         images: np.ndarray | None = None) -> np.ndarray:
    """The default fused score of each image under the draws ``ids`` the server reported: each member's
    standardized score (the vote over those fingerprints, the logit margin and, where the bank's fusion has
    it, feature squeezing: the largest L1 distance of the softmax to that of a squeezed copy, each copy
    made by :func:`squeezed_copies` and classified by the exported model in ``out``) -> its clean p-value
    by interpolation in the stored reference curve -> the smallest one, standardized."""
    stored = bank.meta["calibration"]
    vote, margin, fused = (Calibration.from_json(stored[k]) for k in ("vote", "margin", "fused"))
    labels, one_class = logits.argmax(1), np.zeros(len(logits), np.int64)
    offline = score(acts, labels, bank, vote.m, ids=ids)
    top2 = np.sort(logits.astype(np.float64), 1)[:, -2:]
    members = {"vote": vote.standardize(offline.vote, one_class),
               "margin": margin.standardize(top2[:, 1] - top2[:, 0], one_class)}
    if "squeeze" in stored["fused"]["members"]:
        def softmax(z):
            e = np.exp(z - z.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        p = softmax(logits.astype(np.float64))
        distance = np.max([np.abs(p - softmax(served_outputs(out, copy)[0].astype(np.float64))).sum(1)
                           for copy in squeezed_copies(images, stored["squeeze"]["squeezers"])], axis=0)
        members["squeeze"] = Calibration.from_json(stored["squeeze"]).standardize(-distance, one_class)
    refs = stored["fused"]["references"]
    levels = np.linspace(0, 1, len(refs["vote"]))
    log_p = []
    for k, z in members.items():  # below the lowest clean score a Gaussian tail continues the p-value
        tail = np.log(levels[1] / 2) + np.log(norm.cdf(np.minimum(z, refs[k][0])) / norm.cdf(refs[k][0]))
        log_p.append(np.where(z < refs[k][0], tail, np.log(np.maximum(np.interp(z, refs[k], levels), levels[1] / 2))))
    return fused.standardize(np.min(log_p, axis=0), one_class)
