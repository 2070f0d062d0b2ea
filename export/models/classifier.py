"""Classifiers: the built-in small CNN, user models from an import path, and checkpoints.

A classifier is described by a :class:`ClassifierSpec` (JSON) beside its weights (a ``state_dict``
saved by ``torch.save`` and read back with ``weights_only=True``, so loading never runs pickled code).
Models take ``(B, C, H, W) float32`` images in ``[0, 1]`` and return ``(B, num_classes)`` logits;
any normalisation belongs inside the model so that attacks and serving see the same input range.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from export.data.datasets import Dataset
from export.data.workspace import Workspace
from export.models.weights import load_weights
from kernels.bank import sha256_file
from kernels.errors import InvalidInputError


class SmallCNN(nn.Module):
    """The embedded default classifier: two conv blocks and three fully connected layers.

    The fully connected stack mirrors LeNet-5's, whose last layers the paper fingerprints
    (Fisher, Shahar & Resheff, 2024, "Neural Fingerprints for Adversarial Attack Detection").
    ReLUs are separate, non-in-place modules so that a layer's pre-activation output can be
    captured by name (``fc1``, ``fc2``, ``fc3``).

    Args:
        in_channels: image channels (1 for MNIST).
        image_size: height and width of the square input (28 for MNIST).
        num_classes: number of logits.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 256)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(0.3)
        self.fc2 = nn.Linear(256, 128)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.dropout(self.relu3(self.fc1(self.flatten(x))))
        return self.fc3(self.relu4(self.fc2(x)))


def _efficientnet_lite0(**kwargs) -> nn.Module:
    from export.models.efficientnet_lite import efficientnet_lite0

    return efficientnet_lite0(**kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"small-cnn": SmallCNN, "efficientnet-lite0": _efficientnet_lite0}


@dataclass(frozen=True)
class ClassifierSpec:
    """How to rebuild a classifier: a built-in architecture name or ``module:factory`` import path.

    Attributes:
        architecture: key of :data:`ARCHITECTURES` or ``"package.module:factory"``.
        kwargs: keyword arguments of the architecture or factory (JSON values).
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of logits.
    """

    architecture: str
    input_shape: tuple[int, int, int]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        factory = ARCHITECTURES.get(self.architecture) or load_factory(self.architecture)
        model = factory(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"{self.architecture} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ClassifierSpec":
        return cls(d["architecture"], tuple(d["input_shape"]), int(d["num_classes"]), dict(d.get("kwargs", {})))


def default_spec(input_shape: tuple[int, int, int], num_classes: int) -> ClassifierSpec:
    """The built-in small CNN sized for ``input_shape`` (square images)."""
    c, h, w = input_shape
    if h != w:
        raise InvalidInputError(f"small-cnn needs square images, got {h}x{w}; bring your own model with --factory")
    return ClassifierSpec("small-cnn", input_shape, num_classes, {"in_channels": c, "image_size": h, "num_classes": num_classes})


def load_factory(path: str) -> Callable[..., nn.Module]:
    """Import ``"package.module:factory"`` and return the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInputError(
            f"unknown architecture {path!r}: use one of {sorted(ARCHITECTURES)} or an import path 'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"cannot import {module_name!r} for model factory {path!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidInputError(f"{module_name!r} has no callable {attr!r}")
    return factory


def save_checkpoint(model: nn.Module, spec: ClassifierSpec, weights: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``weights`` (state_dict) and ``weights.with_suffix('.json')`` (spec, hash, extra facts)."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    meta = {"spec": spec.to_json(), "weights": weights.name, "sha256": sha256_file(weights), **(extra or {})}
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(weights: Path) -> tuple[nn.Module, ClassifierSpec]:
    """Rebuild a classifier saved by :func:`save_checkpoint`, in eval mode."""
    meta_path = Path(weights).with_suffix(".json")
    if not meta_path.is_file():
        raise InvalidInputError(f"{meta_path} not found: it describes how to rebuild {weights}")
    spec = ClassifierSpec.from_json(json.loads(meta_path.read_text())["spec"])
    return load_weights(spec.build(), weights), spec


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits ``(N, num_classes) float32`` of images ``(N, C, H, W) float32`` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device)).cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == y).mean())


def correctly_classified(model: torch.nn.Module, ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """The indices among ``idx`` whose image the model labels correctly."""
    return idx[predict(model, ds.x[idx]).argmax(1) == ds.y[idx]]


def load_classifier(ws: Workspace) -> torch.nn.Module:
    return load_checkpoint(ws.require(ws.classifier, "train"))[0]
