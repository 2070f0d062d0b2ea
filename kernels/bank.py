"""The fingerprint bank: plain arrays plus JSON metadata, never pickle.

Runtime layout (what the scoring kernels read):

- ``indices (F, Kmax) int32``: neuron ids of each fingerprint, padded with ``D`` (``num_neurons``);
  the kernels read column ``D`` as a virtual zero, so padding adds nothing to a sum.
- ``lengths (F,) int32``: neurons in each fingerprint (fingerprints of different sizes fit).
- ``clean_mean, clean_std, attacked_mean, attacked_std (F,) float32``: the two Gaussians of each
  fingerprint's value (Fisher, Shahar & Resheff, 2024, Sec. 3.2).
- ``cohen_d (F,) float32``: separation measured in the search.
- ``class_offsets (C + 1,) int64``: fingerprints of class ``c`` are rows ``class_offsets[c]:class_offsets[c+1]``.

Files: ``bank.npz`` (the arrays, read with ``allow_pickle=False``) and ``bank.json`` (format version,
activation layout, class names, search parameters and seed, the ONNX model's SHA-256 once exported,
calibration).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kernels.errors import InvalidInputError, ModelMismatchError

FORMAT_VERSION = 1
ARRAYS = ("indices", "lengths", "clean_mean", "clean_std", "attacked_mean", "attacked_std", "cohen_d", "class_offsets")
MIN_STD = 1e-6  # floor of the Gaussians' std: a constant fingerprint must not give infinite likelihoods


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file (a bank is bound to its model's), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bank:
    """All classes' fingerprints in the runtime layout described in the module docstring.

    ``meta`` holds JSON-serialisable facts: ``num_neurons``, ``class_names``, ``layout`` (the activation
    layout), ``search`` (parameters, seed), ``model_sha256`` and ``calibration`` when known.
    """

    indices: np.ndarray
    lengths: np.ndarray
    clean_mean: np.ndarray
    clean_std: np.ndarray
    attacked_mean: np.ndarray
    attacked_std: np.ndarray
    cohen_d: np.ndarray
    class_offsets: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        # the scoring hot path needs this per call; a scan of F lengths costs ~100 us at F = 10^6
        object.__setattr__(self, "uniform_length", bool((self.lengths == self.indices.shape[1]).all()))
        object.__setattr__(self, "counts", np.diff(self.class_offsets))  # (C,) int64 fingerprints per class

    @property
    def lrt_params(self) -> np.ndarray:
        """``(5, F) float32`` rows: clean mean, 1 / clean std, attacked mean, 1 / attacked std and
        log(attacked std / clean std) of each fingerprint, so that the log-likelihood ratio of a value
        ``v`` is ``0.5 * (((v - am) / as)^2 - ((v - cm) / cs)^2) + log(as / cs)``; a draw fetches all
        five with one ``take`` (:func:`kernels.scoring.lrt_scores`). Built on first use."""
        if "_lrt_params" not in self.__dict__:
            cs, as_ = self.clean_std.astype(np.float64), self.attacked_std.astype(np.float64)
            params = np.stack([self.clean_mean, 1 / cs, self.attacked_mean, 1 / as_, np.log(as_ / cs)])
            object.__setattr__(self, "_lrt_params", np.ascontiguousarray(params, np.float32))
        return self.__dict__["_lrt_params"]

    @property
    def num_fingerprints(self) -> int:
        return len(self.lengths)

    @property
    def num_classes(self) -> int:
        return len(self.class_offsets) - 1

    @property
    def num_neurons(self) -> int:
        return int(self.meta["num_neurons"])

    def class_slice(self, c: int) -> slice:
        return slice(int(self.class_offsets[c]), int(self.class_offsets[c + 1]))

    def validate(self) -> None:
        """Check dtypes, shapes and ranges; raise :class:`InvalidInputError` naming what is wrong."""
        f = len(self.lengths)
        expect = {"indices": (np.int32, 2), "lengths": (np.int32, 1), "class_offsets": (np.int64, 1)}
        for name in ARRAYS:
            a = getattr(self, name)
            dtype, ndim = expect.get(name, (np.float32, 1))
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
                raise InvalidInputError(f"bank array {name!r} must be {ndim}-d {np.dtype(dtype).name}, got "
                                        f"{getattr(a, 'dtype', type(a).__name__)} with shape {getattr(a, 'shape', None)}")
            if name not in ("indices", "class_offsets") and len(a) != f:
                raise InvalidInputError(f"bank array {name!r} has {len(a)} rows, expected {f} (one per fingerprint)")
        if "num_neurons" not in self.meta:
            raise InvalidInputError("bank metadata lacks 'num_neurons'")
        d = self.num_neurons
        if self.indices.shape[0] != f:
            raise InvalidInputError(f"bank indices have {self.indices.shape[0]} rows, expected {f}")
        if f and (self.lengths.min() < 1 or self.lengths.max() > self.indices.shape[1]):
            raise InvalidInputError(f"fingerprint lengths must lie in [1, {self.indices.shape[1]}]")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() > d):
            raise InvalidInputError(f"bank neuron indices must lie in [0, {d}] ({d} = padding)")
        cols = np.arange(self.indices.shape[1])
        if f and not np.array_equal(self.indices >= d, cols[None, :] >= self.lengths[:, None]):
            raise InvalidInputError("bank padding (index = num_neurons) must fill exactly the slots past each length")
        off = self.class_offsets
        if len(off) < 2 or off[0] != 0 or off[-1] != f or (np.diff(off) < 0).any():
            raise InvalidInputError(f"class_offsets must rise from 0 to {f}, got {off.tolist()}")
        for name in ("clean_std", "attacked_std"):
            if f and not (getattr(self, name) > 0).all():
                raise InvalidInputError(f"bank {name} must be positive")
        for name in ARRAYS[2:7]:
            if not np.isfinite(getattr(self, name)).all():
                raise InvalidInputError(f"bank array {name!r} holds NaN or infinite values")

    def strongest(self, per_class: int) -> "Bank":
        """A smaller bank: each class's ``per_class`` fingerprints of largest |Cohen's d| (all of a class
        that has fewer). Its calibration, if any, is dropped: thresholds depend on the bank."""
        if per_class < 1:
            raise InvalidInputError(f"fingerprints per class must be at least 1, got {per_class}")
        return self.take([self.class_slice(c).start + np.argsort(-np.abs(self.cohen_d[self.class_slice(c)]),
                                                                 kind="stable")[:per_class]
                          for c in range(self.num_classes)])

    def take(self, rows: list[np.ndarray]) -> "Bank":
        """A bank of the fingerprints ``rows[c]`` (bank rows, each inside class ``c``) for every class ``c``;
        its calibration, if any, is dropped."""
        if len(rows) != self.num_classes or any(
                len(r) and (np.min(r) < self.class_offsets[c] or np.max(r) >= self.class_offsets[c + 1])
                for c, r in enumerate(rows)):
            raise InvalidInputError(f"take needs one array of rows per class ({self.num_classes}), each inside its class")
        keep = np.concatenate(rows).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        meta = {k: v for k, v in self.meta.items() if k != "calibration"}
        return Bank(*(getattr(self, n)[keep] for n in ARRAYS[:7]), offsets, meta)

    def with_meta(self, **updates: Any) -> "Bank":
        return replace(self, meta={**self.meta, **updates})

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``bank.npz`` and ``bank.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "bank.npz", **{name: getattr(self, name) for name in ARRAYS})
        meta = {"format_version": FORMAT_VERSION, "num_fingerprints": self.num_fingerprints,
                "fingerprints_per_class": self.counts.tolist(), **self.meta}
        (directory / "bank.json").write_text(json.dumps(meta, indent=2))
        return directory / "bank.npz", directory / "bank.json"

    @classmethod
    def load(cls, directory: Path, model_sha256: str | None = None) -> "Bank":
        """Read a bank saved by :meth:`save`; refuse another format version or, when ``model_sha256``
        is given, a bank built for another model."""
        directory = Path(directory)
        for name in ("bank.npz", "bank.json"):
            if not (directory / name).is_file():
                raise InvalidInputError(f"no bank at {directory}: {name} is missing")
        try:
            meta = json.loads((directory / "bank.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"bank {directory}/bank.json is not valid JSON ({e})") from None
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise InvalidInputError(f"bank format version {version} is not supported (this code reads {FORMAT_VERSION})")
        meta.pop("num_fingerprints", None)
        meta.pop("fingerprints_per_class", None)
        if model_sha256 is not None and meta.get("model_sha256") != model_sha256:
            raise ModelMismatchError(f"bank {directory} was built for model sha256 {meta.get('model_sha256')}, "
                                     f"not for the served model {model_sha256}")
        try:
            with np.load(directory / "bank.npz", allow_pickle=False) as f:
                missing = [n for n in ARRAYS if n not in f.files]
                if missing:
                    raise InvalidInputError(f"bank {directory}/bank.npz lacks arrays {missing}")
                arrays = {n: f[n] for n in ARRAYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, not a zip, a bad array
            raise InvalidInputError(f"bank {directory}/bank.npz cannot be read ({type(e).__name__}: {e})") from None
        return cls(**arrays, meta=meta)

    @classmethod
    def from_fingerprints(cls, per_class: list, num_neurons: int, meta: dict[str, Any] | None = None) -> "Bank":
        """Pack :class:`kernels.fingerprint_search.ClassFingerprints` (one per class) into the runtime layout."""
        neurons = [n for fp in per_class for n in fp.neurons]
        kmax = max((len(n) for n in neurons), default=1)
        indices = np.full((len(neurons), kmax), num_neurons, np.int32)
        for i, n in enumerate(neurons):
            indices[i, : len(n)] = n

        def cat(attr: str, floor: float | None = None) -> np.ndarray:
            a = np.concatenate([np.asarray(getattr(fp, attr), np.float64) for fp in per_class]) if per_class else np.zeros(0)
            return (np.maximum(a, floor) if floor else a).astype(np.float32)

        return cls(indices=indices, lengths=np.array([len(n) for n in neurons], np.int32),
                   clean_mean=cat("clean_mean"), clean_std=cat("clean_std", MIN_STD),
                   attacked_mean=cat("attacked_mean"), attacked_std=cat("attacked_std", MIN_STD),
                   cohen_d=cat("cohen_d"),
                   class_offsets=np.concatenate([[0], np.cumsum([len(fp.neurons) for fp in per_class])]).astype(np.int64),
                   meta={"num_neurons": int(num_neurons), **(meta or {})})
