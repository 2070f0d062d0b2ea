"""What the stages leave in a :class:`~export.data.workspace.Workspace`, read back: the prepared data set and
splits, the captured activation sets, the bank's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.data.datasets import Dataset, Splits, load_dataset
from export.data.workspace import Workspace
from kernels.errors import ModelMismatchError


def load_prepared(ws: Workspace) -> tuple[Dataset, Splits, dict[str, Any]]:
    """The data set and splits recorded by ``prepare``."""
    meta = ws.read_json(ws.data_json, "prepare")
    ds = load_dataset(meta["dataset"], meta.get("num_classes"))
    if len(ds.y) != meta["num_images"] or ds.class_names != tuple(meta["class_names"]):
        raise ModelMismatchError(f"data set {meta['dataset']!r} changed since `prepare` ({meta['num_images']} images then, "
                                 f"{len(ds.y)} now): run prepare again")
    s = ws.load_npz(ws.splits, "prepare")
    return ds, Splits(s["fit"], s["calibration"], s["test"]), meta


def load_activation_set(ws: Workspace, name: str, mmap: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(acts (N, D) float32, {"label", "predicted", "source"})`` of one captured set."""
    acts = np.load(ws.require(ws.activations / f"{name}.npy", "capture"), mmap_mode="r" if mmap else None,
                   allow_pickle=False)
    return acts, ws.load_npz(ws.activations / f"{name}.npz", "capture")


def bank_dir(ws: Workspace) -> Path:
    return ws.root / "bank"
