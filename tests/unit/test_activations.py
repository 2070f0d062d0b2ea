import numpy as np
import pytest
import torch
from torch import nn

from export.models.activations import ActivationLayout, capture_activations, default_layers
from kernels.errors import LayerNotFoundError


def test_default_layers_are_the_last_four_weighted_layers(small_model):
    assert default_layers(small_model) == ["conv2", "fc1", "fc2", "fc3"]


def test_captured_values_equal_the_layers_outputs(small_model, mnist_subset):
    x = mnist_subset[0][:10]
    acts, layout, logits = capture_activations(small_model, x, ["fc1", "fc3"], batch_size=3,
                                               progress=False, return_logits=True)
    assert acts.shape == (10, 266) and acts.dtype == np.float32
    assert [(s.name, s.offset, s.size) for s in layout.slices] == [("fc1", 0, 256), ("fc3", 256, 10)]
    with torch.no_grad():
        expected = small_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(acts[:, 256:], expected, atol=1e-5)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert (acts[:, :256] < 0).any(), "fc1's output is captured before its ReLU"


def test_a_modules_input_is_reachable(small_model, mnist_subset):
    acts, layout = capture_activations(small_model, mnist_subset[0][:4], ["fc1", "fc2:input"], progress=False)
    pre, post = acts[:, :256], acts[:, 256:]
    np.testing.assert_allclose(post, np.maximum(pre, 0), atol=1e-6)  # fc2's input is relu(fc1) in eval mode
    assert layout.slices[1].where == "input" and layout.layers == ["fc1", "fc2:input"]


def test_in_place_relu_does_not_overwrite_the_captured_output():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = np.random.default_rng(0).normal(size=(8, 1, 2, 2)).astype(np.float32)
    model = nn.Sequential(nn.Flatten(), *model)
    acts, _ = capture_activations(model, x, ["1"], progress=False)
    with torch.no_grad():
        expected = model[1](torch.from_numpy(x).flatten(1)).numpy()
    assert (expected < 0).any()
    np.testing.assert_allclose(acts, expected, atol=1e-6)


def test_unknown_layer_lists_the_available_ones(small_model, mnist_subset):
    with pytest.raises(LayerNotFoundError, match="'fc9' not found.*available: conv1, relu1"):
        capture_activations(small_model, mnist_subset[0][:2], ["fc9"], progress=False)


def test_large_captures_can_go_to_a_memory_mapped_file(small_model, mnist_subset, tmp_path):
    x = mnist_subset[0][:20]
    in_ram, layout = capture_activations(small_model, x, progress=False)
    on_disk, _ = capture_activations(small_model, x, out=tmp_path / "a.npy", batch_size=7, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), in_ram, atol=1e-5)  # batch size changes BLAS order
    layout.save(tmp_path / "layout.json")
    assert ActivationLayout.load(tmp_path / "layout.json") == layout
