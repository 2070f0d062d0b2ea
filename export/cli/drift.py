"""``nfp drift``: watch a running server's scores for a window and test them against the clean calibration reference: does the false-positive rate still hold? (exit status 1 on an alarm)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig

HELP = "watch a running server's scores for a window and test them against the clean calibration reference: does the false-positive rate still hold? (exit status 1 on an alarm)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/default"),
                   help="pipeline output folder whose bank is served (default: %(default)s)")
    p.add_argument("--bank", type=Path, default=None,
                   help="the served bank folder instead, e.g. a rotated version's <repository>/<model>/<version>/bank "
                        "(default: <out>/bank)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics",
                   help="Triton's metrics endpoint (default: %(default)s)")
    p.add_argument("--model", default="fingerprint_detector",
                   help="the detecting model: fingerprint_detector (the ensemble's step) or guarded_classifier_fused "
                        "(default: %(default)s)")
    p.add_argument("--window", type=float, default=300.0,
                   help="seconds of traffic to compare; 0: everything since the server started (default: %(default)s)")
    p.add_argument("--fpr", type=float, default=None,
                   help="the server's operating false-positive rate (default: the lowest calibrated)")
    p.add_argument("--alpha", type=float, default=0.01,
                   help="significance level of both tests; the exit status is 1 when either rejects "
                        "(default: %(default)s)")
    p.add_argument("--predicted-class", type=int, default=None,
                   help="compare only inputs predicted as this class (default: all)")


OPTIONS = (add_arguments,)
REPORTS = False


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp drift`` reads: its options."""

    out: Path
    bank: Path | None
    metrics_url: str
    model: str
    window: float
    fpr: float | None
    alpha: float
    predicted_class: int | None


def run(cfg: Config, progress: bool) -> int:
    """The served bank's calibration against a window of the server's score histogram; 1 on an alarm."""
    from client.metrics import score_histogram
    from kernels.bank import Bank
    from kernels.served import served_detector
    from kernels.drift import ScoreWindow, watch

    detector = served_detector(Bank.load(cfg.bank or cfg.out / "bank"), cfg.fpr)
    buckets = len((detector.calibration.reference or {"edges": []})["edges"])
    read = lambda: ScoreWindow.of_metrics(  # noqa: E731
        score_histogram(cfg.metrics_url, cfg.model, buckets, cfg.predicted_class))
    report = watch(detector.calibration, detector.fpr, read, cfg.window, cfg.alpha)
    print(report.to_text())
    return 1 if report.alarm else 0
