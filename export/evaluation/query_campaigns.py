"""``nfp campaigns``: query-based black-box attacks run through the running server, against its query memory.

Each campaign is one of ART's black-box attacks (SquareAttack, HopSkipJump, BoundaryAttack) on one
correctly classified test image, whose every query is an image of a gRPC request to the served guarded
classifier (:class:`ServedBlackBox`, behind ART's ``BlackBoxClassifierNeuralNetwork``); the server answers each image with
its label and ``query_flagged`` (:mod:`kernels.query_memory`, Blacklight's test). Per campaign: the
queries until the first flag, and the first query at which the attacker held a successful adversarial
image (misclassified, and for the minimal-perturbation attacks within the L2 ``budget``). Rejecting
flagged queries (answering a flagged client nothing useful from then on) leaves the answers before the
first flag unchanged, so "success with rejection" is a success before the first flag: measured from the
same campaign, not a second run.

The adaptive variant draws a random transform for every query (a one-pixel shift and uniform noise of
half a quantization step), as Blacklight's authors tried against their own detector, so that
consecutive queries share fewer quantized windows.

Benign traffic: the clean test split in random order, a share of it sent twice (natural repeats, which
``repeats="allow"`` answers unflagged), through the same server before the campaigns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.grpc_client import ENSEMBLE, DetectorClient
from kernels.errors import InvalidInputError

CAMPAIGN_ATTACKS = {  # label: (ART's class, its parameters); query budgets sized for a CPU server
    "SquareAttack-eps0.3": ("SquareAttack", {"norm": np.inf, "eps": 0.3, "max_iter": 300, "p_init": 0.8,
                                              "nb_restarts": 1}),
    "SquareAttack-eps0.15": ("SquareAttack", {"norm": np.inf, "eps": 0.15, "max_iter": 300, "p_init": 0.8,
                                               "nb_restarts": 1}),
    "HopSkipJump": ("HopSkipJump", {"norm": 2, "max_iter": 10, "max_eval": 200, "init_eval": 20, "init_size": 20}),
    "BoundaryAttack": ("BoundaryAttack", {"targeted": False, "max_iter": 200, "num_trial": 10, "sample_size": 10,
                                          "init_size": 20, "delta": 0.01, "epsilon": 0.01}),
}
L2_BUDGET = 3.0  # a minimal-perturbation attack (HopSkipJump, BoundaryAttack) succeeds once within it (MNIST CW-L2: ~2.3)
REPEAT_SHARE = 0.1  # of the benign stream's images sent a second time


@dataclass
class Campaign:
    """What one campaign's queries met: the index (0-based) of the first flagged query and of the first
    successful one (None: never)."""

    queries: int = 0
    first_flag: int | None = None
    first_success: int | None = None
    flags: int = 0


@dataclass
class ServedBlackBox:
    """The ART black-box estimator's prediction function: images -> probabilities, from the server.

    Records, for the current :class:`Campaign`, every query's flag and whether it was a success for an
    attacker of ``source`` (true label ``label``): misclassified and, with ``budget``, within it in L2.
    ``transform`` (the adaptive attacker's) is applied to every query before it is sent."""

    client: DetectorClient
    batch: int = 256
    transform: Any = None
    campaign: Campaign = field(default_factory=Campaign)
    source: np.ndarray | None = None
    label: int = -1
    budget: float | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1, *self.source.shape)
        out = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            sent = chunk if self.transform is None else self.transform(chunk)
            d = self.client.detect(sent)
            flagged = np.zeros(len(chunk), bool) if d.query_flagged is None else d.query_flagged
            won = d.label != self.label
            if self.budget is not None:
                won &= np.linalg.norm((chunk - self.source).reshape(len(chunk), -1), axis=1) <= self.budget
            c = self.campaign
            if c.first_flag is None and flagged.any():
                c.first_flag = c.queries + int(np.argmax(flagged))
            if c.first_success is None and won.any():
                c.first_success = c.queries + int(np.argmax(won))
            c.queries += len(chunk)
            c.flags += int(flagged.sum())
            out.append(d.probabilities)
        return np.concatenate(out)


def random_transform(rng: np.random.Generator, quantization: int = 50):
    """The adaptive attacker's per-query transform: shift each image by up to one pixel and add uniform
    noise of half a quantization step (``quantization`` on the 0-255 scale)."""
    def transform(x: np.ndarray) -> np.ndarray:
        shifted = np.stack([np.roll(img, tuple(rng.integers(-1, 2, size=2)), axis=(-2, -1)) for img in x])
        noise = rng.uniform(-0.5, 0.5, size=x.shape) * quantization / 255.0
        return np.clip(shifted + noise, 0.0, 1.0).astype(np.float32)
    return transform


def benign_stream(client: DetectorClient, images: np.ndarray, seed: int = 0, batch: int = 1) -> dict[str, Any]:
    """Send ``images`` in a seeded random order, :data:`REPEAT_SHARE` of them twice; the share of first
    sendings flagged (benign false flags) and the repeats flagged."""
    rng = np.random.default_rng(seed)
    repeats = rng.choice(len(images), size=int(REPEAT_SHARE * len(images)), replace=False)
    stream = rng.permutation(np.r_[np.arange(len(images)), repeats])  # an image's later sending is the repeat
    first = np.zeros(len(stream), bool)
    _, where = np.unique(stream, return_index=True)
    first[where] = True
    answers = [client.detect(images[stream[i:i + batch]]) for i in range(0, len(stream), batch)]
    if answers[0].query_flagged is None:
        raise InvalidInputError(f"{client.model} answers no query_flagged: its repository was written without a "
                                "query memory")
    flagged = np.concatenate([a.query_flagged for a in answers])
    return {"queries": int(len(stream)), "distinct": int(first.sum()), "repeats": int((~first).sum()),
            "flagged_distinct": int(flagged[first].sum()), "flagged_repeats": int(flagged[~first].sum()),
            "flag_rate": float(flagged[first].mean())}


def run_campaigns(url: str, attack: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                  adaptive: bool = False, seed: int = 0, progress: bool = True, model: str = ENSEMBLE,
                  params: dict[str, Any] | None = None) -> list[Campaign]:
    """One campaign of ``attack`` (a label of :data:`CAMPAIGN_ATTACKS`) per image, through ``model`` of the
    server at ``url``; ``params`` replace its ART parameters."""
    from art.estimators.classification.blackbox import BlackBoxClassifierNeuralNetwork
    import art.attacks.evasion as evasion
    from tqdm.auto import tqdm

    if attack not in CAMPAIGN_ATTACKS:
        raise InvalidInputError(f"unknown campaign attack {attack!r}; choose one of {', '.join(CAMPAIGN_ATTACKS)}")
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # ART draws from NumPy's global generator
    campaigns = []
    with DetectorClient(url, model) as client:
        art_class, default_params = CAMPAIGN_ATTACKS[attack]
        box = ServedBlackBox(client, transform=random_transform(rng) if adaptive else None,
                             budget=None if art_class == "SquareAttack" else L2_BUDGET)
        estimator = BlackBoxClassifierNeuralNetwork(box, images.shape[1:], num_classes, clip_values=(0.0, 1.0))
        for x, y in tqdm(list(zip(images, labels)), desc=f"{attack}{' adaptive' if adaptive else ''}",
                         unit="campaign", disable=not progress):
            box.campaign, box.source, box.label = Campaign(), x, int(y)
            attacker = getattr(evasion, art_class)(estimator, verbose=False, **(params or default_params))
            attacker.generate(x[None], y=np.eye(num_classes)[[y]])
            campaigns.append(box.campaign)
    return campaigns


def summarize(campaigns: list[Campaign]) -> dict[str, Any]:
    """Campaigns, queries, flags and successes of one attack (see the module docstring)."""
    n = len(campaigns)
    flagged = [c for c in campaigns if c.first_flag is not None]
    success = [c for c in campaigns if c.first_success is not None]
    before = [c for c in campaigns if c.first_flag is not None and (c.first_success is None or c.first_flag < c.first_success)]
    despite = [c for c in success if c.first_flag is None or c.first_success < c.first_flag]
    firsts = [c.first_flag + 1 for c in flagged]
    return {"campaigns": n, "median_queries": float(np.median([c.queries for c in campaigns])),
            "flagged": len(flagged) / n, "flagged_before_success": len(before) / n,
            "median_queries_to_first_flag": float(np.median(firsts)) if firsts else None,
            "max_queries_to_first_flag": int(max(firsts)) if firsts else None,
            "success": len(success) / n, "success_with_rejection": len(despite) / n,
            "flagged_query_share": float(sum(c.flags for c in campaigns) / max(1, sum(c.queries for c in campaigns)))}


def markdown(rows: dict[str, dict[str, Any]], benign: dict[str, Any]) -> str:
    head = ("| attack | campaigns | median queries | flagged | flagged before success | median (max) queries to "
            "first flag | success | success with rejection | flagged share of queries |\n|" + "---|" * 9)
    lines = [head]
    for name, r in rows.items():
        first = "-" if r["median_queries_to_first_flag"] is None else \
            f"{r['median_queries_to_first_flag']:g} ({r['max_queries_to_first_flag']})"
        lines.append(f"| {name} | {r['campaigns']} | {r['median_queries']:g} | {r['flagged']:.0%} | "
                     f"{r['flagged_before_success']:.0%} | {first} | {r['success']:.0%} | "
                     f"{r['success_with_rejection']:.0%} | {r['flagged_query_share']:.1%} |")
    return (f"Benign stream: {benign['distinct']} clean test images in random order, {benign['repeats']} sent twice: "
            f"{benign['flagged_distinct']} flagged ({benign['flag_rate']:.2%}), repeats flagged: "
            f"{benign['flagged_repeats']}.\n\n" + "\n".join(lines) + "\n")


def campaign_study(ws, url: str, count: int = 50, attacks: tuple[str, ...] = tuple(CAMPAIGN_ATTACKS),
                   adaptive: bool = True, seed: int = 0, progress: bool = True, model: str | None = None
                   ) -> dict[str, Any]:
    """The benign stream, then ``count`` campaigns of each attack (and of each adaptive variant), through
    ``model`` (default the ensemble) of the server at ``url``; writes ``report/campaigns.{json,md}``."""
    from export.data.artifacts import load_prepared
    from export.models.classifier import correctly_classified, load_classifier

    started = time.time()
    ds, splits, meta = load_prepared(ws)
    model = model or ENSEMBLE
    with DetectorClient(url, model) as client:
        benign = benign_stream(client, ds.x[splits.test], seed)
    pool = correctly_classified(load_classifier(ws), ds, splits.test)
    idx = np.sort(np.random.default_rng(seed).choice(pool, size=min(count, len(pool)), replace=False))
    rows = {}
    for attack in attacks:
        for variant in (False, True) if adaptive else (False,):
            name = f"{attack}{' (adaptive: random transform per query)' if variant else ''}"
            rows[name] = summarize(run_campaigns(url, attack, ds.x[idx], ds.y[idx], len(meta["class_names"]),
                                                 variant, seed, progress, model))
    table = markdown(rows, benign)
    out = ws.root / "report"
    out.mkdir(exist_ok=True)
    (out / "campaigns.md").write_text(f"# Query-based attackers against the query memory\n\n{table}")
    files = [ws.write_json(out / "campaigns.json", {"benign": benign, "attacks": rows, "images": idx.tolist(),
                                                    "params": {k: [a, {kk: str(vv) for kk, vv in p.items()}]
                                                               for k, (a, p) in CAMPAIGN_ATTACKS.items()},
                                                    "l2_budget": L2_BUDGET}), out / "campaigns.md"]
    ws.record("campaigns", {"count": count, "attacks": list(attacks), "adaptive": adaptive, "seed": seed,
                            "model": model}, files, started)
    return {"benign": benign, "attacks": rows, "table": table}
