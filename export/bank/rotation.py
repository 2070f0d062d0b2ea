"""Bank rotation, like key rotation: a fresh bank, signed, rolled out to a running server.

The bank is the detector's secret (which neurons it watches); an attacker who has learned it, or
rebuilt it from the same data and seed, learns what the randomized draws can pick from. Rotation
re-runs the search recorded in the workspace's bank on the same fit activations under a new secret
seed (OS entropy), recalibrates it as ``calibrate`` did (the manifest's arguments), binds it to the
same ONNX model, writes it into the served repository as a new version of each detecting model,
re-signs those folders, and asks the server to load them (Triton's model control, with the admin
key): Triton swaps a model's version only once the new one is ready, and keeps the old one if the new
one fails to load, so no request is refused or lost across the switch (``tests/functional``).

    nfp rotate --out runs/default --url 127.0.0.1:8001 --admin-key KEY

A hardened bank (``nfp harden``) is rotated from the fit activations alone: harden again after it.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from export.bank.search import bank_overlap
from export.data.artifacts import bank_dir
from export.bank.calibrate import calibrated_bank
from export.bank.search import searched_bank
from export.data.workspace import Workspace
from kernels.bank import Bank
from kernels.errors import InvalidInputError
from kernels.served import served_squeezers
from kernels.fingerprint_search import SearchConfig
from model_repository.writer import DETECTOR, FUSED, add_bank_version


def fresh_bank(ws: Workspace, seed: int | None = None, progress: bool = True) -> Bank:
    """The workspace's search and calibration run again under ``seed`` (default: a secret one from OS
    entropy, never written anywhere), bound to the same model as the workspace's bank."""
    current = Bank.load(bank_dir(ws))
    if "model_sha256" not in current.meta:
        raise InvalidInputError(f"the bank in {ws.root} is not exported: run `nfp export` first")
    stages = json.loads(ws.manifest.read_text())["stages"]
    config = replace(SearchConfig(**current.meta["search"]), seed=secrets.randbits(63) if seed is None else seed)
    bank = searched_bank(ws, config, progress)
    cal = stages["calibrate"]["args"]
    served = served_squeezers(current)  # the squeezed copies the served graph returns
    bank, _ = calibrated_bank(ws, bank, cal["m"], cal["fprs"], cal["seed"], cal["repeats"], progress,
                              cal.get("confidence"), "on" if served else "off", served or None)
    search = {**bank.meta["search"], "seed": "secret" if seed is None else seed}
    return bank.with_meta(search=search, model_sha256=current.meta["model_sha256"], onnx=current.meta["onnx"])


def rotate(ws: Workspace, repository: Path, signing_key: Path | None, url: str | None = None,
           admin_key: str | None = None, seed: int | None = None, progress: bool = True) -> dict[str, Any]:
    """A fresh bank (:func:`fresh_bank`) written into ``repository`` as a new version of each detecting
    model and signed with ``signing_key``; with ``url`` (and the server's ``admin_key``), loaded there.
    Returns the new versions, the seconds each step took and the overlap with the old bank."""
    from model_repository.server import load_model

    if url is not None and not admin_key:
        raise InvalidInputError("loading a new version needs the server's admin key (--admin-key or NFP_ADMIN_KEY)")
    started = time.perf_counter()
    old = Bank.load(bank_dir(ws))
    bank = fresh_bank(ws, seed, progress)
    built = time.perf_counter()
    versions = add_bank_version(repository, bank, signing_key)
    written = time.perf_counter()
    loads = {}
    if url is not None:
        for name in (FUSED, DETECTOR):  # the ensemble serves its detector's latest version
            if name in versions:
                t = time.perf_counter()
                load_model(url, name, admin_key)  # type: ignore[arg-type]
                loads[name] = round(time.perf_counter() - t, 2)
    return {"versions": versions, "search_and_calibrate_s": round(built - started, 1),
            "write_and_sign_s": round(written - built, 2), "load_s": loads,
            "fingerprints": bank.num_fingerprints, "shared_with_previous": round(bank_overlap(bank, old), 3)}
