"""``nfp prepare``: load a data set and make the seeded fit / calibration / test splits."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out

HELP = 'load a data set and make the seeded fit / calibration / test splits'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist",
                   help="'mnist' (5,000 images, embedded), 'fashion-mnist' (Debian package dataset-fashion-mnist), "
                        "a folder with one sub-folder of images per class, or an .npz with x and y (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: %(default)s)")
    p.add_argument("--num-classes", type=int,
                   help="the model's class count when it exceeds the folder's (sub-folders then named by class "
                        "index, e.g. 285/ and 967/ for an ImageNet model)")
    p.add_argument("--fractions", type=float, nargs=3, metavar=("FIT", "CAL", "TEST"), default=(0.6, 0.2, 0.2),
                   help="shares of the fit, calibration and test splits (default: 0.6 0.2 0.2)")
    p.add_argument("--images-per-class", type=int,
                   help="a seeded subset of this many images per class, e.g. 500 for a 5,000-image Fashion-MNIST "
                        "(default: every image)")


OPTIONS = (add_out, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp prepare`` reads: its options."""

    out: Path
    dataset: str
    seed: int
    num_classes: int | None
    fractions: tuple[float, ...]
    images_per_class: int | None


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    return pipeline.prepare(ws, cfg.dataset, cfg.seed, cfg.fractions, cfg.num_classes, cfg.images_per_class)
