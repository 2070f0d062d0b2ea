"""The white-box attacker with a local copy: what per-request random draws buy.

Threat model (Fisher, Shahar & Resheff, 2024, Sec. 5): the attacker has the classifier's weights, the
whole bank, the threshold and this code, but not the server's random draws. Strategy 1, *filter*: make
many attacked images, score each with a local detector, and send only those that pass it. Local
detectors (each a :class:`kernels.detector.Detector`):

- ``static``: every fingerprint of the predicted class (:class:`~kernels.detector.AllFingerprints`,
  one fixed detector, its own threshold calibrated on the clean calibration split at the same rate);
- ``random``: one local random draw of ``m`` fingerprints, as the server does, with the server's
  calibration.

The figure that matters: of the images that passed the local detector, the fraction the server's own
random draws (fresh for every request) still flag. The static detector lets 100% of its own
survivors through by construction; a randomized server helps only insofar as its draws disagree with
the local one. Strategy 2, *detector-aware optimisation* (:mod:`export.adaptive_attack`), is scored by
:func:`adaptive_experiment`.

The server is a detector too: replayed offline (the kernels' own :class:`~kernels.detector.FingerprintDetector`
with fresh draws per image) or a running Triton server called over gRPC (:class:`ServedOverGrpc`).
:func:`whitebox` runs the whole experiment on a pipeline output folder; :mod:`export.whitebox_report`
writes its tables and plot.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kernels.bank import Bank
from kernels.detector import (
    DEFAULT_CALIBRATION_REPEATS,
    AllFingerprints,
    Detector,
    FingerprintDetector,
    Observations,
    RandomDraws,
    Verdicts,
)
from kernels.errors import FingerprintError, ModelMismatchError


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``k / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def static_detector(bank: Bank, clean: Observations, fpr: float) -> FingerprintDetector:
    """The attacker's static local copy, calibrated for ``fpr`` on clean calibration observations."""
    detector = FingerprintDetector(bank, AllFingerprints())
    detector.calibrate(clean, (fpr,))
    return detector


class ServedOverGrpc(Detector):
    """A running server as a detector: its verdicts on ``Observations.images`` over gRPC (``client``: a
    :class:`client.grpc_client.DetectorClient`), at its own calibration and false-positive rate.

    Counts in ``label_mismatches`` the images the server classified differently from the observations'
    labels (the attacker's local copy); a mismatch means the local copy is not the served model.
    """

    name = "server"
    randomized = True

    def __init__(self, client, m: int, batch: int = 64) -> None:
        super().__init__()
        self.client, self.draw_size, self.batch = client, m, batch
        self.label_mismatches = 0

    def raw_scores(self, obs, rng=None):
        raise FingerprintError("a served detector scores on its server, at its own calibration: call detect()")

    def detect(self, obs: Observations, fpr: float | None = None, rng=None) -> Verdicts:
        images = obs.need("images", self.name)
        parts = []
        for start in range(0, len(obs), self.batch):
            chunk = slice(start, start + self.batch)
            r = self.client.detect(np.ascontiguousarray(images[chunk]))
            if r.fingerprint_ids.shape[1] != self.draw_size:
                raise ModelMismatchError(f"the server draws {r.fingerprint_ids.shape[1]} fingerprints per "
                                         f"request, the local bank's calibration {self.draw_size}: not the same bank")
            self.label_mismatches += int((r.label != obs.labels[chunk]).sum())
            parts.append((r.score.astype(np.float64), r.is_attacked, r.checked, r.fingerprint_ids))
        if not parts:
            return Verdicts(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), np.zeros((0, self.draw_size), np.int64))
        return Verdicts(*(np.concatenate(a) for a in zip(*parts)))


def filter_experiment(local: dict[str, Detector], server: Detector, attacked: Observations,
                      seed: int = 0) -> dict[str, Any]:
    """Filter strategy against one set of successful attacked images: for each local detector, the
    images it lets pass are sent to ``server`` (which draws anew per request).

    Returns, per local detector, how many images passed it and how many of those the server still
    flags (with a 95% Wilson interval of the evasion rate = passed the server too).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"attacked": len(attacked)}
    for name, detector in local.items():
        rows = np.flatnonzero(~detector.detect(attacked, rng=rng).is_attacked)
        flagged = server.detect(attacked.take(rows), rng=rng).is_attacked if len(rows) else np.zeros(0, bool)
        evaded = int((~flagged).sum())
        out[name] = {"passed_local": int(len(rows)), "flagged_by_server": int(flagged.sum()), "evaded_server": evaded,
                     "evasion_rate": evaded / len(rows) if len(rows) else None, "evasion_ci95": wilson(evaded, len(rows))}
    return out


def adaptive_experiment(detectors: dict[str, Detector], attacked: Observations, true_labels: np.ndarray,
                        seed: int = 0) -> dict[str, Any]:
    """Evasion rates of detector-aware attacks (strategy 2): misclassified and not flagged, against
    each detector (the static local copy, randomized servers)."""
    rng = np.random.default_rng(seed)
    wrong = attacked.labels != true_labels
    n = len(attacked)
    out: dict[str, Any] = {"attacked": n, "misclassified": int(wrong.sum())}
    for name, detector in detectors.items():
        evaded = int((wrong & ~detector.detect(attacked, rng=rng).is_attacked).sum())
        out[name] = {"evaded": evaded, "evasion_rate": evaded / n if n else 0.0, "evasion_ci95": wilson(evaded, n)}
    return out


def pooled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Filter-strategy rows pooled over attacks, per (bank size, m, local detector): of all attacked
    images that passed the local detector, how many the server still flagged."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        for local in ("static", "random"):
            key = (r["bank_size"], r["m"], local)
            p = out.setdefault(key, {"bank_size": key[0], "m": key[1], "local": local, "attacked": 0, "passed_local": 0,
                                     "flagged_by_server": 0, "evaded_server": 0})
            p["attacked"] += r["attacked"]
            for name in ("passed_local", "flagged_by_server", "evaded_server"):
                p[name] += r[local][name]
    for p in out.values():
        n = p["passed_local"]
        p["evasion_rate"] = p["evaded_server"] / n if n else None
        p["evasion_ci95"] = wilson(p["evaded_server"], n)
    return list(out.values())


@dataclass(frozen=True)
class WhiteboxConfig:
    """Settings of :func:`whitebox`.

    Attributes:
        fpr: operating false-positive rate (against a running server: the server's own).
        seed: seed of the local draws, the server replay and the attacks' random starts.
        m_values: fingerprints the replayed server draws per input, one experiment each (default: the
            bank's calibrated ``m``).
        bank_sizes: repeat for banks of each class's N strongest fingerprints (default: the whole bank).
        adaptive_eps: also run the detector-aware PGD at these L-inf budgets.
        adaptive_count: test images the detector-aware PGD attacks.
        adaptive_weight: weight of the expected likelihood-ratio term in its loss.
        url: attack a running Triton server at host:port (gRPC) instead of replaying it offline.
        model: the served model to attack at ``url``.
    """

    fpr: float = 0.01
    seed: int = 2
    m_values: tuple[int, ...] = ()
    bank_sizes: tuple[int, ...] = ()
    adaptive_eps: tuple[float, ...] = ()
    adaptive_count: int = 100
    adaptive_weight: float = 1.0
    url: str | None = None
    model: str = "guarded_classifier"


def whitebox(ws, cfg: WhiteboxConfig = WhiteboxConfig(), progress: bool = True) -> dict[str, Any]:
    """The white-box experiment on the pipeline output folder ``ws``; writes ``report/whitebox.{json,md,png}``
    (``report/whitebox_served.*`` against a running server).

    Filter strategy against every evaluation attack and, with ``adaptive_eps``, the detector-aware
    PGD, for each bank size and each ``m``. The server is replayed offline, calibrated for ``fpr`` at
    each setting, unless ``url`` names a running Triton server: then the images are sent to its
    ``model`` over gRPC and its verdicts count, at its own bank, ``m`` and false-positive rate.
    """
    from tqdm.auto import tqdm

    from export.pipeline import bank_dir, load_activation_set
    from export.whitebox_report import filter_tables, plot_evasion

    started = time.time()
    full = Bank.load(bank_dir(ws))
    summary = ws.read_json(ws.attacks / "summary.json", "attack")
    served_m = FingerprintDetector.from_bank(full).draws.m
    client = None
    if cfg.url:
        from client.grpc_client import DetectorClient

        client = DetectorClient(cfg.url, cfg.model)
        params = client.detector_parameters()
        if params.get("model_sha256") != full.meta.get("model_sha256"):
            raise ModelMismatchError(f"the server at {cfg.url} serves model sha256 {params.get('model_sha256')}, the "
                                     f"bank in {ws.root} belongs to {full.meta.get('model_sha256')}: attack the served model")
        cfg = WhiteboxConfig(**{**asdict(cfg), "fpr": float(params["false_positive_rate"]), "bank_sizes": (),
                                "m_values": ()})
    m_values = list(cfg.m_values or [served_m])
    banks = [full.strongest(n) for n in cfg.bank_sizes] if cfg.bank_sizes else [full]
    results: dict[str, Any] = {"fpr": cfg.fpr, "server": {"url": cfg.url, "model": cfg.model} if cfg.url
                               else "offline replay", "filter": []}
    calibration, cal_meta = load_activation_set(ws, "calibration", mmap=False)
    cal_obs = Observations(cal_meta["predicted"], acts=calibration)
    evals = {label: (*load_activation_set(ws, f"eval_{label}"),  # memory-mapped: rows are copied when used
                     ws.load_npz(ws.attacks / "eval" / f"{label}.npz", "attack")) for label in summary["eval"]}
    steps = tqdm(total=len(banks) * len(m_values), desc="whitebox filter", unit="setting", disable=not progress)
    mismatches = 0
    statics = [static_detector(bank, cal_obs, cfg.fpr) for bank in banks]
    for bank, static in zip(banks, statics):
        for m in m_values:
            steps.update()
            if client is None:
                local = FingerprintDetector(bank, RandomDraws(m))
                local.calibrate(cal_obs, (cfg.fpr,), DEFAULT_CALIBRATION_REPEATS, cfg.seed)
            else:  # the attacker knows the served thresholds: those stored with the bank
                local = FingerprintDetector.from_bank(bank, fpr=cfg.fpr)
            server = ServedOverGrpc(client, m) if client else local  # offline: the same detector, fresh draws
            for label, (acts, meta, adv) in evals.items():
                ok = adv["success"] & local.draws.covers(meta["predicted"], bank)
                if not ok.any():
                    continue
                attacked = Observations(meta["predicted"][ok], acts=np.ascontiguousarray(acts[ok]),
                                        images=adv["x_adv"][ok])
                r = filter_experiment({"static": static, "random": local}, server, attacked, cfg.seed)
                results["filter"].append({"bank_size": int(bank.counts.max()), "m": m, "attack": label, **r})
            mismatches += getattr(server, "label_mismatches", 0)
    steps.close()
    results["filter_pooled"] = pooled(results["filter"])
    where = f"the Triton server at {cfg.url} ({cfg.model})" if cfg.url else "the server, replayed offline"
    table = f"Server: {where}; thresholds for {cfg.fpr:.0%} FPR.\n\n" + filter_tables(results)
    if cfg.adaptive_eps:
        from export.whitebox_report import adaptive_table

        results["adaptive"] = adaptive(ws, banks, statics, cfg, m_values, client, progress)
        table += "\n## Detector-aware PGD\n\n" + adaptive_table(results["adaptive"])
    if client is not None:
        results["server"]["label_mismatches"] = mismatches
        client.close()
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    name = "whitebox_served" if cfg.url else "whitebox"  # the served run keeps the offline report
    (out / f"{name}.md").write_text("# White-box attacker: filter strategy (attacked images that pass a local "
                                    "detector, sent to a randomized server)\n\n" + table)
    plot_evasion(results, out / f"{name}.png")
    files = [ws.write_json(out / f"{name}.json", results), out / f"{name}.md", out / f"{name}.png"]
    ws.record(name, {**asdict(cfg), "m_values": m_values}, files, started)
    results["table"] = table
    return results


def adaptive(ws, banks: list[Bank], statics: list[FingerprintDetector], cfg: WhiteboxConfig, m_values: list[int],
             client=None, progress: bool = False) -> list[dict[str, Any]]:
    """Strategy 2: detector-aware PGD (weight > 0) against each bank, beside plain PGD (weight 0), on
    ``adaptive_count`` correctly classified test images; scored against each bank's static detector
    (``statics``, calibrated by :func:`whitebox`) and randomized servers (replayed offline for each
    ``m``, or the running server behind ``client``)."""
    from tqdm.auto import tqdm

    from export.activations import ActivationLayout, capture_activations
    from export.adaptive_attack import PGDConfig, detector_aware_pgd
    from export.pipeline import correctly_classified, load_activation_set, load_classifier, load_prepared

    ds, splits, _ = load_prepared(ws)
    model = load_classifier(ws)
    layout = ActivationLayout.from_json(banks[0].meta["layout"])
    test = correctly_classified(model, ds, splits.test)[: cfg.adaptive_count]
    x, y = ds.x[test], ds.y[test]
    cal_acts, cal_meta = load_activation_set(ws, "calibration", mmap=False)
    cal_obs = Observations(cal_meta["predicted"], acts=cal_acts)
    per_bank: list[dict[str, Detector]] = []  # calibrated once, used at every eps
    for bank, static in zip(banks, statics):
        detectors: dict[str, Detector] = {"static": static}
        if client:
            detectors["server"] = ServedOverGrpc(client, m_values[0])
        for m in ([] if client else m_values):
            detectors[f"random_m{m}"] = FingerprintDetector(bank, RandomDraws(m))
            detectors[f"random_m{m}"].calibrate(cal_obs, (cfg.fpr,), DEFAULT_CALIBRATION_REPEATS, cfg.seed)
        per_bank.append(detectors)
    results: list[dict[str, Any]] = []
    for eps in tqdm(cfg.adaptive_eps, desc="detector-aware PGD", unit="eps", disable=not progress):
        plain = detector_aware_pgd(model, layout, banks[0], x, y, PGDConfig(eps, weight=0.0, seed=cfg.seed))
        for bank, detectors in zip(banks, per_bank):
            for w in (0.0, cfg.adaptive_weight):
                x_adv = plain if w == 0 else detector_aware_pgd(model, layout, bank, x, y,
                                                                 PGDConfig(eps, weight=w, seed=cfg.seed))
                acts, _, logits = capture_activations(model, x_adv, layout.layers, progress=False, return_logits=True)
                labels = logits.argmax(1)
                ok = RandomDraws(max(m_values)).covers(labels, bank)
                attacked = Observations(labels[ok], acts=acts[ok], images=x_adv[ok])
                r = adaptive_experiment(detectors, attacked, y[ok], cfg.seed)
                results.append({"eps": eps, "weight": w, "bank_size": int(bank.counts.max()), **r})
    return results


