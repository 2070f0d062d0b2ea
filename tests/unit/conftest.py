"""Synthetic banks and activation rows shared by the unit tests (NumPy only: no torch, no Triton)."""
from __future__ import annotations

import numpy as np
import pytest

from kernels.bank import Bank

PLANTED_D = 120


def planted_rows(n: int, seed: int, attacked: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two classes over 120 neurons; attacked rows of each class carry a shift on that class's own 16."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, PLANTED_D)).astype(np.float32)
    y = np.arange(n) % 2
    if attacked:
        for c in (0, 1):
            x[np.ix_(y == c, np.arange(16) + 16 * c)] += 1.6
    return x, y


@pytest.fixture(scope="session")
def make_rows():
    """``make_rows(n, seed, attacked) -> (acts (n, 120) float32, labels (n,))`` of the planted signal."""
    return planted_rows


@pytest.fixture(scope="session")
def bank():
    """A bank searched on the planted signal: two classes, fingerprints of 1 and 2 neurons."""
    from kernels.fingerprint_search import SearchConfig, search_fingerprints

    clean, cy = planted_rows(400, 0, False)
    attacked, ay = planted_rows(400, 1, True)
    fps = search_fingerprints(clean, cy, attacked, ay, 2, SearchConfig(k=(1, 2), candidates=30_000, keep=200),
                              progress=False)
    return Bank.from_fingerprints(fps, PLANTED_D, {"class_names": ["a", "b"]})


def random_mixed_size_bank(num_neurons: int = 300, per_class: int = 50, seed: int = 0, classes: int = 3) -> Bank:
    """Random fingerprints of 1 to 8 neurons (padding exercised) with random Gaussians."""
    rng = np.random.default_rng(seed)
    f = classes * per_class
    lengths = rng.integers(1, 9, f).astype(np.int32)
    indices = np.full((f, 8), num_neurons, np.int32)
    for i, n in enumerate(lengths):
        indices[i, :n] = np.sort(rng.choice(num_neurons, n, replace=False))
    g = lambda lo, hi: rng.uniform(lo, hi, f).astype(np.float32)  # noqa: E731
    return Bank(indices, lengths, g(-1, 1), g(0.5, 2), g(-1, 1), g(0.5, 2), g(1, 3),
                np.arange(0, f + 1, per_class, dtype=np.int64), {"num_neurons": num_neurons})


@pytest.fixture(scope="session")
def mixed_size_bank():
    """``mixed_size_bank(num_neurons=300, per_class=50, seed=0, classes=3) -> Bank``."""
    return random_mixed_size_bank
