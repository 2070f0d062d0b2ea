"""``nfp serve``: write the Triton model repository and serve it until Ctrl-C."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from export.cli.options import CommandConfig, add_admin_key, add_out, add_quiet, signing_keys

HELP = 'write the Triton model repository and serve it until Ctrl-C'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the pip-installed server (Python backend only); gpu: NVIDIA's Triton container "
                        "(default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--http-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--metrics-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--write-only", action="store_true", help="write <out>/repository/<profile> and exit")
    p.add_argument("--fused", action="store_true",
                   help="also serve guarded_classifier_fused: classifier and detector in one Python step, same "
                        "inputs and outputs as the ensemble, less added latency (cpu profile)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="calibrated false-positive rate that decides is_attacked (default: %(default)s)")
    p.add_argument("--queue-delay-us", type=int, default=0, help="dynamic-batching delay per model (default: 0)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (default: 1)")
    p.add_argument("--signing-key", type=Path,
                   help="private key that signs every model folder; the server gets its public.pem beside it and "
                        "loads signed, unchanged models only (default: <out>/signing/private.pem, created if "
                        "missing; keep it off the serving machine)")
    p.add_argument("--audit", action="store_true",
                   help="also answer each request's draws (fingerprint_ids); off by default, the draws are the "
                        "detector's secret")
    p.add_argument("--no-query-memory", action="store_true",
                   help="serve without the query memory (no query_flagged output, the detector step gets no image)")
    p.add_argument("--query-capacity", type=int, default=None, metavar="N",
                   help="queries the memory remembers (default: the calibrated file's, else 100000; 8 bytes x 2 x "
                        "50 hashes each, ~80 MB per 100,000)")
    p.add_argument("--query-threshold", type=int, default=None, metavar="T",
                   help="shared hashes (of 50) with one recent query that set query_flagged (default: the one "
                        "`nfp calibrate` chose on clean images, <out>/query_memory.json)")
    add_admin_key(p, "the key the server requires (header nfp-admin-key) for its restricted protocols: model "
                      "control, shared memory, statistics, trace, logging (default: $NFP_ADMIN_KEY, else a fresh "
                      "random key, printed)")


OPTIONS = (add_out, add_quiet, add_arguments,)
REPORTS = False  # runs in the foreground until Ctrl-C


@dataclass(frozen=True)
class Config(CommandConfig):
    """What ``nfp serve`` reads: its options."""

    out: Path
    quiet: bool
    profile: str
    grpc_port: int
    http_port: int
    metrics_port: int
    write_only: bool
    fused: bool
    fpr: float
    queue_delay_us: int
    instances: int
    signing_key: Path | None
    audit: bool
    admin_key: str | None
    no_query_memory: bool = False
    query_capacity: int | None = None
    query_threshold: int | None = None


def query_memory(out: Path, capacity: int | None, threshold: int | None):
    """The served query memory's knobs: the calibrated ones with ``capacity`` and ``threshold`` where given;
    None (the writer takes the calibrated ones) where neither is."""
    from dataclasses import replace

    from model_repository.writer import calibrated_query_memory

    given = {k: v for k, v in (("capacity", capacity), ("threshold", threshold)) if v is not None}
    return replace(calibrated_query_memory(out), **given) if given else None


def run(cfg: Config, progress: bool) -> None:
    """Write the repository and run the server in the foreground until Ctrl-C (or SIGTERM)."""
    import signal
    import time

    from model_repository.server import ADMIN_HEADER, GRPC_ADMIN_HEADER, RESTRICTED, TritonServer
    from model_repository.writer import ServingConfig, write_repository

    serving = ServingConfig(false_positive_rate=cfg.fpr, fused=cfg.fused, queue_delay_us=cfg.queue_delay_us,
                            instances=cfg.instances, audit=cfg.audit, watch_queries=not cfg.no_query_memory,
                            query_memory=query_memory(cfg.out, cfg.query_capacity, cfg.query_threshold))
    private, public = signing_keys(cfg.out, cfg.signing_key)
    repo = write_repository(cfg.out, cfg.out / "repository" / cfg.profile, cfg.profile, serving, signing_key=private)
    print(f"model repository: {repo} (signed; public key {public})", file=sys.stderr)
    if cfg.write_only:
        return
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    server = TritonServer(repo, cfg.grpc_port, cfg.http_port, cfg.metrics_port, verbose=not cfg.quiet,
                          public_key=public, admin_key=cfg.admin_key)
    try:
        server.start()
        models = "'guarded_classifier'" + (" and 'guarded_classifier_fused'" if cfg.fused else "")
        print(f"serving {models}: gRPC {server.grpc_url}, metrics {server.metrics_url}; Ctrl-C stops", file=sys.stderr)
        print(f"admin protocols ({', '.join(RESTRICTED)}) need the header {ADMIN_HEADER} (over gRPC: "
              f"{GRPC_ADMIN_HEADER}): {server.admin_key}", file=sys.stderr)
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        code = server.stop()
        print(f"server stopped (exit code {code})", file=sys.stderr)
