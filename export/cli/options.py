"""Options and plumbing shared by several commands of ``nfp`` (:mod:`export.cli`)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

from kernels.errors import FingerprintError

DEFAULT_OUT = Path("runs/default")


@dataclass(frozen=True)
class CommandConfig:
    """Base of every command's frozen configuration: its fields are the command's options."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The configuration from parsed options (lists become tuples); a field the namespace lacks
        takes its default (``nfp pipeline`` runs the demo without the demo's own options)."""
        values = {}
        for f in fields(cls):
            if hasattr(args, f.name):
                value = getattr(args, f.name)
                values[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


def add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder of the pipeline (default: %(default)s)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for serve: no server log)")


def json_object(text: str) -> dict:
    """argparse type of ``--factory-kwargs``: a JSON object, with the parser's error named."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 2}}', got {text!r}")
    return value


def add_search(p: argparse.ArgumentParser) -> None:
    from kernels.fingerprint_search import SearchConfig

    d = SearchConfig()
    p.add_argument("--k", type=int, nargs="+", default=list(d.k),
                   help="neurons per fingerprint; several sizes mix (default: %(default)s; the paper: 50)")
    p.add_argument("--candidates", type=int, default=d.candidates, help="candidates tried per class (default: %(default)s)")
    p.add_argument("--p-max", type=float, default=d.p_max, help="Welch t-test p-value bound (default: %(default)s)")
    p.add_argument("--d-min", type=float, default=d.d_min, help="|Cohen's d| bound (default: %(default)s)")
    p.add_argument("--keep", type=int, default=d.keep, help="fingerprints kept per class (default: %(default)s)")
    p.add_argument("--search-method", choices=["auto", "covariance", "gather"], default=d.method,
                   help="how subset statistics are computed (default: %(default)s)")
    p.add_argument("--search-seed", type=int, default=d.seed,
                   help="seed of the candidates; a secret one keeps a 5-neuron bank secret, not a 1-neuron one "
                        "(README, white-box section) (default: %(default)s)")
    p.add_argument("--max-correlation", type=float,
                   help="keep each class's fingerprints apart: strongest first, layers in turn, |r| on attacked "
                        "data at most this (0.5 measured best against the adaptive attacker; default: off)")


@dataclass(frozen=True)
class SearchOptions(CommandConfig):
    """The fields of :func:`add_search`'s options, for the commands that search."""

    k: tuple[int, ...]
    candidates: int
    p_max: float
    d_min: float
    keep: int
    search_method: str
    search_seed: int
    max_correlation: float | None


def search_config(cfg):
    from kernels.fingerprint_search import SearchConfig

    return SearchConfig(k=tuple(cfg.k), candidates=cfg.candidates, p_max=cfg.p_max, d_min=cfg.d_min,
                        keep=cfg.keep, method=cfg.search_method, seed=cfg.search_seed,
                        max_correlation=cfg.max_correlation)


def add_admin_key(p: argparse.ArgumentParser, help_text: str) -> None:
    import os

    p.add_argument("--admin-key", default=os.environ.get("NFP_ADMIN_KEY"), help=help_text)


def add_onnx_model(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--onnx-model", type=Path, required=required,
                   help="the classifier you already serve, a Triton model folder (config.pbtxt + <version>/model.onnx) "
                        "or an ONNX file: used as is instead of training, its input and outputs kept when served")
    p.add_argument("--logits", help="with --onnx-model: the output holding pre-softmax class scores (default: the first)")
    p.add_argument("--input-scale", type=float,
                   help="with --onnx-model: the input value of a white pixel (default: 255 for UINT8 inputs, else 1)")


def signing_keys(out: Path, private: Path | None) -> tuple[Path, Path]:
    """The private key given (its ``public.pem`` beside it) or ``<out>/signing/`` (created if missing)."""
    from model_repository.signing import create_keys

    if private is None:
        private = Path(out) / "signing" / "private.pem"
        if not private.is_file():
            return create_keys(private.parent)
    public = Path(private).parent / "public.pem"
    if not Path(private).is_file() or not public.is_file():
        raise FingerprintError(f"signing needs {private} and public.pem beside it")
    return Path(private), public
