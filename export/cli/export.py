"""``nfp export``: export model.onnx with the activations as extra outputs; parity check; bind the bank to it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out

HELP = 'export model.onnx with the activations as extra outputs; parity check; bind the bank to it'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.add_argument("--parity-count", type=int, default=256,
                   help="test images of the onnxruntime-vs-torch parity check (default: %(default)s)")


OPTIONS = (add_out, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp export`` reads: its options."""

    out: Path
    opset: int
    parity_count: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    return pipeline.export_model(ws, cfg.parity_count, cfg.opset)
