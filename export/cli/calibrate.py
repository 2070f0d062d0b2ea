"""``nfp calibrate``: set detection thresholds on the calibration split."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = 'set detection thresholds on the calibration split'


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kernels.detector import DEFAULT_CALIBRATION_REPEATS, DEFAULT_M
    from kernels.calibration import DEFAULT_FPRS

    p.add_argument("--m", type=int, default=DEFAULT_M, help="fingerprints drawn per input (default: %(default)s)")
    p.add_argument("--fprs", type=float, nargs="+", default=list(DEFAULT_FPRS),
                   help="false-positive rates to calibrate (default: %(default)s)")
    p.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the split of the calibration images and of the draws while calibrating "
                        "(default: %(default)s)")
    p.add_argument("--calibration-repeats", type=int, default=DEFAULT_CALIBRATION_REPEATS,
                   help="independent draws per image of the reference half of the calibration split, pooled "
                        "(default: %(default)s)")
    p.add_argument("--confidence", type=float, default=None,
                   help="make the realized clean FPR stay at or below each nominal rate with this probability "
                        "over calibration draws (e.g. 0.95; costs detection; needs more calibration images, see "
                        "the README), instead of only the expected FPR (default: expected FPR <= nominal)")
    p.add_argument("--squeeze", choices=("auto", "on", "off"), default="auto",
                   help="feature squeezing in the served fusion: 'auto' keeps the squeezers (1-bit depth, 2x2 median "
                        "for grey images) that cost at most 1 point of accuracy on the calibration split, none if "
                        "none does (MNIST: both; Fashion-MNIST: none); 'on' both; 'off' none (the vote and the "
                        "margin only: one forward pass per input instead of three) (default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp calibrate`` reads: its options."""

    out: Path
    m: int
    fprs: tuple[float, ...]
    calibration_seed: int
    calibration_repeats: int
    confidence: float | None
    squeeze: str = "auto"


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    return pipeline.calibrate(ws, cfg.m, cfg.fprs, cfg.calibration_seed, cfg.calibration_repeats, progress,
                              cfg.confidence, cfg.squeeze)
