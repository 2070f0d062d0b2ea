"""``nfp capture``: capture the fingerprinted layers' activations of every image set."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = "capture the fingerprinted layers' activations of every image set"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", metavar="LAYER",
                   help="module names to capture, 'name' for its output or 'name:input' for its input; for a model "
                        "trained with --onnx-model, graph tensor names (`nfp layers`) (default: outputs of the last "
                        "four linear/conv layers, i.e. pre-activation values)")
    p.add_argument("--capture-batch-size", type=int, default=256, help="(default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp capture`` reads: its options."""

    out: Path
    layers: tuple[str, ...] | None
    capture_batch_size: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    layout = pipeline.capture(ws, cfg.layers, cfg.capture_batch_size, progress)
    return {"layers": layout.layers, "num_neurons": layout.num_neurons}
