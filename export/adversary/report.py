"""Table and plot of the white-box experiment (:mod:`export.adversary.whitebox`)."""
from __future__ import annotations

from typing import Any

import numpy as np


def _rate(rate: float | None, ci: tuple[float, float]) -> str:
    return "" if rate is None else f"{rate:.1%} ({ci[0]:.1%}-{ci[1]:.1%})"


def whitebox_table(rows: list[dict[str, Any]], draws: int) -> str:
    """One row per (defence, eps): both strategies with 95% intervals, the attacker's own expectation,
    and what plain PGD gets."""
    lines = ["| defence | eps | clean FPR (nominal 1%) | attacked | robust acc. eps (eps/2) | plain PGD evades "
             "| attacker expects: untargeted / all | evades, per request | evades all "
             f"{draws} requests | filter: sent | filter: evade, per request |", "|---" * 11 + "|"]
    for r in rows:
        n = r["attacked"]
        lo, hi = r.get("clean_fpr_ci95", (np.nan, np.nan))
        lines.append(f"| {r['defence']} | {r['eps']:g} | {r['clean_fpr']:.1%} ({lo:.1%}-{hi:.1%}) | {n} "
                     f"| {r['robust_accuracy']:.1%} ({r['robust_accuracy_half_eps']:.1%}) "
                     f"| {r['plain_pgd_evasion']:.1%} | {r['expected_untargeted']:.1%} / {r['expected_evasion']:.1%} "
                     f"| {_rate(r['eot_evasion'], r['eot_ci95'])} "
                     f"| {_rate(r['eot_all_draws'] / n if n else None, r['eot_all_draws_ci95'])} "
                     f"| {r['filter_sent']} | {_rate(r['filter_evasion'], r['filter_ci95'])} |")
    return "\n".join(lines) + "\n"


def plot_evasion(rows: list[dict[str, Any]], path) -> None:
    """Evasion per request vs eps with 95% intervals, one line per defence: sending every image (left), the filter (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    defences = list(dict.fromkeys(r["defence"] for r in rows))  # one colour per defence in both panels
    for ax, (key, title) in zip(axes, [("eot", "send all: misclassified and not flagged, per request"),
                                      ("filter", "filter: sent images the server lets through")]):
        for defence in defences:
            pts = [(r["eps"], r[f"{key}_evasion"], *r[f"{key}_ci95"]) for r in rows
                   if r["defence"] == defence and r[f"{key}_evasion"] is not None]
            if pts:
                x, y, lo, hi = (np.array(v, float) for v in zip(*sorted(pts)))
                ax.errorbar(x, y, yerr=np.clip([y - lo, hi - y], 0, None), marker="o", capsize=3, label=defence,
                            color=f"C{defences.index(defence)}")
        ax.axhline(0.10, color="gray", lw=0.8, ls="--", label="target")
        ax.set_xlabel("L-inf budget eps")
        ax.set_ylabel("evasion rate (95% CI)")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
