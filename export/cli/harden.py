"""``nfp harden``: rounds of detector-aware attacks on fit images added to the bank's data, then a new search (after search; calibrate, export and serve again after it)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = "rounds of detector-aware attacks on fit images added to the bank's data, then a new search (after search; calibrate, export and serve again after it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.adversary.defences import Hardening

    d = Hardening()
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="at most this many attack-and-search rounds (default: %(default)s)")
    p.add_argument("--count", type=int, default=d.count, help="fit images attacked per round (default: %(default)s)")
    p.add_argument("--eps", type=float, nargs="+", default=list(d.eps),
                   help="L-inf budgets attacked in every round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="PGD steps per attack run (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=d.min_gain,
                   help="stop once a round lowers the attacker's mean pass probability by less than this "
                        "(default: %(default)s)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate the attacked detector is calibrated at (default: %(default)s)")
    p.add_argument("--harden-seed", type=int, default=2,
                   help="seed of the fit images chosen, the attacks' random starts and the calibration's draws "
                        "(default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp harden`` reads: its options."""

    out: Path
    rounds: int
    count: int
    eps: tuple[float, ...]
    steps: int
    min_gain: float
    fpr: float
    harden_seed: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.adversary.defences import Hardening, harden_bank

    return harden_bank(ws, Hardening(cfg.rounds, cfg.count, tuple(cfg.eps), cfg.steps, cfg.min_gain), cfg.fpr, cfg.harden_seed,
                       progress)
