"""EfficientNet-Lite0 with its shipped ImageNet weights recognises real photos."""
import numpy as np
import pytest
import torch

from export.models.activations import capture_activations, default_layers
from export.models.classifier import ClassifierSpec

skimage = pytest.importorskip("skimage")

EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


@pytest.fixture(scope="module")
def model():
    return ClassifierSpec("efficientnet-lite0", (3, 224, 224), 1000, {"pretrained": True}).build().eval()


@pytest.fixture(scope="module")
def photos():
    from skimage import data, transform

    resize = lambda img: transform.resize(img, (224, 224), anti_aliasing=True).transpose(2, 0, 1)  # noqa: E731
    return np.stack([resize(data.chelsea()), resize(data.coffee())]).astype(np.float32)


def test_the_cat_is_a_cat_and_the_coffee_an_espresso(model, photos):
    with torch.no_grad():
        top = model(torch.from_numpy(photos)).argmax(1).tolist()
    assert top[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT) and top[1] == ESPRESSO


def test_its_last_layers_can_be_captured_for_fingerprints(model, photos):
    assert default_layers(model) == ["_blocks.15._depthwise_conv", "_blocks.15._project_conv", "_conv_head", "_fc"]
    acts, layout = capture_activations(model, photos, ["_conv_head", "_fc"], progress=False)
    assert acts.shape == (2, 1280 * 7 * 7 + 1000) and layout.slices[1].offset == 1280 * 49
