"""Offline side of neural-fingerprint attack detection (Fisher, Shahar & Resheff, 2024).

Data, classifier, attacks and activation capture; the stages write one output folder
(see :mod:`export.workspace`). The short way in for your own model::

    from export import capture_activations
    acts, layout = capture_activations(model, images, ["fc1", "fc2:input"])
"""
from export.activations import ActivationLayout, LayerSlice, capture_activations, default_layers
from export.attacks import AttackSpec, attack_defaults, attack_into_classes, run_attack
from export.datasets import Dataset, Splits, load_dataset, split_dataset
from export.models import ClassifierSpec, load_checkpoint, load_weights
from export.training import TrainingConfig, train_classifier

__all__ = [
    "ActivationLayout", "AttackSpec", "ClassifierSpec", "Dataset", "LayerSlice", "Splits", "TrainingConfig",
    "attack_defaults", "attack_into_classes", "capture_activations", "default_layers", "load_checkpoint",
    "load_dataset", "load_weights", "run_attack", "split_dataset", "train_classifier",
]
