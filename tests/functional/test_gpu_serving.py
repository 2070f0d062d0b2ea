"""Smoke test of the ``gpu`` profile: the classifier on Triton's native onnxruntime backend
(``KIND_GPU``), the detector's CUDA kernel taking its activations through DLPack. Needs a GPU and a
Triton install with the onnxruntime backend (NVIDIA's container): set ``NFP_TRITONSERVER`` and
``NFP_TRITON_BACKENDS`` (see :mod:`model_repository.server`); ``make test-gpu`` runs it there."""
import os

import numpy as np
import pytest

from kernels.gpu import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="no CUDA device visible to CuPy"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(os.environ.get("NFP_TRITON_BACKENDS", "/nonexistent"),
                                                      "onnxruntime")),
                       reason="no Triton onnxruntime backend: set NFP_TRITONSERVER and NFP_TRITON_BACKENDS"),
]


def test_the_gpu_profile_serves_the_offline_verdicts(tiny_run, mnist_subset, tmp_path):
    from client.grpc_client import DetectorClient
    from model_repository.server import TritonServer
    from model_repository.writer import ServingConfig, write_repository
    from kernels.bank import Bank
    from kernels.calibration import Calibration
    from kernels.onnx_runtime import ort_session
    from kernels.scoring import score

    out, _ = tiny_run
    repo = write_repository(out, tmp_path / "gpu", "gpu", ServingConfig(audit=True))  # replays the draws
    x = mnist_subset[0][:32]
    with TritonServer(repo) as server, DetectorClient(server.grpc_url) as client:
        result = client.detect(x)
    logits, acts = ort_session(out / "model.onnx").run(None, {"images": x})
    bank = Bank.load(out / "bank")
    cal = Calibration.from_json(bank.meta["calibration"]["lrt"])
    np.testing.assert_array_equal(result.label, logits.argmax(1))
    rows = result.checked
    offline = score(acts[rows], result.label[rows], bank, cal.m, ids=result.fingerprint_ids[rows])
    np.testing.assert_allclose(result.score[rows], cal.standardize(offline.lrt, result.label[rows]),
                               rtol=1e-4, atol=1e-4)
