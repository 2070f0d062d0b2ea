"""``nfp attack``: targeted attacks into every class (bank data) and evaluation attacks (ART)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = 'targeted attacks into every class (bank data) and evaluation attacks (ART)'


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.attacks.art_attacks import ATTACK_DEFAULTS, ATTACK_NAMES
    from export.pipeline.stages import DEFAULT_EVAL_COUNT
    from export.attacks.art_attacks import DEFAULT_TRAIN_PER_CLASS

    p.add_argument("--per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                   help="images of other classes attacked into each focal class for the bank (default: %(default)s)")
    p.add_argument("--eval-attacks", nargs="+", metavar="ATTACK",
                   help="evaluation attacks, each 'name' or 'name:key=value,...', e.g. 'pgd:eps=0.1' "
                        f"(names: {', '.join(ATTACK_NAMES)}; default: every L-inf attack over the data set's "
                        "budget sweep, then cw-l2 and deepfool)")
    p.add_argument("--eval-count", type=int, default=DEFAULT_EVAL_COUNT,
                   help="test images attacked by each evaluation attack (default: %(default)s)")
    p.add_argument("--attack-seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--train-eps", type=float, nargs="+", metavar="EPS",
                   help="the bank's targeted attacks: the L-inf budgets tried in turn, each image moving to the next "
                        "only if the last failed (default: the profile's, 0.2 0.3 for MNIST; raise for robust models)")
    p.add_argument("--train-max-iter", type=int,
                   help="steps of those attacks (default: the profile's, 40)")
    p.add_argument("--attack-profile", choices=sorted(ATTACK_DEFAULTS),
                   help="which data set's attack defaults to use (default: the data set's own; 'default' for "
                        "folders and .npz files: natural images, eps 8/255)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp attack`` reads: its options."""

    out: Path
    per_class: int
    eval_attacks: tuple[str, ...] | None
    eval_count: int
    attack_seed: int
    train_eps: tuple[float, ...] | None
    train_max_iter: int | None
    attack_profile: str | None


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    summary = pipeline.attack(ws, cfg.per_class, cfg.eval_attacks, cfg.eval_count, cfg.attack_seed, progress,
                              cfg.attack_profile, cfg.train_eps, cfg.train_max_iter)
    return {"train_successful_per_focal_class": summary["train"]["successful_per_focal_class"],
            "train_budgets": summary["train"]["budgets"],
            "classes_below_minimum (answered unchecked)": summary["train"]["classes_below_minimum"],
            "eval": {k: f"{v['successful']}/{v['attempted']} successful" for k, v in summary["eval"].items()}}
