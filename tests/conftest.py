"""Shared fixtures: a small real MNIST subset and a small CNN trained on it once per session."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.datasets import load_mnist_5k
from export.models import default_spec
from export.training import TrainingConfig, train_classifier

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist():
    return load_mnist_5k()


@pytest.fixture(scope="session")
def mnist_subset(mnist):
    """60 real MNIST images per class: ``(x (600, 1, 28, 28) float32, y (600,) int64)``."""
    idx = np.concatenate([np.flatnonzero(mnist.y == c)[:60] for c in range(10)])
    return mnist.x[idx], mnist.y[idx]


@pytest.fixture(scope="session")
def mnist_npz(tmp_path_factory, mnist_subset):
    """The subset as an ``.npz`` data set, images uint8 (N, H, W)."""
    x, y = mnist_subset
    path = tmp_path_factory.mktemp("data") / "mnist600.npz"
    np.savez(path, x=(x[:, 0] * 255).round().astype(np.uint8), y=y)
    return path


@pytest.fixture(scope="session")
def small_model(mnist_subset):
    """The built-in small CNN trained for a few epochs on the subset (about 90% accurate on it)."""
    x, y = mnist_subset
    model = default_spec((1, 28, 28), 10).build()
    train_classifier(model, x, y, TrainingConfig(epochs=6, seed=0), progress=False)
    return model
