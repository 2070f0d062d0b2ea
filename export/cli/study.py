"""``nfp study``: many detector designs (fingerprint sizes, layers, thresholds, aggregations, fusions) and the baselines, side by side on the pipeline's test split."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = "many detector designs (fingerprint sizes, layers, thresholds, aggregations, fusions) and the baselines, side by side on the pipeline's test split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study-seed", type=int, default=1, help="seed of the draws on the test split (default: %(default)s)")
    p.add_argument("--only", metavar="TEXT", help="measure only the designs whose name contains TEXT, e.g. 'vote'")
    p.add_argument("--transfer", action="store_true",
                   help="instead: leave one attack family out; the default's shape with banks from each family "
                        "(L-inf, L2 PGD, CW-L2, DeepFool, EAD), all but one, or all, tested on every family and on a "
                        "black-box attack no bank saw (SquareAttack); cells of families a bank never saw are marked")
    p.add_argument("--family-images", type=int, default=300, metavar="N",
                   help="with --transfer: images each family's attack runs on, fit split for bank data and test "
                        "split where the pipeline did not run it (default: %(default)s; cached in attacks/families/)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp study`` reads: its options."""

    out: Path
    study_seed: int
    only: str | None
    transfer: bool
    family_images: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.evaluation.design_study import run_study

    if cfg.transfer:
        from export.evaluation.transfer import transfer_study

        return {"table": transfer_study(ws, cfg.study_seed, cfg.family_images, progress)["table"]}
    return {"table": run_study(ws, cfg.study_seed, cfg.only, progress)["table"]}
