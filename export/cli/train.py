"""``nfp train``: train the classifier on the fit split, or load your model's weights."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_onnx_model, add_out, add_quiet, json_object

HELP = "train the classifier on the fit split, or load your model's weights"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from export.models.training import TrainingConfig

    d = TrainingConfig()
    p.add_argument("--factory", help="your model: 'package.module:function' returning an nn.Module that maps "
                                     "(B, C, H, W) images in [0, 1] to logits (default: the built-in small CNN)")
    p.add_argument("--factory-kwargs", type=json_object, default={},
                   help="keyword arguments for --factory, a JSON object, e.g. '{\"width\": 2}'")
    p.add_argument("--weights", type=Path, help="a state_dict for the model: load it instead of training")
    p.add_argument("--pretrained", action="store_true",
                   help="the factory returns a trained model (e.g. --factory efficientnet-lite0): use it as is")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (default: %(default)s)")
    p.add_argument("--train-seed", type=int, default=d.seed, help="seed of initialisation and batches (default: %(default)s)")
    p.add_argument("--adversarial-eps", type=float, default=d.adversarial_eps,
                   help="then PGD adversarial training at this L-inf budget (ART's AdversarialTrainerMadryPGD), "
                        "for a robust classifier; 0 = none (default: %(default)s)")
    p.add_argument("--adversarial-epochs", type=int, default=d.adversarial_epochs,
                   help="epochs of adversarial training (default: %(default)s)")
    add_onnx_model(p)


OPTIONS = (add_out, add_quiet, add_arguments,)


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp train`` reads: its options."""

    out: Path
    factory: str | None
    factory_kwargs: dict
    weights: Path | None
    pretrained: bool
    epochs: int
    batch_size: int
    lr: float
    train_seed: int
    adversarial_eps: float
    adversarial_epochs: int
    onnx_model: Path | None
    logits: str | None
    input_scale: float | None


def run(cfg: Config, ws, progress: bool) -> dict:
    from export.pipeline import stages as pipeline
    from export.models.training import TrainingConfig

    if cfg.onnx_model:
        from export.models.onnx_import import import_model

        return import_model(ws, cfg.onnx_model, cfg.logits, cfg.input_scale)

    config = TrainingConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.lr, seed=cfg.train_seed,
                            adversarial_eps=cfg.adversarial_eps, adversarial_epochs=cfg.adversarial_epochs)
    return pipeline.train(ws, config, cfg.factory, cfg.factory_kwargs, cfg.weights, progress, cfg.pretrained)
