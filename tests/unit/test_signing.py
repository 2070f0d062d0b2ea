"""Signing model folders with model-signing: what is signed verifies, and any change is named."""
import os

import pytest

from model_repository.signing import (
    INSECURE_ENV,
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


def test_a_signed_folder_is_verified_with_the_key_and_refused_without_it(repo, monkeypatch, capsys):
    root, public = repo
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    assert verify_if_required(root / "fingerprint_detector") is True
    monkeypatch.delenv(PUBLIC_KEY_ENV)
    with pytest.raises(SignatureError, match=f"fingerprint_detector is signed .* no public key.*{INSECURE_ENV}=1"):
        verify_if_required(root / "fingerprint_detector")  # fails closed, naming the way out
    monkeypatch.setenv(INSECURE_ENV, "yes")  # only the exact opt-out counts
    with pytest.raises(SignatureError, match="no public key"):
        verify_if_required(root / "fingerprint_detector")
    monkeypatch.setenv(INSECURE_ENV, "1")
    assert verify_if_required(root / "fingerprint_detector") is False
    assert "WITHOUT checking its signature" in capsys.readouterr().err


def test_a_changed_folder_or_a_missing_key_file_is_refused(repo, monkeypatch):
    root, public = repo
    (root / "classifier" / "config.pbtxt").write_text("changed")
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    with pytest.raises(SignatureError):
        verify_if_required(root / "classifier")
    monkeypatch.setenv(INSECURE_ENV, "1")  # the opt-out never overrides a key that was given
    with pytest.raises(SignatureError):
        verify_if_required(root / "classifier")
    monkeypatch.setenv(PUBLIC_KEY_ENV, os.devnull + "-missing")
    with pytest.raises(SignatureError, match="does not exist"):
        verify_if_required(root / "classifier")


def test_an_unsigned_folder_loads_unverified_with_a_warning_and_never_under_a_key(repo, monkeypatch, capsys):
    root, public = repo
    (root / "classifier" / "model.sig").unlink()
    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    assert verify_if_required(root / "classifier") is False
    assert "classifier is not signed" in capsys.readouterr().err
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(public))
    with pytest.raises(SignatureError, match="not signed"):
        verify_if_required(root / "classifier")
