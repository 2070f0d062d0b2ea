"""``nfp layers``: list the tensors of an ONNX model or Triton model folder with their shapes, the default fingerprinted ones marked (for capture --layers)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_onnx_model

HELP = 'list the tensors of an ONNX model or Triton model folder with their shapes, the default fingerprinted ones marked (for capture --layers)'

OPTIONS = (lambda p: add_onnx_model(p, True),)
REPORTS = False  # prints its own answer; no workspace


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp layers`` reads: its options."""

    onnx_model: Path
    logits: str | None
    input_scale: float | None


def run(cfg: Config, progress: bool) -> None:
    """The contract and the tensors of an ONNX model, the default layers marked."""
    from export.models.onnx_import import intermediate_tensors, proposed_layers, read_model

    onnx_path, contract = read_model(cfg.onnx_model, cfg.logits, cfg.input_scale)
    proposed = proposed_layers(onnx_path)
    rows = [f"| {'*' if t['name'] in proposed else ''} | `{t['name']}` | {t['op']} | {t['shape']} |"
            for t in intermediate_tensors(onnx_path)]
    print(json.dumps({"model": str(onnx_path), "contract": contract.to_json()}, indent=2)
            + "\n\n| default | tensor | operator | shape |\n|---|---|---|---|\n" + "\n".join(rows))
