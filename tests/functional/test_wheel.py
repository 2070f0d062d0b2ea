"""A built wheel serves: it carries the Triton models' code and the CUDA source, so a user who installs
it (no source tree anywhere on the path) can write a repository and be answered over gRPC; and
``pip install .[client]`` alone gives a working client without torch."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

SERVE_ONE = """
import json, sys
from pathlib import Path
import numpy as np
import export, kernels
from client.grpc_client import DetectorClient
from model_repository.server import TritonServer
from model_repository.writer import write_repository

out, target = Path(sys.argv[1]), Path(sys.argv[2])
repo = write_repository(out, target, "cpu")
with np.load(out / "splits.npz") as s, np.load(sys.argv[3]) as d:
    image = (d["x"][s["test"][:1]].astype(np.float32) / 255)[:, None]
with TritonServer(repo) as server, DetectorClient(server.grpc_url) as client:
    r = client.detect(image)
print(json.dumps({"export": export.__file__, "kernels": kernels.__file__, "label": int(r.label[0]),
                  "checked": bool(r.checked[0]), "cu": (Path(kernels.__file__).parent / "fingerprint_kernel.cu").is_file()}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    return next(wheels.glob("*.whl"))


def test_a_wheel_installed_in_a_fresh_environment_writes_a_repository_and_serves(wheel, tiny_run, mnist_npz, tmp_path):
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    # the dependencies come from this environment (a path entry, so its editable install of the source
    # tree is not activated); the project itself only from the wheel
    site = Path(sysconfig.get_paths(vars={"base": str(fresh)})["purelib"])
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(fresh / "bin" / "python"), "-c", SERVE_ONE, str(tiny_run[0]), str(tmp_path / "repo"),
                           str(mnist_npz)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["export"].startswith(str(fresh)) and result["kernels"].startswith(str(fresh)), result
    assert result["cu"] and 0 <= result["label"] < 10


def test_the_client_extra_installs_without_torch_and_asks_a_running_server(wheel, tiny_run, mnist_subset, tmp_path):
    """A fresh environment with ``<wheel>[client]`` from the package index: no torch, no SciPy, and
    ``nfp predict`` gets the same labels and verdicts shape from a real server as the full install."""
    from client.grpc_client import DetectorClient
    from model_repository.server import TritonServer
    from model_repository.writer import write_repository

    fresh = tmp_path / "client-env"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    py = str(fresh / "bin" / "python")
    done = subprocess.run([py, "-m", "pip", "install", "-q", f"{wheel}[client]"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    missing = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'scipy', 'onnx', "
                              "'art', 'tritonclient', 'numpy') if u.find_spec(m) is None])"],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.stdout.strip() == "['torch', 'scipy', 'onnx', 'art']", missing.stdout + missing.stderr
    images = tmp_path / "four.npz"
    np.savez(images, x=mnist_subset[0][:4])
    repo = write_repository(tiny_run[0], tmp_path / "repo", "cpu")
    with TritonServer(repo) as server:
        asked = subprocess.run([str(fresh / "bin" / "nfp"), "predict", str(images), "--url", server.grpc_url],
                               capture_output=True, text=True, cwd=tmp_path, timeout=120)
        with DetectorClient(server.grpc_url) as client:
            expected = client.detect(mnist_subset[0][:4]).label
    assert asked.returncode == 0, asked.stderr[-2000:]
    rows = asked.stdout.strip().splitlines()[1:]
    assert [int(r.split()[1]) for r in rows] == expected.tolist()
    assert all(r.split()[-1] in ("clean", "ATTACKED") for r in rows)
