import numpy as np
import pytest

from export.attacks.art_attacks import BankAttacks, ATTACK_DEFAULTS, AttackSpec, attack_into_classes, parse_attack, run_attack
from export.models.classifier import predict
from kernels.errors import InvalidInputError

MNIST = ATTACK_DEFAULTS["mnist"]


def test_attack_spec_records_every_parameter_passed_to_art():
    spec = parse_attack("pgd:eps=0.1", MNIST)
    assert spec.params == {"eps": 0.1, "eps_step": pytest.approx(0.01), "max_iter": MNIST.max_iter}
    assert spec.label == "pgd_eps0.1" and not spec.targeted
    assert parse_attack("pgd-targeted", MNIST).targeted


def test_unknown_attacks_and_parameters_are_refused():
    with pytest.raises(InvalidInputError, match="unknown attack 'jsma'"):
        parse_attack("jsma", MNIST)
    with pytest.raises(InvalidInputError, match="no parameter"):
        parse_attack("deepfool:eps=0.1", MNIST)
    with pytest.raises(InvalidInputError, match="class name of an ART evasion attack"):
        parse_attack("Classifier:eps=0.1", MNIST)  # not an evasion attack


def test_any_art_evasion_attack_is_taken_by_class_name_with_its_parameters(small_model, mnist_subset):
    """A black-box attack the project has no short name for: ART's SquareAttack, parameters passed on."""
    spec = parse_attack("SquareAttack:eps=0.3,max_iter=30,nb_restarts=1", MNIST)
    assert spec.params == {"eps": 0.3, "max_iter": 30, "nb_restarts": 1} and spec.label == "SquareAttack_eps0.3"
    x, y = mnist_subset[0][:12], mnist_subset[1][:12]
    r = run_attack(spec, small_model, x, y, np.arange(12), 10, progress=False)
    np.testing.assert_array_equal(r.success, predict(small_model, r.x_adv).argmax(1) != y)
    assert r.success.any() and r.linf.max() <= 0.3 + 1e-5
    with pytest.raises(InvalidInputError, match="SquareAttack.*unexpected keyword argument 'no_such'"):
        run_attack(parse_attack("SquareAttack:no_such=1", MNIST), small_model, x, y, np.arange(12), 10, progress=False)


def test_untargeted_pgd_success_is_counted_from_the_models_own_predictions(small_model, mnist_subset):
    x, y = mnist_subset[0][:40], mnist_subset[1][:40]
    spec = AttackSpec.from_defaults("pgd", MNIST, eps=0.3)
    r = run_attack(spec, small_model, x, y, np.arange(40), 10, progress=False)
    pred = predict(small_model, r.x_adv).argmax(1)
    np.testing.assert_array_equal(r.success, pred != y)
    assert r.success.mean() > 0.9
    assert r.linf.max() <= 0.3 + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1


def test_training_attacks_push_other_classes_into_each_focal_class(small_model, mnist_subset):
    x, y = mnist_subset
    results = attack_into_classes(small_model, x, y, np.arange(len(y)), 10, BankAttacks(MNIST, per_class=4),
                                  progress=False)
    tried = np.concatenate([r.target for r in results])
    assert set(tried.tolist()) == set(range(10))
    for r in results:
        assert (r.true_label != r.target).all(), "only images of other classes are attacked into a class"
        np.testing.assert_array_equal(r.success, predict(small_model, r.x_adv).argmax(1) == r.target)
    ok = sum(int(r.success.sum()) for r in results)
    assert ok >= 30  # of 40: weak models are easy to push
