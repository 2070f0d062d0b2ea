"""The served detector: randomized neural-fingerprint detection of a classifier's outputs.

Fisher, Shahar & Resheff (2024), Sec. 3.3, as a server runs it: verify the model folder's signature
(:mod:`model_repository.signing`) when the server has a public key, load the bank once, refusing a bank
built for another model than the ONNX file actually served (hashed at load), check each request on its
own, and answer a batch of requests through the detector contract
(:func:`kernels.served.served_detector`: by default the fusion of the randomized fingerprints, where
every input draws its own ``m`` fingerprints from the bank of its predicted class from the operating
system's CSPRNG and one gather-reduce in NumPy or the CUDA kernel of :mod:`kernels.gpu`, the logit
margin and feature squeezing, whose squeezed copies' logits come from the served graph).

Both Triton models that detect use it: ``fingerprint_detector`` (the ensemble's second step) and
``guarded_classifier_fused`` (classifier and detector in one step). It holds no Triton code, so it is
tested directly.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import numpy as np

from kernels.bank import Bank, sha256_file
from kernels.detector import Observations, Verdicts
from kernels.served import served_detector, served_squeezers
from kernels.errors import FingerprintError
from kernels.query_memory import QueryMemory, QueryMemoryConfig
from kernels.scoring import check_activations, secure_rng

METRICS = (("nfp_inputs_total", "Inputs scored by the fingerprint detector, by predicted class"),
           ("nfp_flagged_total", "Inputs flagged as attacked, by predicted class"),
           ("nfp_unchecked_total", "Inputs predicted as a class the bank cannot check (answered unchecked)"))
KERNEL_METRIC = ("nfp_kernel_microseconds_total", "Time spent drawing and scoring fingerprints")
QUERY_METRICS = (("nfp_queries_total", "Queries remembered by the query memory (stateful detection of query-based attacks)"),
                 ("nfp_query_flagged_total", "Queries flagged by the query memory: near-copies of a recent query (query_flagged)"))
SCORE_HISTOGRAM = "nfp_score"
SIGNATURE_GAUGE = "nfp_signature_verified"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def answered_safely(pb_utils, model: str, execute, requests) -> list:
    """``execute(requests)``, except that an unexpected exception (a bug, an onnxruntime failure) is
    written to the server's log in full and answered to each request of the call with a short error
    naming neither server paths nor internals. Expected problems (bad input, a request's own error)
    are answered by ``execute`` itself, request by request."""
    try:
        return execute(requests)
    except Exception as e:
        pb_utils.Logger.log_error(f"{model}: unexpected {type(e).__name__} in execute:\n{traceback.format_exc()}")
        error = pb_utils.TritonError(f"internal error in model {model} ({type(e).__name__}); details are in the "
                                     "server's log")
        return [pb_utils.InferenceResponse(error=error) for _ in requests]


def response_tensors(logits: np.ndarray, labels: np.ndarray, verdicts: Verdicts,
                     sizes: list[int], audit: bool = False,
                     query_flagged: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """The served output tensors of consecutive requests of ``sizes`` inputs each, named as in the model
    configs. Every image is answered; an unchecked one has NaN ``score`` and ``is_attacked`` False. Only
    with ``audit`` do they include the draws, ``fingerprint_ids`` (-1 where unchecked); with a query memory,
    ``query_flagged``."""
    probabilities, score = softmax(logits), verdicts.score.astype(np.float32)
    bounds = np.cumsum([0, *sizes])
    return [{"label": labels[a:b, None].astype(np.int64), "probabilities": probabilities[a:b],
             "score": score[a:b, None], "is_attacked": verdicts.is_attacked[a:b, None],
             "checked": verdicts.checked[a:b, None], **({"fingerprint_ids": verdicts.draws[a:b]} if audit else {}),
             **({} if query_flagged is None else {"query_flagged": query_flagged[a:b, None]})}
            for a, b in zip(bounds[:-1], bounds[1:])]


class QueryWatch:
    """A served model's :class:`kernels.query_memory.QueryMemory`, built from its config parameters
    (``query_<knob>``, written by :mod:`model_repository.writer`), and its Prometheus counters
    ``nfp_queries_total{model}`` and ``nfp_query_flagged_total{model}``. :meth:`from_params` returns None
    for a model written without one. One memory per model instance: instances share nothing."""

    def __init__(self, pb_utils, model: str, config: QueryMemoryConfig, scale: float) -> None:
        self.memory, self.scale = QueryMemory(config), float(scale)
        self.memory.observe(np.zeros((0, config.window), np.float32))  # compiled at load, not at the first request
        kind = pb_utils.MetricFamily
        self.families = [kind(name=name, description=text, kind=kind.COUNTER) for name, text in QUERY_METRICS]
        self.queries, self.flagged = (f.Metric(labels={"model": model}) for f in self.families)

    @classmethod
    def from_params(cls, pb_utils, model: str, params: dict[str, str], scale: float) -> "QueryWatch | None":
        knobs = {k[len("query_"):]: v for k, v in params.items() if k.startswith("query_")}
        if not knobs:
            return None
        return cls(pb_utils, model, QueryMemoryConfig.from_strings(knobs), scale)

    def observe(self, images: np.ndarray) -> np.ndarray:
        """``(B,) bool``: each image (served values, divided by the input's scale) flagged or not, in order."""
        flagged, _ = self.memory.observe(np.asarray(images, np.float32) / self.scale)
        self.queries.increment(len(flagged))
        self.flagged.increment(int(flagged.sum()))
        return flagged


class DetectorMetrics:
    """Prometheus metrics of a detecting model (``pb_utils`` is Triton's module, passed in so this file
    imports without Triton): inputs answered, flagged and left unchecked per predicted class
    (``{model, class}``), kernel microseconds, and the histogram ``nfp_score{model, class}`` of the
    standardized scores of checked inputs, its buckets the clean calibration reference's quantiles
    (``Calibration.reference``; ``nfp drift`` compares a window of it with the reference)."""

    def __init__(self, pb_utils, model: str, detector: "ServedDetector") -> None:
        classes = [str(c) for c in range(detector.bank.num_classes)]
        kind = pb_utils.MetricFamily
        # keep the families alive: a Metric fails once its MetricFamily is garbage-collected
        self.families = [kind(name=name, description=text, kind=kind.COUNTER) for name, text in (*METRICS, KERNEL_METRIC)]
        self.inputs, self.flagged, self.unchecked = ([f.Metric(labels={"model": model, "class": c}) for c in classes]
                                                     for f in self.families[:3])
        self.kernel_us = self.families[3].Metric(labels={"model": model})
        reference = detector.detector.calibration.reference
        self.scores = None
        if reference is not None:
            self.families.append(kind(name=SCORE_HISTOGRAM, kind=kind.HISTOGRAM,
                                      description="Standardized detector scores of checked inputs (low: attacked); "
                                                  "buckets: quantiles of the clean calibration scores"))
            self.scores = [self.families[-1].Metric(labels={"model": model, "class": c}, buckets=reference["edges"])
                           for c in classes]

    def record(self, verdicts: Verdicts, labels: np.ndarray, kernel_s: float) -> None:
        for c in np.unique(labels):
            rows = labels == c
            self.inputs[c].increment(int(rows.sum()))
            self.flagged[c].increment(int(verdicts.is_attacked[rows].sum()))
            self.unchecked[c].increment(int((~verdicts.checked[rows]).sum()))
            if self.scores is not None:
                for value in verdicts.score[rows & verdicts.checked]:
                    self.scores[c].observe(float(value))
        self.kernel_us.increment(int(kernel_s * 1e6))


def signature_gauge(pb_utils, model: str, verified: bool) -> tuple:
    """The Prometheus gauge ``nfp_signature_verified{model}``: 1 when the model's folder was checked
    against its signature at load, 0 when it loaded unverified (:func:`model_repository.signing.verify_if_required`).
    Returns the family and the metric, which the model keeps alive."""
    family = pb_utils.MetricFamily(name=SIGNATURE_GAUGE, kind=pb_utils.MetricFamily.GAUGE,
                                   description="1: the model folder's signature was checked at load; 0: loaded unverified")
    metric = family.Metric(labels={"model": model})
    metric.set(1.0 if verified else 0.0)
    return family, metric


class ServedDetector:
    """Bank, calibration and secret draws of one served model.

    Args:
        bank_dir: the calibrated bank exported with the model, inside the model's version folder.
        model_sha256: the ONNX file's SHA-256 the repository was written for; a bank bound to another
            model is refused.
        false_positive_rate: which calibrated threshold decides ``is_attacked``.
        gpu: score with the CUDA kernel (activations may then be GPU tensors).
        device_id: the CUDA device of this model instance (Triton's ``model_instance_device_id``).
        served_model: the ONNX file the server actually runs: hashed, and refused unless it is the
            model the bank was built for.
    """

    def __init__(self, bank_dir: Path, model_sha256: str, false_positive_rate: float = 0.01, gpu: bool = False,
                 device_id: int = 0, served_model: Path | None = None):
        from model_repository.signing import verify_if_required

        self.verified = verify_if_required(Path(bank_dir).parent.parent)  # <model>/<version>/bank
        if served_model is not None:
            actual = sha256_file(served_model)
            if actual != model_sha256:
                raise FingerprintError(f"the served model.onnx has sha256 {actual}, the repository was written for "
                                       f"{model_sha256}: refusing to guard another model")
        bank = Bank.load(Path(bank_dir), model_sha256=model_sha256)
        backend = None
        if gpu:
            from kernels.gpu import GpuScorer

            backend = GpuScorer(bank, device_id)
        self.detector = served_detector(bank, float(false_positive_rate), backend)
        self.bank, self.gpu = bank, backend
        self.squeezers = len(served_squeezers(bank))  # squeezed copies whose logits each request brings
        bank.lrt_params  # build the scoring table now, not on the first request
        self.rng = secure_rng()

    def check(self, logits: np.ndarray, acts, squeezed: np.ndarray | None = None):
        """Predicted labels ``(B,)`` of one request's ``logits (B, C)``, ``acts (B, D)`` and, when the
        detector squeezes, ``squeezed (B, S, C)``, and the activations to score (on the GPU path a
        checked CuPy view of a GPU tensor); raises :class:`FingerprintError` naming the problem if the
        request is malformed. Activations are validated per request on both paths, so one bad request
        fails alone. An image predicted as a class the bank cannot check is no error: it is answered
        unchecked."""
        if isinstance(acts, np.ndarray) or self.gpu is None:
            check_activations(acts, self.bank.num_neurons)
        else:
            acts = self.gpu.as_device_array(acts)
        if logits.ndim != 2 or logits.shape[1] != self.bank.num_classes or len(logits) != len(acts):
            raise FingerprintError(f"logits must have shape ({len(acts)}, {self.bank.num_classes}), got {logits.shape}")
        if not np.isfinite(logits).all():
            raise FingerprintError("logits hold NaN or infinite values")
        if self.squeezers:
            want = (len(logits), self.squeezers, self.bank.num_classes)
            if squeezed is None or squeezed.shape != want:
                raise FingerprintError(f"squeezed_logits must have shape {want}, got "
                                       f"{None if squeezed is None else squeezed.shape}")
            if not np.isfinite(squeezed).all():
                raise FingerprintError("squeezed_logits hold NaN or infinite values")
        return logits.argmax(axis=1), acts

    def detect(self, labels: np.ndarray, acts: list, logits: np.ndarray,
               squeezed: np.ndarray | None = None) -> tuple[Verdicts, float]:
        """Verdicts for a batch of requests that passed :meth:`check`, and the seconds spent drawing
        and scoring. ``labels (B,)``, ``logits (B, C)`` and ``squeezed (B, S, C)`` (if the detector
        squeezes) of all requests; ``acts`` their activations as :meth:`check` returned them, one array
        per request."""
        start = time.perf_counter()
        if len(acts) == 1:
            batch = acts[0]
        elif self.gpu is None:
            batch = np.concatenate(acts)
        else:
            with self.gpu.device:
                batch = self.gpu.cp.concatenate([self.gpu.cp.asarray(a) for a in acts])
        verdicts = self.detector.detect(Observations(labels, acts=batch, logits=logits, squeezed_logits=squeezed,
                                                     validated=True), rng=self.rng)
        return verdicts, time.perf_counter() - start
