"""The evaluation report: how well randomized fingerprints catch each attack, measured honestly.

Everything is measured on the test split, never on images used for the bank or the thresholds:
for each attack, ROC AUC and TPR at the calibrated 1% / 2% / 5% thresholds (overall and per class),
the clean false-positive rate actually observed at each threshold, and the same figures for a
trivial input-statistics detector (:class:`kernels.baselines.GrayPixels`), feature squeezing and the
other baselines scored side by side — on MNIST a strong L-inf attack is caught by gray pixels alone.
The paper's claim of "a large family of detectors with consistent performance" (Fisher, Shahar &
Resheff, 2024) is measured as the spread of TPR at 1% FPR over many independent random draws.
Every detector is asked through one contract (:mod:`kernels.detector`), so a new baseline or score is
one more entry of the ``detectors`` mapping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from export.data.artifacts import load_activation_set, load_prepared
from export.data.workspace import Workspace
from export.models.activations import ActivationLayout
from export.models.classifier import load_classifier, predict
from kernels.bank import Bank
from kernels.baselines import GrayPixels, LogitMargin, Mahalanobis, MaxSoftmax
from kernels.detector import Detector, FingerprintDetector, Observations, PValueFusion
from kernels.served import served_detector
from kernels.squeezing import FeatureSqueezing, default_squeezers, observed

UNCHECKED_Z = 1e300  # standardized score of a row the detector cannot check: above every threshold and score


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


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def clean_false_positives(detector: Detector, clean: Observations, seed: int, draws: int = 100) -> dict[str, Any]:
    """The realized clean false-positive rate at every calibrated rate, beside the nominal and the
    guarantee of the calibration: on one fresh draw per image (with its 95% Wilson interval, what one
    request sees) and averaged over ``draws`` independent draws (a randomized detector's expected rate)."""
    cal, clean = detector.calibration, observed(detector, clean)
    out = {}
    for f in sorted(cal.thresholds):
        rng = np.random.default_rng([seed, 24])
        rates = [float(detector.detect(clean, f, rng).is_attacked.mean()) for _ in range(draws if detector.randomized else 1)]
        k = round(rates[0] * len(clean))
        out[str(f)] = {"nominal": f, "realized": rates[0], "ci95": wilson(k, len(clean)),
                       "over_draws": float(np.mean(rates)), "draws": len(rates), "n": len(clean),
                       "bound": cal.fpr_bound.get(f), "guarantee": cal.guarantee(f)}
    return out


def false_positive_table(figures: dict[str, Any]) -> str:
    """:func:`clean_false_positives` as a markdown table."""
    lines = ["| nominal FPR | realized, one draw (95% CI) | realized, mean over draws | guarantee of the thresholds |",
             "|---|---|---|---|"]
    for r in figures.values():
        lines.append(f"| {r['nominal']:.2%} | {r['realized']:.2%} ({r['ci95'][0]:.2%}-{r['ci95'][1]:.2%}) | "
                     f"{r['over_draws']:.2%} ({r['draws']} draws) | {r['guarantee']} |")
    return "\n".join(lines) + "\n"


def _scored(detector: Detector, obs: Observations, rng: np.random.Generator) -> np.ndarray:
    """Standardized scores of ``obs`` (one fresh draw per row), :data:`UNCHECKED_Z` where not checked."""
    v = detector.detect(obs, rng=rng)
    return np.where(v.checked, v.score, UNCHECKED_Z)


def evaluate_attack(detectors: dict[str, Detector], clean: Observations, attacked: Observations, seed: int,
                    spread_draws: int = 100) -> tuple[dict[str, Any], dict]:
    """Figures of every calibrated detector for one attack (pass successful attacked rows only).

    The first detector is the one reported per class and, if randomized, over ``spread_draws``
    independent draws. Rows a detector cannot check stay in both sets and are never flagged: an
    unchecked attack is a miss, an unchecked clean image no false positive, as on the server. TPRs are
    at every rate calibrated for the first detector (the others must have them too); the spread at the
    lowest. Returns the figures and the ROC curves ``{name: (fpr, tpr)}`` for plotting.
    """
    primary_name, primary = next(iter(detectors.items()))
    clean, attacked = observed(primary, clean), observed(primary, attacked)
    fprs = sorted(primary.calibration.thresholds)
    f0 = fprs[0]
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"n_clean": len(clean), "n_attacked": len(attacked), "detectors": list(detectors)}
    curves, z = {}, {}
    for name, det in detectors.items():
        cz, az = _scored(det, clean, rng), _scored(det, attacked, rng)
        report[name] = detection_figures(cz, az, {f: det.threshold(f, clean.labels) for f in fprs},
                                         {f: det.threshold(f, attacked.labels) for f in fprs})
        curves[name] = roc_curve(np.r_[np.zeros(len(cz)), np.ones(len(az))], -np.r_[cz, az])[:2]
        z[name] = (cz, az)
    cz, az = z[primary_name]
    checked_a = az < UNCHECKED_Z
    report["unchecked_clean"] = int((cz >= UNCHECKED_Z).sum())
    report["unchecked_attacked"] = int((~checked_a).sum())
    thr_a = primary.threshold(f0, attacked.labels)
    per_class = {}
    for c in np.unique(attacked.labels):
        a, cl_mask = attacked.labels == c, clean.labels == c
        entry = {"n_attacked": int(a.sum()), "unchecked": int((a & ~checked_a).sum()),
                 f"tpr@{f0:g}": float((az[a] < thr_a[a]).mean())}
        if cl_mask.sum() and (a & checked_a).any():
            entry["auc"] = float(roc_auc_score(np.r_[np.zeros(cl_mask.sum()), np.ones(a.sum())],
                                               -np.r_[cz[cl_mask], az[a]]))
        per_class[int(c)] = entry
    report["per_class"] = per_class
    if primary.randomized:  # independent draws: a different member of the detector family each time
        tprs = [float(primary.detect(attacked, f0, np.random.default_rng([seed, i + 1])).is_attacked.mean())
                for i in range(spread_draws)]
        report["spread"] = {"draws": spread_draws, "fpr": f0, "tpr_mean": float(np.mean(tprs)),
                            "tpr_std": float(np.std(tprs)), "tpr_min": float(np.min(tprs))}
    return report, curves


def markdown_table(report: dict[str, Any]) -> str:
    """One row per attack: the first detector's figures (the served default), then AUC and TPR at the
    lowest rate of every other detector (the other scores, the baselines). ``unchecked`` counts
    successful attacks predicted as a class the bank cannot check: they are counted as misses."""
    fprs = report["fprs"]
    f0 = min(fprs)
    attacks = report["attacks"]
    first = next(iter(attacks.values()), {"detectors": []})
    primary, others = first["detectors"][0] if first["detectors"] else None, first["detectors"][1:]
    head = (["attack", "attacked n", "unchecked", "AUC"] + [f"TPR@{f:g}" for f in fprs]
            + [f"clean FPR@{f:g}" for f in fprs] + [f"TPR@{f0:g} over draws (mean±std, min)"]
            + [f"{name} TPR@{f0:g} (AUC)" for name in others])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in attacks.items():
        p, sp = r[primary], r.get("spread")
        row = ([name, str(r["n_attacked"]), str(r["unchecked_attacked"]), f"{p['auc']:.3f}"]
               + [f"{p[f'tpr@{f:g}']:.3f}" for f in fprs] + [f"{p[f'fpr@{f:g}']:.3f}" for f in fprs]
               + [f"{sp['tpr_mean']:.3f}±{sp['tpr_std']:.3f}, {sp['tpr_min']:.3f}" if sp else ""]
               + [f"{r[o][f'tpr@{f0:g}']:.3f} ({r[o]['auc']:.3f})" for o in others])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(curves: dict[str, dict], path: Path, operating_fpr: float = 0.01) -> None:
    """ROC curves, one panel per attack, one line per detector (the first solid)."""
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
            ax.plot(fpr, tpr, label=label, ls="-" if label == next(iter(cs)) else "--")
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


def layered_mahalanobis(layout: ActivationLayout, clean: Observations) -> PValueFusion:
    """Lee et al. (2018)'s multi-layer Mahalanobis score without input pre-processing: one class-conditional
    Gaussian (tied covariance) per captured layer, convolutional feature maps averaged per channel, the
    layers' clean p-values combined by Fisher's sum (where Lee et al. fit a logistic regression on attacks,
    which would make it a detector that has seen the attack)."""
    return PValueFusion({s.name: Mahalanobis(slice(s.offset, s.offset + s.size),
                                             channels=s.shape[0] if len(s.shape) == 3 else None).fit(clean)
                         for s in layout.slices}, "fisher")


def evaluation_detectors(ws: Workspace, bank: Bank, calibration: Observations) -> tuple[dict[str, Detector], int]:
    """The served detector (the fusion), its members alone, and the baselines side by side, each
    calibrated on the clean calibration split at the served detector's rates; and the draw size."""
    model = load_classifier(ws)
    logits_of = lambda images: predict(model, images)  # noqa: E731
    served = served_detector(bank, logits_of=logits_of)
    fprs = sorted(served.calibration.thresholds)
    detectors: dict[str, Detector] = {"fused": served, **getattr(served, "members", {})}
    detectors["lrt"] = FingerprintDetector.from_bank(bank, "lrt")  # the paper's score
    layout = ActivationLayout.from_json(bank.meta["layout"])
    fit_acts, fit_meta = load_activation_set(ws, "fit_clean", mmap=False)
    last = layout.slices[-1]  # the last captured layer: the logits for the built-in models
    ds, _, _ = load_prepared(ws)
    clean = Observations(fit_meta["label"], acts=fit_acts)
    baselines = {"msp": MaxSoftmax(), "gray_pixels": GrayPixels(),
                 "mahalanobis": Mahalanobis(slice(last.offset, last.offset + last.size)).fit(clean),
                 "mahalanobis_layers": layered_mahalanobis(layout, clean)}
    if "margin" not in detectors:
        baselines["margin"] = LogitMargin()
    if "squeeze" not in detectors:  # Xu, Evans & Qi (2018), the paper's squeezers for these images
        baselines["squeeze"] = FeatureSqueezing(logits_of, default_squeezers(ds.image_shape[0]))
    calibration = observed(served, calibration)
    for name, baseline in baselines.items():
        baseline.calibrate(calibration, fprs)
        detectors[name] = baseline
    return detectors, served.draw_size
