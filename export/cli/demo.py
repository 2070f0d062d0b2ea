"""``nfp demo``: serve on a real Triton server, send clean and attacked test images over gRPC, print results."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet, signing_keys

HELP = 'serve on a real Triton server, send clean and attacked test images over gRPC, print results'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fpr", type=float, default=0.01,
                   help="calibrated false-positive rate the demo's server flags at (default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp demo`` reads: its options."""

    out: Path
    fpr: float = 0.01  # `nfp pipeline` runs the demo at the default


def run(cfg: Config, ws, progress: bool) -> dict:
    from client.demo import format_report, run_demo
    from export.pipeline.stages import demo_images
    from model_repository.server import TritonServer
    from model_repository.writer import ServingConfig, write_repository

    fpr = cfg.fpr
    private, public = signing_keys(ws.root, None)
    repo = write_repository(ws.root, ws.root / "repository" / "cpu", "cpu", ServingConfig(false_positive_rate=fpr),
                            signing_key=private)
    x, y, attacked = demo_images(ws)
    with TritonServer(repo, verbose=False, public_key=public) as server:
        served = run_demo(server.grpc_url, x, y, attacked, progress=progress)
    return {**served, "table": format_report(served, fpr)}
