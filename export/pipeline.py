"""The offline pipeline's stages, each reading and writing one :class:`~export.workspace.Workspace`.

``prepare`` -> ``train`` -> ``attack`` -> ``capture``. The command line (``nfp``) calls these
functions one per sub-command; ``run_pipeline`` calls them in order.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.activations import ActivationLayout, capture_activations
from export.attacks import (
    attack_defaults,
    attack_into_classes,
    evaluation_suite,
    merge_results,
    parse_attack,
    run_attack,
)
from export.datasets import DEFAULT_SPLIT_FRACTIONS, Dataset, Splits, load_dataset, split_dataset
from export.fingerprint_search import SearchConfig, search_fingerprints
from export.models import ClassifierSpec, default_spec, load_checkpoint, load_weights, predict, save_checkpoint
from export.training import TrainingConfig, train_classifier
from export.workspace import Workspace
from kernels.bank import Bank
from kernels.calibration import DEFAULT_FPRS, Calibration, calibrate_threshold
from kernels.errors import InvalidInputError, ModelMismatchError
from kernels.scoring import METHODS, covered, score

DEFAULT_TRAIN_PER_CLASS = 300   # attacked images pushed into each focal class
DEFAULT_M = 128                 # fingerprints drawn per input (see the README's measurements)
DEFAULT_CALIBRATION_REPEATS = 10  # independent draws per calibration image
DEFAULT_EVAL_COUNT = 300        # test images attacked by each evaluation attack (CW-L2 takes ~0.25 s each)


def load_prepared(ws: Workspace) -> tuple[Dataset, Splits, dict[str, Any]]:
    """The data set and splits recorded by ``prepare``."""
    meta = ws.read_json(ws.data_json, "prepare")
    ds = load_dataset(meta["dataset"], meta.get("num_classes"))
    if len(ds.y) != meta["num_images"] or ds.class_names != tuple(meta["class_names"]):
        raise ModelMismatchError(f"data set {meta['dataset']!r} changed since `prepare` ({meta['num_images']} images then, "
                                 f"{len(ds.y)} now): run prepare again")
    s = ws.load_npz(ws.splits, "prepare")
    return ds, Splits(s["fit"], s["calibration"], s["test"]), meta


def prepare(ws: Workspace, dataset: str = "mnist", seed: int = 0,
            fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS, num_classes: int | None = None) -> dict[str, Any]:
    """Load the data set, make the seeded splits, and record both (see :func:`load_dataset` for
    ``num_classes``)."""
    started = time.time()
    ds = load_dataset(dataset, num_classes)
    splits = split_dataset(ds.y, seed, tuple(fractions))  # type: ignore[arg-type]
    ws.root.mkdir(parents=True, exist_ok=True)
    np.savez(ws.splits, **splits.as_dict())
    meta = {"dataset": dataset, "num_classes": num_classes, "num_images": len(ds.y), "image_shape": ds.image_shape,
            "class_names": ds.class_names, "seed": seed, "fractions": list(fractions),
            "split_sizes": {k: len(v) for k, v in splits.as_dict().items()}}
    ws.write_json(ws.data_json, meta)
    ws.record("prepare", {"dataset": dataset, "seed": seed, "fractions": list(fractions)},
              [ws.data_json, ws.splits], started, meta["split_sizes"])
    return meta


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x).argmax(1) == y).mean())


def correctly_classified(model: torch.nn.Module, ds: Dataset, idx: np.ndarray) -> np.ndarray:
    """The indices among ``idx`` whose image the model labels correctly."""
    return idx[predict(model, ds.x[idx]).argmax(1) == ds.y[idx]]


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


def load_classifier(ws: Workspace) -> torch.nn.Module:
    return load_checkpoint(ws.require(ws.classifier, "train"))[0]


def attack(ws: Workspace, per_class: int = DEFAULT_TRAIN_PER_CLASS, eval_attacks: Sequence[str] | None = None,
           eval_count: int = DEFAULT_EVAL_COUNT, seed: int = 0, progress: bool = True,
           profile: str | None = None) -> dict[str, Any]:
    """Targeted training attacks into every class (fit split), and evaluation attacks (test split).

    ``eval_attacks`` default to :func:`~export.attacks.evaluation_suite` (an L-inf budget sweep, CW-L2,
    DeepFool). ``profile`` picks the attack defaults (a key of ``ATTACK_DEFAULTS``; default: the data set's).
    Only correctly classified images are attacked. Writes ``attacks/train.npz`` and one
    ``attacks/eval/<attack>.npz`` per evaluation attack, with ``attacks/summary.json``.
    """
    started = time.time()
    ds, splits, meta = load_prepared(ws)
    model = load_classifier(ws)
    defaults = attack_defaults(profile or meta["dataset"])
    eval_attacks = list(eval_attacks or evaluation_suite(defaults))
    specs = [parse_attack(a, defaults) for a in eval_attacks]

    fit = correctly_classified(model, ds, splits.fit)
    train_results = attack_into_classes(model, ds.x[fit], ds.y[fit], fit, ds.num_classes, defaults,
                                        per_class, seed, progress)
    merged = merge_results(train_results)
    ws.attacks.mkdir(parents=True, exist_ok=True)
    train_path = ws.attacks / "train.npz"
    np.savez(train_path, **merged)
    ok = merged["success"]
    per_class_counts = {ds.class_names[c]: int((ok & (merged["target"] == c)).sum()) for c in range(ds.num_classes)}
    summary: dict[str, Any] = {
        "train": {"rungs": [r.summary() for r in train_results], "successful_per_focal_class": per_class_counts,
                  "attempted": int(len(np.unique(merged["source"] * ds.num_classes + merged["target"]))),
                  "successful": int(ok.sum())},
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
    ``label`` (true class; focal class for ``fit_attacked``), ``predicted`` and ``source`` (dataset index).
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
        np.savez(out / f"{name}.npz", label=label, predicted=pred, source=source)
        files += [out / f"{name}.npy", out / f"{name}.npz"]
        counts[name] = int(len(label))
    assert layout is not None
    layout.save(out / "layout.json")
    files.append(out / "layout.json")
    ws.record("capture", {"layers": layout.layers, "batch_size": batch_size}, files, started,
              {"num_neurons": layout.num_neurons, "rows": counts})
    return layout


def load_activation_set(ws: Workspace, name: str, mmap: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(acts (N, D) float32, {"label", "predicted", "source"})`` of one captured set."""
    acts = np.load(ws.require(ws.activations / f"{name}.npy", "capture"), mmap_mode="r" if mmap else None,
                   allow_pickle=False)
    return acts, ws.load_npz(ws.activations / f"{name}.npz", "capture")


def bank_dir(ws: Workspace) -> Path:
    return ws.root / "bank"


def search(ws: Workspace, config: SearchConfig = SearchConfig(), progress: bool = True) -> dict[str, Any]:
    """Search fingerprints for every class and write the bank (``bank/bank.npz``, ``bank/bank.json``)."""
    started = time.time()
    _, _, meta = load_prepared(ws)
    layout = ActivationLayout.load(ws.require(ws.activations / "layout.json", "capture"))
    clean, clean_meta = load_activation_set(ws, "fit_clean", mmap=False)
    attacked, attacked_meta = load_activation_set(ws, "fit_attacked", mmap=False)
    per_class = search_fingerprints(clean, clean_meta["label"], attacked, attacked_meta["label"],
                                    len(meta["class_names"]), config, progress)
    bank = Bank.from_fingerprints(per_class, layout.num_neurons, {
        "class_names": meta["class_names"], "layout": layout.to_json(), "search": config.to_json(),
        "search_results": [{"tried": fp.tried, "passed": fp.passed, "kept": len(fp.neurons),
                            "best_abs_d": float(np.abs(fp.cohen_d).max()) if len(fp.cohen_d) else None}
                           for fp in per_class]})
    files = list(bank.save(bank_dir(ws)))
    results = {"fingerprints_per_class": bank.counts.tolist(), "passed_per_class": [fp.passed for fp in per_class]}
    ws.record("search", config.to_json(), files, started, results)
    return results


def calibrate_draws(acts: np.ndarray, predicted: np.ndarray, bank: Bank, m: int, fprs: Sequence[float], seed: int,
                    repeats: int, progress: bool = False) -> tuple[dict[str, Calibration], np.ndarray]:
    """Calibrations of every score method for draws of ``m``, from the calibration split's activations
    ``acts`` and predicted labels.

    Returns the calibrations and the mask of images used (predicted as a class with at least ``m``
    fingerprints).
    """
    keep = covered(predicted, bank, m)
    if not keep.any():
        raise InvalidInputError(f"no calibration image is predicted as a class with at least {m} fingerprints")
    acts, predicted = acts[keep], predicted[keep]
    rng = np.random.default_rng(seed)
    from tqdm.auto import tqdm

    runs = [score(acts, predicted, bank, m, rng)
            for _ in tqdm(range(repeats), desc=f"calibrate m={m}", unit="draw", disable=not progress)]
    labels, images = np.tile(predicted, repeats), np.tile(np.arange(len(predicted)), repeats)
    cal = {method: calibrate_threshold(np.concatenate([r.get(method) for r in runs]), labels, bank.num_classes,
                                       method, m, fprs, image_ids=images)
           for method in METHODS}
    return cal, keep


def calibrate(ws: Workspace, m: int = DEFAULT_M, fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
              repeats: int = DEFAULT_CALIBRATION_REPEATS, progress: bool = True) -> dict[str, Any]:
    """Thresholds for each false-positive rate, from the calibration split's clean images, under the
    same random drawing of ``m`` fingerprints per image used at test time; stored in ``bank.json``.

    Each image is scored under ``repeats`` independent draws and all scores are pooled, so the
    thresholds reflect the spread that the random draw itself adds, with less estimation noise.
    """
    started = time.time()
    bank = Bank.load(bank_dir(ws))
    acts, meta = load_activation_set(ws, "calibration", mmap=False)
    cal, keep = calibrate_draws(acts, meta["predicted"], bank, m, fprs, seed, repeats, progress)
    bank = bank.with_meta(calibration={k: c.to_json() for k, c in cal.items()}, draws_per_input=m)
    files = list(bank.save(bank_dir(ws)))
    ws.record("calibrate", {"m": m, "fprs": list(fprs), "seed": seed, "repeats": repeats}, files, started,
              {"global_lrt_thresholds": {str(f): float(np.median(t)) for f, t in cal["lrt"].thresholds.items()}})
    return {"m": m, "calibration_images": int(keep.sum()), "uncovered_images": int((~keep).sum()), "repeats": repeats}


def load_calibrations(bank: Bank) -> dict[str, Calibration]:
    if "calibration" not in bank.meta:
        raise InvalidInputError("the bank is not calibrated: run `nfp calibrate` first")
    return {k: Calibration.from_json(v) for k, v in bank.meta["calibration"].items()}


def evaluate(ws: Workspace, seed: int = 1, spread_draws: int = 100, progress: bool = True) -> dict[str, Any]:
    """The evaluation report on the test split: ``report/evaluation.json``, ``.md`` and ``roc.png``."""
    from tqdm.auto import tqdm

    from export.evaluation import ImageSet, calibrate_baseline, evaluate_attack, markdown_table, plot_roc

    started = time.time()
    ds, splits, _ = load_prepared(ws)
    bank = Bank.load(bank_dir(ws))
    cals = load_calibrations(bank)
    fprs = sorted(cals["lrt"].thresholds)
    baseline = calibrate_baseline(ds.x[splits.calibration], fprs)
    m = cals["lrt"].m
    test_acts, test_meta = load_activation_set(ws, "test", mmap=False)
    clean = ImageSet.of(np.ascontiguousarray(test_acts), test_meta["predicted"], ds.x[test_meta["source"]], bank, m)
    summary = ws.read_json(ws.attacks / "summary.json", "attack")
    report: dict[str, Any] = {"m": m, "fprs": fprs, "seed": seed, "attacks": {},
                              "test_images_predicted_uncovered": int((~clean.checked).sum()),
                              "test_accuracy": float((test_meta["predicted"] == test_meta["label"]).mean())}
    curves = {}
    for label in tqdm(summary["eval"], desc="evaluate", unit="attack", disable=not progress):
        acts, meta = load_activation_set(ws, f"eval_{label}", mmap=False)
        adv = ws.load_npz(ws.attacks / "eval" / f"{label}.npz", "attack")
        ok = adv["success"]
        if ok.sum() < 2:
            report["attacks"][label] = {"skipped": f"only {int(ok.sum())} successful attacks"}
            continue
        attacked = ImageSet.of(np.ascontiguousarray(acts[ok]), meta["predicted"][ok], adv["x_adv"][ok], bank, m)
        r, curves[label] = evaluate_attack(bank, cals, baseline, clean, attacked, seed, spread_draws)
        report["attacks"][label] = {"params": summary["eval"][label]["params"],
                                    "success_rate": summary["eval"][label]["success_rate"], **r}
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    evaluated = {k: v for k, v in report["attacks"].items() if "skipped" not in v}
    table = markdown_table({**report, "attacks": evaluated})
    (out / "evaluation.md").write_text(
        f"# Evaluation on the test split\n\nm = {report['m']} fingerprints drawn per image; thresholds from the "
        f"calibration split; {len(clean.labels)} clean test images, {report['test_images_predicted_uncovered']} of "
        f"them predicted as a class the bank cannot check (never flagged). Successful attacks only; those the "
        f"bank cannot check (column 'unchecked') count as misses.\n\n{table}")
    plot_roc(curves, out / "roc.png", min(fprs))
    files = [ws.write_json(out / "evaluation.json", report), out / "evaluation.md", out / "roc.png"]
    f0 = f"tpr@{min(fprs):g}"
    ws.record("evaluate", {"seed": seed, "spread_draws": spread_draws}, files, started,
              {k: {"auc": v["lrt"]["auc"], f0: v["lrt"][f0]} for k, v in evaluated.items()})
    report["table"] = table
    return report


def export_model(ws: Workspace, parity_count: int = 256, opset: int = 18) -> dict[str, Any]:
    """Export ``model.onnx`` (logits + the bank's activations), check parity on real test images, and
    record the model's SHA-256 in the bank so that the bank is refused next to any other model."""
    from export.onnx_export import export_onnx

    started = time.time()
    ds, splits, _ = load_prepared(ws)
    bank = Bank.load(bank_dir(ws))
    layout = ActivationLayout.from_json(bank.meta["layout"])
    report = export_onnx(load_classifier(ws), layout, ws.root / "model.onnx", ds.x[splits.test[:parity_count]], opset)
    bank = bank.with_meta(model_sha256=report.sha256, onnx=report.to_json())
    files = [ws.root / "model.onnx", *bank.save(bank_dir(ws))]
    ws.record("export", {"parity_count": parity_count, "opset": opset}, files, started, report.to_json())
    return report.to_json()


def whitebox(ws: Workspace, fpr: float = 0.01, seed: int = 2, m_values: Sequence[int] | None = None,
             bank_sizes: Sequence[int] | None = None, adaptive_eps: Sequence[float] = (), adaptive_count: int = 100,
             adaptive_weight: float = 1.0, url: str | None = None, model: str = "guarded_classifier",
             progress: bool = True) -> dict[str, Any]:
    """The white-box experiment of :mod:`export.whitebox`; writes ``report/whitebox.{json,md,png}``
    (``report/whitebox_served.*`` against a running server).

    Filter strategy against every evaluation attack, and with ``adaptive_eps`` the detector-aware PGD,
    for each bank size of ``bank_sizes`` (each class's strongest fingerprints; default: the whole bank)
    and each ``m`` of ``m_values`` (default: the bank's calibrated ``m``). The server is replayed
    offline, calibrated for ``fpr`` at each setting, unless ``url`` names a running Triton server: then
    the images are sent to its ``model`` over gRPC and its verdicts count, at its own bank, ``m`` and
    false-positive rate (read from its configuration).
    """
    from export.whitebox import RemoteServer, filter_experiment, plot_evasion, pooled, static_calibration

    started = time.time()
    full = Bank.load(bank_dir(ws))
    summary = ws.read_json(ws.attacks / "summary.json", "attack")
    client = None
    if url:
        from client.grpc_client import DetectorClient

        client = DetectorClient(url, model)
        served = client.detector_parameters()
        if served.get("model_sha256") != full.meta.get("model_sha256"):
            raise ModelMismatchError(f"the server at {url} serves model sha256 {served.get('model_sha256')}, the bank in "
                                     f"{ws.root} belongs to {full.meta.get('model_sha256')}: attack the served model")
        fpr, bank_sizes, m_values = float(served["false_positive_rate"]), None, None
    m_values = list(m_values or [load_calibrations(full)["lrt"].m])
    banks = [full] if not bank_sizes else [full.strongest(n) for n in bank_sizes]
    results: dict[str, Any] = {"fpr": fpr, "server": {"url": url, "model": model} if url else "offline replay",
                               "filter": []}
    lines = ["| bank size | m | attack | attacked | local detector | passed locally | still flagged by the server "
             "| evasion rate (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    mismatches = 0
    calibration, cal_meta = load_activation_set(ws, "calibration", mmap=False)
    evals = {label: (*load_activation_set(ws, f"eval_{label}"),  # memory-mapped: rows are copied when used
                     ws.load_npz(ws.attacks / "eval" / f"{label}.npz", "attack")) for label in summary["eval"]}
    from tqdm.auto import tqdm

    steps = tqdm(total=len(banks) * len(m_values), desc="whitebox filter", unit="setting", disable=not progress)
    for bank in banks:
        size = int(bank.counts.max())
        for m in m_values:
            steps.update()
            if client is None:
                cals, keep = calibrate_draws(calibration, cal_meta["predicted"], bank, m, (fpr,), seed,
                                             DEFAULT_CALIBRATION_REPEATS)
                server_cal = cals["lrt"]
            else:  # the attacker knows the served thresholds: those stored with the bank
                server_cal = load_calibrations(bank)["lrt"]
                keep = covered(cal_meta["predicted"], bank, m)
            static_cal = static_calibration(calibration[keep], cal_meta["predicted"][keep], bank, fpr)
            for label, (acts, meta, adv) in evals.items():
                ok = adv["success"] & covered(meta["predicted"], bank, m)
                if not ok.any():
                    continue
                remote = client and RemoteServer(client, adv["x_adv"][ok], meta["predicted"][ok], m)
                r = filter_experiment(bank, server_cal, static_cal, np.ascontiguousarray(acts[ok]),
                                      meta["predicted"][ok], fpr, seed, remote)
                mismatches += remote.label_mismatches if remote else 0
                results["filter"].append({"bank_size": size, "m": m, "attack": label, **r})
                for local in ("static", "random"):
                    e = r[local]
                    lines.append(f"| {size} | {m} | {label} | {r['attacked']} | {local} | {e['passed_local']} "
                                 f"| {e['flagged_by_server']} | {_evasion_cell(e)} |")
    steps.close()
    results["filter_pooled"] = pooled(results["filter"])
    summary_lines = ["| bank size | m | local detector | attacked | passed locally | still flagged by the server "
                     "| evasion rate (95% CI) |", "|---|---|---|---|---|---|---|"]
    for p in results["filter_pooled"]:
        summary_lines.append(f"| {p['bank_size']} | {p['m']} | {p['local']} | {p['attacked']} | {p['passed_local']} "
                             f"| {p['flagged_by_server']} | {_evasion_cell(p)} |")
    where = f"the Triton server at {url} ({model})" if url else "the server, replayed offline"
    table = (f"Server: {where}; thresholds for {fpr:.0%} FPR.\n\nAll evaluation attacks pooled:\n\n"
             + "\n".join(summary_lines) + "\n\nPer attack:\n\n" + "\n".join(lines) + "\n")
    if adaptive_eps:
        results["adaptive"], adaptive_table = adaptive(ws, banks, fpr, seed, m_values, adaptive_eps, adaptive_count,
                                                       adaptive_weight, client, progress)
        table += "\n## Detector-aware PGD\n\n" + adaptive_table
    if client is not None:
        results["server"]["label_mismatches"] = mismatches
        client.close()
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    name = "whitebox_served" if url else "whitebox"  # the served run keeps the offline report
    (out / f"{name}.md").write_text("# White-box attacker: filter strategy (attacked images that pass a local "
                                    "detector, sent to a randomized server)\n\n" + table)
    plot_evasion(results, out / f"{name}.png")
    files = [ws.write_json(out / f"{name}.json", results), out / f"{name}.md", out / f"{name}.png"]
    ws.record(name, {"fpr": fpr, "seed": seed, "m_values": m_values, "bank_sizes": list(bank_sizes or []),
                     "adaptive_eps": list(adaptive_eps), "adaptive_count": adaptive_count,
                     "adaptive_weight": adaptive_weight, "url": url, "model": model}, files, started)
    results["table"] = table
    return results


def _evasion_cell(e: dict[str, Any]) -> str:
    if e["evasion_rate"] is None:
        return ""
    return f"{e['evasion_rate']:.3f} ({e['evasion_ci95'][0]:.3f}-{e['evasion_ci95'][1]:.3f})"


def adaptive(ws: Workspace, banks: Sequence[Bank], fpr: float, seed: int, m_values: Sequence[int],
             eps_values: Sequence[float], count: int, weight: float, client=None,
             progress: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Strategy 2: detector-aware PGD (weight > 0) against each bank, beside plain PGD (weight 0), on
    ``count`` test images; scored against the static detector of the bank and randomized servers
    (replayed offline for each ``m``, or the running server behind ``client``)."""
    from export.adaptive_attack import detector_aware_pgd
    from export.whitebox import RemoteServer, adaptive_experiment, offline_server, static_calibration

    ds, splits, _ = load_prepared(ws)
    model = load_classifier(ws)
    layout = ActivationLayout.from_json(banks[0].meta["layout"])
    test = correctly_classified(model, ds, splits.test)[:count]
    x, y = ds.x[test], ds.y[test]
    cal_acts, cal_meta = load_activation_set(ws, "calibration", mmap=False)
    rng = np.random.default_rng(seed)
    results: list[dict[str, Any]] = []
    names = ["server"] if client else [f"random_m{m}" for m in m_values]
    lines = ["| eps | detector weight | bank size | attacked | misclassified | evade static | "
             + " | ".join(f"evade {n}" for n in names) + " |", "|---" * (6 + len(names)) + "|"]
    from tqdm.auto import tqdm

    for eps in tqdm(eps_values, desc="detector-aware PGD", unit="eps", disable=not progress):
        plain = detector_aware_pgd(model, layout, banks[0], x, y, eps, weight=0.0, seed=seed)  # needs no bank
        for bank in banks:
            keep = covered(cal_meta["predicted"], bank, 1)
            static_cal = static_calibration(cal_acts[keep], cal_meta["predicted"][keep], bank, fpr)
            cals = ({} if client else
                    {m: calibrate_draws(cal_acts, cal_meta["predicted"], bank, m, (fpr,), seed,
                                         DEFAULT_CALIBRATION_REPEATS)[0]["lrt"] for m in m_values})
            for w in (0.0, weight):
                x_adv = plain if w == 0 else detector_aware_pgd(model, layout, bank, x, y, eps, weight=w, seed=seed)
                acts, _, logits = capture_activations(model, x_adv, layout.layers, progress=False, return_logits=True)
                labels = logits.argmax(1)
                ok = covered(labels, bank, max(m_values))
                acts, labels = acts[ok], labels[ok]
                servers = ({"server": RemoteServer(client, x_adv[ok], labels, m_values[0])} if client else
                           {f"random_m{m}": offline_server(bank, cal, acts, labels, fpr, rng) for m, cal in cals.items()})
                r = adaptive_experiment(bank, servers, static_cal, acts, labels, y[ok], fpr)
                r = {"eps": eps, "weight": w, "bank_size": int(bank.counts.max()), **r}
                results.append(r)
                cells = [f"{r[n]['evasion_rate']:.3f}" for n in ("static", *names)]
                lines.append(f"| {eps:g} | {w:g} | {r['bank_size']} | {r['attacked']} | {r['misclassified']} | "
                             + " | ".join(cells) + " |")
    return results, "\n".join(lines) + "\n"
