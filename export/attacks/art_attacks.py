"""Adversarial attacks from the Adversarial Robustness Toolbox (ART), for training and evaluation.

Two uses, as in Fisher, Shahar & Resheff (2024), "Neural Fingerprints for Adversarial Attack Detection":

- **Fingerprint training data** (:func:`attack_into_classes`): for each focal class ``c``, images of
  the other classes attacked with a *targeted* L-inf attack (iterative FGSM = ART's
  ``BasicIterativeMethod``, and PGD) so that the model predicts ``c``. Only successful attacks count.
- **Evaluation** (:func:`run_attack`): FGSM, BIM, PGD, CW-L2 and DeepFool (untargeted) and targeted
  PGD, on the test split, each with its parameters recorded beside its results.

Attack hyper-parameters have one home, :data:`ATTACK_DEFAULTS`, keyed by data set.
All attacks take and return ``(N, C, H, W) float32`` images in ``[0, 1]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kernels.errors import InvalidInputError

ATTACK_NAMES = ("fgsm", "bim", "pgd", "pgd-targeted", "cw-l2", "deepfool")
LINF_ATTACKS = ("fgsm", "bim", "pgd", "pgd-targeted")
TRAINING_METHODS = ("bim", "pgd")


@dataclass(frozen=True)
class AttackDefaults:
    """Per-data-set attack parameters.

    Attributes:
        eps: L-inf budget of the evaluation attacks.
        eps_step: step of the iterative L-inf attacks, as a fraction of their ``eps``.
        max_iter: iterations of the iterative L-inf attacks.
        train_eps: the ladder of L-inf budgets of the fingerprint-training attacks
            (see :func:`attack_into_classes`).
        sweep_eps: L-inf budgets of the default evaluation suite (:func:`evaluation_suite`).
        cw: parameters of ART's ``CarliniL2Method``.
        deepfool: parameters of ART's ``DeepFool``.
    """

    eps: float
    eps_step: float = 0.1
    max_iter: int = 40
    train_eps: tuple[float, ...] = ()
    sweep_eps: tuple[float, ...] = ()
    cw: dict[str, Any] = field(default_factory=lambda: {
        "confidence": 0.0, "learning_rate": 0.1, "binary_search_steps": 5, "max_iter": 20, "initial_const": 0.1})
    deepfool: dict[str, Any] = field(default_factory=lambda: {"max_iter": 50, "epsilon": 0.02})


# MNIST's customary budget is 0.3 (Madry et al., 2018); Fashion-MNIST is usually attacked at 0.1;
# natural images at 8/255.
ATTACK_DEFAULTS: dict[str, AttackDefaults] = {
    "mnist": AttackDefaults(eps=0.3, train_eps=(0.2, 0.3),  # targeted eps 0.1 succeeded on 4%
                            sweep_eps=(0.05, 0.1, 0.2, 0.3)),
    "fashion-mnist": AttackDefaults(eps=0.1, train_eps=(0.05, 0.1, 0.2), sweep_eps=(0.02, 0.05, 0.1, 0.2)),
    "default": AttackDefaults(eps=8 / 255, max_iter=10, eps_step=0.25, train_eps=(4 / 255, 8 / 255),
                              sweep_eps=(2 / 255, 4 / 255, 8 / 255)),
}


def evaluation_suite(defaults: AttackDefaults) -> list[str]:
    """Every L-inf attack at every budget of ``sweep_eps``, then CW-L2 at confidence 0, 5 and 10 (past
    the decision boundary by that logit margin, where a margin test stops helping) and DeepFool."""
    return ([f"{name}:eps={eps:g}" for eps in defaults.sweep_eps for name in LINF_ATTACKS]
            + ["cw-l2", "cw-l2:confidence=5", "cw-l2:confidence=10", "deepfool"])


def attack_defaults(dataset: str) -> AttackDefaults:
    """Attack parameters for a data-set name; other data (folders, .npz) get the natural-image ones."""
    return ATTACK_DEFAULTS.get(dataset, ATTACK_DEFAULTS["default"])


@dataclass(frozen=True)
class AttackSpec:
    """One configured attack: its name and every parameter passed to ART.

    Build with :meth:`from_defaults`; ``params`` is what the report records beside the results.
    """

    name: str
    params: dict[str, Any]

    def __post_init__(self) -> None:
        if self.name not in ATTACK_NAMES:
            art_attack_class(self.name)  # any ART evasion attack by its class name

    @property
    def targeted(self) -> bool:
        return self.name == "pgd-targeted" or bool(self.params.get("targeted", False))

    @property
    def label(self) -> str:
        """A file-name-safe identifier, e.g. ``pgd-targeted_eps0.1``, ``cw-l2_conf5``."""
        if "eps" in self.params:
            return f"{self.name}_eps{self.params['eps']:g}"
        if self.params.get("confidence"):
            return f"{self.name}_conf{self.params['confidence']:g}"
        return self.name

    @classmethod
    def from_defaults(cls, name: str, defaults: AttackDefaults, **overrides: Any) -> "AttackSpec":
        if name not in ATTACK_NAMES:  # an ART class: its own defaults, the parameters given
            art_attack_class(name)
            return cls(name, dict(overrides))
        if name in LINF_ATTACKS:
            eps = float(overrides.pop("eps", defaults.eps))
            params: dict[str, Any] = {"eps": eps}
            if name != "fgsm":
                params.update(eps_step=eps * defaults.eps_step, max_iter=defaults.max_iter)
            if name == "pgd-targeted":
                params["targeted"] = True
        elif name == "cw-l2":
            params = dict(defaults.cw)
        else:
            params = dict(defaults.deepfool)
        unknown = set(overrides) - set(params) - {"targeted"}
        if unknown:
            raise InvalidInputError(f"attack {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(params)}")
        params.update(overrides)
        return cls(name, params)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def art_attack_class(name: str):
    """The ART evasion attack class called ``name`` (e.g. ``SquareAttack``, ``HopSkipJump``,
    ``ElasticNet``); the error lists the project's short names and says where ART's are."""
    import art.attacks.evasion as evasion
    from art.attacks.attack import EvasionAttack

    cls = getattr(evasion, name, None)
    if not (isinstance(cls, type) and issubclass(cls, EvasionAttack)):
        raise InvalidInputError(f"unknown attack {name!r}: give one of {', '.join(ATTACK_NAMES)} or the class name "
                                f"of an ART evasion attack (art.attacks.evasion), e.g. SquareAttack")
    return cls


def _literal(value: str):
    """A command-line parameter value: a number, True/False/None, a tuple, or else the string."""
    import ast

    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_attack(text: str, defaults: AttackDefaults) -> AttackSpec:
    """Parse a command-line attack, ``name`` or ``name:key=value,key=value`` (e.g. ``pgd:eps=0.1``);
    ``name`` is a short name of :data:`ATTACK_NAMES` or the class name of any ART evasion attack
    (``SquareAttack:eps=0.3,max_iter=200``), whose parameters go to its constructor as given."""
    name, _, rest = text.partition(":")
    known = AttackSpec.from_defaults(name.strip(), defaults).params
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise InvalidInputError(f"attack option {item!r} in {text!r} is not key=value")
        if key not in known:
            overrides[key] = _literal(value)
            continue
        kind = type(known[key])
        try:
            overrides[key] = kind(value)
        except ValueError:
            raise InvalidInputError(f"attack option {key}={value!r}: expected {kind.__name__}") from None
    return AttackSpec.from_defaults(name.strip(), defaults, **overrides)


def art_classifier(model: nn.Module, input_shape: tuple[int, ...], num_classes: int):
    """Wrap a logits-returning model for ART, with inputs clipped to [0, 1]."""
    from art.estimators.classification import PyTorchClassifier

    model.eval()
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=num_classes, clip_values=(0.0, 1.0), device_type=device_type(model))


def device_type(model: nn.Module) -> str:
    """ART's name of the device ``model`` lives on: ``"gpu"`` for a CUDA model, else ``"cpu"``."""
    param = next(model.parameters(), None)
    return "gpu" if param is not None and param.is_cuda else "cpu"


def make_art_attack(spec: AttackSpec, classifier, batch_size: int = 128, progress: bool = False):
    """Instantiate the ART attack described by ``spec``."""
    try:
        return _make_art_attack(spec, classifier, batch_size, progress)
    except ValueError as e:  # ART validates its parameters with ValueError
        raise InvalidInputError(f"attack {spec.label} {spec.params}: {e}") from e


def _make_art_attack(spec: AttackSpec, classifier, batch_size: int, progress: bool):
    from art.attacks.evasion import (
        BasicIterativeMethod,
        CarliniL2Method,
        DeepFool,
        FastGradientMethod,
        ProjectedGradientDescent,
    )

    p = dict(spec.params)
    if spec.name not in ATTACK_NAMES:
        import inspect

        cls = art_attack_class(spec.name)
        accepted = inspect.signature(cls.__init__).parameters
        extra = {k: v for k, v in (("batch_size", batch_size), ("verbose", progress)) if k in accepted and k not in p}
        try:
            return cls(classifier, **p, **extra)
        except TypeError as e:  # a parameter the class does not take
            raise InvalidInputError(f"attack {spec.name}: {e}") from None
    if spec.name == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=p["eps"], targeted=spec.targeted, batch_size=batch_size)
    if spec.name == "bim":
        return BasicIterativeMethod(classifier, eps=p["eps"], eps_step=p["eps_step"], max_iter=p["max_iter"],
                                    targeted=spec.targeted, batch_size=batch_size, verbose=progress)
    if spec.name in ("pgd", "pgd-targeted"):
        return ProjectedGradientDescent(classifier, norm=np.inf, eps=p["eps"], eps_step=p["eps_step"],
                                        max_iter=p["max_iter"], targeted=spec.targeted, num_random_init=1,
                                        batch_size=batch_size, verbose=progress)
    if spec.name == "cw-l2":
        return CarliniL2Method(classifier, targeted=spec.targeted, batch_size=batch_size, verbose=progress,
                               **{k: p[k] for k in ("confidence", "learning_rate", "binary_search_steps",
                                                    "max_iter", "initial_const")})
    return DeepFool(classifier, max_iter=p["max_iter"], epsilon=p["epsilon"], nb_grads=classifier.nb_classes,
                    batch_size=batch_size, verbose=progress)


@dataclass(frozen=True)
class AttackResult:
    """Images attacked by one :class:`AttackSpec`.

    Attributes:
        spec: the attack and its parameters.
        x_adv: ``(N, C, H, W) float32`` attacked images.
        source: ``(N,) int64`` dataset indices of the images attacked.
        true_label: ``(N,) int64`` their labels.
        target: ``(N,) int64`` class aimed at (targeted attacks) or -1.
        adv_label: ``(N,) int64`` the model's prediction on ``x_adv``.
        success: ``(N,) bool``: reaches the target, or (untargeted) leaves the true label.
        linf, l2: ``(N,) float32`` size of each perturbation.
    """

    spec: AttackSpec
    x_adv: np.ndarray
    source: np.ndarray
    true_label: np.ndarray
    target: np.ndarray
    adv_label: np.ndarray
    success: np.ndarray
    linf: np.ndarray
    l2: np.ndarray

    def summary(self) -> dict[str, Any]:
        ok = self.success
        return {"attack": self.spec.label, "params": self.spec.params, "attempted": int(len(ok)),
                "successful": int(ok.sum()), "success_rate": round(float(ok.mean()), 4),
                "mean_linf_successful": round(float(self.linf[ok].mean()), 4) if ok.any() else None,
                "mean_l2_successful": round(float(self.l2[ok].mean()), 4) if ok.any() else None}


def _predict(classifier, x: np.ndarray) -> np.ndarray:
    return classifier.predict(x, batch_size=512).argmax(1).astype(np.int64)


def run_attack(spec: AttackSpec, model: nn.Module, x: np.ndarray, y: np.ndarray, source: np.ndarray,
               num_classes: int, seed: int = 0, target: np.ndarray | None = None,
               progress: bool = True) -> AttackResult:
    """Attack images ``x`` with true labels ``y``; targeted attacks aim at ``target`` or, if not given,
    at a seeded random class other than the true one."""
    if len(x) == 0:
        raise InvalidInputError(f"{spec.label}: no images to attack")
    torch.manual_seed(seed)
    np.random.seed(seed)  # ART draws PGD's random start from NumPy's global generator
    clf = art_classifier(model, x.shape[1:], num_classes)
    if spec.targeted:
        if target is None:
            rng = np.random.default_rng(seed)
            target = (y + rng.integers(1, num_classes, size=len(y))) % num_classes
        labels = np.eye(num_classes, dtype=np.float32)[target]
    else:
        target = np.full(len(y), -1, dtype=np.int64)
        labels = np.eye(num_classes, dtype=np.float32)[y]
    x_adv = make_art_attack(spec, clf, progress=progress).generate(x=x, y=labels).astype(np.float32)
    adv = _predict(clf, x_adv)
    success = adv == target if spec.targeted else adv != y
    delta = (x_adv - x).reshape(len(x), -1)
    return AttackResult(spec, x_adv, np.asarray(source, np.int64), np.asarray(y, np.int64),
                        np.asarray(target, np.int64), adv, success,
                        np.abs(delta).max(1), np.linalg.norm(delta, axis=1).astype(np.float32))


@dataclass(frozen=True)
class BankAttacks:
    """What :func:`attack_into_classes` runs: the budgets (``defaults.train_eps``), the images attacked
    into each focal class, the seed, and the focal classes (default: every class present)."""

    defaults: AttackDefaults
    per_class: int = 200
    seed: int = 0
    into: Sequence[int] | None = None


def attack_into_classes(model: nn.Module, x: np.ndarray, y: np.ndarray, source: np.ndarray, num_classes: int,
                        plan: BankAttacks, progress: bool = True) -> list[AttackResult]:
    """Targeted L-inf attacks that push images of other classes into each focal class.

    For every focal class ``c`` (each class present in ``y``, or those of ``plan.into``), ``per_class`` images
    are drawn (seeded)
    from the other classes and
    split between the methods of :data:`TRAINING_METHODS`. Each image is attacked towards ``c`` at
    the smallest budget of ``defaults.train_eps`` first; the ones that do not reach ``c`` are attacked
    again at the next budget, until the model predicts ``c`` or the budgets run out. So the bank sees
    attacks just strong enough to succeed, weak ones included. Pass only correctly classified images.

    Returns one :class:`AttackResult` per (method, budget) rung; ``target`` holds the focal class. An
    image appears once per rung it was tried at, successful at most at its last one.
    """
    defaults, per_class, seed, into = plan.defaults, plan.per_class, plan.seed, plan.into
    if per_class < 1:
        raise InvalidInputError(f"per_class must be at least 1, got {per_class}")
    if not defaults.train_eps:
        raise InvalidInputError("no training budgets (train_eps) given")
    rng = np.random.default_rng(seed)
    chosen, focal = [], []
    for c in np.unique(y) if into is None else into:  # a 1,000-class model with images of a few classes: those few
        others = np.flatnonzero(y != c)
        if len(others) == 0:
            raise InvalidInputError(f"no images outside class {c} to attack into it")
        pick = rng.choice(others, size=min(per_class, len(others)), replace=False)
        chosen.append(pick)
        focal.append(np.full(len(pick), c, dtype=np.int64))
    rows, targets = np.concatenate(chosen), np.concatenate(focal)
    method_of = rng.permutation(np.arange(len(rows)) % len(TRAINING_METHODS))
    results = []
    for m, method in enumerate(TRAINING_METHODS):
        pending = np.flatnonzero(method_of == m)
        for rung, eps in enumerate(sorted(defaults.train_eps)):
            if len(pending) == 0:
                break
            spec = AttackSpec.from_defaults(method, defaults, eps=eps, targeted=True)
            r = rows[pending]
            result = run_attack(spec, model, x[r], y[r], source[r], num_classes, seed=seed + 100 * m + rung,
                                target=targets[pending], progress=progress)
            results.append(result)
            pending = pending[~result.success]
    return results


def merge_results(results: list[AttackResult]) -> dict[str, np.ndarray]:
    """Concatenate attack results into arrays for an ``.npz`` (method index into ``specs``)."""
    return {
        "x_adv": np.concatenate([r.x_adv for r in results]),
        "source": np.concatenate([r.source for r in results]),
        "true_label": np.concatenate([r.true_label for r in results]),
        "target": np.concatenate([r.target for r in results]),
        "adv_label": np.concatenate([r.adv_label for r in results]),
        "success": np.concatenate([r.success for r in results]),
        "linf": np.concatenate([r.linf for r in results]),
        "l2": np.concatenate([r.l2 for r in results]),
        "spec_index": np.concatenate([np.full(len(r.success), i, np.int64) for i, r in enumerate(results)]),
    }


DEFAULT_TRAIN_PER_CLASS = 300   # attacked images pushed into each focal class
