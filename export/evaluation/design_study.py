"""``nfp study``: many detector designs measured side by side on one pipeline output folder.

Every design is a detector of the one contract (:mod:`kernels.detector`): built from the fit split
(clean images and the bank's attacks into each class), calibrated on the calibration split at 1% FPR,
measured on the test split's clean images (the realized false-positive rate) and on every successful
evaluation attack (TPR at the threshold, ROC AUC). Nothing is chosen on the test split. The designs:

- the paper's fingerprints (k = 5 random neurons, mean likelihood ratio, per-class thresholds) and
  variants: single neurons (k = 1), mixed sizes, one bank per layer merged (layer-stratified
  candidates), per-class against one global threshold, other aggregations of the drawn fingerprints
  (vote, clean likelihood);
- baselines: logit margin, maximum softmax probability, Mahalanobis on the last layer, gray pixels,
  feature squeezing (Xu, Evans & Qi, 2018; not for an imported model, whose graph has no squeezed copies);
- a second view (:class:`SqueezedViewChange`): fingerprints over the change of the activations when the
  input is squeezed, alone and fused with the default;
- fusions of fingerprints and baselines by clean p-values (:class:`kernels.detector.PValueFusion`); the
  first of them is what ``nfp calibrate`` serves by default.

Writes ``report/study.{json,md}``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from export.models.activations import ActivationLayout
from export.bank.calibrate import workspace_squeezing
from export.evaluation.report import UNCHECKED_Z, layered_mahalanobis
from export.data.artifacts import load_activation_set, load_prepared
from export.data.workspace import Workspace
from kernels.bank import Bank
from kernels.baselines import GrayPixels, LogitMargin, Mahalanobis, MaxSoftmax
from kernels.detector import (
    DEFAULT_CALIBRATION_REPEATS,
    DEFAULT_M,
    Detector,
    FingerprintDetector,
    PValueFusion,
    Observations,
    RandomDraws,
)
from kernels.fingerprint_search import ClassFingerprints, SearchConfig, search_fingerprints
from kernels.squeezing import FeatureSqueezing, observed

FPR = 0.01


def layer_stratified_bank(clean: Observations, attacked: Observations, layout: ActivationLayout, num_classes: int,
                          config: SearchConfig) -> Bank:
    """One search per layer (candidates drawn inside it, ``config.keep / layers`` kept per class and
    layer), merged into one bank: every layer gets its share of fingerprints, not just the widest."""
    per_layer = []
    keep = max(1, config.keep // len(layout.slices))
    for s in layout.slices:
        cols = slice(s.offset, s.offset + s.size)
        cfg = SearchConfig(**{**config.to_json(), "keep": keep, "k": tuple(k for k in config.k if k <= s.size) or (1,)})
        found = search_fingerprints(np.ascontiguousarray(clean.acts[:, cols]), clean.labels,
                                    np.ascontiguousarray(attacked.acts[:, cols]), attacked.labels, num_classes, cfg,
                                    progress=False)
        per_layer.append([ClassFingerprints([n + s.offset for n in fp.neurons], *(getattr(fp, a) for a in (
            "clean_mean", "clean_std", "attacked_mean", "attacked_std", "cohen_d", "p_value")), fp.tried, fp.passed)
            for fp in found])
    merged = []
    for c in range(num_classes):
        parts = [layer[c] for layer in per_layer]
        merged.append(ClassFingerprints(
            [n for p in parts for n in p.neurons],
            *(np.concatenate([getattr(p, a) for p in parts]) for a in (
                "clean_mean", "clean_std", "attacked_mean", "attacked_std", "cohen_d", "p_value")),
            sum(p.tried for p in parts), sum(p.passed for p in parts)))
    return Bank.from_fingerprints(merged, layout.num_neurons)


class SqueezedViewChange(Detector):
    """Fingerprints over a second view of the input: the change of its activations when it is squeezed,
    ``acts(squeeze(x)) - acts(x)`` (Bahat, Irani & Shakhnarovich, 2019: a correct prediction is invariant
    to such transforms, an adversarial one less so), searched and voted like the default's fingerprints.
    Offline only: the served graph returns the squeezed copies' logits, not their activations (one more
    output of 3B x D values)."""

    name = "view-change"
    randomized = True

    def __init__(self, squeezer, activations_of: Callable[[np.ndarray], np.ndarray], m: int = DEFAULT_M) -> None:
        self.squeezer, self.activations_of = squeezer, activations_of
        self.inner = FingerprintDetector(draws=RandomDraws(m), method="vote")
        self.draw_size, self._views = m, {}
        super().__init__()

    def view(self, obs: Observations) -> Observations:
        key = id(obs.need("images", self.name))  # each set's view is computed once per study design
        if key not in self._views:
            self._views[key] = (obs.images, self.activations_of(self.squeezer(obs.images)) - obs.acts)
        return Observations(obs.labels, acts=self._views[key][1])

    def fit(self, clean: Observations, attacked: Observations, config: SearchConfig | None = None,
            num_classes: int | None = None) -> "SqueezedViewChange":
        self.inner.fit(self.view(clean), self.view(attacked), config or SearchConfig(), num_classes)
        return self

    def raw_scores(self, obs: Observations, rng: np.random.Generator | None = None):
        return self.inner.raw_scores(self.view(obs), rng)


def designs(ws: Workspace, m: int = DEFAULT_M, candidates: int = 100_000) -> dict[str, Callable[[], Detector]]:
    """Name -> a function building that design's (uncalibrated) detector from the fit split."""
    _, _, meta = load_prepared(ws)
    num_classes = len(meta["class_names"])
    layout = ActivationLayout.load(ws.require(ws.activations / "layout.json", "capture"))
    fit_acts, fit_meta = load_activation_set(ws, "fit_clean", mmap=False)
    att_acts, att_meta = load_activation_set(ws, "fit_attacked", mmap=False)
    clean, attacked = Observations(fit_meta["label"], acts=fit_acts), Observations(att_meta["label"], acts=att_acts)
    banks: dict[Any, Bank] = {}

    def bank(k: tuple[int, ...], keep: int, stratified: bool = False, max_correlation: float | None = None) -> Bank:
        key = (k, keep, stratified, max_correlation)
        if key not in banks:
            cfg = SearchConfig(k=k, candidates=candidates, keep=keep, max_correlation=max_correlation,
                               layer_starts=tuple(s.offset for s in layout.slices))
            banks[key] = (layer_stratified_bank(clean, attacked, layout, num_classes, cfg) if stratified else
                          FingerprintDetector(draws=RandomDraws(m)).fit(clean, attacked, cfg, num_classes).bank)
        return banks[key]

    def fingerprints(k=(1,), keep=300, per_class=False, method="lrt", stratified=False, max_correlation=None):
        return lambda: FingerprintDetector(bank(k, keep, stratified, max_correlation), RandomDraws(m), method,
                                           per_class=per_class)

    last = layout.slices[-1]
    mahalanobis = lambda: Mahalanobis(slice(last.offset, last.offset + last.size)).fit(clean)  # noqa: E731
    def fuse(rule="min", **members):
        return lambda: PValueFusion({k: make() for k, make in members.items()}, rule)

    paper, _ = workspace_squeezing(ws)  # the paper's squeezers; None for an imported model: no such designs
    squeeze = lambda: FeatureSqueezing(paper.logits_of, paper.squeezers)  # noqa: E731 (a fresh one per design)

    def view_change():
        from export.models.activations import capture_activations
        from export.models.classifier import load_classifier

        model, ds = load_classifier(ws), load_prepared(ws)[0]
        train = ws.load_npz(ws.attacks / "train.npz", "attack")
        detector = SqueezedViewChange(paper.squeezers[0], lambda x: capture_activations(model, x, layout.layers,
                                                                                         progress=False)[0], m)
        return detector.fit(Observations(clean.labels, acts=clean.acts, images=ds.x[fit_meta["source"]]),
                            Observations(attacked.labels, acts=attacked.acts, images=train["x_adv"][train["success"]]),
                            SearchConfig(candidates=candidates), num_classes)

    squeezing = {} if paper is None else {
        "default: min-p(fingerprints k=1 vote, margin, feature squeezing)": fuse(
            vote=fingerprints(method="vote"), margin=LogitMargin, squeeze=squeeze),
        "min-p(fingerprints k=1 vote, feature squeezing)": fuse(vote=fingerprints(method="vote"), squeeze=squeeze),
        "second view: vote over the activations' change under the first squeezer": view_change,
        "min-p(vote, second-view vote, margin, feature squeezing)": fuse(
            vote=fingerprints(method="vote"), view=view_change, margin=LogitMargin, squeeze=squeeze),
    }
    return {
        **squeezing,
        "previous default: min-p(fingerprints k=1 vote, margin)": fuse(vote=fingerprints(method="vote"),
                                                                        margin=LogitMargin),
        "Fisher(fingerprints k=1 vote, margin)": fuse("fisher", vote=fingerprints(method="vote"), margin=LogitMargin),
        "min-p(decorrelated fingerprints |r|<=0.5 vote, margin)": fuse(
            vote=fingerprints(method="vote", max_correlation=0.5), margin=LogitMargin),
        "min-p(fingerprints k=1 vote, margin, Mahalanobis)": fuse(vote=fingerprints(method="vote"),
                                                                  margin=LogitMargin, mahalanobis=mahalanobis),
        "min-p(fingerprints k=1 LRT, margin)": fuse(lrt=fingerprints(), margin=LogitMargin),
        "Fisher(fingerprints k=1 LRT, margin)": fuse("fisher", lrt=fingerprints(), margin=LogitMargin),
        "min-p(paper k=5 per-class LRT, margin)": fuse(lrt=fingerprints((5,), 1000, True), margin=LogitMargin),
        "paper: k=5, 1000/class, per-class threshold": fingerprints((5,), 1000, True),
        "k=5, 1000/class, global threshold": fingerprints((5,), 1000),
        "k=1, 300/class, per-class threshold": fingerprints(per_class=True),
        "k=1, 300/class, global threshold": fingerprints(),
        "k=1, 1000/class, global": fingerprints(keep=1000),
        "k=1,2,5 mixed, 1000/class, global": fingerprints((1, 2, 5), 1000),
        "k=1, layer-stratified (300/class split by layer), global": fingerprints(stratified=True),
        "k=5, layer-stratified, global": fingerprints((5,), 1000, stratified=True),
        "k=1 global, vote aggregation": fingerprints(method="vote"),
        "k=1 global, clean-likelihood (anomaly) aggregation": fingerprints(method="anomaly"),
        "baseline: logit margin": LogitMargin,
        "baseline: max softmax": MaxSoftmax,
        "baseline: Mahalanobis (last layer)": mahalanobis,
        "baseline: Mahalanobis, every layer (Lee et al. 2018; Fisher's sum)": lambda: layered_mahalanobis(layout, clean),
        "baseline: gray pixels": GrayPixels,
        **({"baseline: feature squeezing (Xu et al. 2018)": squeeze} if paper is not None else {}),
    }


def run_study(ws: Workspace, seed: int = 1, only: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Measure every design of :func:`designs` (those whose name contains ``only``, if given); write
    ``report/study.{json,md}``."""
    from tqdm.auto import tqdm

    started = time.time()
    sets, attacks = evaluation_sets(ws, ws.read_json(ws.attacks / "summary.json", "attack")["eval"])
    rows: dict[str, dict[str, Any]] = {}
    chosen = {k: v for k, v in designs(ws).items() if only is None or only in k}
    for name, build in tqdm(chosen.items(), desc="study", unit="design", disable=not progress):
        t = time.time()
        rows[name] = {**measure(build(), sets, attacks, seed), "seconds": round(time.time() - t, 1)}
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    table = markdown(rows, list(attacks), {k: len(v) for k, v in attacks.items()}, len(sets["test"]))
    (out / "study.md").write_text(f"# Detector designs side by side\n\n{table}")
    files = [ws.write_json(out / "study.json", {"fpr": FPR, "seed": seed, "designs": rows}), out / "study.md"]
    ws.record("study", {"seed": seed}, files, started)
    return {"designs": rows, "table": table}


def evaluation_sets(ws: Workspace, labels) -> tuple[dict[str, Observations], dict[str, Observations]]:
    """The calibration and test splits, and the successful rows (2 or more) of each evaluation attack
    of ``labels`` that the run has."""
    ds, _, _ = load_prepared(ws)
    sets = {}
    for name in ("calibration", "test"):
        acts, meta = load_activation_set(ws, name, mmap=False)
        sets[name] = Observations(meta["predicted"], acts=acts, logits=meta["logits"], images=ds.x[meta["source"]])
    attacks = {}
    for label in labels:
        if not (ws.activations / f"eval_{label}.npy").exists():
            continue
        acts, meta = load_activation_set(ws, f"eval_{label}", mmap=False)
        adv = ws.load_npz(ws.attacks / "eval" / f"{label}.npz", "attack")
        ok = adv["success"]
        if ok.sum() >= 2:
            attacks[label] = Observations(meta["predicted"][ok], acts=np.ascontiguousarray(acts[ok]),
                                          logits=meta["logits"][ok], images=adv["x_adv"][ok])
    return sets, attacks


def measure(detector: Detector, sets: dict[str, Observations], attacks: dict[str, Observations],
            seed: int) -> dict[str, Any]:
    """Calibrate ``detector`` at :data:`FPR` on the calibration split; its realized FPR on the test split
    and TPR and AUC on each attack (unchecked rows count as misses)."""
    sets = {k: observed(detector, v) for k, v in sets.items()}
    detector.calibrate(sets["calibration"], (FPR,), DEFAULT_CALIBRATION_REPEATS, seed=0)
    rng = np.random.default_rng(seed)
    clean = detector.detect(sets["test"], rng=rng)
    cz = np.where(clean.checked, clean.score, UNCHECKED_Z)
    row: dict[str, Any] = {"clean_fpr": float(clean.is_attacked.mean()), "unchecked_clean": int((~clean.checked).sum())}
    for label, obs in attacks.items():
        v = detector.detect(observed(detector, obs), rng=rng)
        az = np.where(v.checked, v.score, UNCHECKED_Z)
        row[label] = {"tpr": float(v.is_attacked.mean()),
                      "auc": float(roc_auc_score(np.r_[np.zeros(len(cz)), np.ones(len(az))], -np.r_[cz, az]))}
    return row


def markdown(rows: dict[str, dict[str, Any]], attacks: list[str], sizes: dict[str, int], n_clean: int) -> str:
    """One row per design: realized clean FPR at a nominal 1%, then TPR (AUC) per attack; the best TPR
    of each column in bold."""
    best = {a: max(r[a]["tpr"] for r in rows.values()) for a in attacks}
    head = ["design", f"clean FPR@1% (n={n_clean})"] + [f"{a} (n={sizes[a]})" for a in attacks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"**{r[a]['tpr']:.2f}**" if r[a]["tpr"] == best[a] else f"{r[a]['tpr']:.2f}" for a in attacks]
        cells = [f"{c} ({r[a]['auc']:.3f})" for c, a in zip(cells, attacks)]
        lines.append("| " + " | ".join([name, f"{r['clean_fpr']:.3f}", *cells]) + " |")
    return ("TPR at the threshold calibrated for 1% FPR on the calibration split (ROC AUC in brackets), "
            "successful attacks of the test split only; thresholds never see the test split.\n\n"
            + "\n".join(lines) + "\n")
