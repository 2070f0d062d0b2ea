"""Fingerprint-search speed: candidates per second, each path beside a per-candidate loop, one run.

    python -m export.evaluation.search_benchmark

Every rate includes the per-class set-up. Shapes from the fingerprint-bank issue: 400 clean + 400 attacked rows; ``D = 4096`` at ``k = 50`` and
``k = 5``; ``D = 100,000`` at ``k = 50``. The baseline is the straightforward loop (per candidate:
gather the subset, average, Welch t-test with SciPy, Cohen's d) timed on a few hundred candidates in
the same process, so the printed ratio is measured side by side.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from kernels.fingerprint_search import SearchConfig, search_class

ROWS = 400


def loop_baseline(clean: np.ndarray, attacked: np.ndarray, k: int, count: int, seed: int) -> float:
    """Candidates per second of the per-candidate loop."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(count):
        s = rng.choice(clean.shape[1], size=k, replace=False)
        c, a = clean[:, s].mean(1), attacked[:, s].mean(1)
        stats.ttest_ind(c, a, equal_var=False)
        pooled = np.sqrt((c.var(ddof=1) * (len(c) - 1) + a.var(ddof=1) * (len(a) - 1)) / (len(c) + len(a) - 2))
        _ = (a.mean() - c.mean()) / pooled
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=200_000, help="candidates per measured search (default: %(default)s)")
    p.add_argument("--loop-candidates", type=int, default=300, help="candidates of the loop baseline (default: %(default)s)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"{'D':>7} {'k':>3} {'path':>10} {'candidates/s':>13} {'loop cand/s':>12} {'ratio':>7}")
    for d, k, paths in [(4096, 50, ("covariance", "gather")), (4096, 5, ("covariance", "gather")),
                        (100_000, 50, ("gather",))]:
        clean = rng.normal(size=(ROWS, d)).astype(np.float32)
        attacked = (rng.normal(size=(ROWS, d)) + 0.05).astype(np.float32)
        loop = loop_baseline(clean, attacked, k, args.loop_candidates, seed=1)
        # per-class set-up (a D x D covariance: ~0.5 s at D = 4096) is included, so size the searches
        # like real ones: 1M candidates at k = 5
        n = args.candidates * (5 if k <= 10 else 1) if d < 50_000 else args.candidates // 10
        for path in paths:
            cfg = SearchConfig(k=(k,), candidates=n, method=path, d_min=0.2)
            search_class(clean, attacked, SearchConfig(k=(k,), candidates=1000, method=path), seed=0)  # warm-up
            start = time.perf_counter()
            search_class(clean, attacked, cfg, seed=0)
            rate = n / (time.perf_counter() - start)
            print(f"{d:>7} {k:>3} {path:>10} {rate:>13,.0f} {loop:>12,.0f} {rate / loop:>6.0f}x")


if __name__ == "__main__":
    main()
