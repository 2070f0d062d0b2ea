"""The offline pipeline's stages, each reading and writing one :class:`~export.data.workspace.Workspace`.

``prepare`` -> ``train`` -> ``attack`` -> ``capture``. The command line (``nfp``) calls these
functions one per sub-command; ``run_pipeline`` calls them in order.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.attacks.art_attacks import (
    BankAttacks,
    DEFAULT_TRAIN_PER_CLASS,
    attack_defaults,
    attack_into_classes,
    evaluation_suite,
    merge_results,
    parse_attack,
    run_attack,
)
from export.bank.calibrate import calibrated_bank
from export.bank.search import searched_bank
from export.data.artifacts import bank_dir, load_activation_set, load_prepared
from export.data.datasets import DEFAULT_SPLIT_FRACTIONS, load_dataset, split_dataset
from export.data.workspace import Workspace
from export.evaluation.report import evaluation_detectors
from export.models.activations import ActivationLayout, capture_activations
from export.models.classifier import (
    ClassifierSpec,
    accuracy,
    correctly_classified,
    default_spec,
    load_classifier,
    predict,
    save_checkpoint,
)
from export.models.training import TrainingConfig, train_classifier
from export.models.weights import load_weights
from kernels.bank import Bank
from kernels.calibration import DEFAULT_FPRS
from kernels.detector import DEFAULT_CALIBRATION_REPEATS, DEFAULT_M, Observations
from kernels.errors import InvalidInputError, ModelMismatchError
from kernels.served import served_squeezers
from kernels.fingerprint_search import SearchConfig
from kernels.query_memory import QueryMemoryConfig, calibrated
from kernels.scoring import covered
from model_repository.writer import QUERY_MEMORY

MIN_ATTACKED_PER_CLASS = 3      # a class's search needs at least this many (kernels.fingerprint_search)
DEFAULT_EVAL_COUNT = 300        # test images attacked by each evaluation attack (CW-L2 takes ~0.25 s each)
QUERY_FLAG_RATE = 0.001        # benign queries the served query memory may flag (issue 27's target)
DEMO_ATTACKS = ("pgd_eps0.3", "pgd_eps0.1", "pgd-targeted_eps0.3", "cw-l2", "cw-l2_conf5", "deepfool")  # what the demo sends


def prepare(ws: Workspace, dataset: str = "mnist", seed: int = 0,
            fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, num_classes: int | None = None,
            per_class: int | None = None) -> dict[str, Any]:
    """Load the data set, make the seeded splits (of ``per_class`` images per class, if given), and
    record both (see :func:`load_dataset` for ``num_classes``)."""
    started = time.time()
    ds = load_dataset(dataset, num_classes)
    splits = split_dataset(ds.y, seed, tuple(fractions), per_class)  # type: ignore[arg-type]
    ws.root.mkdir(parents=True, exist_ok=True)
    np.savez(ws.splits, **splits.as_dict())
    meta = {"dataset": dataset, "num_classes": num_classes, "num_images": len(ds.y), "image_shape": ds.image_shape,
            "class_names": ds.class_names, "seed": seed, "fractions": list(fractions), "per_class": per_class,
            "split_sizes": {k: len(v) for k, v in splits.as_dict().items()}}
    ws.write_json(ws.data_json, meta)
    ws.record("prepare", {"dataset": dataset, "seed": seed, "fractions": list(fractions), "per_class": per_class},
              [ws.data_json, ws.splits], started, meta["split_sizes"])
    return meta


def train(ws: Workspace, config: TrainingConfig = TrainingConfig(), factory: str | None = None,
          factory_kwargs: dict[str, Any] | None = None, weights: Path | None = None,
          progress: bool = True, pretrained: bool = False) -> dict[str, Any]:
    """Train the classifier on the fit split, or load a user's weights, and report accuracy per split.

    Args:
        factory: ``"package.module:factory"`` returning an ``nn.Module``; default the built-in small CNN.
        factory_kwargs: keyword arguments for the factory.
        weights: an existing state_dict for the model; then nothing is trained.
        pretrained: the factory's model is already trained (e.g. ``efficientnet-lite0``); use it as is.
    """
    started = time.time()
    ds, splits, _ = load_prepared(ws)
    spec = (ClassifierSpec(factory, ds.image_shape, ds.num_classes, dict(factory_kwargs or {}))
            if factory else default_spec(ds.image_shape, ds.num_classes))
    torch.manual_seed(config.seed)  # the initial weights too
    model = spec.build()
    train_seconds = 0.0
    if weights is not None:
        load_weights(model, weights)
    elif not pretrained:
        t = time.time()
        train_classifier(model, ds.x[splits.fit], ds.y[splits.fit], config, progress)
        train_seconds = time.time() - t
    logits = predict(model, ds.x[:1])
    if logits.shape[1] != ds.num_classes:
        raise ModelMismatchError(f"model gives {logits.shape[1]} logits but the data set has {ds.num_classes} classes")
    acc = {name: round(accuracy(model, ds.x[idx], ds.y[idx]), 4) for name, idx in splits.as_dict().items()}
    trained = weights is None and not pretrained
    results = {"accuracy": acc, "train_seconds": round(train_seconds, 1), "trained": trained}
    save_checkpoint(model, spec, ws.classifier, {"training": asdict(config) if trained else None, **results})
    ws.record("train", {"factory": factory, "weights": str(weights) if weights else None, "pretrained": pretrained,
                        **asdict(config)},
              [ws.classifier, ws.classifier.with_suffix(".json")], started, results)
    return results


def attack(ws: Workspace, per_class: int = DEFAULT_TRAIN_PER_CLASS, eval_attacks: Sequence[str] | None = None,
           eval_count: int = DEFAULT_EVAL_COUNT, seed: int = 0, progress: bool = True,
           profile: str | None = None, train_eps: Sequence[float] | None = None,
           train_max_iter: int | None = None) -> dict[str, Any]:
    """Targeted training attacks into every class (fit split), and evaluation attacks (test split).

    ``eval_attacks`` default to :func:`~export.attacks.art_attacks.evaluation_suite` (an L-inf budget sweep, CW-L2,
    DeepFool). ``profile`` picks the attack defaults (a key of ``ATTACK_DEFAULTS``; default: the data set's);
    ``train_eps`` and ``train_max_iter`` override its ladder of training budgets and their steps (a
    robust classifier needs larger ones). Fails, naming the budgets tried, when no class gets 3
    successful training attacks; classes below 3 are reported (their inputs will be answered unchecked).
    Only correctly classified images are attacked. Writes ``attacks/train.npz`` and one
    ``attacks/eval/<attack>.npz`` per evaluation attack, with ``attacks/summary.json``.
    """
    started = time.time()
    ds, splits, meta = load_prepared(ws)
    model = load_classifier(ws)
    defaults = attack_defaults(profile or meta["dataset"])
    defaults = replace(defaults, train_eps=tuple(train_eps or defaults.train_eps),
                       max_iter=train_max_iter or defaults.max_iter)
    eval_attacks = list(eval_attacks or evaluation_suite(defaults))
    specs = [parse_attack(a, defaults) for a in eval_attacks]

    fit = correctly_classified(model, ds, splits.fit)
    train_results = attack_into_classes(model, ds.x[fit], ds.y[fit], fit, ds.num_classes,
                                        BankAttacks(defaults, per_class, seed), progress)
    merged = merge_results(train_results)
    ws.attacks.mkdir(parents=True, exist_ok=True)
    train_path = ws.attacks / "train.npz"
    np.savez(train_path, **merged)
    ok = merged["success"]
    per_class_counts = {ds.class_names[c]: int((ok & (merged["target"] == c)).sum()) for c in range(ds.num_classes)}
    short = [name for name, n in per_class_counts.items() if n < MIN_ATTACKED_PER_CLASS]
    budgets = f"eps {', '.join(f'{e:g}' for e in defaults.train_eps)} with {defaults.max_iter} steps"
    if len(short) == len(per_class_counts):
        raise InvalidInputError(
            f"the bank's targeted attacks succeeded on at most {max(per_class_counts.values())} images per class at "
            f"{budgets}: too few to search fingerprints (3 per class needed). A robust classifier needs larger "
            f"budgets: e.g. --train-eps 0.3 0.4 0.5 --train-max-iter 100")
    summary: dict[str, Any] = {
        "train": {"rungs": [r.summary() for r in train_results], "successful_per_focal_class": per_class_counts,
                  "attempted": int(len(np.unique(merged["source"] * ds.num_classes + merged["target"]))),
                  "successful": int(ok.sum()), "budgets": budgets, "classes_below_minimum": short},
        "eval": {},
    }
    files = [train_path]
    test = correctly_classified(model, ds, splits.test)
    rng = np.random.default_rng(seed)
    test = np.sort(rng.choice(test, size=min(eval_count, len(test)), replace=False))
    (ws.attacks / "eval").mkdir(exist_ok=True)
    for i, spec in enumerate(specs):
        result = run_attack(spec, model, ds.x[test], ds.y[test], test, ds.num_classes, seed=seed + 1000 + i,
                            progress=progress)
        path = ws.attacks / "eval" / f"{spec.label}.npz"
        np.savez(path, **merge_results([result]))
        files.append(path)
        summary["eval"][spec.label] = result.summary()
    files.append(ws.write_json(ws.attacks / "summary.json", summary))
    ws.record("attack", {"profile": profile, "defaults": asdict(defaults), "per_class": per_class, "eval_attacks": eval_attacks, "eval_count": eval_count,
                         "seed": seed}, files, started,
              {"train_successful_per_focal_class": per_class_counts,
               "eval_success_rate": {k: v["success_rate"] for k, v in summary["eval"].items()}})
    return summary


def capture(ws: Workspace, layers: Sequence[str] | None = None, batch_size: int = 256,
            progress: bool = True) -> ActivationLayout:
    """Capture activations of every set the later stages need.

    Sets: ``fit_clean`` (fit images the model classifies correctly), ``fit_attacked`` (successful
    training attacks; ``label`` is the focal class), ``calibration``, ``test``, and ``eval_<attack>``
    for each evaluation attack. Each set is ``<set>.npy`` ``(N, D) float32`` plus ``<set>.npz`` with
    ``label`` (true class; focal class for ``fit_attacked``), ``predicted``, ``logits`` and ``source`` (dataset index).
    """
    started = time.time()
    ds, splits, _ = load_prepared(ws)
    model = load_classifier(ws)
    out = ws.activations
    out.mkdir(parents=True, exist_ok=True)
    train_adv = ws.load_npz(ws.attacks / "train.npz", "attack")
    ok = train_adv["success"]
    fit = correctly_classified(model, ds, splits.fit)  # the method's clean set
    sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
        "fit_clean": (ds.x[fit], ds.y[fit], fit),
        "fit_attacked": (train_adv["x_adv"][ok], train_adv["target"][ok], train_adv["source"][ok]),
        "calibration": (ds.x[splits.calibration], ds.y[splits.calibration], splits.calibration),
        "test": (ds.x[splits.test], ds.y[splits.test], splits.test),
    }
    for path in sorted((ws.attacks / "eval").glob("*.npz")):
        adv = ws.load_npz(path, "attack")
        sets[f"eval_{path.stem}"] = (adv["x_adv"], adv["true_label"], adv["source"])

    layout, files, counts = None, [], {}
    for name, (x, label, source) in sets.items():
        if len(x) == 0:
            raise InvalidInputError(f"activation set {name!r} is empty: no images to capture")
        _, lay, logits = capture_activations(model, x, layers, batch_size, out / f"{name}.npy",
                                                progress=progress, return_logits=True)
        pred = logits.argmax(1)
        if layout is not None and lay != layout:
            raise ModelMismatchError(f"set {name} has layout {lay.layers}, others {layout.layers}")
        layout = lay
        np.savez(out / f"{name}.npz", label=label, predicted=pred, source=source, logits=logits)
        files += [out / f"{name}.npy", out / f"{name}.npz"]
        counts[name] = int(len(label))
    assert layout is not None
    layout.save(out / "layout.json")
    files.append(out / "layout.json")
    ws.record("capture", {"layers": layout.layers, "batch_size": batch_size}, files, started,
              {"num_neurons": layout.num_neurons, "rows": counts})
    return layout


def search(ws: Workspace, config: SearchConfig = SearchConfig(), progress: bool = True) -> dict[str, Any]:
    """Search fingerprints for every class and write the bank (``bank/bank.npz``, ``bank/bank.json``)."""
    started = time.time()
    bank = searched_bank(ws, config, progress)
    files = list(bank.save(bank_dir(ws)))
    results = {"fingerprints_per_class": bank.counts.tolist(),
               "passed_per_class": [r["passed"] for r in bank.meta["search_results"]]}
    ws.record("search", bank.meta["search"], files, started, results)
    return results


def calibrate(ws: Workspace, m: int = DEFAULT_M, fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
              repeats: int = DEFAULT_CALIBRATION_REPEATS, progress: bool = True,
              confidence: float | None = None, squeeze: str = "auto") -> dict[str, Any]:
    """Calibrate the workspace's bank (:func:`calibrated_bank`) and store the thresholds in ``bank.json``;
    calibrate the served query memory's threshold on the same clean images (:func:`calibrate_query_memory`)."""
    started = time.time()
    bank, summary = calibrated_bank(ws, Bank.load(bank_dir(ws)), m, fprs, seed, repeats, progress, confidence, squeeze)
    files = [*bank.save(bank_dir(ws)), calibrate_query_memory(ws, seed=seed)]
    ws.record("calibrate", {"m": m, "fprs": list(fprs), "seed": seed, "repeats": repeats, "confidence": confidence,
                            "squeeze": squeeze},
              files, started, {"global_lrt_thresholds": summary.pop("global_lrt_thresholds")})
    return summary


def calibrate_query_memory(ws: Workspace, rate: float = QUERY_FLAG_RATE, seed: int = 0) -> Path:
    """The served query memory's threshold (:func:`kernels.query_memory.calibrated`): the smallest that flags
    at most ``rate`` of the fit and calibration splits' clean images sent as a stream (the most a clean
    image shares with an earlier one grows with the stream, so the longest clean stream short of the test
    split, which measures it); ``query_memory.json``, which the repository writer reads."""
    ds, splits, _ = load_prepared(ws)
    config, measured = calibrated(QueryMemoryConfig(), ds.x[np.r_[splits.fit, splits.calibration]], rate, seed)
    return ws.write_json(ws.root / QUERY_MEMORY, {"config": config.to_json(), "calibration": measured})


def evaluate(ws: Workspace, seed: int = 1, spread_draws: int = 100, progress: bool = True) -> dict[str, Any]:
    """The evaluation report on the test split: ``report/evaluation.json``, ``.md`` and ``roc.png``."""
    from tqdm.auto import tqdm

    from export.evaluation.report import (
        clean_false_positives,
        evaluate_attack,
        false_positive_table,
        markdown_table,
        plot_roc,
    )

    started = time.time()
    ds, splits, _ = load_prepared(ws)
    bank = Bank.load(bank_dir(ws))
    cal_acts, cal_meta = load_activation_set(ws, "calibration", mmap=False)
    detectors, m = evaluation_detectors(ws, bank, Observations(cal_meta["predicted"], acts=cal_acts,
                                                               logits=cal_meta["logits"], images=ds.x[cal_meta["source"]]))
    fprs = sorted(detectors["fused"].calibration.thresholds)
    test_acts, test_meta = load_activation_set(ws, "test", mmap=False)
    clean = Observations(test_meta["predicted"], acts=np.ascontiguousarray(test_acts), images=ds.x[test_meta["source"]],
                         logits=test_meta["logits"])
    summary = ws.read_json(ws.attacks / "summary.json", "attack")
    report: dict[str, Any] = {"m": m, "fprs": fprs, "seed": seed, "attacks": {},
                              "test_images_predicted_uncovered": int((~covered(clean.labels, bank, 1)).sum()),
                              "test_accuracy": float((test_meta["predicted"] == test_meta["label"]).mean())}
    curves = {}
    for label in tqdm(summary["eval"], desc="evaluate", unit="attack", disable=not progress):
        acts, meta = load_activation_set(ws, f"eval_{label}", mmap=False)
        adv = ws.load_npz(ws.attacks / "eval" / f"{label}.npz", "attack")
        ok = adv["success"]
        if ok.sum() < 2:
            report["attacks"][label] = {"skipped": f"only {int(ok.sum())} successful attacks"}
            continue
        attacked = Observations(meta["predicted"][ok], acts=np.ascontiguousarray(acts[ok]), images=adv["x_adv"][ok],
                                logits=meta["logits"][ok])
        r, curves[label] = evaluate_attack(detectors, clean, attacked, seed, spread_draws)
        report["attacks"][label] = {"params": summary["eval"][label]["params"],
                                    "success_rate": summary["eval"][label]["success_rate"], **r}
    report["false_positives"] = clean_false_positives(detectors["fused"], clean, seed, spread_draws)
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    evaluated = {k: v for k, v in report["attacks"].items() if "skipped" not in v}
    table = markdown_table({**report, "attacks": evaluated})
    fp_table = false_positive_table(report["false_positives"])
    (out / "evaluation.md").write_text(
        f"# Evaluation on the test split\n\nm = {report['m']} fingerprints drawn per image; thresholds from the "
        f"calibration split; {len(clean)} clean test images, {report['test_images_predicted_uncovered']} of "
        f"them predicted as a class the bank cannot check (never flagged). Successful attacks only; those the "
        f"bank cannot check (column 'unchecked') count as misses.\n\n"
        f"Clean false positives of the served detector:\n\n{fp_table}\n{table}")
    plot_roc(curves, out / "roc.png", min(fprs))
    files = [ws.write_json(out / "evaluation.json", report), out / "evaluation.md", out / "roc.png"]
    f0 = f"tpr@{min(fprs):g}"
    ws.record("evaluate", {"seed": seed, "spread_draws": spread_draws}, files, started,
              {k: {"auc": v["fused"]["auc"], f0: v["fused"][f0]} for k, v in evaluated.items()})
    report["table"] = f"{fp_table}\n{table}"
    return report


REFERENCE_COUNT = 256  # test images in reference.npz


def write_reference(ws: Workspace, images: np.ndarray) -> Path:
    """``reference.npz``: test images with the exported model's labels and probabilities (onnxruntime), the
    answers a served model must give (``python -m client.soak`` checks every answer against them)."""
    from kernels.contract import load_contract
    from kernels.onnx_runtime import ort_session

    contract = load_contract(ws.root)  # an imported model answers under its own names
    name, feed = ("logits", images) if contract is None else (contract.logits, contract.served_images(images))
    session = ort_session(ws.root / "model.onnx")
    logits = session.run([name], {session.get_inputs()[0].name: feed})[0].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    path = ws.root / "reference.npz"
    np.savez(path, x=images, label=logits.argmax(1), probabilities=(p / p.sum(1, keepdims=True)).astype(np.float32))
    return path


def export_model(ws: Workspace, parity_count: int = 256, opset: int = 18) -> dict[str, Any]:
    """Export ``model.onnx`` (logits + the bank's activations), check parity on real test images,
    record the model's SHA-256 in the bank so that the bank is refused next to any other model, and write
    the reference answers of the served model (:func:`write_reference`)."""
    from export.models.onnx_export import export_onnx
    from export.models.onnx_import import USER_MODEL, export_imported

    started = time.time()
    ds, splits, _ = load_prepared(ws)
    bank = Bank.load(bank_dir(ws))
    layout = ActivationLayout.from_json(bank.meta["layout"])
    images = ds.x[splits.test[:parity_count]]
    if (ws.root / USER_MODEL).is_file():  # an imported model: its own graph, one output added
        report = export_imported(load_classifier(ws), layout, ws.root / USER_MODEL, ws.root / "model.onnx", images)
    else:
        report = export_onnx(load_classifier(ws), layout, ws.root / "model.onnx", images, opset, served_squeezers(bank))
    bank = bank.with_meta(model_sha256=report.sha256, onnx=report.to_json())
    files = [ws.root / "model.onnx", *bank.save(bank_dir(ws)), write_reference(ws, ds.x[splits.test[:REFERENCE_COUNT]])]
    ws.record("export", {"parity_count": parity_count, "opset": opset}, files, started, report.to_json())
    return report.to_json()


def demo_images(ws: Workspace) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Clean test images with their labels, and each demo attack's successful adversarial images."""
    ds, splits, _ = load_prepared(ws)
    attacked = {}
    for name in DEMO_ATTACKS:
        path = ws.attacks / "eval" / f"{name}.npz"
        if path.exists():
            adv = ws.load_npz(path, "attack")
            if adv["success"].any():
                attacked[name] = adv["x_adv"][adv["success"]]
    return ds.x[splits.test], ds.y[splits.test], attacked
