"""The white-box attacker with a local copy: what per-request random draws buy (filter strategy).

Threat model (Fisher, Shahar & Resheff, 2024, Sec. 5): the attacker has the classifier's weights, the
whole bank, the threshold and this code, but not the server's random draws. Strategy 1, *filter*: make
many attacked images, score each with a local detector, and send only those that pass it. Local
detectors:

- ``static``: every fingerprint of the predicted class (one fixed detector, its own threshold
  calibrated on the clean calibration split at the same false-positive rate);
- ``random``: one local random draw of ``m`` fingerprints, as the server does, with the server's
  threshold.

The figure that matters: of the images that passed the local detector, the fraction the server's own
random draws (fresh for every request) still flag. The static detector lets 100% of its own
survivors through by construction; a randomized server helps only insofar as its draws disagree with
the local one. Strategy 2, *detector-aware optimisation* (:mod:`export.adaptive_attack`), is scored by
:func:`adaptive_experiment`.

The server is either replayed offline (:func:`offline_server`: the kernels' own scoring with fresh
draws per image) or a running Triton server called over gRPC (:class:`RemoteServer`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kernels.bank import Bank
from kernels.calibration import Calibration, calibrate_threshold
from kernels.errors import ModelMismatchError
from kernels.scoring import score


def static_scores(acts: np.ndarray, labels: np.ndarray, bank: Bank) -> np.ndarray:
    """``(N,)`` LRT scores using every fingerprint of each input's predicted class."""
    out = np.empty(len(labels))
    for c in np.unique(labels):
        rows = labels == c
        ids = np.broadcast_to(np.arange(bank.class_offsets[c], bank.class_offsets[c + 1]), (rows.sum(), bank.counts[c]))
        out[rows] = score(acts[rows], labels[rows], bank, 1, ids=np.ascontiguousarray(ids)).lrt
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


Server = Callable[[np.ndarray], np.ndarray]
"""The server's verdicts: rows of an attacked set -> ``(len(rows),) bool`` flagged."""


def offline_server(bank: Bank, cal: Calibration, acts: np.ndarray, labels: np.ndarray, fpr: float,
                   rng: np.random.Generator) -> Server:
    """The server replayed offline: each image scored with its own fresh draw of ``cal.m`` fingerprints."""
    return lambda rows: cal.is_attacked(score(acts[rows], labels[rows], bank, cal.m, rng).lrt, labels[rows], fpr)


class RemoteServer:
    """A running server's verdicts on ``images`` over gRPC (``client``: a :class:`client.grpc_client.DetectorClient`).

    Counts in ``label_mismatches`` the images the server classified differently from ``labels`` (the
    attacker's local copy); a mismatch means the local copy is not the served model.
    """

    def __init__(self, client, images: np.ndarray, labels: np.ndarray, m: int, batch: int = 64) -> None:
        self.client, self.images, self.labels, self.m, self.batch = client, images, labels, m, batch
        self.label_mismatches = 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        flags = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            result = self.client.detect(np.ascontiguousarray(self.images[chunk]))
            if result.fingerprint_ids.shape[1] != self.m:
                raise ModelMismatchError(f"the server draws {result.fingerprint_ids.shape[1]} fingerprints per "
                                         f"request, the local bank's calibration {self.m}: not the same bank")
            self.label_mismatches += int((result.label != self.labels[chunk]).sum())
            flags.append(result.is_attacked)
        return np.concatenate(flags) if flags else np.zeros(0, bool)


def static_calibration(acts: np.ndarray, labels: np.ndarray, bank: Bank, fpr: float) -> Calibration:
    """The static detector's threshold for ``fpr``, from clean calibration activations and predicted labels."""
    return calibrate_threshold(static_scores(acts, labels, bank), labels, bank.num_classes, "lrt-static", 0, (fpr,))


def filter_experiment(bank: Bank, server_cal: Calibration, static_cal: Calibration, attacked_acts: np.ndarray,
                      attacked_labels: np.ndarray, fpr: float = 0.01, seed: int = 0,
                      server: Server | None = None) -> dict[str, Any]:
    """Filter strategy against one set of successful attacked images.

    ``server_cal`` is the server's calibration (the attacker knows it: the local random detector uses
    it), ``static_cal`` the static detector's (:func:`static_calibration`); ``server`` the server's
    verdicts, by default :func:`offline_server` with fresh draws.
    Returns, per local detector, how many images passed it and how many of those the server still
    flags (with a 95% Wilson interval of the evasion rate = passed the server too).
    """
    rng = np.random.default_rng(seed)
    server = server or offline_server(bank, server_cal, attacked_acts, attacked_labels, fpr, rng)
    local_random = score(attacked_acts, attacked_labels, bank, server_cal.m, rng).lrt
    local = {
        "static": ~static_cal.is_attacked(static_scores(attacked_acts, attacked_labels, bank), attacked_labels, fpr),
        "random": ~server_cal.is_attacked(local_random, attacked_labels, fpr),
    }
    out: dict[str, Any] = {"attacked": int(len(attacked_labels))}
    for name, passed in local.items():
        rows = np.flatnonzero(passed)
        flagged = server(rows) if len(rows) else np.zeros(0, bool)  # the server draws anew per request
        evaded = int((~flagged).sum())
        out[name] = {"passed_local": int(len(rows)), "flagged_by_server": int(flagged.sum()), "evaded_server": evaded,
                     "evasion_rate": evaded / len(rows) if len(rows) else None, "evasion_ci95": wilson(evaded, len(rows))}
    return out


def adaptive_experiment(bank: Bank, servers: dict[str, Server], static_cal: Calibration, acts: np.ndarray,
                        labels: np.ndarray, true_labels: np.ndarray, fpr: float = 0.01) -> dict[str, Any]:
    """Evasion rates of detector-aware attacks (strategy 2): misclassified and not flagged, against the
    static detector and against each randomized server of ``servers`` (name -> verdicts).

    ``acts (N, D)``, predicted ``labels (N,)`` of the attacked images, ``true_labels (N,)``.
    """
    wrong = labels != true_labels
    n = len(labels)
    flags = {"static": static_cal.is_attacked(static_scores(acts, labels, bank), labels, fpr)}
    flags.update({name: server(np.arange(n)) for name, server in servers.items()})
    out: dict[str, Any] = {"attacked": n, "misclassified": int(wrong.sum())}
    for name, flag in flags.items():
        evaded = int((wrong & ~flag).sum())
        out[name] = {"evaded": evaded, "evasion_rate": evaded / n, "evasion_ci95": wilson(evaded, n)}
    return out


def pooled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Filter-strategy rows pooled over attacks, per (bank size, m, local detector): of all attacked
    images that passed the local detector, how many the server still flagged."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        for local in ("static", "random"):
            key = (r["bank_size"], r["m"], local)
            p = out.setdefault(key, {"bank_size": key[0], "m": key[1], "local": local, "attacked": 0, "passed_local": 0,
                                     "flagged_by_server": 0, "evaded_server": 0})
            p["attacked"] += r["attacked"]
            for field in ("passed_local", "flagged_by_server", "evaded_server"):
                p[field] += r[local][field]
    for p in out.values():
        n = p["passed_local"]
        p["evasion_rate"] = p["evaded_server"] / n if n else None
        p["evasion_ci95"] = wilson(p["evaded_server"], n)
    return list(out.values())


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
