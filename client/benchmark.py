"""Latency and throughput over gRPC: the classifier alone against the guarded models, one run.

    nfp serve --out runs/default --fused --write-only               # writes runs/default/repository/cpu
    nfp synthetic-bank --out runs/efficientnet-lite0 && nfp serve --out runs/efficientnet-lite0 --fused --write-only
    python -m client.benchmark "MNIST CNN=runs/default/repository/cpu" \
        "EfficientNet-Lite0=runs/efficientnet-lite0/repository/cpu:1,8,32:1,2,4,8:6"
    python -m client.benchmark runs/default/repository/cpu --quick  # concurrency 1, 8; batch 1, 8

Each suite is a model repository already written (``nfp serve --write-only``; serving knobs such as
``--queue-delay-us`` and ``--instances`` are set there). For each, the benchmark starts a real
Triton server and measures ``classifier`` alone (asked for its logits only, as the classifier a user
already serves), ``guarded_classifier`` (the ensemble: classifier, then fingerprint detector) and
``guarded_classifier_fused`` when the repository has it. For each batch size and concurrency
(requests kept in flight by a closed loop) it measures, after a warm-up, throughput (images/s),
latency p50 / p90 / p99 and errors, the models taking turns in rounds so that the ratios compare like
with like on a noisy machine. The detectors' own compute comes from their
``nfp_kernel_microseconds_total`` metric, so the report splits the overhead into kernel time and
hand-off between steps. Writes ``benchmark.json``, ``.md`` and ``latency_throughput.png`` to ``--target``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.grpc_client import DetectorClient
from client.metrics import detector_counters
from model_repository.server import TritonServer

BASELINE, ENSEMBLE, FUSED = "classifier", "guarded_classifier", "guarded_classifier_fused"
DETECTING = {ENSEMBLE: "fingerprint_detector", FUSED: FUSED}  # model measured -> model whose kernel time it spends
# the baseline is the classifier a user already serves: it answers with logits, not with activations
REQUESTED = {BASELINE: ["logits"]}


@contextlib.contextmanager
def image_input(url: str, images: np.ndarray, shared_memory: bool, headers: dict[str, str] | None = None):
    """The ``images`` input tensor, its bytes in each request or, registered once with the server at
    ``url`` (shared memory is a restricted protocol: ``headers`` carry the admin key), in a system
    shared-memory region that every request points to."""
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("images", list(images.shape), "FP32")
    if not shared_memory:
        tensor.set_data_from_numpy(images)
        yield tensor
        return
    import tritonclient.utils.shared_memory as shm

    name = f"nfp_bench_{os.getpid()}_{images.shape[0]}"
    region = shm.create_shared_memory_region(name, "/" + name, images.nbytes)
    client = grpcclient.InferenceServerClient(url)
    try:
        shm.set_shared_memory_region(region, [np.ascontiguousarray(images)])
        client.register_system_shared_memory(name, "/" + name, images.nbytes, headers=headers)
        tensor.set_shared_memory(name, images.nbytes)
        yield tensor
    finally:
        client.unregister_system_shared_memory(name, headers=headers)
        client.close()
        shm.destroy_shared_memory_region(region)


def measure(url: str, model: str, tensor, concurrency: int, window_s: float, warmup_s: float
            ) -> tuple[list[float], int]:
    """Closed loop: keep ``concurrency`` requests with input ``tensor`` in flight for ``warmup_s +
    window_s``. Returns the latencies (seconds) of the requests sent inside the window, after the
    warm-up, and the number of errors among them; the last of them are waited for, so that requests
    longer than the window are measured too."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    outputs = [grpcclient.InferRequestedOutput(name) for name in REQUESTED[model]] if model in REQUESTED else None
    slots, lock = threading.Semaphore(concurrency), threading.Lock()
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + window_s

    def callback(sent: float, result, error) -> None:  # runs on the client's thread: record, free a slot
        now = time.perf_counter()
        if measure_from <= sent < stop_at:
            with lock:
                if error is None:
                    latencies.append(now - sent)
                else:
                    errors[0] += 1
        slots.release()

    while time.perf_counter() < stop_at:
        if not slots.acquire(timeout=0.1):
            continue
        sent = time.perf_counter()
        client.async_infer(model, [tensor], functools.partial(callback, sent), outputs=outputs)  # (result=, error=)
    for _ in range(concurrency):  # wait for the last requests in flight
        slots.acquire(timeout=60)
    client.close()
    return latencies, errors[0]


def summarize(model: str, batch: int, concurrency: int, latencies: list[float], errors: int,
              window_s: float) -> dict[str, Any]:
    lat = np.array(latencies) * 1e3
    return {"model": model, "batch": batch, "concurrency": concurrency, "requests": len(lat), "errors": errors,
            "images_per_s": len(lat) * batch / window_s,
            **{f"p{q}_ms": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 90, 99)}}


def run(repository: Path, batches, concurrencies, window_s: float, warmup_s: float, shared_memory: bool = False,
        rounds: int = 3) -> dict[str, Any]:
    """One suite: a server on ``repository``, every (batch, concurrency, model) point.

    Each point's window is split into ``rounds`` slices; within a round the models take turns, in an
    order rotated from round to round, so that drifts of the machine's speed hit every model alike.
    """
    repository = Path(repository)
    models = tuple(m for m in (BASELINE, ENSEMBLE, FUSED) if (repository / m / "config.pbtxt").is_file())
    rng = np.random.default_rng(0)
    points = []
    with TritonServer(repository) as server:
        with DetectorClient(server.grpc_url) as client:
            shape = client.input_shape()
        for batch in batches:
            with image_input(server.grpc_url, rng.random((batch, *shape), dtype=np.float32), shared_memory,
                             server.admin_headers) as tensor:
                points += measure_batch(server, models, tensor, batch, concurrencies, window_s, warmup_s, rounds)
    return {"points": points, "window_s": window_s, "warmup_s": warmup_s, "rounds": rounds,
            "repository": str(repository), "shared_memory": shared_memory, "ratios": ratios(points)}


def _kernel_counters(metrics_url: str, model: str) -> np.ndarray:
    """``[kernel microseconds, inputs scored]`` so far of the detecting ``model``."""
    c = detector_counters(metrics_url, model)
    return np.array([c["nfp_kernel_microseconds_total"], c["nfp_inputs_total"]])


def measure_batch(server: TritonServer, models, tensor, batch: int, concurrencies, window_s: float, warmup_s: float,
                  rounds: int) -> list[dict[str, Any]]:
    points = []
    for conc in concurrencies:
        latencies: dict[str, list[float]] = {m: [] for m in models}
        errors = dict.fromkeys(models, 0)
        counters = {m: np.zeros(2) for m in models}  # detector kernel microseconds, inputs, warm-ups included
        for r in range(rounds):
            for model in models[r % len(models):] + models[: r % len(models)]:
                detector = DETECTING.get(model)
                before = _kernel_counters(server.metrics_url, detector) if detector else 0
                lat, err = measure(server.grpc_url, model, tensor, conc, window_s / rounds, warmup_s)
                latencies[model] += lat
                errors[model] += err
                if detector:
                    counters[model] += _kernel_counters(server.metrics_url, detector) - before
        for model in models:
            point = summarize(model, batch, conc, latencies[model], errors[model], window_s)
            kernel_us, inputs = counters[model]
            point["kernel_us_per_request"] = kernel_us / (inputs / batch) if model in DETECTING and inputs else None
            points.append(point)
            print(f"{model:>24} batch {batch:>3} conc {conc:>3}: {point['images_per_s']:>9,.0f} img/s  "
                  f"p50 {ms(point['p50_ms'])} ms  p99 {ms(point['p99_ms'])} ms  errors {point['errors']}")
    return points


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def ratios(points: list[dict]) -> dict[str, dict[str, Any]]:
    """Each guarded model vs the classifier alone: latency at the smallest batch and concurrency,
    throughput at saturation (the best images/s over all points)."""
    def pick(model, batch, conc):
        return next(p for p in points if p["model"] == model and p["batch"] == batch and p["concurrency"] == conc)

    b, c = min(p["batch"] for p in points), min(p["concurrency"] for p in points)
    best = {p["model"]: max(q["images_per_s"] for q in points if q["model"] == p["model"]) for p in points}
    base = pick(BASELINE, b, c)
    out: dict[str, dict[str, Any]] = {}
    for model in best:
        if model == BASELINE:
            continue
        guarded = pick(model, b, c)
        out[model] = {"batch": b, "concurrency": c, "classifier_p50_ms": base["p50_ms"], "p50_ms": guarded["p50_ms"],
                      "p50_ratio": guarded["p50_ms"] / base["p50_ms"], "p50_added_ms": guarded["p50_ms"] - base["p50_ms"],
                      "p99_ratio": guarded["p99_ms"] / base["p99_ms"],
                      "kernel_ms_per_request": (guarded["kernel_us_per_request"] or 0) / 1e3,
                      "classifier_saturation_images_per_s": best[BASELINE], "saturation_images_per_s": best[model],
                      "throughput_ratio": best[model] / best[BASELINE]}
    return out


def markdown(suites: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, report in suites.items():
        lines += [f"### {name}", "", "| model | batch | concurrency | images/s | p50 ms | p90 ms | p99 ms | errors "
                  "| kernel ms/request |", "|---|---|---|---|---|---|---|---|---|"]
        for p in report["points"]:
            k = f"{p['kernel_us_per_request'] / 1e3:.3f}" if p["kernel_us_per_request"] is not None else ""
            lines.append(f"| {p['model']} | {p['batch']} | {p['concurrency']} | {p['images_per_s']:,.0f} "
                         f"| {ms(p['p50_ms'])} | {ms(p['p90_ms'])} | {ms(p['p99_ms'])} | {p['errors']} | {k} |")
        lines.append("")
        for model, r in report["ratios"].items():
            lines.append(f"- `{model}` vs `classifier` alone, batch {r['batch']}, concurrency {r['concurrency']}: "
                         f"p50 x{r['p50_ratio']:.2f} (+{r['p50_added_ms']:.2f} ms, of which detector kernel "
                         f"{r['kernel_ms_per_request']:.3f} ms), p99 x{r['p99_ratio']:.2f}; throughput at saturation "
                         f"x{r['throughput_ratio']:.2f} ({r['saturation_images_per_s']:,.0f} vs "
                         f"{r['classifier_saturation_images_per_s']:,.0f} images/s).")
        lines.append("")
    return "\n".join(lines)


def plot(suites: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4.5), squeeze=False)
    for ax, (name, report) in zip(axes[0], suites.items()):
        styles = {BASELINE: ("tab:blue", "--"), ENSEMBLE: ("tab:red", "-"), FUSED: ("tab:green", ":")}
        batches = sorted({p["batch"] for p in report["points"]})
        for model in dict.fromkeys(p["model"] for p in report["points"]):
            for batch, marker in zip(batches, "os^Dv"):
                pts = [p for p in report["points"] if p["model"] == model and p["batch"] == batch
                       and p["p50_ms"] is not None]
                color, ls = styles[model]
                ax.plot([p["images_per_s"] for p in pts], [p["p50_ms"] for p in pts], marker=marker, color=color,
                        ls=ls, label=f"{model}, batch {batch}")
        ax.set_xlabel("throughput (images/s)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{name}: gRPC, concurrency sweep (color: model, marker: batch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_suite(text: str, quick: bool) -> tuple[str, Path, list[int], list[int], float]:
    """``[NAME=]REPOSITORY[:BATCHES:CONCURRENCIES:WINDOW]``, lists comma-separated (e.g.
    ``EfficientNet-Lite0=runs/efficientnet-lite0/repository/cpu:1,8,32:1,2,4,8:6``)."""
    name, _, rest = text.rpartition("=") if "=" in text else ("", "", text)
    path, *opts = rest.split(":")
    batches, conc, window = [1, 8, 32], [1, 2, 4, 8, 16, 32, 64], 3.0
    if opts:
        if len(opts) != 3:
            raise SystemExit(f"suite {text!r}: give BATCHES:CONCURRENCIES:WINDOW after the repository, or none")
        batches, conc, window = [int(b) for b in opts[0].split(",")], [int(c) for c in opts[1].split(",")], float(opts[2])
    if quick:
        batches, conc, window = [b for b in batches if b <= 8] or batches[:1], [1, 8], min(window, 1.5)
    return name or Path(path).parent.parent.name, Path(path), batches, conc, window


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="+", metavar="[NAME=]REPOSITORY[:BATCHES:CONCURRENCIES:WINDOW]",
                   help="a written model repository per suite; optionally its batches, concurrencies and measured "
                        "seconds per point (default 1,8,32 : 1,2,4,8,16,32,64 : 3)")
    p.add_argument("--target", type=Path, default=Path("runs/benchmark"),
                   help="folder of the report (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.5,
                   help="warm-up seconds before each measured slice (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="slices of each point's window, models taking turns in rotated order (default: %(default)s)")
    p.add_argument("--shared-memory", action="store_true",
                   help="send the images through a system shared-memory region instead of the gRPC message")
    p.add_argument("--quick", action="store_true", help="batches up to 8, concurrency 1 and 8, windows of 1.5 s at most")
    args = p.parse_args(argv)
    suites: dict[str, dict[str, Any]] = {}
    for text in args.suites:
        name, repo, batches, conc, window = parse_suite(text, args.quick)
        if not (repo / "classifier" / "config.pbtxt").is_file():
            raise SystemExit(f"{repo} is not a written model repository: run `nfp serve --write-only` first")
        suites[name] = run(repo, batches, conc, window, args.warmup, args.shared_memory, args.rounds)
        save(suites, args.target)
    print("\n" + markdown(suites))
    print(f"written to {args.target}/")


def save(suites: dict[str, dict[str, Any]], target: Path) -> None:
    """JSON, Markdown and the plot of the suites measured so far."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "benchmark.json").write_text(json.dumps(suites, indent=2))
    (target / "benchmark.md").write_text(markdown(suites))
    plot(suites, target / "latency_throughput.png")


if __name__ == "__main__":
    main()
