"""Starting and stopping a real Triton Inference Server (2.51, from the ``nvidia-pytriton`` wheel).

Only the wheel's bundled server binary and Python backend are used, not pytriton's API. The recipe
(``DESIGN.md``, "Facts about running a real Triton server here"): a backend directory holding the
Python backend and the stub for the running Python; ``LD_LIBRARY_PATH`` with the wheel's libraries and
Python's ``LIBDIR``; the environment's ``bin`` first on ``PATH``; loopback addresses, free ports and a
unique shared-memory prefix so that parallel servers and leftovers do not collide.

To run another Triton install instead (NVIDIA's container, whose onnxruntime backend the ``gpu``
profile needs), set ``NFP_TRITONSERVER`` to its ``tritonserver`` binary and ``NFP_TRITON_BACKENDS`` to
its backend directory (``/opt/tritonserver/bin/tritonserver`` and ``/opt/tritonserver/backends`` there).

Example::

    with TritonServer(repository) as server:
        client = DetectorClient(server.grpc_url)
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kernels.errors import FingerprintError
from model_repository.signing import PUBLIC_KEY_ENV

READY_TIMEOUT_S = 120
# Triton's non-inference protocols that change or reveal the server: callable only with the admin key header
RESTRICTED = ("shared-memory", "model-repository", "statistics", "trace", "logging")
ADMIN_HEADER = "nfp-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # the name Triton checks over gRPC


class ServerError(FingerprintError):
    """The server did not start, or died; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: it ships the Triton server binary")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when the thread that started it dies, so a
    killed benchmark or test run leaves no server behind (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def load_model(url: str, model: str, admin_key: str, timeout_s: float = 300) -> None:
    """Ask the server at ``url`` to (re)load ``model`` (Triton's model control, with the server's admin
    key): its latest version replaces the one serving once it is ready, without a gap; if it fails to
    load, the old one keeps serving and :class:`ServerError` carries Triton's reason."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(model, headers={GRPC_ADMIN_HEADER: admin_key}, client_timeout=timeout_s)
    except InferenceServerException as e:
        raise ServerError(f"the server at {url} did not load {model}: {e.message()}") from None
    finally:
        client.close()


class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on 127.0.0.1.

    Args:
        repository: a model repository (see :mod:`model_repository.writer`).
        grpc_port, http_port, metrics_port: 0 picks a free port.
        log: where the server's log goes (a file object); default: kept in memory, tail shown on errors.
        verbose: forward the server's log lines to stderr as they come.
        public_key: the key the repository was signed with (:mod:`model_repository.signing`); with it,
            every detecting model refuses to load unless its folder is signed by that key and unchanged.
            It reaches the models through the environment, never through the repository.
        admin_key: the value of the :data:`ADMIN_HEADER` header without which Triton refuses the
            :data:`RESTRICTED` protocols (gRPC and HTTP); default a fresh random one per server
            (:attr:`admin_headers`). Inference, health, metadata and model configs stay open.
    """

    def __init__(self, repository: Path, grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 verbose: bool = False, public_key: Path | None = None, admin_key: str | None = None) -> None:
        import secrets

        self.repository = Path(repository).resolve()
        self.admin_key = admin_key or secrets.token_urlsafe(24)
        self.public_key = Path(public_key).resolve() if public_key is not None else None
        if self.public_key is not None and not self.public_key.is_file():
            raise ServerError(f"public key {public_key} not found")
        self.grpc_port, self.http_port = grpc_port or free_port(), http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.verbose = verbose
        self.shm_prefix = f"nfp{uuid.uuid4().hex[:10]}_"
        self.process: subprocess.Popen | None = None
        self.log_lines: list[str] = []
        self._workdir: tempfile.TemporaryDirectory | None = None

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC headers that open the restricted protocols (``headers=`` of tritonclient's gRPC calls;
        over HTTP the header is :data:`ADMIN_HEADER` itself)."""
        return {GRPC_ADMIN_HEADER: self.admin_key}

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _backend_dir(self) -> Path:
        if os.environ.get("NFP_TRITON_BACKENDS"):  # a full Triton install, e.g. NVIDIA's container
            return Path(os.environ["NFP_TRITON_BACKENDS"])
        root = pytriton_root()
        self._workdir = tempfile.TemporaryDirectory(prefix="nfp-triton-")
        python = Path(self._workdir.name) / "backends" / "python"
        python.mkdir(parents=True)
        stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        if not stub.exists():
            raise ServerError(f"no Triton Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}")
        for src in (root / "backends" / "python" / "libtriton_python.so",
                    root / "backends" / "python" / "triton_python_backend_utils.py", stub):
            (python / src.name).symlink_to(src)
        return Path(self._workdir.name) / "backends"

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.public_key is not None:
            env[PUBLIC_KEY_ENV] = str(self.public_key)
        if os.environ.get("NFP_TRITONSERVER"):
            return env
        libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> "TritonServer":
        binary = os.environ.get("NFP_TRITONSERVER") or pytriton_root() / "bin" / "tritonserver"
        cmd = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={self._backend_dir()}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
               "--model-control-mode=explicit", "--load-model=*",  # all at start; new versions loaded on request
               "--strict-readiness=true", "--exit-on-error=true", "--log-verbose=0",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               f"--grpc-restricted-protocol={','.join(RESTRICTED)}:{ADMIN_HEADER}={self.admin_key}",
               f"--http-restricted-api={','.join(RESTRICTED)}:{ADMIN_HEADER}={self.admin_key}"]
        self.process = subprocess.Popen(cmd, env=self._environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True, preexec_fn=_die_with_parent)
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait_ready()
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log_lines.append(line.rstrip())
            if self.verbose:
                print(f"[triton] {line.rstrip()}", file=sys.stderr)

    def log_tail(self, n: int = 12) -> str:
        """The server's error lines (Triton prefixes them with E and the date), then its last lines."""
        errors = [line for line in self.log_lines if re.match(r"E\d{4} ", line)]
        return "\n".join(errors + ["..."] + self.log_lines[-n:])

    def _wait_ready(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline = time.time() + READY_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; remove this server's shared-memory regions."""
        code = None
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
