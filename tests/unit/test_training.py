import numpy as np
import torch

from export.models import default_spec, predict
from export.training import TrainingConfig, train_classifier


def test_training_learns_and_is_reproducible_with_a_seed(mnist_subset, small_model):
    x, y = mnist_subset
    assert (predict(small_model, x).argmax(1) == y).mean() > 0.85
    torch.manual_seed(1)
    a = default_spec((1, 28, 28), 10).build()
    torch.manual_seed(1)
    b = default_spec((1, 28, 28), 10).build()
    cfg = TrainingConfig(epochs=1, seed=7)
    la = train_classifier(a, x[:128], y[:128], cfg, progress=False)
    lb = train_classifier(b, x[:128], y[:128], cfg, progress=False)
    assert la == lb
    np.testing.assert_array_equal(predict(a, x[:16]), predict(b, x[:16]))
