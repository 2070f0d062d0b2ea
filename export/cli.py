"""``nfp``: the offline pipeline of neural-fingerprint attack detection, one sub-command per stage.

Every stage reads and writes one output folder (``--out``) and records what it did in
``<out>/manifest.json``. ``nfp pipeline`` runs all stages on the embedded default (MNIST-5k).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kernels.errors import FingerprintError

DEFAULT_OUT = Path("runs/default")


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder of the pipeline (default: %(default)s)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (for serve: no server log)")


def json_object(text: str) -> dict:
    """argparse type of ``--factory-kwargs``: a JSON object, with the parser's error named."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"width\": 2}}', got {text!r}")
    return value


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist",
                   help="'mnist' (5,000 images, embedded), 'fashion-mnist' (Debian package dataset-fashion-mnist), "
                        "a folder with one sub-folder of images per class, or an .npz with x and y (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default: %(default)s)")
    p.add_argument("--num-classes", type=int,
                   help="the model's class count when it exceeds the folder's (sub-folders then named by class "
                        "index, e.g. 285/ and 967/ for an ImageNet model)")
    p.add_argument("--fractions", type=float, nargs=3, metavar=("FIT", "CAL", "TEST"), default=(0.6, 0.2, 0.2),
                   help="shares of the fit, calibration and test splits (default: 0.6 0.2 0.2)")
    p.add_argument("--images-per-class", type=int,
                   help="a seeded subset of this many images per class, e.g. 500 for a 5,000-image Fashion-MNIST "
                        "(default: every image)")


def _add_train(p: argparse.ArgumentParser) -> None:
    from export.training import TrainingConfig

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
    _add_onnx_model(p)


def _add_attack(p: argparse.ArgumentParser) -> None:
    from export.attacks import ATTACK_DEFAULTS, ATTACK_NAMES
    from export.pipeline import DEFAULT_EVAL_COUNT, DEFAULT_TRAIN_PER_CLASS

    p.add_argument("--per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                   help="images of other classes attacked into each focal class for the bank (default: %(default)s)")
    p.add_argument("--eval-attacks", nargs="+", metavar="ATTACK",
                   help="evaluation attacks, each 'name' or 'name:key=value,...', e.g. 'pgd:eps=0.1' "
                        f"(names: {', '.join(ATTACK_NAMES)}; default: every L-inf attack over the data set's "
                        "budget sweep, then cw-l2 and deepfool)")
    p.add_argument("--eval-count", type=int, default=DEFAULT_EVAL_COUNT,
                   help="test images attacked by each evaluation attack (default: %(default)s)")
    p.add_argument("--attack-seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--train-eps", type=float, nargs="+", metavar="EPS",
                   help="the bank's targeted attacks: the L-inf budgets tried in turn, each image moving to the next "
                        "only if the last failed (default: the profile's, 0.2 0.3 for MNIST; raise for robust models)")
    p.add_argument("--train-max-iter", type=int,
                   help="steps of those attacks (default: the profile's, 40)")
    p.add_argument("--attack-profile", choices=sorted(ATTACK_DEFAULTS),
                   help="which data set's attack defaults to use (default: the data set's own; 'default' for "
                        "folders and .npz files: natural images, eps 8/255)")


def _add_capture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", metavar="LAYER",
                   help="module names to capture, 'name' for its output or 'name:input' for its input; for a model "
                        "trained with --onnx-model, graph tensor names (`nfp layers`) (default: outputs of the last "
                        "four linear/conv layers, i.e. pre-activation values)")
    p.add_argument("--capture-batch-size", type=int, default=256, help="(default: %(default)s)")


def _add_search(p: argparse.ArgumentParser) -> None:
    from kernels.fingerprint_search import SearchConfig

    d = SearchConfig()
    p.add_argument("--k", type=int, nargs="+", default=list(d.k),
                   help="neurons per fingerprint; several sizes mix (default: %(default)s; the paper: 50)")
    p.add_argument("--candidates", type=int, default=d.candidates, help="candidates tried per class (default: %(default)s)")
    p.add_argument("--p-max", type=float, default=d.p_max, help="Welch t-test p-value bound (default: %(default)s)")
    p.add_argument("--d-min", type=float, default=d.d_min, help="|Cohen's d| bound (default: %(default)s)")
    p.add_argument("--keep", type=int, default=d.keep, help="fingerprints kept per class (default: %(default)s)")
    p.add_argument("--search-method", choices=["auto", "covariance", "gather"], default=d.method,
                   help="how subset statistics are computed (default: %(default)s)")
    p.add_argument("--search-seed", type=int, default=d.seed,
                   help="seed of the candidates; a secret one keeps a 5-neuron bank secret, not a 1-neuron one "
                        "(README, white-box section) (default: %(default)s)")
    p.add_argument("--max-correlation", type=float,
                   help="keep each class's fingerprints apart: strongest first, layers in turn, |r| on attacked "
                        "data at most this (0.5 measured best against the adaptive attacker; default: off)")


def _add_harden(p: argparse.ArgumentParser) -> None:
    from export.defences import Hardening

    d = Hardening()
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="at most this many attack-and-search rounds (default: %(default)s)")
    p.add_argument("--count", type=int, default=d.count, help="fit images attacked per round (default: %(default)s)")
    p.add_argument("--eps", type=float, nargs="+", default=list(d.eps),
                   help="L-inf budgets attacked in every round (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="PGD steps per attack run (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=d.min_gain,
                   help="stop once a round lowers the attacker's mean pass probability by less than this "
                        "(default: %(default)s)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate the attacked detector is calibrated at (default: %(default)s)")
    p.add_argument("--harden-seed", type=int, default=2,
                   help="seed of the fit images chosen, the attacks' random starts and the calibration's draws "
                        "(default: %(default)s)")


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    from kernels.detector import DEFAULT_CALIBRATION_REPEATS, DEFAULT_M
    from kernels.calibration import DEFAULT_FPRS

    p.add_argument("--m", type=int, default=DEFAULT_M, help="fingerprints drawn per input (default: %(default)s)")
    p.add_argument("--fprs", type=float, nargs="+", default=list(DEFAULT_FPRS),
                   help="false-positive rates to calibrate (default: %(default)s)")
    p.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the split of the calibration images and of the draws while calibrating "
                        "(default: %(default)s)")
    p.add_argument("--calibration-repeats", type=int, default=DEFAULT_CALIBRATION_REPEATS,
                   help="independent draws per image of the reference half of the calibration split, pooled "
                        "(default: %(default)s)")
    p.add_argument("--confidence", type=float, default=None,
                   help="make the realized clean FPR stay at or below each nominal rate with this probability "
                        "over calibration draws (e.g. 0.95; costs detection; needs more calibration images, see "
                        "the README), instead of only the expected FPR (default: expected FPR <= nominal)")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the draws on the test split (default: %(default)s)")
    p.add_argument("--spread-draws", type=int, default=100,
                   help="independent draws for the spread of TPR at the lowest calibrated FPR (default: %(default)s)")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: %(default)s)")
    p.add_argument("--parity-count", type=int, default=256,
                   help="test images of the onnxruntime-vs-torch parity check (default: %(default)s)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the pip-installed server (Python backend only); gpu: NVIDIA's Triton container "
                        "(default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--http-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--metrics-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--write-only", action="store_true", help="write <out>/repository/<profile> and exit")
    p.add_argument("--fused", action="store_true",
                   help="also serve guarded_classifier_fused: classifier and detector in one Python step, same "
                        "inputs and outputs as the ensemble, less added latency (cpu profile)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="calibrated false-positive rate that decides is_attacked (default: %(default)s)")
    p.add_argument("--queue-delay-us", type=int, default=0, help="dynamic-batching delay per model (default: 0)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (default: 1)")
    p.add_argument("--signing-key", type=Path,
                   help="private key that signs every model folder; the server gets its public.pem beside it and "
                        "loads signed, unchanged models only (default: <out>/signing/private.pem, created if "
                        "missing; keep it off the serving machine)")
    p.add_argument("--audit", action="store_true",
                   help="also answer each request's draws (fingerprint_ids); off by default, the draws are the "
                        "detector's secret")
    _add_admin_key(p, "the key the server requires (header nfp-admin-key) for its restricted protocols: model "
                      "control, shared memory, statistics, trace, logging (default: $NFP_ADMIN_KEY, else a fresh "
                      "random key, printed)")


def _add_admin_key(p: argparse.ArgumentParser, help_text: str) -> None:
    import os

    p.add_argument("--admin-key", default=os.environ.get("NFP_ADMIN_KEY"), help=help_text)


def _add_rotate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="which written repository, <out>/repository/<profile>, gets the new version (default: %(default)s)")
    p.add_argument("--url", help="HOST:PORT of the server serving that repository: load the new version there "
                                 "(without it: write and sign only)")
    _add_admin_key(p, "the server's admin key, as `nfp serve` printed it (default: $NFP_ADMIN_KEY)")
    p.add_argument("--signing-key", type=Path,
                   help="private key that signed the repository (default: <out>/signing/private.pem)")
    p.add_argument("--seed", type=int,
                   help="the new search's seed, for reproducible tests only (default: a secret one from OS entropy)")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="image files (resized to the served shape) or .npz files")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (default: %(default)s)")
    p.add_argument("--model", default="guarded_classifier",
                   help="guarded_classifier (the ensemble) or guarded_classifier_fused (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server (default: %(default)s)")


def _add_drift(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/default"),
                   help="pipeline output folder whose bank is served (default: %(default)s)")
    p.add_argument("--bank", type=Path, default=None,
                   help="the served bank folder instead, e.g. a rotated version's <repository>/<model>/<version>/bank "
                        "(default: <out>/bank)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics",
                   help="Triton's metrics endpoint (default: %(default)s)")
    p.add_argument("--model", default="fingerprint_detector",
                   help="the detecting model: fingerprint_detector (the ensemble's step) or guarded_classifier_fused "
                        "(default: %(default)s)")
    p.add_argument("--window", type=float, default=300.0,
                   help="seconds of traffic to compare; 0: everything since the server started (default: %(default)s)")
    p.add_argument("--fpr", type=float, default=None,
                   help="the server's operating false-positive rate (default: the lowest calibrated)")
    p.add_argument("--alpha", type=float, default=0.01,
                   help="significance level of both tests; the exit status is 1 when either rejects "
                        "(default: %(default)s)")
    p.add_argument("--predicted-class", type=int, default=None,
                   help="compare only inputs predicted as this class (default: all)")


def _add_whitebox(p: argparse.ArgumentParser) -> None:
    from export.adaptive_attack import AttackConfig
    from export.defences import DEFENCES, Hardening

    p.add_argument("--fpr", type=float, default=0.01,
                   help="operating false-positive rate; with --url the server's own (default: %(default)s)")
    p.add_argument("--whitebox-seed", type=int, default=2,
                   help="seed of the server replay's draws, the attacks' random starts and the defences' "
                        "calibration (default: %(default)s)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                   help="L-inf budgets of the strong attacker (default: %(default)s)")
    p.add_argument("--count", type=int, default=200,
                   help="correctly classified test images attacked (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="PGD steps per attack run (default: %(default)s)")
    a = AttackConfig(eps=0.3)
    p.add_argument("--weights", type=float, nargs="+", default=list(a.weights),
                   help="weights of the detector hinge, a run each (default: %(default)s)")
    p.add_argument("--temperatures", type=float, nargs="+", default=list(a.temperatures),
                   help="temperatures of the smoothed vote in z-units, a run each (default: %(default)s)")
    p.add_argument("--restarts", type=int, default=a.restarts,
                   help="random starts per weight and temperature (default: %(default)s)")
    p.add_argument("--untargeted-only", action="store_true",
                   help="skip the runs into every other class (the weaker attacker of earlier sessions)")
    p.add_argument("--send-at", type=float, default=0.5,
                   help="filter strategy: send an image when the attacker's exact pass probability is at "
                        "least this (default: %(default)s)")
    p.add_argument("--draws", type=int, default=20,
                   help="requests per attacked image, each with fresh server draws (default: %(default)s)")
    p.add_argument("--defences", nargs="+", default=["default"], choices=list(DEFENCES), metavar="NAME",
                   help="server detectors to attack: " + "; ".join(f"{k}: {v}" for k, v in DEFENCES.items())
                        + " (default: %(default)s)")
    h = Hardening()
    p.add_argument("--harden-rounds", type=int, default=h.rounds,
                   help="hardened defences: at most this many rounds of attacks on fit images, each followed by "
                        "a new search (default: %(default)s)")
    p.add_argument("--harden-count", type=int, default=h.count,
                   help="hardened defences: fit images attacked per round (default: %(default)s)")
    p.add_argument("--harden-steps", type=int, default=h.steps,
                   help="hardened defences: PGD steps per attack run (default: %(default)s)")
    p.add_argument("--url", help="attack a running Triton server at host:port (gRPC) instead of replaying it "
                                 "offline; m, bank and FPR are then the server's")
    p.add_argument("--model", default="guarded_classifier",
                   help="served model to attack with --url (default: %(default)s)")


def _add_synthetic(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-class", type=int, default=1000, help="fingerprints per class (default: %(default)s)")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fpr", type=float, default=0.01,
                   help="calibrated false-positive rate the demo's server flags at (default: %(default)s)")


# --- what each command runs: (args, workspace, progress) -> its part of the printed report --------------

def _prepare(args, ws, progress):
    from export import pipeline

    return pipeline.prepare(ws, args.dataset, args.seed, args.fractions, args.num_classes, args.images_per_class)


def _train(args, ws, progress):
    from export import pipeline
    from export.training import TrainingConfig

    if args.onnx_model:
        from export.onnx_model import import_model

        return import_model(ws, args.onnx_model, args.logits, args.input_scale)

    config = TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, seed=args.train_seed,
                            adversarial_eps=args.adversarial_eps, adversarial_epochs=args.adversarial_epochs)
    return pipeline.train(ws, config, args.factory, args.factory_kwargs, args.weights, progress, args.pretrained)


def _attack(args, ws, progress):
    from export import pipeline

    summary = pipeline.attack(ws, args.per_class, args.eval_attacks, args.eval_count, args.attack_seed, progress,
                              args.attack_profile, args.train_eps, args.train_max_iter)
    return {"train_successful_per_focal_class": summary["train"]["successful_per_focal_class"],
            "train_budgets": summary["train"]["budgets"],
            "classes_below_minimum (answered unchecked)": summary["train"]["classes_below_minimum"],
            "eval": {k: f"{v['successful']}/{v['attempted']} successful" for k, v in summary["eval"].items()}}


def _capture(args, ws, progress):
    from export import pipeline

    layout = pipeline.capture(ws, args.layers, args.capture_batch_size, progress)
    return {"layers": layout.layers, "num_neurons": layout.num_neurons}


def _harden(args, ws, progress):
    from export.defences import Hardening, harden_bank

    return harden_bank(ws, Hardening(args.rounds, args.count, tuple(args.eps), args.steps, args.min_gain), args.fpr, args.harden_seed,
                       progress)


def _search_config(args):
    from kernels.fingerprint_search import SearchConfig

    return SearchConfig(k=tuple(args.k), candidates=args.candidates, p_max=args.p_max, d_min=args.d_min,
                        keep=args.keep, method=args.search_method, seed=args.search_seed,
                        max_correlation=args.max_correlation)


def _search(args, ws, progress):
    from export import pipeline

    return pipeline.search(ws, _search_config(args), progress)


def _add_onnx_model(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--onnx-model", type=Path, required=required,
                   help="the classifier you already serve, a Triton model folder (config.pbtxt + <version>/model.onnx) "
                        "or an ONNX file: used as is instead of training, its input and outputs kept when served")
    p.add_argument("--logits", help="with --onnx-model: the output holding pre-softmax class scores (default: the first)")
    p.add_argument("--input-scale", type=float,
                   help="with --onnx-model: the input value of a white pixel (default: 255 for UINT8 inputs, else 1)")


def layers_table(args: argparse.Namespace) -> str:
    """``nfp layers``: the contract and the tensors of an ONNX model, the default layers marked."""
    from export.onnx_model import intermediate_tensors, proposed_layers, read_model

    onnx_path, contract = read_model(args.onnx_model, args.logits, args.input_scale)
    proposed = proposed_layers(onnx_path)
    rows = [f"| {'*' if t['name'] in proposed else ''} | `{t['name']}` | {t['op']} | {t['shape']} |"
            for t in intermediate_tensors(onnx_path)]
    return (json.dumps({"model": str(onnx_path), "contract": contract.to_json()}, indent=2)
            + "\n\n| default | tensor | operator | shape |\n|---|---|---|---|\n" + "\n".join(rows))


def _add_build_bank(p: argparse.ArgumentParser) -> None:
    from export.pipeline import DEFAULT_TRAIN_PER_CLASS

    p.add_argument("--per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                   help="fit images attacked into each focal class (default: %(default)s)")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of the attacks' images and starts (default: 0)")
    p.add_argument("--attack-profile", help="attack defaults (default: the data set's)")
    p.add_argument("--classes", type=int, nargs="+", help="build only these classes' shards (default: all)")
    p.add_argument("--workers", type=int,
                   help="CPUs of the local Ray cluster (default: all cores); 0: one process, no Ray")
    p.add_argument("--ray-address", help="HOST:PORT of a running Ray cluster to join instead (`ray start --head`)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose worker died (default: 3)")
    _add_search(p)


def _build_bank(args, ws, progress):
    from export.distributed import build_bank

    return build_bank(ws, args.per_class, args.attack_seed, _search_config(args), args.workers, args.ray_address,
                      classes=args.classes, profile=args.attack_profile, max_retries=args.max_retries,
                      progress=progress)


def _calibrate(args, ws, progress):
    from export import pipeline

    return pipeline.calibrate(ws, args.m, args.fprs, args.calibration_seed, args.calibration_repeats, progress,
                              args.confidence)


def _evaluate(args, ws, progress):
    from export import pipeline

    table = pipeline.evaluate(ws, args.eval_seed, args.spread_draws, progress)["table"]
    return {"report": f"{ws.root}/report/evaluation.md, evaluation.json, roc.png",
            "table": "Detection on the test split (fingerprint LRT beside the other scores and the gray-pixel "
                     "baseline):\n\n" + table}


def _export(args, ws, progress):
    from export import pipeline

    return pipeline.export_model(ws, args.parity_count, args.opset)


def _whitebox(args, ws, progress):
    from export.adaptive_attack import AttackConfig
    from export.defences import Hardening
    from export.whitebox import WhiteboxConfig, whitebox

    attack = AttackConfig(max(args.eps), weights=tuple(args.weights), temperatures=tuple(args.temperatures),
                          restarts=args.restarts, targeted=not args.untargeted_only)
    cfg = WhiteboxConfig(args.fpr, args.whitebox_seed, tuple(args.eps), args.count, args.steps, args.draws,
                         tuple(args.defences), attack, args.send_at,
                         Hardening(args.harden_rounds, args.harden_count, steps=args.harden_steps),
                         args.url, args.model)
    return {"table": whitebox(ws, cfg, progress)["table"]}


def _demo(args, ws, progress):
    from client.demo import format_report, run_demo
    from export.pipeline import demo_images
    from model_repository.server import TritonServer
    from model_repository.writer import ServingConfig, write_repository

    fpr = getattr(args, "fpr", 0.01)
    private, public = signing_keys(ws.root, getattr(args, "signing_key", None))
    repo = write_repository(ws.root, ws.root / "repository" / "cpu", "cpu", ServingConfig(false_positive_rate=fpr),
                            signing_key=private)
    x, y, attacked = demo_images(ws)
    with TritonServer(repo, verbose=False, public_key=public) as server:
        served = run_demo(server.grpc_url, x, y, attacked, progress=progress)
    return {**served, "table": format_report(served, fpr)}


def _study(args, ws, progress):
    from export.detection_study import run_study

    if args.transfer:
        from export.detection_study import transfer_study

        return {"table": transfer_study(ws, args.study_seed, progress)["table"]}
    return {"table": run_study(ws, args.study_seed, args.only, progress)["table"]}


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study-seed", type=int, default=1, help="seed of the draws on the test split (default: %(default)s)")
    p.add_argument("--only", metavar="TEXT", help="measure only the designs whose name contains TEXT, e.g. 'vote'")
    p.add_argument("--transfer", action="store_true",
                   help="instead: banks from each attack family (targeted L-inf, DeepFool on fit images) and their "
                        "combinations, tested on every family and on a black-box attack no bank saw (SquareAttack)")


def _rotate(args, ws, progress):
    from export.rotation import rotate

    repository = ws.root / "repository" / args.profile
    private, _ = signing_keys(ws.root, args.signing_key or ws.root / "signing" / "private.pem")  # never a new key
    return rotate(ws, repository, private, args.url, args.admin_key, args.seed, progress)


def _synthetic_bank(args, ws, progress):
    from export.synthetic_bank import write_synthetic_out

    return {"out": str(write_synthetic_out(ws.root, per_class=args.per_class))}


_OFFLINE = [_add_prepare, _add_train, _add_attack, _add_capture, _add_search, _add_calibrate, _add_evaluate, _add_export]
PIPELINE = ("prepare", "train", "attack", "capture", "search", "calibrate", "evaluate", "export", "demo")

STAGES = {  # name: (help, option groups, runner; None: handled by run() itself)
    "prepare": ("load a data set and make the seeded fit / calibration / test splits", [_add_out, _add_prepare],
                _prepare),
    "train": ("train the classifier on the fit split, or load your model's weights", [_add_out, _add_quiet, _add_train],
              _train),
    "layers": ("list the tensors of an ONNX model or Triton model folder with their shapes, the default "
               "fingerprinted ones marked (for capture --layers)", [lambda p: _add_onnx_model(p, True)], None),
    "attack": ("targeted attacks into every class (bank data) and evaluation attacks (ART)",
               [_add_out, _add_quiet, _add_attack], _attack),
    "capture": ("capture the fingerprinted layers' activations of every image set", [_add_out, _add_quiet, _add_capture],
                _capture),
    "search": ("search each class's fingerprints and write the bank", [_add_out, _add_quiet, _add_search], _search),
    "build-bank": ("the bank's attacks, capture and search as one shard per class on Ray (local cores by default, "
                   "or a cluster), resumable; merged into bank/ with the calibration split captured (after train; "
                   "calibrate, export and serve after it)", [_add_out, _add_quiet, _add_build_bank], _build_bank),
    "harden": ("rounds of detector-aware attacks on fit images added to the bank's data, then a new search "
               "(after search; calibrate, export and serve again after it)", [_add_out, _add_quiet, _add_harden],
               _harden),
    "calibrate": ("set detection thresholds on the calibration split", [_add_out, _add_quiet, _add_calibrate],
                  _calibrate),
    "evaluate": ("the evaluation report on the test split (JSON, Markdown, ROC plot)",
                 [_add_out, _add_quiet, _add_evaluate], _evaluate),
    "export": ("export model.onnx with the activations as extra outputs; parity check; bind the bank to it",
               [_add_out, _add_export], _export),
    "serve": ("write the Triton model repository and serve it until Ctrl-C", [_add_out, _add_quiet, _add_serve], None),
    "rotate": ("rotate the bank like a key: search a fresh one under a new secret seed, recalibrate, sign, "
               "add it to the written repository as a new model version and load it on a running server",
               [_add_out, _add_quiet, _add_rotate], _rotate),
    "whitebox": ("the white-box attacker with a local copy: detector-aware PGD through the expectation over "
                 "the server's draws, and the filter strategy, against each defence; offline or against a "
                 "running server",
                 [_add_out, _add_quiet, _add_whitebox], _whitebox),
    "predict": ("send image files or an .npz to a running server; print label, confidence, score, verdict",
                [_add_predict], None),
    "drift": ("watch a running server's scores for a window and test them against the clean calibration "
              "reference: does the false-positive rate still hold? (exit status 1 on an alarm)", [_add_drift], None),
    "demo": ("serve on a real Triton server, send clean and attacked test images over gRPC, print results",
             [_add_out, _add_quiet, _add_demo], _demo),
    "study": ("many detector designs (fingerprint sizes, layers, thresholds, aggregations, fusions) and the "
              "baselines, side by side on the pipeline's test split", [_add_out, _add_quiet, _add_study], _study),
    "synthetic-bank": ("write a pipeline output folder for serving benchmarks: EfficientNet-Lite0 exported to ONNX "
                       "with a random 1,000-class bank (never for detection)", [_add_out, _add_synthetic],
                       _synthetic_bank),
    "pipeline": ("run every stage in order, then the demo (the README's main job)",
                 [_add_out, _add_quiet, *_OFFLINE], None),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Given ``argv``, only the named sub-command's options are built: their defaults come
    from modules that load torch, which ``nfp predict`` and ``nfp --help`` do not need."""
    parser = argparse.ArgumentParser(
        prog="nfp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in STAGES), None) if argv is not None else None
    for name, (help_text, adders, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            for add in adders:
                add(p)
    return parser


def run(args: argparse.Namespace) -> int | None:
    """Run one command; ``pipeline`` runs :data:`PIPELINE` in order and prints every stage's report.
    Returns the exit status where a command has one of its own (``drift``: 1 on an alarm)."""
    if args.command == "predict":
        from client.predict import predict

        print(predict(args.url, args.inputs, args.model, args.timeout))
        return
    if args.command == "serve":
        serve(args)
        return
    if args.command == "drift":
        print((report := drift(args)).to_text())
        return 1 if report.alarm else 0
    if args.command == "layers":
        print(layers_table(args))
        return
    from export.workspace import Workspace

    ws, progress = Workspace(args.out), not getattr(args, "quiet", False)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = PIPELINE if args.command == "pipeline" else (args.command,)
    report = {name: STAGES[name][2](args, ws, progress) for name in names}
    tables = [entry.pop("table") for entry in report.values() if isinstance(entry, dict) and "table" in entry]
    if any(report.values()):
        print(json.dumps({k: v for k, v in report.items() if v}, indent=2, default=str))
    for table in tables:
        print("\n" + table)
    print(f"artifacts and manifest: {ws.root}/", file=sys.stderr)


def drift(args: argparse.Namespace):
    """``nfp drift``: the served bank's calibration against a window of the server's score histogram."""
    from client.metrics import score_histogram
    from kernels.bank import Bank
    from kernels.detector import served_detector
    from kernels.drift import ScoreWindow, watch

    detector = served_detector(Bank.load(args.bank or args.out / "bank"), args.fpr)
    buckets = len((detector.calibration.reference or {"edges": []})["edges"])
    read = lambda: ScoreWindow.of_metrics(  # noqa: E731
        score_histogram(args.metrics_url, args.model, buckets, args.predicted_class))
    return watch(detector.calibration, detector.fpr, read, args.window, args.alpha)


def signing_keys(out: Path, private: Path | None) -> tuple[Path, Path]:
    """The private key given (its ``public.pem`` beside it) or ``<out>/signing/`` (created if missing)."""
    from model_repository.signing import create_keys

    if private is None:
        private = Path(out) / "signing" / "private.pem"
        if not private.is_file():
            return create_keys(private.parent)
    public = Path(private).parent / "public.pem"
    if not Path(private).is_file() or not public.is_file():
        raise FingerprintError(f"signing needs {private} and public.pem beside it")
    return Path(private), public


def serve(args: argparse.Namespace) -> None:
    """Write the repository and run the server in the foreground until Ctrl-C (or SIGTERM)."""
    import signal
    import time

    from model_repository.server import ADMIN_HEADER, GRPC_ADMIN_HEADER, RESTRICTED, TritonServer
    from model_repository.writer import ServingConfig, write_repository

    cfg = ServingConfig(false_positive_rate=args.fpr, fused=args.fused, queue_delay_us=args.queue_delay_us,
                        instances=args.instances, audit=args.audit)
    private, public = signing_keys(args.out, args.signing_key)
    repo = write_repository(args.out, args.out / "repository" / args.profile, args.profile, cfg, signing_key=private)
    print(f"model repository: {repo} (signed; public key {public})", file=sys.stderr)
    if args.write_only:
        return
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = TritonServer(repo, args.grpc_port, args.http_port, args.metrics_port, verbose=not args.quiet,
                          public_key=public, admin_key=args.admin_key)
    try:
        server.start()
        models = "'guarded_classifier'" + (" and 'guarded_classifier_fused'" if args.fused else "")
        print(f"serving {models}: gRPC {server.grpc_url}, metrics {server.metrics_url}; Ctrl-C stops", file=sys.stderr)
        print(f"admin protocols ({', '.join(RESTRICTED)}) need the header {ADMIN_HEADER} (over gRPC: "
              f"{GRPC_ADMIN_HEADER}): {server.admin_key}", file=sys.stderr)
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()
        print(f"server stopped (exit code {code})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return run(args) or 0
    except FingerprintError as e:
        print(f"nfp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
