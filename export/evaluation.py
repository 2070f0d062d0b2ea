"""The evaluation report: how well randomized fingerprints catch each attack, measured honestly.

Everything is measured on the test split, never on images used for the bank or the thresholds:
for each attack, ROC AUC and TPR at the calibrated 1% / 2% / 5% thresholds (overall and per class),
the clean false-positive rate actually observed at each threshold, and the same figures for a
trivial input-statistics detector (the count of gray pixels, neither black nor white) scored side by
side — on MNIST a strong L-inf attack is caught by that alone, so strong figures there prove little.
The paper's claim of "a large family of detectors with consistent performance" (Fisher, Shahar &
Resheff, 2024) is measured as the spread of TPR at 1% FPR over many independent random draws.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from kernels.bank import Bank
from kernels.calibration import DEFAULT_FPRS, Calibration, calibrate_threshold
from kernels.scoring import METHODS, covered, score

GRAY_LOW, GRAY_HIGH = 0.1, 0.9
UNCHECKED_Z = 1e300  # standardized score of a row the detector cannot check: above every threshold and score


def gray_pixel_score(images: np.ndarray) -> np.ndarray:
    """``(N,)`` minus the number of pixels neither black nor white: the input-statistics baseline
    (low = attacked, as for fingerprint scores). L-inf attacks turn many pixels gray."""
    flat = images.reshape(len(images), -1)
    return -((flat > GRAY_LOW) & (flat < GRAY_HIGH)).sum(axis=1).astype(np.float64)


@dataclass(frozen=True)
class ImageSet:
    """Rows to score: ``acts (N, D) float32``, predicted ``labels (N,)``, ``images (N, C, H, W)``, and
    ``checked (N,) bool``: whether the detector can check the row (its predicted class has at least
    ``m`` fingerprints). An unchecked row is never flagged, as on the server: a miss when attacked."""

    acts: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    checked: np.ndarray

    @classmethod
    def of(cls, acts: np.ndarray, labels: np.ndarray, images: np.ndarray, bank: Bank, m: int) -> "ImageSet":
        return cls(acts, labels, images, covered(labels, bank, m))


def detection_figures(clean_z: np.ndarray, attacked_z: np.ndarray, clean_thr: dict[float, np.ndarray],
                      attacked_thr: dict[float, np.ndarray]) -> dict[str, Any]:
    """AUC, TPR and observed FPR at each threshold; inputs are standardized scores (low = attacked;
    :data:`UNCHECKED_Z` for rows the detector could not check, which no threshold flags)."""
    y = np.concatenate([np.zeros(len(clean_z)), np.ones(len(attacked_z))])
    out: dict[str, Any] = {"auc": float(roc_auc_score(y, -np.concatenate([clean_z, attacked_z])))}
    for f in clean_thr:
        out[f"tpr@{f:g}"] = float((attacked_z < attacked_thr[f]).mean())
        out[f"fpr@{f:g}"] = float((clean_z < clean_thr[f]).mean())
    return out


def calibrate_baseline(images: np.ndarray, fprs=DEFAULT_FPRS) -> Calibration:
    """Global thresholds of the gray-pixel baseline on clean calibration images."""
    s = gray_pixel_score(images)
    return calibrate_threshold(s, np.zeros(len(s), np.int64), 1, "gray-pixels", 0, fprs)


def _checked_z(s: ImageSet, raw: np.ndarray, cal: Calibration) -> np.ndarray:
    """Standardized scores of ``s``'s rows: those of the checked rows (``raw``), :data:`UNCHECKED_Z`
    elsewhere."""
    z = np.full(len(s.labels), UNCHECKED_Z)
    z[s.checked] = cal.standardize(raw, s.labels[s.checked])
    return z


def _thresholds(s: ImageSet, cal: Calibration, fprs) -> dict[float, np.ndarray]:
    return {f: cal.threshold(f, np.where(s.checked, s.labels, 0)) for f in fprs}


def evaluate_attack(bank: Bank, calibrations: dict[str, Calibration], baseline: Calibration, clean: ImageSet,
                    attacked: ImageSet, seed: int, spread_draws: int = 100) -> tuple[dict[str, Any], dict]:
    """Figures for one attack (only successful attacked rows should be passed).

    Rows the detector cannot check (``ImageSet.checked``) stay in both sets and are never flagged:
    an unchecked attack is a miss, an unchecked clean image no false positive, as on the server.
    TPRs are at the lowest calibrated FPR and the others; the spread is at the lowest.
    Returns the figures and the ROC curves ``{name: (fpr, tpr)}`` for plotting.
    """
    m = calibrations["lrt"].m
    fprs = sorted(calibrations["lrt"].thresholds)
    f0 = fprs[0]
    rng = np.random.default_rng(seed)
    ca, aa = clean.acts[clean.checked], attacked.acts[attacked.checked]
    cl, al = clean.labels[clean.checked], attacked.labels[attacked.checked]
    sc = score(ca, cl, bank, m, rng) if len(cl) else None
    sa = score(aa, al, bank, m, rng) if len(al) else None
    report: dict[str, Any] = {"n_clean": len(clean.labels), "n_attacked": len(attacked.labels),
                              "unchecked_clean": int((~clean.checked).sum()),
                              "unchecked_attacked": int((~attacked.checked).sum())}
    curves = {}
    for method in METHODS:
        cal = calibrations[method]
        cz = _checked_z(clean, sc.get(method) if sc else np.zeros(0), cal)
        az = _checked_z(attacked, sa.get(method) if sa else np.zeros(0), cal)
        report[method] = detection_figures(cz, az, _thresholds(clean, cal, fprs), _thresholds(attacked, cal, fprs))
        if method == "lrt":
            lrt_z = (cz, az)
            curves["fingerprints (lrt)"] = roc_curve(np.r_[np.zeros(len(cz)), np.ones(len(az))], -np.r_[cz, az])[:2]
    zero_c, zero_a = np.zeros(len(clean.labels), np.int64), np.zeros(len(attacked.labels), np.int64)
    bc = baseline.standardize(gray_pixel_score(clean.images), zero_c)
    ba = baseline.standardize(gray_pixel_score(attacked.images), zero_a)
    report["gray_pixels"] = detection_figures(bc, ba, {f: baseline.threshold(f, zero_c) for f in fprs},
                                              {f: baseline.threshold(f, zero_a) for f in fprs})
    curves["gray pixels"] = roc_curve(np.r_[np.zeros(len(bc)), np.ones(len(ba))], -np.r_[bc, ba])[:2]

    cal = calibrations["lrt"]
    thr_a = _thresholds(attacked, cal, [f0])[f0]
    per_class = {}
    for c in np.unique(attacked.labels):
        a, cl_mask = attacked.labels == c, clean.labels == c
        entry = {"n_attacked": int(a.sum()), "unchecked": int((a & ~attacked.checked).sum()),
                 f"tpr@{f0:g}": float((lrt_z[1][a] < thr_a[a]).mean())}
        if cl_mask.sum() and (a & attacked.checked).any():
            entry["auc"] = float(roc_auc_score(np.r_[np.zeros(cl_mask.sum()), np.ones(a.sum())],
                                               -np.r_[lrt_z[0][cl_mask], lrt_z[1][a]]))
        per_class[int(c)] = entry
    report["per_class"] = per_class

    tprs = []
    for i in range(spread_draws):  # independent draws: a different detector family member each time
        if sa is None:
            tprs.append(0.0)
            continue
        s = score(aa, al, bank, m, np.random.default_rng([seed, i + 1])).lrt
        tprs.append(float((cal.standardize(s, al) < thr_a[attacked.checked]).sum() / len(attacked.labels)))
    report["spread"] = {"draws": spread_draws, "fpr": f0, "tpr_mean": float(np.mean(tprs)),
                        "tpr_std": float(np.std(tprs)), "tpr_min": float(np.min(tprs))}
    return report, curves


def markdown_table(report: dict[str, Any]) -> str:
    """One row per attack: fingerprint (LRT) figures beside the gray-pixel baseline. ``unchecked``
    counts successful attacks predicted as a class the bank cannot check: they are counted as misses."""
    fprs = report["fprs"]
    f0 = min(fprs)
    head = (["attack", "attacked n", "unchecked", "AUC"] + [f"TPR@{f:g}" for f in fprs]
            + [f"clean FPR@{f:g}" for f in fprs]
            + [f"TPR@{f0:g} over draws (mean±std, min)", "vote AUC", "anomaly AUC", "gray-pixel AUC",
               f"gray-pixel TPR@{f0:g}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["attacks"].items():
        lrt, sp = r["lrt"], r["spread"]
        row = ([name, str(r["n_attacked"]), str(r["unchecked_attacked"]), f"{lrt['auc']:.3f}"]
               + [f"{lrt[f'tpr@{f:g}']:.3f}" for f in fprs] + [f"{lrt[f'fpr@{f:g}']:.3f}" for f in fprs]
               + [f"{sp['tpr_mean']:.3f}±{sp['tpr_std']:.3f}, {sp['tpr_min']:.3f}",
                  f"{r['vote']['auc']:.3f}", f"{r['anomaly']['auc']:.3f}",
                  f"{r['gray_pixels']['auc']:.3f}", f"{r['gray_pixels'][f'tpr@{f0:g}']:.3f}"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(curves: dict[str, dict], path: Path, operating_fpr: float = 0.01) -> None:
    """ROC curves, one panel per attack, fingerprints against the gray-pixel baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:  # every attack was skipped: say so instead of drawing empty axes
        fig = plt.figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "no attack had 2 or more successful images", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    n = len(curves)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, cs) in zip(axes.ravel(), curves.items()):
        for label, (fpr, tpr) in cs.items():
            ax.plot(fpr, tpr, label=label, ls="--" if "gray" in label else "-")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.axvline(operating_fpr, color="gray", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
