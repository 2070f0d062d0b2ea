"""The main job's last step: call a served guarded classifier with held-out images.

Sends clean test images and successful evaluation attacks over gRPC, then prints served
accuracy, detection rate and false-positive rate at the calibrated threshold, the share the server's
query memory flagged as near-copies of earlier queries (an attacked image is a near-copy of its clean
original when the perturbation is small and the original was sent first, as here), and the batch-1
latency the client saw.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from client.grpc_client import DetectorClient, RequestError


def run_demo(url: str, x: np.ndarray, y: np.ndarray, attacked: dict[str, np.ndarray], batch_size: int = 32,
             latency_requests: int = 200, progress: bool = False) -> dict[str, Any]:
    """Send clean images ``x`` with true labels ``y`` and each attack's adversarial images to the server at
    ``url`` (gRPC), then measure batch-1 latency; ``progress`` shows a bar over the image sets.
    ``nfp demo`` serves a pipeline's repository and calls this with its held-out test images."""
    from tqdm.auto import tqdm

    report: dict[str, Any] = {}
    with DetectorClient(url) as client:
        def served(images: np.ndarray):
            """Labels, verdicts, checked flags and query-memory flags (-1 / False where a whole request
            was refused), and the number of refused requests."""
            labels, flagged, checked, near, refused = (np.full(len(images), -1), np.zeros(len(images), bool),
                                                       np.zeros(len(images), bool), np.zeros(len(images), bool), 0)
            starts = range(0, len(images), batch_size)
            for start, future in zip(starts, [client.submit(images[s : s + batch_size]) for s in starts]):
                try:
                    r = future.result()
                except RequestError:
                    refused += 1
                    continue
                rows = slice(start, start + len(r.label))
                labels[rows], flagged[rows], checked[rows] = r.label, r.is_attacked, r.checked
                if r.query_flagged is not None:
                    near[rows] = r.query_flagged
            return labels, flagged, checked, near, refused

        def summary(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
            """Labels, which images were answered, and the report line of ``images``."""
            labels, flagged, checked, near, refused = served(images)
            answered = labels >= 0
            return labels, answered, {"images": int(answered.sum()), "unchecked": int((answered & ~checked).sum()),
                                      "refused_requests": refused, "flagged": float(flagged[answered].mean()),
                                      "query_flagged": float(near[answered].mean())}

        labels, answered, report["clean test"] = summary(x)
        report["clean test"]["accuracy"] = float((labels[answered] == y[answered]).mean())
        for name, adv in tqdm(attacked.items(), desc="demo", unit="attack", disable=not progress):
            report[name] = summary(adv)[2]
        times = []
        for i in range(latency_requests + 1):  # the first is a warm-up
            start = time.perf_counter()
            try:
                client.detect(x[i % len(x) : i % len(x) + 1])
            except RequestError:
                pass  # a refused request is a full round trip too
            times.append(time.perf_counter() - start)
        times = times[1:]
        report["latency_ms"] = {"p50": 1e3 * float(np.percentile(times, 50)),
                                "p99": 1e3 * float(np.percentile(times, 99)), "requests": latency_requests}
    return report


def format_report(report: dict[str, Any], fpr: float = 0.01) -> str:
    lines = [f"Served by Triton over gRPC (threshold calibrated for {fpr:.0%} false positives):", "",
             "| images | n | not checked (never flagged) | served accuracy | flagged as attacked | "
             "query memory: near-copy of an earlier query |",
             "|---|---|---|---|---|---|"]
    for name, r in report.items():
        if name == "latency_ms":
            continue
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else ""
        what = "false-positive rate" if name == "clean test" else "detection rate"
        lines.append(f"| {name} | {r['images']} | {r['unchecked']} | {acc} | {r['flagged']:.3f} ({what}) | "
                     f"{r['query_flagged']:.3f} |")
    lat = report["latency_ms"]
    lines += ["", f"batch-1 latency over {lat['requests']} sequential requests: p50 {lat['p50']:.2f} ms, "
                  f"p99 {lat['p99']:.2f} ms"]
    return "\n".join(lines)
