"""Offline side of neural-fingerprint attack detection (Fisher, Shahar & Resheff, 2024).

Data, classifier, attacks and activation capture; the stages write one output folder
(see :mod:`export.data.workspace`). The short way in for your own model::

    from export import fit_detector
    detector, layout = fit_detector(model, images, labels, calibration_images)
"""
from importlib import import_module

# Imported on first use (PEP 562), so that torch-free parts (``nfp predict``, the repository writer,
# the command line's parser) do not load torch through this package.
_EXPORTS = {
    "ActivationLayout": "export.models.activations", "LayerSlice": "export.models.activations",
    "capture_activations": "export.models.activations", "default_layers": "export.models.activations",
    "fit_detector": "export.bank.fit", "FitConfig": "export.bank.fit",
    "AttackSpec": "export.attacks.art_attacks", "parse_attack": "export.attacks.art_attacks", "attack_defaults": "export.attacks.art_attacks", "attack_into_classes": "export.attacks.art_attacks",
    "run_attack": "export.attacks.art_attacks",
    "Dataset": "export.data.datasets", "Splits": "export.data.datasets", "load_dataset": "export.data.datasets",
    "split_dataset": "export.data.datasets",
    "ClassifierSpec": "export.models.classifier", "default_spec": "export.models.classifier", "load_checkpoint": "export.models.classifier", "load_weights": "export.models.classifier",
    "TrainingConfig": "export.models.training", "train_classifier": "export.models.training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
