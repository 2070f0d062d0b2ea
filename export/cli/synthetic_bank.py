"""``nfp synthetic-bank``: write a pipeline output folder for serving benchmarks: EfficientNet-Lite0 exported to ONNX with a random 1,000-class bank (never for detection)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out

HELP = 'write a pipeline output folder for serving benchmarks: EfficientNet-Lite0 exported to ONNX with a random 1,000-class bank (never for detection)'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-class", type=int, default=1000, help="fingerprints per class (default: %(default)s)")


OPTIONS = (add_out, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp synthetic-bank`` reads: its options."""

    out: Path
    per_class: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.bank.synthetic import write_synthetic_out

    return {"out": str(write_synthetic_out(ws.root, per_class=cfg.per_class))}
