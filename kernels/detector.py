"""The served detector: randomized neural-fingerprint detection of a classifier's outputs.

Fisher, Shahar & Resheff (2024), Sec. 3.3, as a server runs it: load the bank once (refusing a bank
built for another model), and for every input draw its own ``m`` fingerprints from the bank of the
predicted class with a generator seeded from the operating system's CSPRNG, compute all their values
in one gather-reduce (:mod:`kernels.scoring`, or the CUDA kernel of :mod:`kernels.gpu`), standardize the
likelihood-ratio score for the predicted class and compare it with the threshold calibrated for the
configured false-positive rate.

Both Triton models that detect use it: ``fingerprint_detector`` (the ensemble's second step) and
``guarded_classifier_fused`` (classifier and detector in one step). It holds no Triton code, so it is
tested directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.bank import Bank
from kernels.calibration import Calibration
from kernels.errors import FingerprintError
from kernels.scoring import check_activations, covered, score, secure_rng

METRICS = (("nfp_inputs_total", "Inputs scored by the fingerprint detector"),
           ("nfp_flagged_total", "Inputs flagged as attacked"),
           ("nfp_unchecked_total", "Inputs predicted as a class the bank cannot check (answered unchecked)"),
           ("nfp_kernel_microseconds_total", "Time spent drawing and scoring fingerprints"))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Detection:
    """Verdicts for a batch; :meth:`per_request` splits them into the responses' tensors.

    Every image is answered. ``checked`` says whether the detector could check it: an image predicted
    as a class with fewer than ``m`` fingerprints (a partial bank) is classified but not checked; its
    ``score`` is NaN, ``is_attacked`` False and its ``fingerprint_ids`` row -1.
    """

    labels: np.ndarray  # (B,) int64 predicted classes
    probabilities: np.ndarray  # (B, C) float32 softmax of the logits
    score: np.ndarray  # (B,) float32 standardized LRT score, low = attacked; NaN where not checked
    is_attacked: np.ndarray  # (B,) bool
    checked: np.ndarray  # (B,) bool
    fingerprint_ids: np.ndarray  # (B, m) int64 this batch's draws; -1 where not checked
    kernel_s: float  # seconds spent drawing and scoring

    def per_request(self, sizes: list[int]) -> list[dict[str, np.ndarray]]:
        """The served output tensors of consecutive requests of ``sizes`` inputs each, named as in the
        model configs."""
        bounds = np.cumsum([0, *sizes])
        return [{"label": self.labels[a:b, None], "probabilities": self.probabilities[a:b],
                 "score": self.score[a:b, None], "is_attacked": self.is_attacked[a:b, None],
                 "checked": self.checked[a:b, None], "fingerprint_ids": self.fingerprint_ids[a:b]}
                for a, b in zip(bounds[:-1], bounds[1:])]


class DetectorMetrics:
    """Prometheus counters of a detecting model (``pb_utils`` is Triton's module, passed in so this
    file imports without Triton): inputs answered, inputs flagged, inputs left unchecked, kernel microseconds."""

    def __init__(self, pb_utils, model: str) -> None:
        # keep the families alive: a Metric fails once its MetricFamily is garbage-collected
        self.families = [pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
                         for name, text in METRICS]
        self.inputs, self.flagged, self.unchecked, self.kernel_us = (f.Metric(labels={"model": model})
                                                                     for f in self.families)

    def record(self, detection: Detection) -> None:
        self.inputs.increment(len(detection.labels))
        self.flagged.increment(int(detection.is_attacked.sum()))
        self.unchecked.increment(int((~detection.checked).sum()))
        self.kernel_us.increment(int(detection.kernel_s * 1e6))


class Detector:
    """Bank, calibration and CSPRNG-seeded draws of one served model.

    Args:
        bank_dir: the calibrated bank exported with the model.
        model_sha256: the served ONNX file's SHA-256; a bank bound to another model is refused.
        false_positive_rate: which calibrated threshold decides ``is_attacked``.
        gpu: score with the CUDA kernel (activations may then be GPU tensors).
        device_id: the CUDA device of this model instance (Triton's ``model_instance_device_id``).
    """

    def __init__(self, bank_dir: Path, model_sha256: str, false_positive_rate: float = 0.01, gpu: bool = False,
                 device_id: int = 0):
        self.bank = Bank.load(Path(bank_dir), model_sha256=model_sha256)
        self.calibration = Calibration.from_json(self.bank.meta["calibration"]["lrt"])
        self.m = self.calibration.m
        self.fpr = float(false_positive_rate)
        self.calibration.threshold(self.fpr, np.zeros(1, np.int64))  # fail at load if not calibrated
        self.bank.lrt_params  # build the scoring table now, not on the first request
        self.rng = secure_rng()
        self.gpu = None
        if gpu:
            from kernels.gpu import GpuScorer

            self.gpu = GpuScorer(self.bank, device_id)

    def check(self, logits: np.ndarray, acts):
        """Predicted labels ``(B,)`` of one request's ``logits (B, C)`` and ``acts (B, D)``, and the
        activations to score (on the GPU path a checked CuPy view of a GPU tensor); raises
        :class:`FingerprintError` naming the problem if the request is malformed. Activations are
        validated per request on both paths, so one bad request fails alone. An image predicted as a
        class the bank cannot check is no error: :meth:`detect` answers it unchecked."""
        if isinstance(acts, np.ndarray) or self.gpu is None:
            check_activations(acts, self.bank.num_neurons)
        else:
            acts = self.gpu.as_device_array(acts)
        if logits.ndim != 2 or logits.shape[1] != self.bank.num_classes or len(logits) != len(acts):
            raise FingerprintError(f"logits must have shape ({len(acts)}, {self.bank.num_classes}), got {logits.shape}")
        if not np.isfinite(logits).all():
            raise FingerprintError("logits hold NaN or infinite values")
        return logits.argmax(axis=1), acts

    def detect(self, logits: np.ndarray, labels: np.ndarray, acts: list) -> Detection:
        """Verdicts for a batch of requests that passed :meth:`check`.

        ``logits (B, C)`` and ``labels (B,)`` of all requests; ``acts`` their activations as
        :meth:`check` returned them, one array per request.
        """
        start = time.perf_counter()
        b = len(labels)
        checked = covered(labels, self.bank, self.m)
        raw = np.full(b, np.nan)
        ids = np.full((b, self.m), -1, np.int64)
        if checked.any():
            rows = None if checked.all() else np.flatnonzero(checked)  # score only what can be checked
            if self.gpu is None:
                batch = acts[0] if len(acts) == 1 else np.concatenate(acts)
                scores = score(batch if rows is None else batch[rows], labels[checked], self.bank, self.m, self.rng,
                               checked=True, lrt_only=True)
            else:
                cp = self.gpu.cp
                with self.gpu.device:
                    dev = acts[0] if len(acts) == 1 else cp.concatenate([cp.asarray(a) for a in acts])
                    dev = dev if rows is None else cp.ascontiguousarray(dev[cp.asarray(rows)])
                    scores = self.gpu.lrt(dev, labels[checked], self.m, self.rng, checked=True)
            raw[checked], ids[checked] = scores.lrt, scores.ids
        kernel_s = time.perf_counter() - start
        z = np.full(b, np.nan, np.float32)
        z[checked] = self.calibration.standardize(raw[checked], labels[checked])
        flagged = np.zeros(b, bool)
        flagged[checked] = z[checked] < self.calibration.threshold(self.fpr, labels[checked])
        return Detection(labels.astype(np.int64), softmax(logits), z, flagged, checked, ids, kernel_s)
