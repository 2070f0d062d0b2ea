"""``nfp build-bank``: the bank's attacks, capture and search as one shard per class on Ray (local cores by default, or a cluster), resumable; merged into bank/ with the calibration split captured (after train; calibrate, export and serve after it)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import SearchOptions, add_out, add_quiet, add_search, search_config

HELP = "the bank's attacks, capture and search as one shard per class on Ray (local cores by default, or a cluster), resumable; merged into bank/ with the calibration split captured (after train; calibrate, export and serve after it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.attacks.art_attacks import DEFAULT_TRAIN_PER_CLASS

    p.add_argument("--per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                   help="fit images attacked into each focal class (default: %(default)s)")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of the attacks' images and starts (default: 0)")
    p.add_argument("--attack-profile", help="attack defaults (default: the data set's)")
    p.add_argument("--classes", type=int, nargs="+", help="build only these classes' shards (default: all)")
    p.add_argument("--workers", type=int,
                   help="CPUs of the local Ray cluster (default: all cores); 0: one process, no Ray")
    p.add_argument("--ray-address", help="HOST:PORT of a running Ray cluster to join instead (`ray start --head`)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose worker died (default: 3)")
    add_search(p)


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(SearchOptions):
    """What ``nfp build-bank`` reads: its options."""

    out: Path
    per_class: int
    attack_seed: int
    attack_profile: str | None
    classes: tuple[int, ...] | None
    workers: int | None
    ray_address: str | None
    max_retries: int


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.bank.ray_build import RayCluster, build_bank

    return build_bank(ws, cfg.per_class, cfg.attack_seed, search_config(cfg), classes=cfg.classes,
                      profile=cfg.attack_profile, cluster=RayCluster(cfg.workers, cfg.ray_address, cfg.max_retries),
                      progress=progress)
