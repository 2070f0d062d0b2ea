"""``nfp campaigns``: query-based black-box attacks (ART's SquareAttack, HopSkipJump, BoundaryAttack) run through a real Triton server over gRPC, against its query memory; with a benign stream first."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet, signing_keys

HELP = ("query-based black-box attacks (ART's SquareAttack, HopSkipJump, BoundaryAttack) run through a real Triton "
        "server over gRPC against its query memory, after a benign stream: flags, queries to the first flag, success")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.evaluation.query_campaigns import CAMPAIGN_ATTACKS

    p.add_argument("--count", type=int, default=50, help="campaigns (test images) per attack (default: %(default)s)")
    p.add_argument("--attacks", nargs="+", choices=list(CAMPAIGN_ATTACKS), default=list(CAMPAIGN_ATTACKS), metavar="ATTACK",
                   help=f"which attacks, of: {', '.join(CAMPAIGN_ATTACKS)} (default: all)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="skip the adaptive variants (a random transform on every query)")
    p.add_argument("--campaign-seed", type=int, default=0, help="seed of the images and the attacks (default: 0)")
    p.add_argument("--fused", action="store_true",
                   help="attack guarded_classifier_fused (one step) instead of the guarded_classifier ensemble")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp campaigns`` reads: its options."""

    out: Path
    count: int
    attacks: list[str]
    no_adaptive: bool
    campaign_seed: int
    fused: bool


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.evaluation.query_campaigns import campaign_study
    from model_repository.server import TritonServer
    from model_repository.writer import FUSED, ServingConfig, write_repository

    from kernels.errors import InvalidInputError

    if cfg.count < 1:
        raise ValueError(f"--count must be at least 1, got {cfg.count}")
    private, public = signing_keys(ws.root, None)
    repo = write_repository(ws.root, ws.root / "repository" / "cpu", "cpu", ServingConfig(fused=cfg.fused),
                            signing_key=private)
    with TritonServer(repo, verbose=False, public_key=public) as server:
        result = campaign_study(ws, server.grpc_url, cfg.count, tuple(cfg.attacks), not cfg.no_adaptive,
                                cfg.campaign_seed, progress, model=FUSED if cfg.fused else None)
    return {"benign": result["benign"], "table": result["table"]}
