"""Soak: hold C requests in flight against a running server for N seconds and check every answer.

    python -m client.soak --url 127.0.0.1:8001 --reference runs/default/reference.npz \\
        --seconds 180 --concurrency 64 [--model guarded_classifier_fused] [--json soak.json]

Each request carries ``--batch`` images drawn at random from the reference set (``reference.npz``,
written by ``nfp export``: test images with the exported model's labels and probabilities, computed
offline by onnxruntime). Every answer must give the reference's labels and probabilities (within
1e-4); one that does not counts as *wrong*. Every ``--interval`` seconds one line: requests sent and
answered, errors, wrong answers, latency p50 / p99 of the requests answered in it, and the server's
memory (resident set of ``tritonserver`` and its Python-backend stubs, read from ``/proc`` where the
server runs on this machine). At the end: totals, and *lost*, the requests that never resolved (the
client's own deadline, ``--timeout``, resolves every request, so lost > 0 means a client bug).
Exit status 1 when any request failed, was wrong or was lost.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client.grpc_client import ENSEMBLE, DetectorClient

TOLERANCE = 1e-4


@dataclass
class Interval:
    """What happened in one interval: requests sent in it, and those resolved in it."""

    start_s: float
    sent: int = 0
    answered: int = 0
    errors: int = 0
    wrong: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    server_rss_mb: float | None = None

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_ms)
        row = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        row["p50_ms"] = float(np.percentile(lat, 50)) if lat.size else None
        row["p99_ms"] = float(np.percentile(lat, 99)) if lat.size else None
        return row


@dataclass
class SoakReport:
    url: str
    model: str
    seconds: float
    concurrency: int
    batch: int
    sent: int
    answered: int
    errors: int
    wrong: int
    lost: int
    p50_ms: float | None
    p99_ms: float | None
    intervals: list[dict]
    error_messages: list[str]

    @property
    def clean(self) -> bool:
        return self.errors == 0 and self.wrong == 0 and self.lost == 0 and self.answered == self.sent


def server_rss_mb(grpc_port: int) -> float | None:
    """Resident memory (MB) of the ``tritonserver`` listening on ``grpc_port`` and all its descendants
    (the Python-backend stubs), from ``/proc``; None where no such process runs on this machine."""
    parents, rss, root = {}, {}, None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        pid = int(proc.name)
        parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        if cmd[0].endswith(b"tritonserver") and f"--grpc-port={grpc_port}".encode() in cmd:
            root = pid
    if root is None:
        return None
    family, grew = {root}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in family} - family
        family |= new
        grew = bool(new)
    return sum(rss[p] for p in family) / 2**20


def soak(url: str, reference: Path, seconds: float, concurrency: int, model: str = ENSEMBLE, batch: int = 1,
         interval_s: float = 10.0, timeout_s: float = 30.0, seed: int = 0, printer=print) -> SoakReport:
    """Run the soak (see the module docstring) and return its report; ``printer`` gets each line."""
    with np.load(reference) as ref:
        x, labels, probabilities = ref["x"], ref["label"], ref["probabilities"]
    port = int(url.rsplit(":", 1)[1])
    rng = np.random.default_rng(seed)
    slots = threading.BoundedSemaphore(concurrency)
    lock = threading.Lock()
    intervals: list[Interval] = []
    messages: list[str] = []
    pending = [0]
    start = time.perf_counter()

    def current() -> Interval:
        now = time.perf_counter() - start
        while not intervals or now >= intervals[-1].start_s + interval_s:
            intervals.append(Interval(len(intervals) * interval_s))
        return intervals[-1]

    def done(future, rows, sent_at) -> None:
        latency = (time.perf_counter() - sent_at) * 1e3
        with lock:
            bucket = current()
            pending[0] -= 1
            error = future.exception()
            if error is not None:
                bucket.errors += 1
                if len(messages) < 10:
                    messages.append(str(error))
            else:
                answer = future.result()
                bucket.answered += 1
                bucket.latencies_ms.append(latency)
                if not (np.array_equal(answer.label, labels[rows])
                        and np.allclose(answer.probabilities, probabilities[rows], atol=TOLERANCE)):
                    bucket.wrong += 1
        slots.release()

    printer(f"soak {url} model {model}: {seconds:g} s at {concurrency} in flight, batch {batch}")
    printer(f"{'t (s)':>6} {'sent':>7} {'answered':>8} {'errors':>6} {'wrong':>5} {'p50 ms':>7} {'p99 ms':>7} {'server MB':>9}")
    printed = 0
    with DetectorClient(url, model, timeout_s) as client:
        while time.perf_counter() - start < seconds:
            if not slots.acquire(timeout=0.1):
                continue
            rows = rng.integers(0, len(x), batch)
            with lock:
                current().sent += 1
                pending[0] += 1
            sent_at = time.perf_counter()
            try:
                future = client.submit(x[rows])
            except Exception as e:  # the client could not even send: counted, never silent
                with lock:
                    current().errors += 1
                    pending[0] -= 1
                    messages.append(f"send failed: {e}")
                slots.release()
                continue
            future.add_done_callback(lambda f, rows=rows, sent_at=sent_at: done(f, rows, sent_at))
            with lock:
                finished = intervals[printed:-1]
            for bucket in finished:
                bucket.server_rss_mb = server_rss_mb(port)
                printer(_line(bucket.summary()))
                printed += 1
        deadline = time.perf_counter() + timeout_s + 2
        while time.perf_counter() < deadline and pending[0]:
            time.sleep(0.05)
    with lock:
        lost = pending[0]
        for bucket in intervals[printed:]:
            bucket.server_rss_mb = server_rss_mb(port)
            printer(_line(bucket.summary()))
        rows = [b.summary() for b in intervals]
        all_lat = np.concatenate([b.latencies_ms for b in intervals]) if intervals else np.zeros(0)
    totals = {k: sum(r[k] for r in rows) for k in ("sent", "answered", "errors", "wrong")}
    report = SoakReport(url, model, seconds, concurrency, batch, lost=lost, intervals=rows, error_messages=messages,
                        p50_ms=float(np.percentile(all_lat, 50)) if all_lat.size else None,
                        p99_ms=float(np.percentile(all_lat, 99)) if all_lat.size else None, **totals)
    printer(f"total: sent {report.sent}, answered {report.answered}, errors {report.errors}, wrong {report.wrong}, "
            f"lost {report.lost}; p50 {_ms(report.p50_ms)} ms, p99 {_ms(report.p99_ms)} ms")
    for m in messages[:3]:
        printer(f"  error: {m}")
    return report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _line(row: dict) -> str:
    mb = "-" if row["server_rss_mb"] is None else f"{row['server_rss_mb']:.0f}"
    return (f"{row['start_s']:>6.0f} {row['sent']:>7} {row['answered']:>8} {row['errors']:>6} {row['wrong']:>5} "
            f"{_ms(row['p50_ms']):>7} {_ms(row['p99_ms']):>7} {mb:>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="HOST:PORT of the server's gRPC endpoint")
    p.add_argument("--reference", type=Path, required=True,
                   help="reference.npz from `nfp export` (images, the offline model's labels and probabilities)")
    p.add_argument("--model", default=ENSEMBLE, help="served model to soak (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=60, help="how long to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64, help="requests kept in flight (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per request (default: %(default)s)")
    p.add_argument("--interval", type=float, default=10, help="seconds per reported interval (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30, help="per-request deadline, s (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.batch < 1 or args.seconds <= 0 or args.interval <= 0:
        p.error("--concurrency, --batch, --seconds and --interval must be positive")
    report = soak(args.url, args.reference, args.seconds, args.concurrency, args.model, args.batch, args.interval,
                  args.timeout)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
