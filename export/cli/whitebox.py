"""``nfp whitebox``: the white-box attacker with a local copy: detector-aware PGD through the expectation over the server's draws, and the filter strategy, against each defence; offline or against a running server."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_out, add_quiet

HELP = "the white-box attacker with a local copy: detector-aware PGD through the expectation over the server's draws, and the filter strategy, against each defence; offline or against a running server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.adversary.attacker import AttackConfig
    from export.adversary.defences import DEFENCES, Hardening

    p.add_argument("--fpr", type=float, default=0.01,
                   help="operating false-positive rate; with --url the server's own (default: %(default)s)")
    p.add_argument("--whitebox-seed", type=int, default=2,
                   help="seed of the server replay's draws, the attacks' random starts and the defences' "
                        "calibration (default: %(default)s)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                   help="L-inf budgets of the strong attacker (default: %(default)s)")
    p.add_argument("--count", type=int, default=200,
                   help="correctly classified test images attacked (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="PGD steps per attack run (default: %(default)s)")
    a = AttackConfig(eps=0.3)
    p.add_argument("--weights", type=float, nargs="+", default=list(a.weights),
                   help="weights of the detector hinge, a run each (default: %(default)s)")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(a.temperatures),
                   help="temperatures of the smoothed vote in z-units, a run each (default: %(default)s)")
    p.add_argument("--restarts", type=int, default=a.restarts,
                   help="random starts per weight and temperature (default: %(default)s)")
    p.add_argument("--untargeted-only", action="store_true",
                   help="skip the runs into every other class (the weaker attacker of earlier sessions)")
    p.add_argument("--no-bit-lock", action="store_true",
                   help="skip the bit-locked runs against a defence that squeezes to 1 bit: flips of the 1-bit "
                        "copy into each class by a greedy search, then PGD locked to them (the attacker "
                        "before 2026-12-07)")
    p.add_argument("--send-at", type=float, default=0.5,
                   help="filter strategy: send an image when the attacker's exact pass probability is at "
                        "least this (default: %(default)s)")
    p.add_argument("--draws", type=int, default=20,
                   help="requests per attacked image, each with fresh server draws (default: %(default)s)")
    p.add_argument("--defences", nargs="+", default=["default"], choices=list(DEFENCES), metavar="NAME",
                   help="server detectors to attack: " + "; ".join(f"{k}: {v}" for k, v in DEFENCES.items())
                        + " (default: %(default)s)")
    h = Hardening()
    p.add_argument("--harden-rounds", type=int, default=h.rounds,
                   help="hardened defences: at most this many rounds of attacks on fit images, each followed by "
                        "a new search (default: %(default)s)")
    p.add_argument("--harden-count", type=int, default=h.count,
                   help="hardened defences: fit images attacked per round (default: %(default)s)")
    p.add_argument("--harden-steps", type=int, default=h.steps,
                   help="hardened defences: PGD steps per attack run (default: %(default)s)")
    p.add_argument("--url", help="attack a running Triton server at host:port (gRPC) instead of replaying it "
                                 "offline; m, bank and FPR are then the server's")
    p.add_argument("--model", default="guarded_classifier",
                   help="served model to attack with --url (default: %(default)s)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp whitebox`` reads: its options."""

    out: Path
    fpr: float
    whitebox_seed: int
    eps: tuple[float, ...]
    count: int
    steps: int
    weights: tuple[float, ...]
    temperatures: tuple[float, ...]
    restarts: int
    untargeted_only: bool
    no_bit_lock: bool
    send_at: float
    draws: int
    defences: tuple[str, ...]
    harden_rounds: int
    harden_count: int
    harden_steps: int
    url: str | None
    model: str


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.adversary.attacker import AttackConfig
    from export.adversary.defences import Hardening
    from export.adversary.whitebox import WhiteboxConfig, whitebox

    attack = AttackConfig(max(cfg.eps), weights=tuple(cfg.weights), temperatures=tuple(cfg.temperatures),
                          restarts=cfg.restarts, targeted=not cfg.untargeted_only,
                          bit_lock=not cfg.no_bit_lock)
    experiment = WhiteboxConfig(cfg.fpr, cfg.whitebox_seed, tuple(cfg.eps), cfg.count, cfg.steps, cfg.draws,
                                tuple(cfg.defences), attack, cfg.send_at,
                                Hardening(cfg.harden_rounds, cfg.harden_count, steps=cfg.harden_steps),
                                cfg.url, cfg.model)
    return {"table": whitebox(ws, experiment, progress)["table"]}
