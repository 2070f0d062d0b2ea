"""Guarding a model that is already served: the user's Triton model folder (UINT8 NHWC pixels in, its own
normalization inside the graph, its own output name) through the whole pipeline, served with its
contract kept, answering its own client exactly as before, with detection added."""
import json

import numpy as np
import pytest

from tests.conftest import TINY_PIPELINE

CONFIG = """name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "pixels" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [ 28, 28, 1 ] } ]
output [ { name: "scores" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""


def users_model_folder(model, folder):
    """The tiny run's CNN as a user serves it: a Triton model folder whose graph takes UINT8 NHWC pixels
    and divides by 255 itself (exported with torch's TorchScript exporter, opset 17)."""
    import torch

    class Production(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            return self.net(pixels.permute(0, 3, 1, 2).float() / 255.0)

    (folder / "1").mkdir(parents=True)
    example = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    torch.onnx.export(Production(model.eval()), (example,), str(folder / "1" / "model.onnx"), input_names=["pixels"],
                      output_names=["scores"], dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}},
                      dynamo=False, opset_version=17)
    (folder / "config.pbtxt").write_text(CONFIG)
    return folder


def as_pixels(images):
    """What the user's own client sends: rounded UINT8 NHWC pixels."""
    return np.round(images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def guarded(tiny_run, mnist_npz, tmp_path_factory):
    import contextlib
    import io

    from export.cli import main
    from export.models.classifier import load_classifier
    from export.data.workspace import Workspace

    root = tmp_path_factory.mktemp("served")
    folder = users_model_folder(load_classifier(Workspace(tiny_run[0])), root / "digits")
    out = root / "guarded"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the tiny run's options, its classifier replaced by the user's model
        rc = main(["--threads", "2", "pipeline", "--out", str(out), "--quiet", "--dataset", str(mnist_npz),
                   "--onnx-model", str(folder), *TINY_PIPELINE])
    assert rc == 0
    return folder, out, printed.getvalue()


def test_the_pipeline_runs_from_the_users_model_folder_and_keeps_its_contract(guarded, tiny_run):
    _, out, printed = guarded
    contract = json.loads((out / "contract.json").read_text())
    assert contract == {"input_name": "pixels", "input_type": "TYPE_UINT8", "dims": [28, 28, 1], "layout": "NHWC",
                        "scale": 255.0, "outputs": [{"name": "scores", "data_type": "TYPE_FP32", "dims": [10]}],
                        "logits": "scores"}
    train = json.loads((out / "manifest.json").read_text())["stages"]["train"]["results"]
    reference = json.loads((tiny_run[0] / "manifest.json").read_text())["stages"]["train"]["results"]
    assert train["trained"] is False and train["conversion_max_abs_diff"] < 1e-4
    assert train["accuracy"] == reference["accuracy"], "the same network, converted back: the same accuracy"
    assert train["default_layers"][-1] == "scores" and len(train["default_layers"]) == 4
    assert "Served by Triton over gRPC" in printed


def test_layers_lists_the_users_graph_tensors_with_shapes_and_marks_the_default(guarded, capsys):
    from export.cli import main

    folder, out, _ = guarded
    assert main(["layers", "--onnx-model", str(folder)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "`" in line]
    marked = [line.split("`")[1] for line in rows if line.startswith("| * ")]
    train = json.loads((out / "manifest.json").read_text())["stages"]["train"]["results"]
    assert marked == train["default_layers"]
    assert any("Gemm" in line and "'batch', 256]" in line for line in rows)


def test_detection_matches_the_torch_started_pipeline_on_the_same_data(guarded, tiny_run):
    from export.bank.search import bank_overlap
    from kernels.bank import Bank

    _, out, _ = guarded
    # the same four layers (conv2, fc1, fc2, logits), captured through onnx2torch instead of torch hooks
    mine, theirs = np.load(out / "activations" / "test.npy"), np.load(tiny_run[0] / "activations" / "test.npy")
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
    assert bank_overlap(Bank.load(out / "bank"), Bank.load(tiny_run[0] / "bank")) > 0.7
    rates = [json.loads((o / "report" / "evaluation.json").read_text()) for o in (out, tiny_run[0])]
    for attack in ("pgd_eps0.3", "deepfool"):
        a, b = (r["attacks"][attack] for r in rates)
        assert abs(a["fused"]["tpr@0.05"] - b["fused"]["tpr@0.05"]) < 0.25, attack


def test_the_guarded_repository_answers_the_users_own_client_as_before_plus_detection(guarded, mnist_subset,
                                                                                       tmp_path):
    import tritonclient.grpc as grpcclient

    from client.grpc_client import DetectorClient
    from kernels.onnx_runtime import ort_session
    from model_repository.server import TritonServer
    from model_repository.writer import ServingConfig, write_repository

    folder, out, _ = guarded
    images = mnist_subset[0][:24]
    pixels = as_pixels(images)
    unguarded = ort_session(folder / "1" / "model.onnx").run(["scores"], {"pixels": pixels})[0]
    repo = write_repository(out, tmp_path / "repo", "cpu", ServingConfig(fused=True))
    with TritonServer(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        for model in ("guarded_classifier", "guarded_classifier_fused"):
            meta = client.get_model_metadata(model, as_json=True)
            assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("pixels", "UINT8",
                                                                                         ["-1", "28", "28", "1"])]
            tensor = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")  # the user's client, unchanged
            tensor.set_data_from_numpy(pixels)
            answer = client.infer(model, [tensor])
            np.testing.assert_array_equal(answer.as_numpy("scores"), unguarded)  # the original output, bit for bit
            np.testing.assert_array_equal(answer.as_numpy("label")[:, 0], unguarded.argmax(1))
            assert answer.as_numpy("is_attacked").shape == (24, 1)
            with DetectorClient(server.grpc_url, model) as ours:  # our client sends float images as the model takes them
                assert ours.served_input.layout == "NHWC" and ours.served_input.data_type == "TYPE_UINT8"
                np.testing.assert_array_equal(ours.detect(images).label, unguarded.argmax(1))
        client.close()
