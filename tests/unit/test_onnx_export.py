"""ONNX export: logits and the bank's activations in one graph, equal to torch, any batch size."""
import numpy as np
import pytest
import torch

from export.models.activations import capture_activations
from export.models.onnx_export import ClassifierWithActivations, check_parity, export_onnx
from kernels.errors import ModelMismatchError
from kernels.onnx_runtime import ort_session


@pytest.fixture(scope="module")
def exported(small_model, mnist_subset, tmp_path_factory):
    x = mnist_subset[0][:32]
    acts, layout = capture_activations(small_model, x, ["conv2", "fc1:input", "fc3"], progress=False)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(small_model, layout, path, x), layout, acts


def test_export_outputs_logits_and_activations_laid_out_as_captured(exported, small_model, mnist_subset):
    report, layout, acts = exported
    assert report.max_abs_diff_activations <= 1e-4 and len(report.sha256) == 64
    session = ort_session(report.path)
    for batch in (1, 5):  # the batch axis is dynamic
        logits, onnx_acts = session.run(None, {"images": mnist_subset[0][:batch]})
        assert onnx_acts.shape == (batch, layout.num_neurons)
        np.testing.assert_allclose(onnx_acts, acts[:batch], atol=1e-4)
        with torch.no_grad():
            np.testing.assert_allclose(logits, small_model(torch.from_numpy(mnist_subset[0][:batch])).numpy(), atol=1e-4)


def test_parity_check_fails_loudly_when_the_model_changed(exported, small_model, mnist_subset):
    report, layout, _ = exported
    changed = type(small_model)()
    changed.load_state_dict(small_model.state_dict())
    with torch.no_grad():
        changed.fc3.bias += 1.0
    with pytest.raises(ModelMismatchError, match="disagrees with torch"):
        check_parity(report.path, ClassifierWithActivations(changed.eval(), layout), mnist_subset[0][:8])


def test_a_layout_naming_missing_layers_is_refused(exported):
    _, layout, _ = exported
    with pytest.raises(ModelMismatchError, match="not in"):
        ClassifierWithActivations(torch.nn.Sequential(torch.nn.Flatten()), layout)
