"""``nfp study --transfer``: what transfers between attack families, leave one family out.

The bank is searched on attacks of one or more *families* (L-inf, minimal L2, Carlini-Wagner, DeepFool,
elastic-net L1); an attacker picks the family. Every design here is the served default's shape
(:func:`export.bank.calibrate.default_fusion`: the fingerprints' vote, the logit margin and, for the
built-in classifiers, feature squeezing) with a bank from some families, measured on every family's
test attacks and on a black-box attack no bank ever sees. The table marks the cells whose family the
bank never saw: those are the figures a user facing a new attack should read.

Bank data of a family: its attacks on correctly classified images of the fit split, each image
labelled with the class it lands in (the bank of class ``c`` separates clean ``c`` from images attacked
into ``c``), the same images for every design; the L-inf family is the pipeline's own bank data
(targeted BIM/PGD, ``fit_attacked``). Test data: the pipeline's evaluation attacks where it ran the
family, else the family's attack on correctly classified test images. All cached in
``attacks/families/``; thresholds from the calibration split at 1% FPR as everywhere
(:func:`export.evaluation.design_study.measure`).

Writes ``report/transfer.{json,md}``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.bank.calibrate import workspace_squeezing
from export.data.artifacts import load_activation_set, load_prepared
from export.data.workspace import Workspace
from export.evaluation.design_study import FPR, evaluation_sets, measure
from kernels.baselines import LogitMargin
from kernels.errors import InvalidInputError
from kernels.detector import DEFAULT_M, Detector, FingerprintDetector, Observations, PValueFusion, RandomDraws
from kernels.fingerprint_search import SearchConfig
from kernels.squeezing import FeatureSqueezing


@dataclass(frozen=True)
class Family:
    """One attack family: ``bank`` attacks (each on its own images of the fit split; empty
    for the pipeline's L-inf bank data), ``test`` columns (an evaluation attack's label, or an attack
    run on test images when the pipeline did not run it)."""

    name: str
    bank: tuple[str, ...]
    test: tuple[str, ...]


L2_LADDER = (1.0, 2.0, 3.0, 4.0)  # L2 budgets of the minimal-L2 family's bank data (MNIST images have L2 ~ 9)
FAMILIES = (
    Family("L-inf", (), ("pgd_eps0.1", "pgd_eps0.3")),
    Family("L2 PGD", tuple(f"ProjectedGradientDescent:norm=2,eps={e:g},eps_step={e / 10:g},max_iter=40"
                           for e in L2_LADDER), ("ProjectedGradientDescent:norm=2,eps=2,eps_step=0.2,max_iter=40",)),
    Family("CW-L2", ("cw-l2", "cw-l2:confidence=10"), ("cw-l2", "cw-l2_conf5", "cw-l2_conf10")),
    Family("DeepFool", ("deepfool",), ("deepfool",)),
    Family("EAD (L1)", ("ElasticNet:max_iter=20,binary_search_steps=5",), ("ElasticNet:max_iter=20,binary_search_steps=5",)),
)
BLACK_BOX = "SquareAttack:eps=0.1,max_iter=200,nb_restarts=1"  # in no bank, unseen by every design
FAMILY_IMAGES = 300  # images of the fit split each bank attack is run on, and of the test split each test attack


def _label(text: str, dataset: str) -> str:
    from export.attacks.art_attacks import attack_defaults, parse_attack

    return parse_attack(text, attack_defaults(dataset)).label


def _attacked(ws: Workspace, name: str, text: str, pool: np.ndarray, count: int, seed: int,
              progress: bool) -> Observations:
    """The successful rows of attack ``text`` on ``count`` images drawn (seeded) from ``pool``, labelled
    with the class each lands in; cached in ``attacks/families/{name}_n{count}.npz``."""
    from export.attacks.art_attacks import attack_defaults, parse_attack, run_attack
    from export.models.activations import ActivationLayout, capture_activations
    from export.models.classifier import load_classifier

    path = ws.attacks / "families" / f"{name}_n{count}.npz"
    if not path.exists():
        ds, _, meta = load_prepared(ws)
        model = load_classifier(ws)
        layout = ActivationLayout.load(ws.require(ws.activations / "layout.json", "capture"))
        idx = np.sort(np.random.default_rng(seed).choice(pool, size=min(count, len(pool)), replace=False))
        spec = parse_attack(text, attack_defaults(meta["dataset"]))
        r = run_attack(spec, model, ds.x[idx], ds.y[idx], idx, len(meta["class_names"]), seed=seed, progress=progress)
        x = r.x_adv[r.success]
        acts, _, logits = capture_activations(model, x, layout.layers, progress=False, return_logits=True) if len(x) \
            else (np.zeros((0, layout.num_neurons), np.float32), None, np.zeros((0, len(meta["class_names"]))))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, acts=acts, logits=logits, x_adv=x, attempted=len(idx))
    with np.load(path) as f:
        return Observations(f["logits"].argmax(1), acts=f["acts"], logits=f["logits"], images=f["x_adv"])


def family_sets(ws: Workspace, images: int, seed: int, progress: bool
                ) -> tuple[dict[str, Observations], dict[str, Observations], dict[str, str]]:
    """``(bank data per family, test attacks by column, family of each column)``; each attack the pipeline
    did not run is run on ``images`` images."""
    from export.models.classifier import correctly_classified, load_classifier

    ds, splits, meta = load_prepared(ws)
    model = load_classifier(ws)
    fit_pool, test_pool = (correctly_classified(model, ds, s) for s in (splits.fit, splits.test))
    att_acts, att_meta = load_activation_set(ws, "fit_attacked", mmap=False)
    train = ws.load_npz(ws.attacks / "train.npz", "attack")
    bank_data = {"L-inf": Observations(att_meta["label"], acts=att_acts, logits=att_meta["logits"],
                                       images=train["x_adv"][train["success"]])}
    _, evaluated = evaluation_sets(ws, [t for f in FAMILIES for t in f.test])
    tests, family_of = {}, {}
    for i, fam in enumerate(FAMILIES):
        if fam.bank:
            bank_data[fam.name] = Observations.concat([
                _attacked(ws, f"fit_{_label(t, meta['dataset'])}", t, fit_pool, images, seed + 10 * i + j, progress)
                for j, t in enumerate(fam.bank)])
        for t in fam.test:
            if ":" not in t:  # an evaluation attack: measured where the pipeline ran it
                label, obs = t, evaluated.get(t)
            else:
                label = _label(t, meta["dataset"])
                obs = _attacked(ws, f"test_{label}", t, test_pool, images, seed + 10 * i + 7, progress)
            if obs is not None and len(obs) >= 2:
                tests[label], family_of[label] = obs, fam.name
    square = _attacked(ws, "test_SquareAttack", BLACK_BOX, test_pool, images, seed + 99, progress)
    if len(square) >= 2:
        tests["SquareAttack (black-box)"], family_of["SquareAttack (black-box)"] = square, "black-box"
    return bank_data, tests, family_of


def transfer_study(ws: Workspace, seed: int = 1, images: int = FAMILY_IMAGES, progress: bool = True) -> dict[str, Any]:
    """The default's shape with banks from: the L-inf family alone (the served default), each family
    alone, all families but one (leave one family out), all families, and two banks (L-inf, CW-L2) voting
    apart; every design measured on every family's test attacks. Writes ``report/transfer.{json,md}``."""
    if images < 2:
        raise InvalidInputError(f"each family's attacks need at least 2 images, got {images}")
    started = time.time()
    bank_data, tests, family_of = family_sets(ws, images, seed, progress)
    _, _, meta = load_prepared(ws)
    num_classes = len(meta["class_names"])
    fit_acts, fit_meta = load_activation_set(ws, "fit_clean", mmap=False)
    clean = Observations(fit_meta["label"], acts=fit_acts)
    paper, _ = workspace_squeezing(ws)

    def vote(families: tuple[str, ...]) -> Detector:
        attacked = Observations.concat([bank_data[f] for f in families])
        return FingerprintDetector(draws=RandomDraws(DEFAULT_M), method="vote").fit(clean, attacked, SearchConfig(),
                                                                                    num_classes)

    def default_shape(*banks: tuple[str, ...]) -> Detector:
        """min-p of one vote per bank (each from the families given), the margin and squeezing."""
        members: dict[str, Detector] = {f"vote {'+'.join(b)}": vote(b) for b in banks}
        members["margin"] = LogitMargin()
        if paper is not None:
            members["squeeze"] = FeatureSqueezing(paper.logits_of, paper.squeezers)
        return PValueFusion(members)

    names = list(bank_data)
    designs: dict[str, tuple[tuple[str, ...], ...]] = {"default (bank: L-inf)": (("L-inf",),)}
    designs.update({f"bank: {f} only": ((f,),) for f in names if f != "L-inf"})
    designs.update({f"bank: all but {f}": (tuple(g for g in names if g != f),) for f in names})
    designs["bank: all families"] = (tuple(names),)
    designs["two banks, L-inf and CW-L2, one vote each"] = (("L-inf",), ("CW-L2",))
    sets, _ = evaluation_sets(ws, [])
    from tqdm.auto import tqdm

    rows, skipped = {}, {}
    for design, banks in tqdm(designs.items(), desc="transfer", unit="design", disable=not progress):
        try:
            detector = default_shape(*banks)
        except InvalidInputError as e:  # too few rows of a family for any class's search
            skipped[design] = str(e)
            continue
        rows[design] = {**measure(detector, sets, tests, seed), "bank_families": sorted({f for b in banks for f in b})}
    table = markdown(rows, tests, family_of, len(sets["test"])) + "".join(
        f"\nNot measured: {design}: {why}.\n" for design, why in skipped.items())
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    (out / "transfer.md").write_text(f"# Leave one attack family out\n\n{table}")
    files = [ws.write_json(out / "transfer.json", {"fpr": FPR, "seed": seed, "images": images,
                                                   "designs": rows, "skipped": skipped, "family_of": family_of,
                                                   "bank_rows": {k: len(v) for k, v in bank_data.items()}}),
             out / "transfer.md"]
    ws.record("transfer", {"seed": seed, "images": images}, files, started)
    return {"designs": rows, "table": table}


def markdown(rows: dict[str, dict[str, Any]], tests: dict[str, Observations], family_of: dict[str, str],
             n_clean: int) -> str:
    """Designs x test attacks, TPR (AUC); a cell whose family the design's bank never saw is marked ``*``."""
    head = ["design", f"clean FPR@1% (n={n_clean})"] + [f"{k} [{family_of[k]}] (n={len(v)})" for k, v in tests.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{r[k]['tpr']:.2f}{'' if family_of[k] in r['bank_families'] else '*'} ({r[k]['auc']:.3f})"
                 for k in tests]
        lines.append("| " + " | ".join([name, f"{r['clean_fpr']:.3f}", *cells]) + " |")
    return ("TPR at the threshold calibrated for 1% FPR on the calibration split (ROC AUC in brackets), successful "
            "attacks of the test split only; `*`: a family the design's bank never saw. Every design is "
            "min-p(vote, margin, squeezing), the served default's shape.\n\n" + "\n".join(lines) + "\n")
