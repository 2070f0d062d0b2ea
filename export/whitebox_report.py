"""Tables and plot of the white-box experiment (:mod:`export.whitebox`)."""
from __future__ import annotations

from typing import Any

import numpy as np


def _evasion_cell(e: dict[str, Any]) -> str:
    if e["evasion_rate"] is None:
        return ""
    return f"{e['evasion_rate']:.3f} ({e['evasion_ci95'][0]:.3f}-{e['evasion_ci95'][1]:.3f})"


def filter_tables(results: dict[str, Any]) -> str:
    """The filter strategy pooled over attacks, then per attack."""
    pooled = ["| bank size | m | local detector | attacked | passed locally | still flagged by the server "
              "| evasion rate (95% CI) |", "|---|---|---|---|---|---|---|"]
    for p in results["filter_pooled"]:
        pooled.append(f"| {p['bank_size']} | {p['m']} | {p['local']} | {p['attacked']} | {p['passed_local']} "
                      f"| {p['flagged_by_server']} | {_evasion_cell(p)} |")
    rows = ["| bank size | m | attack | attacked | local detector | passed locally | still flagged by the server "
            "| evasion rate (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    for r in results["filter"]:
        for local in ("static", "random"):
            e = r[local]
            rows.append(f"| {r['bank_size']} | {r['m']} | {r['attack']} | {r['attacked']} | {local} "
                        f"| {e['passed_local']} | {e['flagged_by_server']} | {_evasion_cell(e)} |")
    return ("All evaluation attacks pooled:\n\n" + "\n".join(pooled) + "\n\nPer attack:\n\n"
            + "\n".join(rows) + "\n")


def adaptive_table(rows: list[dict[str, Any]]) -> str:
    """Detector-aware PGD: one row per (eps, weight, bank size), the evasion rate against each detector."""
    names = [k for k, v in rows[0].items() if isinstance(v, dict)] if rows else []
    lines = ["| eps | detector weight | bank size | attacked | misclassified | "
             + " | ".join(f"evade {n}" for n in names) + " |", "|---" * (5 + len(names)) + "|"]
    for r in rows:
        lines.append(f"| {r['eps']:g} | {r['weight']:g} | {r['bank_size']} | {r['attacked']} | {r['misclassified']} | "
                     + " | ".join(f"{r[n]['evasion_rate']:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot_evasion(results: dict[str, Any], path) -> None:
    """Evasion rate vs bank size with 95% intervals: the filter strategy pooled over attacks (left), the
    detector-aware PGD (right); one line per server setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("filter strategy: images that passed a local detector,\nfraction the server lets through", {})]
    for p in results["filter_pooled"]:
        if p["evasion_rate"] is not None:
            label = f"local {p['local']}, server m={p['m']}"
            panels[0][1].setdefault(label, []).append((p["bank_size"], p["evasion_rate"], *p["evasion_ci95"]))
    if results.get("adaptive"):
        panels.append(("detector-aware PGD: misclassified and not flagged", {}))
        for r in results["adaptive"]:
            for key, e in r.items():
                if isinstance(e, dict):
                    label = f"eps {r['eps']:g}, {'aware' if r['weight'] else 'plain PGD'}, vs {key}"
                    panels[1][1].setdefault(label, []).append((r["bank_size"], e["evasion_rate"], *e["evasion_ci95"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    axes[0][0].axhline(0.05, color="gray", lw=0.8, ls="--", label="goal: at most 5% get through")
    for ax, (title, lines) in zip(axes[0], panels):
        for label, pts in lines.items():
            x, y, lo, hi = (np.array(v, float) for v in zip(*sorted(pts)))
            ax.errorbar(x, y, yerr=np.clip([y - lo, hi - y], 0, None), marker="o", capsize=3, label=label,
                        ls=":" if "plain" in label else "-")
        sizes = sorted({x for pts in lines.values() for x, *_ in pts})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("fingerprints per class in the bank")
        ax.set_ylabel("evasion rate (95% CI)")
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
