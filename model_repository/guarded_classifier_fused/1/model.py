"""Triton Python-backend model: classifier and fingerprint detector in one step (cpu profile, optional).

Same inputs and outputs as the ``guarded_classifier`` ensemble (the served image input -> an imported
model's own outputs, ``label``,
``probabilities``, ``score``, ``is_attacked``, ``checked``, ``fingerprint_ids`` with ``audit``, ``query_flagged`` with a query
memory) and the same detection
(``model_repository.serving.ServedDetector``), but the ONNX classifier and the detector run in one ``execute`` of
one Python stub, so the activations never leave the process and no second ensemble step is
scheduled. On the pip-installed server, where the classifier is itself a Python-backend model, this
removes the hand-off between steps that dominates the ensemble's batch-1 overhead
(``python -m client.benchmark``). Written by ``model_repository.writer`` when ``ServingConfig.fused`` is set.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kernels.errors import FingerprintError
from kernels.contract import ServedInput
from kernels.onnx_runtime import image_problem, ort_session
from model_repository.serving import (DetectorMetrics, QueryWatch, ServedDetector, answered_safely, response_tensors,
                                      signature_gauge)
from model_repository.writer import DETECTION_OUTPUTS


def error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        # signature and model hash first: nothing of the folder is parsed before it is verified
        self.detector = ServedDetector(version / "bank", params["model_sha256"],
                                       float(params.get("false_positive_rate", "0.01")), served_model=version / "model.onnx")
        self.session = ort_session(version / "model.onnx", threads=int(params.get("intra_op_threads", "0")),
                                   providers=["CPUExecutionProvider"])
        self.name = args["model_name"]
        self.served = ServedInput.from_config(config)
        self.logits = params["logits_output"]
        # the model's own outputs (an imported model's), served beside the detection outputs
        self.originals = [o["name"] for o in config["output"] if o["name"] not in DETECTION_OUTPUTS]
        self.metrics = DetectorMetrics(pb_utils, self.name, self.detector)
        self.signature = signature_gauge(pb_utils, self.name, self.detector.verified)
        self.audit = params.get("audit") == "true"
        self.watch = QueryWatch.from_params(pb_utils, self.name, params, self.served.scale)  # query_flagged

    def execute(self, requests):
        return answered_safely(pb_utils, self.name, self._execute, requests)

    def _execute(self, requests):
        responses = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            x = pb_utils.get_input_tensor_by_name(request, self.served.name).as_numpy()
            problem = image_problem(x, self.served.dims, self.served.high)
            if problem:
                responses[i] = error(problem)
            else:
                images.append(x)
                owners.append((i, len(x)))
        if not owners:
            return responses
        evidence = ["activations"] + ["squeezed_logits"] * bool(self.detector.squeezers)
        names = list(dict.fromkeys([self.logits, *evidence, *self.originals]))
        batch = np.concatenate(images)
        outputs = dict(zip(names, self.session.run(names, {self.served.name: batch})))
        logits, acts = outputs[self.logits].astype(np.float32, copy=False), outputs["activations"]
        squeezed = outputs.get("squeezed_logits")
        rows, labels, answered = [], [], []
        start = 0
        for i, n in owners:
            s = slice(start, start + n)
            start += n
            try:
                labels.append(self.detector.check(logits[s], acts[s], None if squeezed is None else squeezed[s])[0])
            except FingerprintError as e:
                responses[i] = error(str(e))
                continue
            rows.append(s)
            answered.append((i, n))
        if not answered:
            return responses
        labels = np.concatenate(labels)
        if len(answered) < len(owners):
            logits, acts = np.concatenate([logits[s] for s in rows]), np.concatenate([acts[s] for s in rows])
            squeezed = None if squeezed is None else np.concatenate([squeezed[s] for s in rows])
            batch = np.concatenate([batch[s] for s in rows])
        verdicts, kernel_s = self.detector.detect(labels, [acts], logits, squeezed)
        self.metrics.record(verdicts, labels, kernel_s)
        flagged = None if self.watch is None else self.watch.observe(batch)
        for (i, _), s, out in zip(answered, rows, response_tensors(logits, labels, verdicts, [n for _, n in answered],
                                                                    self.audit, flagged)):
            out.update({name: outputs[name][s] for name in self.originals})
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in out.items()])
        return responses
