"""Shared fixtures: a small real MNIST subset and a small CNN trained on it once per session.

torch (if installed) is set up once per session and the data set is loaded inside its fixture, so the GPU tests
(``make test-gpu`` on a machine without the training extras) collect without them.
"""
from __future__ import annotations

import numpy as np
import pytest


def pytest_configure(config):
    """Two torch threads from the start of the session, as on the CI machine (where torch is installed)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist():
    from export.data.datasets import load_mnist_5k

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
    from export.models.classifier import default_spec
    from export.models.training import TrainingConfig, train_classifier

    x, y = mnist_subset
    model = default_spec((1, 28, 28), 10).build()
    train_classifier(model, x, y, TrainingConfig(epochs=6, seed=0), progress=False)
    return model


TINY_PIPELINE = ["--epochs", "4", "--per-class", "12", "--eval-count", "30", "--attack-profile", "mnist",
                 "--eval-attacks", "fgsm", "pgd:eps=0.3", "pgd-targeted:eps=0.2", "deepfool",
                 "cw-l2:max_iter=3,binary_search_steps=1",
                 "--candidates", "4000", "--keep", "40", "--m", "16", "--spread-draws", "5",
                 "--squeeze", "on"]  # the 4-epoch model's squeezed copies may cost it a point: serve both squeezers


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_npz):
    """The whole main job (offline stages, then the served demo) on 600 MNIST images, once per session.

    Returns the output folder and what the command printed.
    """
    import contextlib
    import io

    from export.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--threads", "2", "pipeline", "--out", str(out), "--quiet", "--dataset", str(mnist_npz),
                   *TINY_PIPELINE])
    assert rc == 0
    return out, printed.getvalue()
