"""The bank built as one shard per class on Ray equals the bank of one process, also after a worker
dies and the run is resumed."""
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from export.bank.ray_build import RayCluster, build_bank, shard_path
from export.data.workspace import Workspace
from kernels.bank import ARRAYS, Bank
from kernels.errors import FingerprintError
from kernels.fingerprint_search import SearchConfig

CONFIG = SearchConfig(candidates=1500, keep=40)
SMALL = dict(per_class=10, config=CONFIG, profile="mnist", progress=False)  # the tiny run's data is an .npz


def trained_copy(tiny_run, target):
    """A workspace with the tiny run's data and classifier, nothing after training."""
    target.mkdir()
    for name in ("data.json", "splits.npz", "classifier.pt", "classifier.json", "manifest.json"):
        shutil.copy2(tiny_run[0] / name, target / name)
    return Workspace(target)


def assert_same_bank(a: Workspace, b: Workspace):
    x, y = Bank.load(a.root / "bank"), Bank.load(b.root / "bank")
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
    assert x.num_fingerprints > 0


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory):
    ws = trained_copy(tiny_run, tmp_path_factory.mktemp("bank") / "local")
    report = build_bank(ws, classes=range(6), cluster=RayCluster(workers=0), **SMALL)
    assert report["shards"] == report["computed_now"] == 6
    return ws


def test_a_two_node_ray_cluster_builds_the_bank_of_one_process(tiny_run, one_process, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ws = trained_copy(tiny_run, tmp_path / "cluster")
        report = build_bank(ws, classes=range(6), cluster=RayCluster(address=cluster.address), **SMALL)
    finally:
        cluster.shutdown()
    assert report["computed_now"] == 6
    assert_same_bank(ws, one_process)
    assert (ws.root / "activations" / "calibration.npy").is_file(), "calibrate can follow"


def test_a_worker_killed_mid_run_leaves_the_saved_shards_and_a_resumed_run_the_same_bank(tiny_run, one_process,
                                                                                         tmp_path):
    ws = trained_copy(tiny_run, tmp_path / "killed")
    failure = []

    def run():
        try:
            build_bank(ws, classes=range(6), cluster=RayCluster(workers=2, max_retries=0), **SMALL)
        except FingerprintError as e:
            failure.append(str(e))

    builder = threading.Thread(target=run)
    builder.start()
    deadline = time.monotonic() + 120
    while not any(shard_path(ws, c).exists() for c in range(6)) and time.monotonic() < deadline:
        time.sleep(0.05)
    subprocess.run(["pkill", "-9", "-f", "ray::class_shard"])  # the workers busy with a shard die
    builder.join()
    assert failure and "run the same command again" in failure[0]
    saved = [c for c in range(6) if shard_path(ws, c).exists()]
    assert 0 < len(saved) < 6
    report = build_bank(ws, classes=range(6), cluster=RayCluster(workers=2), **SMALL)
    assert report["computed_now"] == 6 - len(saved), "only the missing shards are computed"
    assert_same_bank(ws, one_process)


def test_a_resumed_run_with_other_options_is_refused(tiny_run, one_process):
    from kernels.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="another plan"):
        build_bank(one_process, classes=range(6), cluster=RayCluster(workers=0), **{**SMALL, "per_class": 11})
