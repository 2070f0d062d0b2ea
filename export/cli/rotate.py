"""``nfp rotate``: rotate the bank like a key: search a fresh one under a new secret seed, recalibrate, sign, add it to the written repository as a new model version and load it on a running server."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_admin_key, add_out, add_quiet, signing_keys

HELP = 'rotate the bank like a key: search a fresh one under a new secret seed, recalibrate, sign, add it to the written repository as a new model version and load it on a running server'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="which written repository, <out>/repository/<profile>, gets the new version (default: %(default)s)")
    p.add_argument("--url", help="HOST:PORT of the server serving that repository: load the new version there "
                                 "(without it: write and sign only)")
    add_admin_key(p, "the server's admin key, as `nfp serve` printed it (default: $NFP_ADMIN_KEY)")
    p.add_argument("--signing-key", type=Path,
                   help="private key that signed the repository (default: <out>/signing/private.pem)")
    p.add_argument("--seed", type=int,
                   help="the new search's seed, for reproducible tests only (default: a secret one from OS entropy)")


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp rotate`` reads: its options."""

    out: Path
    profile: str
    url: str | None
    admin_key: str | None
    signing_key: Path | None
    seed: int | None


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.bank.rotation import rotate

    repository = ws.root / "repository" / cfg.profile
    private, _ = signing_keys(ws.root, cfg.signing_key or ws.root / "signing" / "private.pem")  # never a new key
    return rotate(ws, repository, private, cfg.url, cfg.admin_key, cfg.seed, progress)
