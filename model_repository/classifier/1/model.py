"""Triton Python-backend model: the exported ONNX classifier run by onnxruntime (cpu profile).

Input: the served contract's image input (``images (C, H, W) float32`` in [0, 1] for a torch-started
pipeline; an imported model's own name, dtype and layout); outputs: the model's own (``logits``) and
``activations (D,)``, the fingerprinted layers laid out as the bank expects, from one forward pass.
All requests of one ``execute`` call run as one batch; a request with bad values (NaN, infinite, out
of [0, 1]) gets its own error response and the others are answered normally. Only the outputs some
request asks for are fetched and returned: a client that wants the logits alone gets no activations.
In the gpu profile the same ONNX file runs on Triton's native onnxruntime backend instead.
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kernels.contract import ServedInput
from kernels.onnx_runtime import image_problem, ort_session
from model_repository.serving import answered_safely, signature_gauge
from model_repository.signing import verify_if_required


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0"))
        verified = verify_if_required(Path(args["model_repository"]))  # a signed repository: this folder unchanged
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort_session(path, threads=threads, providers=["CPUExecutionProvider"])
        self.name = args["model_name"]
        self.signature = signature_gauge(pb_utils, self.name, verified)
        self.served = ServedInput.from_config(config)
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        return answered_safely(pb_utils, self.name, self._execute, requests)

    def _execute(self, requests):
        responses = [None] * len(requests)
        batch, owners = [], []
        for i, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, self.served.name).as_numpy()
            problem = image_problem(images, self.served.dims, self.served.high)
            if problem:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(problem))
            else:
                batch.append(images)
                owners.append((i, len(images), request.requested_output_names()))
        if batch:
            names = [n for n in self.outputs if any(n in wanted for *_, wanted in owners)]
            outputs = dict(zip(names, self.session.run(names, {self.served.name: np.concatenate(batch)})))
            start = 0
            for i, n, wanted in owners:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, outputs[name][start : start + n]) for name in names if name in wanted])
                start += n
        return responses
