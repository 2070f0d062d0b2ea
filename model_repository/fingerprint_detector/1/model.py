"""Triton Python-backend model: randomized neural-fingerprint detection (Fisher, Shahar & Resheff, 2024).

Loads the bank once (refusing a bank built for another model), and for every input draws its own
``m`` fingerprints from the bank of the predicted class with a generator seeded from the operating
system's CSPRNG, computes all fingerprint values in one gather-reduce (``kernels``; the CUDA kernel on
``KIND_GPU``, taking the activations through DLPack), and returns:

- ``label (1,) int64``, ``probabilities (num_classes,) float32`` (softmax of the logits);
- ``score (1,) float32``: the likelihood-ratio score standardized for the predicted class (low = attacked);
- ``is_attacked (1,) bool``: score below the threshold calibrated for the configured false-positive rate;
- ``fingerprint_ids (m,) int64``: the draws of this request. They are fresh for every request, so
  knowing past draws does not tell an attacker the next ones; tests replay them offline.

Requests of one ``execute`` call are scored together; a request with bad activations gets its own
error. Detection counts and kernel time are exported as Prometheus metrics.
"""
import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kernels.bank import Bank
from kernels.calibration import Calibration
from kernels.errors import FingerprintError
from kernels.scoring import check_activations, covered, score, secure_rng


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bank_dir = Path(args["model_repository"]) / args["model_version"] / "bank"
        self.bank = Bank.load(bank_dir, model_sha256=params["model_sha256"])
        self.calibration = Calibration.from_json(self.bank.meta["calibration"]["lrt"])
        self.m = self.calibration.m
        self.fpr = float(params.get("false_positive_rate", "0.01"))
        self.calibration.threshold(self.fpr, np.zeros(1, np.int64))  # fail now if not calibrated
        self.rng = secure_rng()
        self.gpu = None
        if args.get("model_instance_kind") == "GPU":
            from kernels.gpu import GpuScorer

            self.gpu = GpuScorer(self.bank)
        # keep the families alive: a Metric fails once its MetricFamily is garbage-collected
        self.metric_families = {
            name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
            for name, text in (("nfp_inputs_total", "Inputs scored by the fingerprint detector"),
                               ("nfp_flagged_total", "Inputs flagged as attacked"),
                               ("nfp_kernel_microseconds_total", "Time spent drawing and scoring fingerprints"))}
        labels = {"model": "fingerprint_detector"}
        self.inputs_total, self.flagged_total, self.kernel_us = (
            f.Metric(labels=labels) for f in self.metric_families.values())

    def execute(self, requests):
        responses = [None] * len(requests)
        logits, labels, acts, owners = [], [], [], []
        for i, request in enumerate(requests):
            z = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy()
            a_tensor = pb_utils.get_input_tensor_by_name(request, "activations")
            a = a_tensor.as_numpy() if self.gpu is None or a_tensor.is_cpu() else a_tensor
            try:
                if self.gpu is None:
                    check_activations(a, self.bank.num_neurons)
                if not np.isfinite(z).all():
                    raise FingerprintError("logits hold NaN or infinite values")
                pred = z.argmax(axis=1)
                uncovered = ~covered(pred, self.bank, self.m)
                if uncovered.any():
                    classes = np.unique(pred[uncovered]).tolist()
                    raise FingerprintError(f"predicted class(es) {classes} have no fingerprints in the bank: "
                                           "this input cannot be checked")
            except FingerprintError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            logits.append(z)
            labels.append(pred)
            acts.append(a)
            owners.append((i, len(z)))
        if not owners:
            return responses
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        start = time.perf_counter()
        try:
            if self.gpu is None:
                scores = score(np.concatenate(acts), labels, self.bank, self.m, self.rng, checked=True)
            else:
                import cupy as cp

                dev = cp.concatenate([a if isinstance(a, np.ndarray) else cp.from_dlpack(a.to_dlpack()) for a in acts])
                scores = self.gpu.score(dev, labels, self.m, self.rng)
        except FingerprintError as e:  # checks passed per request, so this is unexpected: fail the batch
            for i, _ in owners:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
            return responses
        self.kernel_us.increment(int((time.perf_counter() - start) * 1e6))
        z = self.calibration.standardize(scores.lrt, labels)
        flagged = z < self.calibration.threshold(self.fpr, labels)
        probs = softmax(logits)
        self.inputs_total.increment(len(labels))
        self.flagged_total.increment(int(flagged.sum()))
        start = 0
        for i, n in owners:
            s = slice(start, start + n)
            out = [pb_utils.Tensor("label", labels[s, None].astype(np.int64)),
                   pb_utils.Tensor("probabilities", probs[s]),
                   pb_utils.Tensor("score", z[s, None].astype(np.float32)),
                   pb_utils.Tensor("is_attacked", flagged[s, None]),
                   pb_utils.Tensor("fingerprint_ids", scores.ids[s].astype(np.int64))]
            responses[i] = pb_utils.InferenceResponse(output_tensors=out)
            start += n
        return responses
