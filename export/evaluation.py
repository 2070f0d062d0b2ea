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
from kernels.scoring import METHODS, score

GRAY_LOW, GRAY_HIGH = 0.1, 0.9


def gray_pixel_score(images: np.ndarray) -> np.ndarray:
    """``(N,)`` minus the number of pixels neither black nor white: the input-statistics baseline
    (low = attacked, as for fingerprint scores). L-inf attacks turn many pixels gray."""
    flat = images.reshape(len(images), -1)
    return -((flat > GRAY_LOW) & (flat < GRAY_HIGH)).sum(axis=1).astype(np.float64)


@dataclass(frozen=True)
class ImageSet:
    """Rows to score: ``acts (N, D) float32``, predicted ``labels (N,)``, ``images (N, C, H, W)``."""

    acts: np.ndarray
    labels: np.ndarray
    images: np.ndarray


def detection_figures(clean_z: np.ndarray, attacked_z: np.ndarray, clean_thr: dict[float, np.ndarray],
                      attacked_thr: dict[float, np.ndarray]) -> dict[str, Any]:
    """AUC, TPR and observed FPR at each threshold; inputs are standardized scores (low = attacked)."""
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


def evaluate_attack(bank: Bank, calibrations: dict[str, Calibration], baseline: Calibration, clean: ImageSet,
                    attacked: ImageSet, seed: int, spread_draws: int = 100) -> tuple[dict[str, Any], dict]:
    """Figures for one attack (only successful attacked rows should be passed).

    Returns the figures and the ROC curves ``{name: (fpr, tpr)}`` for plotting.
    """
    m = calibrations["lrt"].m
    fprs = list(calibrations["lrt"].thresholds)
    rng = np.random.default_rng(seed)
    sc, sa = score(clean.acts, clean.labels, bank, m, rng), score(attacked.acts, attacked.labels, bank, m, rng)
    report: dict[str, Any] = {"n_clean": len(clean.labels), "n_attacked": len(attacked.labels)}
    curves = {}
    for method in METHODS:
        cal = calibrations[method]
        cz, az = cal.standardize(sc.get(method), clean.labels), cal.standardize(sa.get(method), attacked.labels)
        report[method] = detection_figures(cz, az, {f: cal.threshold(f, clean.labels) for f in fprs},
                                           {f: cal.threshold(f, attacked.labels) for f in fprs})
        if method == "lrt":
            lrt_z = (cz, az)
            curves["fingerprints (lrt)"] = roc_curve(np.r_[np.zeros(len(cz)), np.ones(len(az))], -np.r_[cz, az])[:2]
    zero_c, zero_a = np.zeros(len(clean.labels), np.int64), np.zeros(len(attacked.labels), np.int64)
    bc = baseline.standardize(gray_pixel_score(clean.images), zero_c)
    ba = baseline.standardize(gray_pixel_score(attacked.images), zero_a)
    report["gray_pixels"] = detection_figures(bc, ba, {f: baseline.threshold(f, zero_c) for f in fprs},
                                              {f: baseline.threshold(f, zero_a) for f in fprs})
    curves["gray pixels"] = roc_curve(np.r_[np.zeros(len(bc)), np.ones(len(ba))], -np.r_[bc, ba])[:2]

    cal, f0 = calibrations["lrt"], min(fprs)
    thr_a = cal.threshold(f0, attacked.labels)
    per_class = {}
    for c in np.unique(attacked.labels):
        a, cl = attacked.labels == c, clean.labels == c
        entry = {"n_attacked": int(a.sum()), f"tpr@{f0:g}": float((lrt_z[1][a] < thr_a[a]).mean())}
        if cl.sum() and a.sum():
            entry["auc"] = float(roc_auc_score(np.r_[np.zeros(cl.sum()), np.ones(a.sum())], -np.r_[lrt_z[0][cl], lrt_z[1][a]]))
        per_class[int(c)] = entry
    report["per_class"] = per_class

    tprs = []
    for i in range(spread_draws):  # independent draws: a different detector family member each time
        s = score(attacked.acts, attacked.labels, bank, m, np.random.default_rng([seed, i + 1])).lrt
        tprs.append(float((cal.standardize(s, attacked.labels) < thr_a).mean()))
    report["spread"] = {"draws": spread_draws, f"tpr@{f0:g}_mean": float(np.mean(tprs)),
                        f"tpr@{f0:g}_std": float(np.std(tprs)), f"tpr@{f0:g}_min": float(np.min(tprs))}
    return report, curves


def markdown_table(report: dict[str, Any]) -> str:
    """One row per attack: fingerprint (LRT) figures beside the gray-pixel baseline."""
    fprs = report["fprs"]
    head = (["attack", "attacked n", "AUC"] + [f"TPR@{f:g}" for f in fprs] + [f"clean FPR@{f:g}" for f in fprs]
            + ["TPR@0.01 over draws (mean±std, min)", "vote AUC", "anomaly AUC", "gray-pixel AUC", "gray-pixel TPR@0.01"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["attacks"].items():
        lrt, sp = r["lrt"], r["spread"]
        row = ([name, str(r["n_attacked"]), f"{lrt['auc']:.3f}"] + [f"{lrt[f'tpr@{f:g}']:.3f}" for f in fprs]
               + [f"{lrt[f'fpr@{f:g}']:.3f}" for f in fprs]
               + [f"{sp['tpr@0.01_mean']:.3f}±{sp['tpr@0.01_std']:.3f}, {sp['tpr@0.01_min']:.3f}",
                  f"{r['vote']['auc']:.3f}", f"{r['anomaly']['auc']:.3f}",
                  f"{r['gray_pixels']['auc']:.3f}", f"{r['gray_pixels']['tpr@0.01']:.3f}"])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(curves: dict[str, dict], path: Path) -> None:
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
        ax.axvline(0.01, color="gray", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
