import numpy as np
import torch

from export.models.classifier import default_spec, predict
from export.models.training import TrainingConfig, train_classifier


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


def test_adversarial_training_makes_the_model_harder_to_attack(mnist_subset, small_model):
    """ART's Madry PGD training: after it, PGD at the trained budget fools the model on fewer images."""
    import copy

    from export.attacks.art_attacks import ATTACK_DEFAULTS, AttackSpec, run_attack
    from export.models.training import adversarial_training

    x, y = mnist_subset
    robust = copy.deepcopy(small_model)
    adversarial_training(robust, x, y, TrainingConfig(adversarial_eps=0.1, adversarial_epochs=3, seed=0), progress=False)
    pgd = AttackSpec.from_defaults("pgd", ATTACK_DEFAULTS["mnist"], eps=0.1)
    fooled = [run_attack(pgd, m, x[:200], y[:200], np.arange(200), 10, progress=False).success.mean()
              for m in (small_model, robust)]
    assert fooled[1] <= 0.6 * fooled[0], fooled  # measured: 0.25 of the plain model, 0.11 after
