"""Server detectors built to resist an attacker with a local copy (``nfp whitebox --defences``).

Each :class:`Defence` pairs the detector the server runs with the one the attacker attacks and filters
with (its local copy: the same one when the attacker knows everything). All are the default fused
detector (the fingerprints' vote and the logit margin, :func:`export.bank.calibrate.default_fusion`),
calibrated on the clean calibration split; they differ in how the server's bank is built:

- ``default``: the workspace's bank; the attacker has it (the paper's threat model, Sec. 5).
- ``no-squeeze``: the same without its feature-squeezing member (Xu et al., 2018), the default before
  2026-12-07: what squeezing adds against this attacker.
- ``secret``: the server searches its bank with a secret seed; the attacker has the model, the code and
  the data, so searches banks of its own with other seeds and attacks those (issue 14, item 1).
  ``k5`` and ``secret-k5`` repeat both with the paper's 5-neuron fingerprints, where the seed decides
  far more of the bank (single neurons are nearly all tried by any seed).
- ``decorrelated``: from a pool of ten times the bank, each class keeps fingerprints greedily, strongest
  first and taking the layers in turn, whose values on the attacked fit images correlate with every one
  kept before by at most :data:`MAX_CORRELATION` (item 2; :func:`kernels.fingerprint_search.decorrelate`,
  ``nfp search --max-correlation``).
- ``hardened``: adversarial training of the bank (:func:`harden`): rounds of the strong attacker
  (:func:`export.adversary.attacker.adaptive_attack`) on fresh fit-split images against the current bank;
  the images that fool the classifier join the bank's attacked data and the bank is searched again,
  until the attacker's pass rate stops falling. Never on the test images the experiment attacks.
- ``decorrelated-hardened``: both (item 5).

A robust base (item 4) is a workspace whose classifier was trained with ``nfp train --adversarial-eps``:
run the experiment there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from export.bank.calibrate import default_fusion, workspace_squeezing
from export.bank.search import bank_overlap
from export.data.artifacts import bank_dir, load_activation_set, load_prepared
from export.data.workspace import Workspace
from export.models.activations import ActivationLayout
from kernels.bank import Bank
from kernels.detector import (
    DEFAULT_CALIBRATION_REPEATS,
    DEFAULT_M,
    Detector,
    FingerprintDetector,
    Observations,
    RandomDraws,
)
from kernels.served import served_detector, served_squeezers
from kernels.errors import InvalidInputError
from kernels.fingerprint_search import SearchConfig
from kernels.squeezing import FeatureSqueezing

MAX_CORRELATION = 0.5
SECRET_SEED, ATTACKER_SEED = 7_919, 104_729  # the server's seed stands for one nobody else knows


@dataclass
class Defence:
    """A server detector and the attacker's local copy, both calibrated at the experiment's FPR."""

    name: str
    server: Detector
    attacker: Detector
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class FitData:
    """What the workspace holds to build a bank: the fit split's clean and attacked activations, the
    calibration split's clean observations, the bank's metadata, and the served default's feature
    squeezing on the workspace's classifier (``None`` for an imported model)."""

    clean: Observations
    attacked: Observations
    calibration: Observations
    num_classes: int
    meta: dict[str, Any]
    squeeze: FeatureSqueezing | None = None

    @classmethod
    def load(cls, ws: Workspace) -> "FitData":
        ds, _, prepared = load_prepared(ws)
        (c, cm), (a, am) = load_activation_set(ws, "fit_clean", False), load_activation_set(ws, "fit_attacked", False)
        cal, cal_meta = load_activation_set(ws, "calibration", False)
        stored = Bank.load(bank_dir(ws))
        meta = {k: v for k, v in stored.meta.items() if k not in ("calibration", "search_results")}
        served = served_squeezers(stored)  # every defence squeezes as the served default does
        squeeze, _ = workspace_squeezing(ws, "on" if served else "off", served or None)
        calibration = Observations(cal_meta["predicted"], acts=cal, logits=cal_meta["logits"], images=ds.x[cal_meta["source"]])
        return cls(Observations(cm["label"], acts=c), Observations(am["label"], acts=a),
                   squeeze.observe(calibration) if squeeze else calibration,  # the squeezed copies' logits once
                   len(prepared["class_names"]), meta, squeeze)

    def search(self, config: SearchConfig, extra_attacked: Observations | None = None) -> Bank:
        """The bank searched on the fit split (and ``extra_attacked`` rows)."""
        attacked = joined(self.attacked, extra_attacked)
        detector = FingerprintDetector(draws=RandomDraws(1)).fit(self.clean, attacked, config, self.num_classes,
                                                                 {**self.meta, "search": config.to_json()})
        return detector.bank

    def fused(self, bank: Bank, m: int, fpr: float, seed: int) -> Detector:
        detector = default_fusion(bank, m, self.squeeze)
        detector.calibrate(self.calibration, (fpr,), DEFAULT_CALIBRATION_REPEATS, seed)
        return detector


def joined(a: Observations, b: Observations | None) -> Observations:
    """Labelled activation rows of ``a`` then ``b``."""
    if b is None or not len(b):
        return a
    return Observations.concat([a, b])


def harden(ws: Workspace, data: FitData, bank: Bank, config: SearchConfig, m: int, fpr: float, hardening: "Hardening",
           seed: int, progress: bool = False) -> tuple[Bank, list[dict[str, Any]]]:
    """Adversarial training of the bank against the strong attacker (in the spirit of GAT, Yin et al.,
    ICLR 2020, which trains per-class detectors on attacks against themselves).

    Each round draws ``hardening.count`` fresh correctly classified fit-split images, attacks them with
    :func:`export.adversary.attacker.adaptive_attack` at every eps of ``hardening.eps`` against the current
    fused detector and records the attacker's mean exact pass probability (the round's point of the
    curve); the images that fool the classifier join the bank's attacked data (labelled with their
    predicted class) and the bank is searched again with ``config``. It stops after ``hardening.rounds``
    searches or once a round's pass rate fell by less than ``hardening.min_gain`` from the best so far,
    and returns the bank the attacker did worst against, with the curve."""
    from export.adversary.attacker import (
        AttackConfig,
        ExpectedDetector,
        adaptive_attack,
    )
    from export.models.activations import capture_activations
    from export.models.classifier import correctly_classified, load_classifier

    ds, splits, _ = load_prepared(ws)
    model = load_classifier(ws)
    layout = ActivationLayout.from_json(bank.meta["layout"])
    rng = np.random.default_rng(seed)
    pool = correctly_classified(model, ds, splits.fit)
    extra: Observations | None = None
    history: list[dict[str, Any]] = []
    best_bank, best_pass = bank, np.inf
    for r in range(hardening.rounds + 1):
        copy = ExpectedDetector(data.fused(bank, m, fpr, seed), fpr)
        fit = rng.choice(pool, min(hardening.count, len(pool)), replace=False)
        passed, added = {}, []
        for eps in hardening.eps:
            result = adaptive_attack(model, layout, copy, ds.x[fit], ds.y[fit],
                                     AttackConfig(eps, steps=hardening.steps, seed=seed + r), progress)
            passed[eps] = float(result.pass_probability.mean())
            acts, _, logits = capture_activations(model, result.x_adv, layout.layers, progress=False,
                                                  return_logits=True)
            fooled = logits.argmax(1) != ds.y[fit]
            added.append(Observations(logits.argmax(1)[fooled], acts=acts[fooled]))
        mean_pass = float(np.mean(list(passed.values())))
        history.append({"round": r, "fingerprints": int(bank.num_fingerprints), "expected_pass": passed,
                        "mean_expected_pass": mean_pass})
        improved = mean_pass < best_pass - hardening.min_gain
        if mean_pass < best_pass:
            best_bank, best_pass = bank, mean_pass
        if r == hardening.rounds or (r and not improved):
            break
        for new in added:
            extra = new if extra is None else joined(extra, new)
        bank = data.search(config, extra)
        history[-1]["added"] = int(sum(len(a) for a in added))
    return best_bank, history


def harden_bank(ws: Workspace, hardening: Hardening, fpr: float = 0.01, seed: int = 2,
                progress: bool = False) -> dict[str, Any]:
    """``nfp harden``: :func:`harden` the workspace's bank with its own search settings and write it back
    (uncalibrated: run ``nfp calibrate`` again)."""
    import time

    started = time.time()
    stored = Bank.load(bank_dir(ws))
    data = FitData.load(ws)
    bank, history = harden(ws, data, stored, SearchConfig(**stored.meta["search"]),
                           int(stored.meta.get("draws_per_input", DEFAULT_M)), fpr, hardening, seed, progress)
    bank = bank.with_meta(hardening={**asdict(hardening), "fpr": fpr, "seed": seed, "rounds_done": history})
    files = list(bank.save(bank_dir(ws)))
    ws.record("harden", {**asdict(hardening), "fpr": fpr, "seed": seed}, files, started, {"rounds": history})
    return {"rounds": history, "fingerprints": int(bank.num_fingerprints)}


DEFENCES: dict[str, str] = {
    "default": "the workspace's bank, known to the attacker",
    "no-squeeze": "the default without its feature-squeezing member (the default until 2026-12-07)",
    "secret": "bank searched with a secret seed; the attacker attacks its own bank",
    "k5": "the paper's 5-neuron fingerprints, known to the attacker",
    "secret-k5": "5-neuron fingerprints searched with a secret seed; the attacker attacks its own",
    "decorrelated": f"fingerprints kept for |r| <= {MAX_CORRELATION} on attacked data, layers in turn",
    "hardened": "rounds of detector-aware attacks on fit images added to the bank's data",
    "decorrelated-hardened": "both",
}


@dataclass(frozen=True)
class Hardening:
    """How :func:`harden` builds the ``hardened`` defence: at most ``rounds`` searches, each after the
    strong attacker at every eps of ``eps`` on ``count`` fresh fit images (``steps`` per run); stop once
    a round lowers the attacker's mean pass probability by less than ``min_gain``."""

    rounds: int = 6
    count: int = 300
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    steps: int = 100
    min_gain: float = 0.01

    def __post_init__(self):
        if self.rounds < 0 or self.count < 1 or self.steps < 1 or not self.eps or min(self.eps) <= 0:
            raise InvalidInputError(f"hardening needs rounds >= 0, count >= 1, steps >= 1 and positive eps: {self}")


def build(ws: Workspace, name: str, fpr: float, seed: int, hardening: Hardening = Hardening(),
          progress: bool = False) -> Defence:
    """The defence ``name`` (one of :data:`DEFENCES`) on workspace ``ws``; ``default`` is the served
    detector with its stored thresholds when ``nfp calibrate`` stored them for ``fpr``."""
    if name not in DEFENCES:
        raise InvalidInputError(f"unknown defence {name!r}; choose from {', '.join(DEFENCES)}")
    stored = Bank.load(bank_dir(ws))
    m = int(stored.meta.get("draws_per_input", DEFAULT_M))
    data = FitData.load(ws)
    base = SearchConfig(**stored.meta["search"])
    fused: Callable[[Bank], Detector] = lambda bank: data.fused(bank, m, fpr, seed)  # noqa: E731
    if name == "no-squeeze":
        detector = replace(data, squeeze=None).fused(stored, m, fpr, seed)
        return Defence(name, detector, detector)
    if name == "default":
        stored_fprs = stored.meta.get("calibration", {}).get("fused", {}).get("thresholds", {})
        logits_of = data.squeeze.logits_of if data.squeeze is not None else None
        detector = (served_detector(stored, fpr, logits_of=logits_of) if any(float(f) == fpr for f in stored_fprs)
                    else fused(stored))
        return Defence(name, detector, detector)
    if name in ("secret", "secret-k5", "k5"):
        k5 = replace(base, k=(5,), keep=1000) if "k5" in name else base
        server_bank = data.search(replace(k5, seed=SECRET_SEED if "secret" in name else 0))
        if name == "k5":
            detector = fused(server_bank)
            return Defence(name, detector, detector)
        attacker_bank = data.search(replace(k5, seed=ATTACKER_SEED))
        return Defence(name, fused(server_bank), fused(attacker_bank),
                       {"attacker_bank_overlap": round(bank_overlap(server_bank, attacker_bank), 3)})
    if name.startswith("decorrelated"):
        layout = ActivationLayout.from_json(stored.meta["layout"])
        base = replace(base, max_correlation=MAX_CORRELATION, layer_starts=tuple(s.offset for s in layout.slices))
    bank, notes = data.search(base) if name.startswith("decorrelated") else stored, {}
    if name.endswith("hardened"):
        bank, notes["rounds"] = harden(ws, data, bank, base, m, fpr, hardening, seed, progress)
    detector = fused(bank)
    return Defence(name, detector, detector, {**notes, "fingerprints": int(bank.num_fingerprints)})
