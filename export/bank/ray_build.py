"""Building the bank past one machine, on Ray: one shard per focal class.

The cost of a bank is not the search (100k+ candidates/s) but the targeted attacks into every class
and the activation capture (``python -m export.evaluation.bank_cost`` measures both). Each focal class ``c`` is
one shard, computed wherever Ray places it: attack ``per_class`` correctly classified fit images of
other classes into ``c`` (the bank's targeted L-inf ladder, :func:`export.attacks.art_attacks.attack_into_classes`
with the class's own seed), capture the activations of ``c``'s clean fit images and of the successful
attacks, and search ``c``'s fingerprints (:func:`kernels.fingerprint_search.search_focal_class`, the
class's own seed). Every shard computes with one torch thread, so a shard's arrays do not depend on
where, or beside what, it ran: the merged bank is identical, array for array, whether built in one
process (``--workers 0``) or across a cluster.

Shards travel back through Ray's object store and the driver writes each one as it arrives
(``<out>/bank_shards/class_<c>.npz``), so workers need no shared file system. A run stopped by a dead
worker, a lost node or Ctrl-C is resumed by running it again: only missing shards are computed (the
plan, ``plan.json``, must match). Then the shards are merged into ``bank/`` and the calibration split's
activations are captured, so ``nfp calibrate``, ``export`` and ``serve`` follow as usual.

    nfp build-bank --out runs/default                          # Ray on this machine's cores
    nfp build-bank --out runs/default --ray-address HOST:6379  # join a running cluster
    nfp build-bank --out runs/default --workers 0              # one process, no Ray
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export.models.activations import ActivationLayout, capture_activations
from export.attacks.art_attacks import BankAttacks, AttackDefaults, attack_defaults, attack_into_classes, merge_results
from export.data.datasets import Dataset, Splits
from export.attacks.art_attacks import DEFAULT_TRAIN_PER_CLASS
from export.data.artifacts import bank_dir, load_prepared
from export.models.classifier import correctly_classified, load_classifier
from export.data.workspace import Workspace
from kernels.bank import Bank
from kernels.errors import FingerprintError, InvalidInputError
from kernels.fingerprint_search import ClassFingerprints, SearchConfig, search_focal_class

SHARDS = "bank_shards"


@dataclass(frozen=True)
class BankPlan:
    """What every shard of one bank build shares; a resumed run must have the same plan."""

    per_class: int
    seed: int
    search: dict[str, Any]
    defaults: dict[str, Any]
    layers: list[str] | None
    classes: list[int]
    model_sha256: str


def class_shard(model, x: np.ndarray, y: np.ndarray, source: np.ndarray, num_classes: int, plan: BankPlan,
                c: int) -> dict[str, Any]:
    """Shard ``c``: attack into ``c``, capture, search (see the module docstring). Returns the class's
    fingerprints as arrays plus what it cost."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shard's arrays must not depend on the worker's core count
    try:
        return _shard(model, x, y, source, num_classes, plan, c)
    finally:
        torch.set_num_threads(threads)


def _shard(model, x, y, source, num_classes, plan, c) -> dict[str, Any]:
    started = time.perf_counter()
    defaults = AttackDefaults(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.defaults.items()})
    results = attack_into_classes(model, x, y, source, num_classes,
                                  BankAttacks(defaults, plan.per_class, plan.seed * 1_000_003 + c, into=[c]), progress=False)
    attacked = merge_results(results)
    ok = attacked["success"]
    attacked_s = time.perf_counter()
    clean_acts, layout = capture_activations(model, x[y == c], plan.layers, progress=False)
    adv_acts = (capture_activations(model, attacked["x_adv"][ok], plan.layers, progress=False)[0] if ok.any()
                else np.zeros((0, layout.num_neurons), np.float32))
    captured_s = time.perf_counter()
    config = replace(SearchConfig(**plan.search), layer_starts=tuple(s.offset for s in layout.slices))
    fp = search_focal_class(clean_acts, adv_acts, c, config)
    lengths = np.array([len(n) for n in fp.neurons], np.int64)
    return {"c": c, "neurons": np.concatenate(fp.neurons) if fp.neurons else np.zeros(0, np.int64), "lengths": lengths,
            "clean_mean": fp.clean_mean, "clean_std": fp.clean_std, "attacked_mean": fp.attacked_mean,
            "attacked_std": fp.attacked_std, "cohen_d": fp.cohen_d, "p_value": fp.p_value,
            "tried": fp.tried, "passed": fp.passed, "attacked": int(len(np.unique(attacked["source"]))),
            "successful": int(ok.sum()), "layout": json.dumps(layout.to_json()),
            "attack_s": attacked_s - started, "capture_s": captured_s - attacked_s,
            "search_s": time.perf_counter() - captured_s}


def shard_path(ws: Workspace, c: int) -> Path:
    return ws.root / SHARDS / f"class_{c:05d}.npz"


def save_shard(ws: Workspace, shard: dict[str, Any]) -> None:
    path = shard_path(ws, shard["c"])
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **shard)
    partial.replace(path)  # atomic: a shard file is whole or absent


def load_shard(ws: Workspace, c: int) -> dict[str, Any]:
    with np.load(shard_path(ws, c), allow_pickle=False) as f:
        return {k: f[k] if f[k].ndim else f[k].item() for k in f.files}


def fingerprints(shard: dict[str, Any]) -> ClassFingerprints:
    neurons = np.split(shard["neurons"], np.cumsum(shard["lengths"])[:-1]) if len(shard["lengths"]) else []
    return ClassFingerprints(list(neurons), shard["clean_mean"], shard["clean_std"], shard["attacked_mean"],
                             shard["attacked_std"], shard["cohen_d"], shard["p_value"], int(shard["tried"]),
                             int(shard["passed"]))


def _plan(ws: Workspace, ds: Dataset, meta: dict[str, Any], per_class: int, seed: int, config: SearchConfig,
          layers: Sequence[str] | None, classes: Sequence[int] | None, profile: str | None) -> BankPlan:
    from kernels.bank import sha256_file

    defaults = attack_defaults(profile or meta["dataset"])
    chosen = sorted(set(range(ds.num_classes) if classes is None else classes))
    if not chosen or chosen[0] < 0 or chosen[-1] >= ds.num_classes:
        raise InvalidInputError(f"classes must lie in [0, {ds.num_classes}), got {classes}")
    return BankPlan(per_class, seed, config.to_json(), asdict(defaults), list(layers) if layers else None, chosen,
                    sha256_file(ws.classifier))


@dataclass(frozen=True)
class RayCluster:
    """Where :func:`build_bank` computes its shards: in this process (``workers=0``), on a local Ray
    cluster of ``workers`` CPUs (default all), or on the cluster at ``address``; a task whose worker
    dies is retried ``max_retries`` times."""

    workers: int | None = None
    address: str | None = None
    max_retries: int = 3


def build_bank(ws: Workspace, per_class: int = DEFAULT_TRAIN_PER_CLASS, seed: int = 0,
               config: SearchConfig = SearchConfig(), layers: Sequence[str] | None = None,
               classes: Sequence[int] | None = None, profile: str | None = None, cluster: RayCluster = RayCluster(),
               progress: bool = True) -> dict[str, Any]:
    """Compute the missing shards where ``cluster`` says, merge them into ``bank/`` and capture the
    calibration split. Past ``cluster.max_retries`` retries of a shard the run stops with the count of
    shards done, and running it again resumes."""
    workers = cluster.workers
    started = time.time()
    ds, splits, meta = load_prepared(ws)  # once: a folder of photos is read again on every load
    plan = _plan(ws, ds, meta, per_class, seed, config, layers, classes, profile)
    folder = ws.root / SHARDS
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != json.loads(json.dumps(asdict(plan))):
        raise InvalidInputError(f"{folder} holds shards of another plan (other seeds, sizes or model): remove it "
                                f"to start over, or run with the same options to resume")
    plan_file.write_text(json.dumps(asdict(plan), indent=2))
    todo = [c for c in plan.classes if not shard_path(ws, c).exists()]
    model = load_classifier(ws).eval()
    fit = correctly_classified(model, ds, splits.fit)
    args = (ds.x[fit], ds.y[fit], fit, ds.num_classes, plan)
    computed = len(todo)
    if todo and workers == 0:
        from tqdm.auto import tqdm

        for c in tqdm(todo, desc="bank shards", disable=not progress):
            save_shard(ws, class_shard(model, *args, c))
    elif todo:
        _on_ray(ws, model, args, todo, len(plan.classes), cluster, progress)
    return merge_shards(ws, ds, splits, meta, plan, model, computed, started)


def _on_ray(ws, model, args, todo: list[int], total: int, cluster: RayCluster, progress: bool) -> None:
    workers, address, max_retries = cluster.workers, cluster.address, cluster.max_retries
    import ray
    from tqdm.auto import tqdm

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    try:
        shard = ray.remote(num_cpus=1, max_retries=max_retries)(class_shard)
        shared = [ray.put(model), *(ray.put(a) for a in args)]
        pending = {shard.remote(*shared, c): c for c in todo}
        bar = tqdm(total=total, initial=total - len(todo), desc="bank shards (cluster)", disable=not progress)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(ready[0])
            try:
                save_shard(ws, ray.get(ready[0]))
            except ray.exceptions.RayError as e:
                for ref in pending:
                    ray.cancel(ref, force=True)
                done = len(list((ws.root / SHARDS).glob("class_?????.npz")))
                raise FingerprintError(f"shard of class {c} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                       f"{done} of {total} shards are saved: run the same command again to "
                                       "compute the rest") from None
            bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()


def merge_shards(ws: Workspace, ds: Dataset, splits: Splits, meta: dict[str, Any], plan: BankPlan, model,
                 computed: int, started: float) -> dict[str, Any]:
    """The shards of ``plan``, in class order, packed into ``bank/`` (classes outside the plan get no
    fingerprints); then the calibration split's activations in the layout the shards used."""
    shards = {c: load_shard(ws, c) for c in plan.classes}
    layouts = {s["layout"] for s in shards.values()}
    if len(layouts) != 1:
        raise InvalidInputError("the shards were captured with different layers: remove bank_shards and rebuild")
    layout = ActivationLayout.from_json(json.loads(layouts.pop()))
    empty = fingerprints({"neurons": np.zeros(0, np.int64), "lengths": np.zeros(0, np.int64), "tried": 0, "passed": 0,
                          **{k: np.zeros(0) for k in ("clean_mean", "clean_std", "attacked_mean", "attacked_std",
                                                      "cohen_d", "p_value")}})
    per_class = [fingerprints(shards[c]) if c in shards else empty for c in range(ds.num_classes)]
    config = replace(SearchConfig(**plan.search), layer_starts=tuple(s.offset for s in layout.slices))
    bank = Bank.from_fingerprints(per_class, layout.num_neurons, {
        "class_names": meta["class_names"], "layout": layout.to_json(), "search": config.to_json(),
        "search_results": [{"tried": fp.tried, "passed": fp.passed, "kept": len(fp.neurons),
                            "best_abs_d": float(np.abs(fp.cohen_d).max()) if len(fp.cohen_d) else None}
                           for fp in per_class], "built_by": {"shards": SHARDS, "per_class": plan.per_class,
                                                             "seed": plan.seed}})
    files = list(bank.save(bank_dir(ws)))
    ws.activations.mkdir(parents=True, exist_ok=True)
    x, label = ds.x[splits.calibration], ds.y[splits.calibration]
    acts, _, logits = capture_activations(model, x, plan.layers, out=ws.activations / "calibration.npy",
                                          progress=False, return_logits=True)
    np.savez(ws.activations / "calibration.npz", label=label, predicted=logits.argmax(1), source=splits.calibration,
             logits=logits)
    layout.save(ws.activations / "layout.json")
    files += [ws.activations / "calibration.npy", ws.activations / "calibration.npz", ws.activations / "layout.json"]
    cost = {k: round(float(sum(s[k] for s in shards.values())), 2) for k in ("attack_s", "capture_s", "search_s")}
    results = {"shards": len(shards), "computed_now": computed, "fingerprints_per_class": bank.counts.tolist(),
               "attacked": int(sum(s["attacked"] for s in shards.values())),
               "successful": int(sum(s["successful"] for s in shards.values())), "shard_seconds": cost}
    ws.record("build-bank", asdict(plan), files, started, results)
    return results
