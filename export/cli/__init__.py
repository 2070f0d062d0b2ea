"""``nfp``: the offline pipeline of neural-fingerprint attack detection, one sub-command per stage.

Every stage reads and writes one output folder (``--out``) and records what it did in
``<out>/manifest.json``. ``nfp pipeline`` runs all stages on the embedded default (MNIST-5k).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from kernels.errors import FingerprintError

# The table: each command is one module of this package with its HELP, its OPTIONS (argparse groups),
# a frozen Config of what it reads, and run(); REPORTS = False for those that print their own answer.
COMMANDS = {
    "prepare": "prepare", "train": "train", "layers": "layers", "attack": "attack", "capture": "capture",
    "search": "search", "build-bank": "build_bank", "harden": "harden", "calibrate": "calibrate",
    "evaluate": "evaluate", "export": "export", "serve": "serve", "rotate": "rotate", "whitebox": "whitebox",
    "predict": "predict", "drift": "drift", "demo": "demo", "study": "study", "synthetic-bank": "synthetic_bank",
    "campaigns": "campaigns", "pipeline": "pipeline",
}


def command(name: str):
    """The module of command ``name``."""
    return importlib.import_module(f"export.cli.{COMMANDS[name]}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Given ``argv``, only the named sub-command's options are built: their defaults come
    from modules that load torch, which ``nfp predict`` and ``nfp --help`` do not need."""
    parser = argparse.ArgumentParser(
        prog="nfp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    for name in COMMANDS:
        module = command(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if argv is None or name == chosen:
            for add in module.OPTIONS:
                add(p)
    return parser


def run(args: argparse.Namespace) -> int | None:
    """Run one command; ``pipeline`` runs its stages in order and prints every stage's report.
    Returns the exit status where a command has one of its own (``drift``: 1 on an alarm)."""
    module, progress = command(args.command), not getattr(args, "quiet", False)
    if not getattr(module, "REPORTS", True):
        return module.run(module.Config.from_args(args), progress)
    from export.data.workspace import Workspace

    ws = Workspace(args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = module.STAGES if args.command == "pipeline" else (args.command,)
    report = {name: command(name).run(command(name).Config.from_args(args), ws, progress) for name in names}
    tables = [entry.pop("table") for entry in report.values() if isinstance(entry, dict) and "table" in entry]
    if any(report.values()):
        print(json.dumps({k: v for k, v in report.items() if v}, indent=2, default=str))
    for table in tables:
        print("\n" + table)
    print(f"artifacts and manifest: {ws.root}/", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return run(args) or 0
    except FingerprintError as e:
        print(f"nfp {args.command}: error: {e}", file=sys.stderr)
        return 2
