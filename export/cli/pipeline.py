"""``nfp pipeline``: run every stage in order, then the demo (the README's main job)."""
from __future__ import annotations

from export.cli import attack, calibrate, capture, evaluate, export, prepare, train
from export.cli.options import add_out, add_quiet, add_search

HELP = "run every stage in order, then the demo (the README's main job)"

OPTIONS = (add_out, add_quiet, prepare.add_arguments, train.add_arguments, attack.add_arguments, capture.add_arguments,
           add_search, calibrate.add_arguments, evaluate.add_arguments, export.add_arguments)
STAGES = ("prepare", "train", "attack", "capture", "search", "calibrate", "evaluate", "export", "demo")  # in order
