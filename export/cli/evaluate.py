"""``nfp evaluate``: the evaluation report on the test split (JSON, Markdown, ROC plot)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = 'the evaluation report on the test split (JSON, Markdown, ROC plot)'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the draws on the test split (default: %(default)s)")
    p.add_argument("--spread-draws", type=int, default=100,
                   help="independent draws for the spread of TPR at the lowest calibrated FPR (default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp evaluate`` reads: its options."""

    out: Path
    eval_seed: int
    spread_draws: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    table = pipeline.evaluate(ws, cfg.eval_seed, cfg.spread_draws, progress)["table"]
    return {"report": f"{ws.root}/report/evaluation.md, evaluation.json, roc.png",
            "table": "Detection on the test split (the served default beside its members, the paper's LRT and "
                     "the baselines):\n\n" + table}
