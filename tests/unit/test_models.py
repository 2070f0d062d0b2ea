import pytest
import torch
from torch import nn

from export.models.classifier import ClassifierSpec, default_spec, load_checkpoint, save_checkpoint
from export.models.weights import load_weights
from kernels.errors import InvalidInputError, ModelMismatchError


def tiny_mlp(hidden: int = 8) -> nn.Module:
    """A user model factory referenced by import path in the tests."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_checkpoint_round_trip_rebuilds_the_same_function(tmp_path):
    spec = default_spec((1, 28, 28), 10)
    model = spec.build().eval()
    save_checkpoint(model, spec, tmp_path / "m.pt")
    loaded, loaded_spec = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(3, 1, 28, 28)
    assert loaded_spec == spec
    torch.testing.assert_close(loaded(x), model(x))


def test_user_factory_is_built_from_its_import_path():
    spec = ClassifierSpec("tests.unit.test_models:tiny_mlp", (1, 4, 4), 3, {"hidden": 5})
    assert spec.build()[1].out_features == 5


def test_unknown_architecture_says_how_to_name_one():
    with pytest.raises(InvalidInputError, match="package.module:factory"):
        ClassifierSpec("resnet9000", (1, 4, 4), 3).build()


def test_weights_of_another_model_are_refused_naming_the_keys(tmp_path):
    torch.save(tiny_mlp(8).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelMismatchError, match=r"shape mismatch.*1.weight"):
        load_weights(tiny_mlp(5), tmp_path / "w.pt")
    with pytest.raises(ModelMismatchError, match="missing"):
        load_weights(default_spec((1, 28, 28), 10).build(), tmp_path / "w.pt")


def test_pickled_objects_are_not_loaded_as_weights(tmp_path):
    torch.save({"x": object()}, tmp_path / "evil.pt")
    with pytest.raises(ModelMismatchError, match="not a readable state_dict"):
        load_weights(tiny_mlp(), tmp_path / "evil.pt")
