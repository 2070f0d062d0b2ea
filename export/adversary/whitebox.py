"""The white-box attacker with a local copy: what per-request random draws, a secret bank and hardened
banks buy (``nfp whitebox``).

Threat model (Fisher, Shahar & Resheff, 2024, Sec. 5, made stronger): the attacker has the classifier's
weights, this code, the data and, unless the defence keeps it secret, the bank and the thresholds; it
never sees the server's random draws. It attacks held-out test images (never used to build, calibrate
or harden anything) with the strong attacker of :mod:`export.adversary.attacker` (untargeted, then into
every other class, every iterate judged by the exact pass probability of the served decision), at each
L-inf budget. Two strategies are scored against the server:

- *send all*: every attacked image is sent; evasion = misclassified and not flagged, per request
  (averaged over ``draws`` requests of each image, each with fresh draws) and in every one of them;
- *filter*: the attacker sends an image only where its exact pass probability is at least ``send_at``;
  evasion = the share of sent images' requests the server does not flag.

Beside them: the attacker's own expectation (mean exact pass probability; after the untargeted run
alone, and in all), plain PGD (robust accuracy at eps and at eps / 2, Tramèr 2022's yardstick) and the
realized clean false-positive rate.

The server is a detector of the one contract: a :class:`export.adversary.defences.Defence`'s detector replayed
offline with fresh draws per request, or a running Triton server called over gRPC
(:class:`ServedOverGrpc`). :func:`whitebox` runs it all; :mod:`export.adversary.report` writes the table and plot.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from export.adversary.attacker import AttackConfig
from export.adversary.defences import Hardening
from export.evaluation.report import wilson
from kernels.bank import Bank
from kernels.detector import Detector, Observations, Verdicts
from kernels.errors import FingerprintError, ModelMismatchError
from kernels.squeezing import observed


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
            draws = r.fingerprint_ids if r.fingerprint_ids is not None else np.zeros((len(r.label), 0), np.int64)
            if r.fingerprint_ids is not None and draws.shape[1] != self.draw_size:
                raise ModelMismatchError(f"the server draws {draws.shape[1]} fingerprints per request, the local "
                                         f"bank's calibration {self.draw_size}: not the same bank")
            self.label_mismatches += int((r.label != obs.labels[chunk]).sum())
            parts.append((r.score.astype(np.float64), r.is_attacked, r.checked, draws))
        if not parts:
            return Verdicts(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), np.zeros((0, 0), np.int64))
        return Verdicts(*(np.concatenate(a) for a in zip(*parts)))


@dataclass(frozen=True)
class WhiteboxConfig:
    """Settings of :func:`whitebox`.

    Attributes:
        fpr: operating false-positive rate (against a running server: the server's own).
        seed: seed of the server replay's draws, the attacks' random starts and the defences' calibration.
        eps: the L-inf budgets attacked.
        count: correctly classified test images attacked.
        steps: PGD steps per attack configuration.
        draws: requests per attacked image (fresh server draws each).
        defences: names of :data:`export.adversary.defences.DEFENCES`.
        attack: the attacker's settings beyond eps, steps and seed (:class:`export.adversary.attacker.AttackConfig`).
        send_at: the filter sends an image when the attacker's exact pass probability is at least this.
        hardening: how the ``hardened`` defence is built (:class:`export.adversary.defences.Hardening`).
        url: attack a running Triton server at host:port (gRPC) instead of replaying it offline (then
            the defence is the served bank, ``default``).
        model: the served model to attack at ``url``.
    """

    fpr: float = 0.01
    seed: int = 2
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    count: int = 200
    steps: int = 200
    draws: int = 20
    defences: tuple[str, ...] = ("default",)
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(eps=0.3))
    send_at: float = 0.5
    hardening: Hardening = field(default_factory=Hardening)
    url: str | None = None
    model: str = "guarded_classifier"


def bootstrap_mean(values: np.ndarray, seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-image ``values``."""
    if len(values) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def request_evasion(server: Detector, obs: Observations, true_labels: np.ndarray, draws: int,
                    rng: np.random.Generator) -> np.ndarray:
    """``(N,)`` per image, the share of ``draws`` requests in which it is misclassified and not flagged."""
    wrong, obs = obs.labels != true_labels, observed(server, obs)
    passed = np.mean([~server.detect(obs, rng=rng).is_attacked for _ in range(draws)], axis=0)
    return wrong * passed


def score_attack(server: Detector, result, plain: dict[str, np.ndarray], model, layout, y: np.ndarray,
                 cfg: WhiteboxConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Both strategies' figures for one attack run (:class:`export.adversary.attacker.AttackResult`), with
    plain PGD at eps and eps / 2 (``plain``: ``{"eps": images, "half": images}``) beside them."""
    from export.models.activations import capture_activations

    def observe(images: np.ndarray) -> Observations:
        acts, _, logits = capture_activations(model, images, layout.layers, progress=False, return_logits=True)
        return Observations(logits.argmax(1), acts=acts, images=images, logits=logits)

    n = len(y)
    kept = observe(result.x_adv)
    per_image = request_evasion(server, kept, y, cfg.draws, rng)
    always = int((per_image == 1).sum())
    # filter: the kept image is sent only where the attacker's exact pass probability says it passes
    sent = np.flatnonzero(result.pass_probability >= cfg.send_at)
    filtered = request_evasion(server, kept.take(sent), y[sent], cfg.draws, rng) if len(sent) else np.zeros(0)
    pgd = observe(plain["eps"])
    return {"attacked": n, "misclassified": int((kept.labels != y).sum()),
            "robust_accuracy": float((pgd.labels == y).mean()),
            "robust_accuracy_half_eps": float((observe(plain["half"]).labels == y).mean()),
            "plain_pgd_evasion": float(request_evasion(server, pgd, y, cfg.draws, rng).mean()),
            "expected_untargeted": result.expected_after("untargeted"),
            "expected_evasion": float(result.pass_probability.mean()),
            "eot_evasion": float(per_image.mean()), "eot_ci95": bootstrap_mean(per_image, cfg.seed),
            "eot_all_draws": always, "eot_all_draws_ci95": wilson(always, n),
            "filter_sent": int(len(sent)), "filter_evasion": float(filtered.mean()) if len(sent) else None,
            "filter_ci95": bootstrap_mean(filtered, cfg.seed),
            "runs_kept": {name: int((result.run == i).sum()) for i, name in enumerate(result.runs)
                          if (result.run == i).any()}}


def whitebox(ws, cfg: WhiteboxConfig = WhiteboxConfig(), progress: bool = True) -> dict[str, Any]:
    """The white-box experiment on the pipeline output folder ``ws``: every defence of ``cfg`` at every
    eps; writes ``report/whitebox.{json,md,png}`` (``report/whitebox_served.*`` against a running server)."""
    from tqdm.auto import tqdm

    from export.models.activations import ActivationLayout
    from export.adversary.attacker import ExpectedDetector, adaptive_attack, plain_pgd
    from export.adversary.defences import DEFENCES, Defence, build
    from export.data.artifacts import bank_dir, load_activation_set, load_prepared
    from export.models.classifier import correctly_classified, load_classifier
    from export.adversary.report import plot_evasion, whitebox_table

    started = time.time()
    stored = Bank.load(bank_dir(ws))
    client = None
    if cfg.url:
        from client.grpc_client import DetectorClient

        client = DetectorClient(cfg.url, cfg.model)
        params = client.detector_parameters()
        if params.get("model_sha256") != stored.meta.get("model_sha256"):
            raise ModelMismatchError(f"the server at {cfg.url} serves model sha256 {params.get('model_sha256')}, the "
                                     f"bank in {ws.root} belongs to {stored.meta.get('model_sha256')}: attack the served model")
        cfg = replace(cfg, fpr=float(params["false_positive_rate"]), defences=("default",))
    unknown = [d for d in cfg.defences if d not in DEFENCES]
    if unknown:
        raise FingerprintError(f"unknown defence(s) {unknown}; choose from {', '.join(DEFENCES)}")
    ds, splits, _ = load_prepared(ws)
    model = load_classifier(ws)
    layout = ActivationLayout.from_json(stored.meta["layout"])
    test = correctly_classified(model, ds, splits.test)[: cfg.count]
    x, y = ds.x[test], ds.y[test]
    acts, meta = load_activation_set(ws, "test", mmap=False)
    clean = Observations(meta["predicted"], acts=acts, logits=meta["logits"], images=ds.x[meta["source"]])
    rows: list[dict[str, Any]] = []
    plain: dict[float, dict[str, np.ndarray]] = {}  # plain PGD does not depend on the defence
    bar = tqdm(total=len(cfg.defences) * len(cfg.eps), desc="whitebox", unit="attack", disable=not progress)
    for name in cfg.defences:
        defence: Defence = build(ws, name, cfg.fpr, cfg.seed, cfg.hardening)
        server = ServedOverGrpc(client, defence.server.draw_size) if client else defence.server
        copy = ExpectedDetector(defence.attacker, cfg.fpr)
        rng = np.random.default_rng(cfg.seed)
        realized = float(server.detect(clean, rng=rng).is_attacked.mean())
        for eps in cfg.eps:
            bar.set_postfix(defence=name, eps=eps)
            if eps not in plain:
                plain[eps] = {"eps": plain_pgd(model, x, y, eps, cfg.steps, cfg.seed),
                              "half": plain_pgd(model, x, y, eps / 2, cfg.steps, cfg.seed)}
            result = adaptive_attack(model, layout, copy, x, y, replace(cfg.attack, eps=eps, steps=cfg.steps,
                                                                       seed=cfg.seed))
            rows.append({"defence": name, "eps": eps, "clean_fpr": realized, "clean_fpr_ci95": wilson(
                int(round(realized * len(clean))), len(clean)), "notes": defence.notes,
                **score_attack(server, result, plain[eps], model, layout, y, cfg, rng)})
            bar.update()
    bar.close()
    where = f"the Triton server at {cfg.url} ({cfg.model})" if cfg.url else "the server replayed offline"
    accuracy = ws.read_json(ws.root / "classifier.json", "train")["accuracy"]["test"]
    results = {"fpr": cfg.fpr, "server": where, "clean_accuracy": accuracy, "config": asdict(cfg), "rows": rows}
    if client is not None:
        results["label_mismatches"] = server.label_mismatches
        client.close()
    table = (f"Server: {where}; thresholds for {cfg.fpr:.0%} clean FPR; classifier's clean test accuracy "
             f"{accuracy:.1%}; {len(y)} correctly classified test images attacked, {cfg.steps} steps per "
             f"configuration.\n\n" + whitebox_table(rows, cfg.draws))
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    name = "whitebox_served" if cfg.url else "whitebox"  # the served run keeps the offline report
    (out / f"{name}.md").write_text("# White-box attacker with a local copy\n\n" + table)
    plot_evasion(rows, out / f"{name}.png")
    files = [ws.write_json(out / f"{name}.json", results), out / f"{name}.md", out / f"{name}.png"]
    ws.record(name, asdict(cfg), files, started)
    results["table"] = table
    return results
