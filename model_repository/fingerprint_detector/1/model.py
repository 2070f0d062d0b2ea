"""Triton Python-backend model: randomized neural-fingerprint detection (Fisher, Shahar & Resheff, 2024),
the second step of the ``guarded_classifier`` ensemble.

Inputs ``logits (num_classes,)``, ``activations (D,)`` and, when the detector has a feature-squeezing
member, ``squeezed_logits (S, num_classes)`` from the classifier step. For every input it
draws its own ``m`` fingerprints from the bank of the predicted class (``model_repository.serving.ServedDetector``:
draws read from the OS's CSPRNG, one gather-reduce; the CUDA kernel on ``KIND_GPU``, taking the activations through
DLPack), and returns:

- ``label (1,) int64``, ``probabilities (num_classes,) float32`` (softmax of the logits);
- ``score (1,) float32``: the detector's standardized score (by default the fused one: the smallest log
  clean p-value of the fingerprints' likelihood ratio and the logit margin; low = attacked);
- ``is_attacked (1,) bool``: score below the threshold calibrated for the configured false-positive rate;
- ``checked (1,) bool``: whether the input could be checked (False where the predicted class has fewer
  than ``m`` fingerprints; then ``score`` is NaN and ``is_attacked`` False);
- ``fingerprint_ids (m,) int64``, only when the repository was written with ``audit``: the draws of
  this request (tests replay them offline). Off by default: the draws are the detector's secret;
- ``query_flagged (1,) bool``, when written with a query memory (the default; the ensemble then hands this
  step the image too): the image is a near-copy of a recent query, the mark of a query-based black-box
  attack (``model_repository.serving.QueryWatch``, Blacklight's test). Images are remembered in arrival order.

Requests of one ``execute`` call are scored together; a request with bad activations gets its own
error, on ``KIND_GPU`` too (each request's GPU tensor is checked on its own), and every image of a good
request is answered. Detection counts and kernel time are exported as Prometheus metrics.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kernels.errors import FingerprintError
from model_repository.serving import (DetectorMetrics, QueryWatch, ServedDetector, answered_safely, response_tensors,
                                      signature_gauge)


def host_array(tensor) -> np.ndarray:
    """A NumPy copy of an input tensor; on ``KIND_GPU`` inputs may live on the GPU (DLPack)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    import cupy as cp

    return cp.from_dlpack(tensor.to_dlpack()).get()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        classifier = Path(args["model_repository"]).parent / "classifier" / "1" / "model.onnx"  # the ensemble's step 1
        self.detector = ServedDetector(Path(args["model_repository"]) / args["model_version"] / "bank",
                                       params["model_sha256"], float(params.get("false_positive_rate", "0.01")),
                                       gpu=args.get("model_instance_kind") == "GPU",
                                       device_id=int(args.get("model_instance_device_id", "0")), served_model=classifier)
        self.name = args["model_name"]
        self.metrics = DetectorMetrics(pb_utils, self.name, self.detector)
        self.signature = signature_gauge(pb_utils, self.name, self.detector.verified)
        self.audit = params.get("audit") == "true"
        self.watch = QueryWatch.from_params(pb_utils, self.name, params, float(params.get("input_scale", "1")))
        evidence = {"logits", "activations", "squeezed_logits"}
        self.image_input = next((t["name"] for t in config["input"] if t["name"] not in evidence), None)

    def execute(self, requests):
        return answered_safely(pb_utils, self.name, self._execute, requests)

    def _execute(self, requests):
        responses = [None] * len(requests)
        logits, labels, acts, squeezed, images, owners = [], [], [], [], [], []
        for i, request in enumerate(requests):
            z = host_array(pb_utils.get_input_tensor_by_name(request, "logits")).astype(np.float32, copy=False)
            a = pb_utils.get_input_tensor_by_name(request, "activations")
            a = a.as_numpy() if self.detector.gpu is None or a.is_cpu() else a
            s = pb_utils.get_input_tensor_by_name(request, "squeezed_logits") if self.detector.squeezers else None
            s = None if s is None else host_array(s)
            try:
                label, a = self.detector.check(z, a, s)
            except FingerprintError as e:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            if self.watch is not None:
                images.append(host_array(pb_utils.get_input_tensor_by_name(request, self.image_input)))
            logits.append(z)
            labels.append(label)
            acts.append(a)
            squeezed.append(s)
            owners.append((i, len(z)))
        if not owners:
            return responses
        labels, logits = np.concatenate(labels), np.concatenate(logits)
        squeezed = np.concatenate(squeezed) if self.detector.squeezers else None
        verdicts, kernel_s = self.detector.detect(labels, acts, logits, squeezed)
        self.metrics.record(verdicts, labels, kernel_s)
        flagged = None if self.watch is None else self.watch.observe(np.concatenate(images))
        for (i, _), out in zip(owners, response_tensors(logits, labels, verdicts, [n for _, n in owners], self.audit,
                                                        flagged)):
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()])
        return responses
