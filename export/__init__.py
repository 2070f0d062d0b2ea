"""Offline side of neural-fingerprint attack detection (Fisher, Shahar & Resheff, 2024).

Data, classifier, attacks and activation capture; the stages write one output folder
(see :mod:`export.workspace`). The short way in for your own model::

    from export import fit_detector
    detector, layout = fit_detector(model, images, labels, calibration_images)
"""
from importlib import import_module

# Imported on first use (PEP 562), so that torch-free parts (``nfp predict``, the repository writer,
# the command line's parser) do not load torch through this package.
_EXPORTS = {
    "ActivationLayout": "export.activations", "LayerSlice": "export.activations",
    "capture_activations": "export.activations", "default_layers": "export.activations",
    "fit_detector": "export.fit",
    "AttackSpec": "export.attacks", "parse_attack": "export.attacks", "attack_defaults": "export.attacks", "attack_into_classes": "export.attacks",
    "run_attack": "export.attacks",
    "Dataset": "export.datasets", "Splits": "export.datasets", "load_dataset": "export.datasets",
    "split_dataset": "export.datasets",
    "ClassifierSpec": "export.models", "default_spec": "export.models", "load_checkpoint": "export.models", "load_weights": "export.models",
    "TrainingConfig": "export.training", "train_classifier": "export.training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
