"""Signing a model repository and verifying it at load, with OpenSSF's ``model-signing``.

Each model folder (``<repository>/<model>``: its ``config.pbtxt`` with the served false-positive rate,
and its version folders with the ONNX model, the bank with its calibration and the model's code) is
signed as one unit with an elliptic-curve key (``model_signing``'s local-key signer: no network, no
Sigstore); the signature lies beside the files as ``model.sig``. The private
key stays outside the repository (by default ``<out>/signing/``, written by ``nfp serve``); the server
gets only the public key, through the environment variable :data:`PUBLIC_KEY_ENV` that the launcher
(:class:`model_repository.server.TritonServer`) sets, never through a file inside the repository. Each
model verifies its own folder in ``initialize`` (:class:`model_repository.serving.ServedDetector`, the
classifier's ``model.py``) and refuses to load on any difference: a changed, added or removed file. It
fails closed: a signed folder started without a key (a user's own ``tritonserver``, a container) does
not load unless :data:`INSECURE_ENV` says to skip the check (:func:`verify_if_required`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from kernels.errors import FingerprintError

SIGNATURE = "model.sig"

PUBLIC_KEY_ENV = "NFP_PUBLIC_KEY"

INSECURE_ENV = "NFP_INSECURE_SKIP_SIGNATURE_CHECK"  # the explicit opt-out: load signed models unchecked


class SignatureError(FingerprintError):
    """A model folder is unsigned, or its signature does not match its files or the key."""


def create_keys(directory: Path) -> tuple[Path, Path]:
    """A new P-256 key pair in ``directory`` (``private.pem``, readable by the owner only, and
    ``public.pem``); returns their paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = directory / "private.pem", directory / "public.pem"
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _hashing(model: Path):
    """Hash every file of the model folder but the signature and the bytecode Python writes into a
    version folder when Triton imports its ``model.py``."""
    from model_signing import hashing

    ignored = [SIGNATURE] + [f"{v.name}/__pycache__" for v in Path(model).iterdir() if v.is_dir()]
    return hashing.Config().set_ignored_paths(paths=ignored)


def sign_model(model: Path, private_key: Path) -> Path:
    """Sign the model folder ``model``; returns the signature's path."""
    from model_signing import signing

    signature = Path(model) / SIGNATURE
    signing.Config().use_elliptic_key_signer(private_key=str(private_key)).set_hashing_config(_hashing(model)).sign(
        model, signature)
    return signature


def sign_repository(repository: Path, private_key: Path) -> list[Path]:
    """Sign every model folder of ``repository``; returns the signatures' paths."""
    return [sign_model(m, private_key) for m in sorted(Path(repository).iterdir()) if (m / "config.pbtxt").is_file()]


def verify_model(model: Path, public_key: Path) -> None:
    """Raise :class:`SignatureError` naming what differs unless the model folder ``model`` is signed by
    ``public_key``'s key and unchanged since (paths in the message relative to the repository)."""
    from model_signing import verifying

    model = Path(model)
    if not (model / SIGNATURE).is_file():
        raise SignatureError(f"model {model.name} is not signed (no {SIGNATURE}); this server loads signed models only")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=str(public_key)).set_hashing_config(
            _hashing(model)).verify(model, model / SIGNATURE)
    except Exception as e:  # model_signing raises ValueError for mismatches, others for a bad signature file
        detail = str(e).replace(str(model.parent) + os.sep, "")
        raise SignatureError(f"model {model.name} fails its signature check: {detail[:500]}") from None


def verify_if_required(model: Path) -> bool:
    """Verify the model folder ``model`` at load; fail closed. Returns whether it was verified.

    - With a public key (:data:`PUBLIC_KEY_ENV`): the folder must be signed by it and unchanged.
    - Without one, a folder written signed (its :data:`SIGNATURE` is there) refuses to load, unless the
      operator opted out with :data:`INSECURE_ENV` ``=1``; it then loads unverified with a warning.
    - Without one, an unsigned folder (``nfp export`` without a key) loads unverified with a warning.

    Someone who can write the repository can delete the signatures too: only a server started with
    the key checks anything, and the ``nfp_signature_verified`` gauge says which models it checked.
    """
    model = Path(model)
    key = os.environ.get(PUBLIC_KEY_ENV)
    if key:
        if not Path(key).is_file():
            raise SignatureError(f"the public key named by {PUBLIC_KEY_ENV} does not exist")
        verify_model(model, Path(key))
        return True
    if not (model / SIGNATURE).is_file():
        _warn(f"model {model.name} is not signed: loading it unverified")
        return False
    if os.environ.get(INSECURE_ENV) != "1":
        raise SignatureError(f"model {model.name} is signed ({SIGNATURE}) but the server has no public key to check "
                             f"it with: set {PUBLIC_KEY_ENV} to the public key it was signed with, or {INSECURE_ENV}=1 "
                             f"to load it unchecked (whoever can write the repository then decides what it serves)")
    _warn(f"{INSECURE_ENV}=1: loading the signed model {model.name} WITHOUT checking its signature")
    return False


def _warn(message: str) -> None:
    """A warning in the Triton server's log (stderr, where the launcher and Triton's own log collect it)."""
    print(f"WARNING nfp: {message}", file=sys.stderr, flush=True)
