"""``nfp predict``: send image files or an .npz to a running server; print label, confidence, score, verdict."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig

HELP = 'send image files or an .npz to a running server; print label, confidence, score, verdict'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="image files (resized to the served shape) or .npz files")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default: %(default)s)")
    p.add_argument("--model", default="guarded_classifier",
                   help="guarded_classifier (the ensemble) or guarded_classifier_fused (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default: %(default)s)")


OPTIONS = (add_arguments,)
REPORTS = False


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp predict`` reads: its options."""

    inputs: tuple[Path, ...] | None
    url: str
    model: str
    timeout: float


def run(cfg: Config, progress: bool) -> None:
    from client.predict import predict

    print(predict(cfg.url, cfg.inputs, cfg.model, cfg.timeout))
