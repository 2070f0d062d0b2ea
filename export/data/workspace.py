"""The output folder of the offline pipeline, and its manifest of what produced each artifact.

Layout (every stage writes only under its own names)::

    <out>/manifest.json            one entry per stage run: arguments, duration, files with SHA-256
    <out>/data.json, splits.npz    prepare: data set, class names, split indices
    <out>/classifier.pt, .json     train: state_dict and how to rebuild it
    <out>/attacks/                 attack: training attacks and evaluation attacks (.npz + .json)
    <out>/activations/             capture: <set>.npy (N, D) float32, <set>.npz labels, layout.json

Arrays are ``.npy`` / ``.npz`` read with ``allow_pickle=False``; metadata is JSON.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernels.bank import sha256_file
from kernels.errors import InvalidInputError


@dataclass(frozen=True)
class Workspace:
    """Paths of one pipeline output folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data_json(self) -> Path:
        return self.root / "data.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.npz"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier.pt"

    @property
    def attacks(self) -> Path:
        return self.root / "attacks"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    def require(self, path: Path, stage: str) -> Path:
        """``path`` if it exists, else an error telling which stage makes it."""
        if not path.exists():
            raise InvalidInputError(f"{path} not found: run `nfp {stage} --out {self.root}` first")
        return path

    def read_json(self, path: Path, stage: str) -> dict[str, Any]:
        return json.loads(self.require(path, stage).read_text())

    def write_json(self, path: Path, obj: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=_json_default))
        return path

    def load_npz(self, path: Path, stage: str) -> dict[str, np.ndarray]:
        with np.load(self.require(path, stage), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    def record(self, stage: str, args: dict[str, Any], files: list[Path], started: float,
               results: dict[str, Any] | None = None) -> None:
        """Add a stage run to the manifest: its arguments, duration, produced files and their hashes."""
        manifest = json.loads(self.manifest.read_text()) if self.manifest.exists() else {"stages": {}}
        import torch  # local: the versions are facts about the run

        manifest["stages"][stage] = {
            "args": args,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 2),
            "files": {str(Path(f).relative_to(self.root)): sha256_file(Path(f)) for f in files},
            "results": results or {},
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        }
        self.write_json(self.manifest, manifest)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
