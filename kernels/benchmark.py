"""Scoring speed: the gather-reduce path beside NumPy fancy indexing and a per-image loop, one run.

    python -m kernels.benchmark            # the full grid
    python -m kernels.benchmark --quick    # B = 64, m = 256, k = 50 only
    python -m kernels.benchmark --detectors  # the served detector step: the LRT alone vs the fused default
    python -m kernels.benchmark --query-memory  # what the query memory adds to the detector step

For each ``B`` (images), ``m`` (fingerprints drawn per image) and ``k`` (neurons per fingerprint):
microseconds per batch, images per second, and gathered activation values per second of the full
detection step (draw, subset means, LRT / vote / anomaly scores), best of several repeats; then the
serving path (``lrt_only``: the LRT score alone, from the packed Gaussians) and its speed-up; where a
GPU is visible, the CUDA kernels (three scores; LRT only, the serving launch) and the LRT kernel's
speed-up over the NumPy serving path, all measured in the same run. The
baselines compute the same subset means with ``acts[b, indices[ids]]`` fancy indexing plus a mask,
and with a Python loop over images; their scores use the same scoring code.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from kernels.bank import Bank
from kernels.gpu import gpu_available
from kernels.scoring import OsEntropy, draw_fingerprints, score, score_values


def synthetic_bank(num_classes: int, per_class: int, k: int, num_neurons: int, seed: int = 0) -> Bank:
    """A bank of realistic size and layout; speed does not depend on the fingerprints' values."""
    rng = np.random.default_rng(seed)
    f = num_classes * per_class
    ones = np.ones(f, np.float32)
    return Bank(np.sort(rng.integers(0, num_neurons, (f, k)), axis=1).astype(np.int32), np.full(f, k, np.int32),
                ones * 0, ones, ones, ones, ones, np.arange(0, f + 1, per_class, dtype=np.int64),
                {"num_neurons": num_neurons})


def fancy_indexing(acts: np.ndarray, ids: np.ndarray, bank: Bank) -> np.ndarray:
    idx = bank.indices[ids]
    mask = np.arange(idx.shape[2]) < bank.lengths[ids][..., None]
    vals = acts[np.arange(len(acts))[:, None, None], np.minimum(idx, acts.shape[1] - 1)]
    return (vals * mask).sum(2) / bank.lengths[ids]


def per_image_loop(acts: np.ndarray, ids: np.ndarray, bank: Bank) -> np.ndarray:
    out = np.empty(ids.shape, np.float32)
    for b in range(len(acts)):
        for j, f in enumerate(ids[b]):
            out[b, j] = acts[b, bank.indices[f, : bank.lengths[f]]].mean()
    return out


def best_times(fns: list[Callable[[], object]], budget_s: float = 0.6, max_repeats: int = 50) -> list[float]:
    """Best time of each function, their calls interleaved so that the machine's drifts hit all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < max_repeats and sum(map(sum, times)) < budget_s:
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def detector_steps(neurons: int = 2280, classes: int = 1000, m: int = 128, window_s: float = 0.5) -> None:
    """What the served detector's step costs (checked activations in, verdicts out), the LRT alone (the
    paper's score) beside the default fusion of the vote and the logit margin, in interleaved rounds;
    an EfficientNet-Lite0-size bank by default (1,000 classes, D = 2,280)."""
    from kernels.baselines import LogitMargin
    from kernels.detector import FingerprintDetector, Observations, PValueFusion, RandomDraws

    rng = np.random.default_rng(0)
    print(f"detector step, {classes} classes, D = {neurons}, m = {m}; ms per batch, best of 3 interleaved rounds")
    for k, per_class in ((5, 1000), (1, 300)):
        bank = synthetic_bank(classes, per_class, k, neurons)
        cal = Observations(rng.integers(0, classes, 2000), acts=rng.normal(size=(2000, neurons)).astype(np.float32),
                           logits=rng.normal(size=(2000, classes)))
        lrt = FingerprintDetector(bank, RandomDraws(m), "lrt")
        fused = PValueFusion({"vote": FingerprintDetector(bank, RandomDraws(m), "vote"), "margin": LogitMargin()})
        for d in (lrt, fused):
            d.calibrate(cal, (0.01,), repeats=2)
        for b in (1, 32, 256):
            obs = Observations(rng.integers(0, classes, b), acts=rng.normal(size=(b, neurons)).astype(np.float32),
                               logits=rng.normal(size=(b, classes)), validated=True)
            best = {}
            for name, d in (("lrt", lrt), ("fused", fused)) * 3:
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < window_s:
                    d.detect(obs, rng=rng)
                    n += 1
                best[name] = min(best.get(name, np.inf), (time.perf_counter() - start) / n * 1e3)
            print(f"  k={k} x{per_class}/class  B={b:>3}: LRT alone {best['lrt']:7.3f} ms   fused vote+margin "
                  f"{best['fused']:7.3f} ms   x{best['fused'] / best['lrt']:.2f}")


def draw_sources(neurons: int) -> None:
    """What secret draws cost: the seeded PCG64 generator the server used before against
    :class:`kernels.scoring.OsEntropy` (fresh OS entropy per draw, unbiased), alone and within the
    whole detection step, side by side."""
    rng = np.random.default_rng(0)
    print("draw source: PCG64 (seeded once) vs OS entropy (getrandom per draw, unbiased); best of repeats")
    print(f"{'B':>4} {'m':>5} | {'pcg64 us':>9} {'os us':>9} {'x':>5} | {'step pcg64 us':>13} {'step os us':>10} {'x':>5}")
    for b, m in ((1, 128), (64, 128), (256, 1024)):
        bank = synthetic_bank(10, max(1000, m), 1, neurons)
        acts = rng.normal(size=(b, neurons)).astype(np.float32)
        labels = rng.integers(0, 10, b)
        pcg, os_ = np.random.default_rng(1), OsEntropy()
        t = best_times([lambda: draw_fingerprints(labels, bank, m, pcg), lambda: draw_fingerprints(labels, bank, m, os_),
                        lambda: score(acts, labels, bank, m, pcg), lambda: score(acts, labels, bank, m, os_)])
        print(f"{b:>4} {m:>5} | {t[0] * 1e6:>9.1f} {t[1] * 1e6:>9.1f} {t[1] / t[0]:>5.1f} | {t[2] * 1e6:>13.0f} "
              f"{t[3] * 1e6:>10.0f} {t[3] / t[2]:>5.2f}")


def query_memory_cost(neurons: int, image_shape: tuple[int, ...] = (1, 28, 28)) -> None:
    """What the served query memory (:mod:`kernels.query_memory`) adds to the detector step: the step
    (the fused vote and margin on an MNIST-size bank) and the memory's match-and-remember of the same
    batch's images, best of interleaved repeats, and the memory's size per 100,000 remembered queries.
    The memory is filled with 20,000 queries first; images are uniform noise (every window distinct:
    the most hashing and sorting)."""
    from kernels.baselines import LogitMargin
    from kernels.detector import FingerprintDetector, Observations, PValueFusion, RandomDraws
    from kernels.query_memory import QueryMemory, QueryMemoryConfig

    rng = np.random.default_rng(0)
    bank = synthetic_bank(10, 300, 1, neurons)
    fused = PValueFusion({"vote": FingerprintDetector(bank, RandomDraws(128), "vote"), "margin": LogitMargin()})
    fused.calibrate(Observations(rng.integers(0, 10, 1000), acts=rng.normal(size=(1000, neurons)).astype(np.float32),
                                 logits=rng.normal(size=(1000, 10))), (0.01,), repeats=2)
    memory = QueryMemory(QueryMemoryConfig())
    memory.observe(rng.random((20_000, *image_shape), np.float32))
    per_100k = QueryMemory(QueryMemoryConfig(capacity=100_000)).nbytes
    print(f"query memory beside the detector step (D = {neurons}, m = 128, fused vote + margin); images "
          f"{'x'.join(map(str, image_shape))}; best of interleaved repeats")
    print(f"{'B':>4} | {'step us':>9} {'memory us':>10} {'per image us':>12} {'step + memory':>14}")
    for b in (1, 32, 256):
        obs = Observations(rng.integers(0, 10, b), acts=rng.normal(size=(b, neurons)).astype(np.float32),
                           logits=rng.normal(size=(b, 10)), validated=True)
        images = rng.random((b, *image_shape), np.float32)
        step, watch = best_times([lambda: fused.detect(obs, rng=rng), lambda: memory.observe(images)])
        print(f"{b:>4} | {step * 1e6:>9.0f} {watch * 1e6:>10.0f} {watch / b * 1e6:>12.1f} {(step + watch) / step:>13.2f}x")
    print(f"memory per 100,000 remembered queries: {per_100k / 1e6:.1f} MB (fixed at start)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neurons", type=int, default=12938, help="D (default: %(default)s, the MNIST CNN's layout)")
    p.add_argument("--quick", action="store_true", help="only B=64, m=256, k=50")
    p.add_argument("--detectors", action="store_true",
                   help="instead: the served detector step, the LRT alone beside the fused default")
    p.add_argument("--draw-sources", action="store_true",
                   help="instead: the cost of secret draws (OS entropy) against a seeded PCG64, alone and per step")
    p.add_argument("--query-memory", action="store_true",
                   help="instead: what the served query memory adds to the detector step, and its size")
    args = p.parse_args(argv)
    if args.query_memory:
        query_memory_cost(args.neurons)
        return
    if args.detectors:
        detector_steps()
        return
    if args.draw_sources:
        draw_sources(args.neurons)
        return
    grid = [(64, 256, 50)] if args.quick else [(b, m, k) for k in (10, 50) for m in (64, 256, 1024) for b in (1, 64, 256)]
    rng = np.random.default_rng(0)
    gpu = gpu_available()
    print(f"D = {args.neurons}; times are the whole detection step; best of repeats; GPU: {'yes' if gpu else 'no'}")
    print(f"{'B':>4} {'m':>5} {'k':>3} | {'ours us':>9} {'img/s':>9} {'values/s':>9} | {'lrt-only':>9} {'x':>5} |"
          f" {'fancy us':>9} {'x':>5} | {'loop us':>9} {'x':>6}"
          + (f" | {'cuda 3-score us':>15} {'cuda lrt us':>11} {'img/s':>10} {'vs numpy lrt':>12}" if gpu else ""))
    for b, m, k in grid:
        bank = synthetic_bank(10, max(1000, m), k, args.neurons)
        acts = rng.normal(size=(b, args.neurons)).astype(np.float32)
        labels = rng.integers(0, 10, b)
        draw_rng = np.random.default_rng(1)

        def baseline(means_fn):
            def run():
                i = draw_fingerprints(labels, bank, m, draw_rng)
                return score_values(means_fn(acts, i, bank), i, bank)
            return run

        ours, serving, fancy = best_times([lambda: score(acts, labels, bank, m, draw_rng),
                                           lambda: score(acts, labels, bank, m, draw_rng, lrt_only=True),
                                           baseline(fancy_indexing)])
        loop = best_times([baseline(per_image_loop)], budget_s=0.5, max_repeats=3)[0] if b * m <= 64 * 256 else float("nan")
        values = b * m * k / ours
        line = (f"{b:>4} {m:>5} {k:>3} | {ours * 1e6:>9.0f} {b / ours:>9,.0f} {values:>9.2e} | {serving * 1e6:>9.0f}"
                f" {ours / serving:>5.1f} | {fancy * 1e6:>9.0f} {fancy / ours:>5.1f} | {loop * 1e6:>9.0f} {loop / ours:>6.0f}")
        if gpu:
            import cupy as cp

            from kernels.gpu import GpuScorer

            scorer, acts_d = GpuScorer(bank), cp.asarray(acts)
            # both return host arrays, so each call includes its synchronization
            three, lrt = best_times([lambda: scorer.score(acts_d, labels, m, draw_rng),
                                     lambda: scorer.lrt(acts_d, labels, m, draw_rng)], budget_s=0.3)
            line += f" | {three * 1e6:>15.0f} {lrt * 1e6:>11.0f} {b / lrt:>10,.0f} {serving / lrt:>12.1f}"
        print(line)


if __name__ == "__main__":
    main()
