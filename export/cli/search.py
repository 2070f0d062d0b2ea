"""``nfp search``: search each class's fingerprints and write the bank."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.cli.options import SearchOptions, add_out, add_quiet, add_search, search_config

HELP = "search each class's fingerprints and write the bank"

OPTIONS = (add_out, add_quiet, add_search,)


@dataclass(frozen=True)
class Config(SearchOptions):
    """What ``nfp search`` reads: its options."""

    out: Path


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline

    return pipeline.search(ws, search_config(cfg), progress)
