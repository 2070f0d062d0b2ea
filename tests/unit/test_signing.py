"""Signing model folders with model-signing: what is signed verifies, and any change is named."""
import os

import pytest

from model_repository.signing import (
    PUBLIC_KEY_ENV,
    SignatureError,
    create_keys,
    sign_repository,
    verify_if_required,
    verify_model,
)


@pytest.fixture()
def repo(tmp_path):
    """A repository of two model folders, signed with a key kept beside (not inside) it."""
    root = tmp_path / "repo"
    for name in ("classifier", "fingerprint_detector"):
        (root / name / "1" / "bank").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\n')
        (root / name / "1" / "model.onnx").write_bytes(b"weights")
        (root / name / "1" / "bank" / "bank.json").write_text('{"thresholds": [-2.3]}')
    private, public = create_keys(tmp_path / "keys")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert len(sign_repository(root, private)) == 2
    return root, public


def test_a_signed_folder_verifies_and_the_bytecode_python_writes_is_ignored(repo):
    root, public = repo
    (root / "classifier" / "1" / "__pycache__").mkdir()
    (root / "classifier" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    for model in root.iterdir():
        verify_model(model, public)


@pytest.mark.parametrize("change, named", [
    (lambda m: (m / "1" / "bank" / "bank.json").write_text('{"thresholds": [-1e30]}'), "1/bank/bank.json"),
    (lambda m: (m / "config.pbtxt").write_text('name: "x"\n'), "config.pbtxt"),
    (lambda m: (m / "1" / "other.onnx").write_bytes(b"x"), "other.onnx"),
    (lambda m: (m / "1" / "model.onnx").unlink(), "model.onnx"),
])
def test_any_change_is_refused_and_named_without_the_servers_paths(repo, change, named):
    root, public = repo
    change(root / "fingerprint_detector")
    with pytest.raises(SignatureError, match="fingerprint_detector fails its signature check") as e:
        verify_model(root / "fingerprint_detector", public)
    assert named in str(e.value) and str(root) not in str(e.value)
    verify_model(root / "classifier", public)  # the other folder is untouched


def test_another_key_and_a_missing_signature_are_refused(repo, tmp_path):
    root, _ = repo
    _, other = create_keys(tmp_path / "other")
    with pytest.raises(SignatureError, match="fails its signature check"):
        verify_model(root / "classifier", other)
    (root / "classifier" / "model.sig").unlink()
    with pytest.raises(SignatureError, match="classifier is not signed"):
        verify_model(root / "classifier", other)


def test_verification_is_required_exactly_when_the_server_has_a_public_key(repo, monkeypatch):
    root, public = repo
    (root / "classifier" / "config.pbtxt").write_text("changed")
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    assert verify_if_required(root / "classifier") is False
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    assert verify_if_required(root / "fingerprint_detector") is True
    with pytest.raises(SignatureError):
        verify_if_required(root / "classifier")
    monkeypatch.setenv(PUBLIC_KEY_ENV, os.devnull + "-missing")
    with pytest.raises(SignatureError, match="does not exist"):
        verify_if_required(root / "classifier")
