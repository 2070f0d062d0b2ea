"""A small gRPC client of the guarded classifier served by Triton.

Example::

    client = DetectorClient("127.0.0.1:8001")
    result = client.detect(images)          # images: (B, C, H, W) float32 in [0, 1]
    result.label, result.is_attacked        # (B,) int64, (B,) bool

    futures = [client.submit(batch) for batch in batches]   # concurrent requests
    results = [f.result() for f in futures]
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from kernels.errors import FingerprintError, InvalidInputError

ENSEMBLE = "guarded_classifier"
OUTPUTS = ("label", "probabilities", "score", "is_attacked", "fingerprint_ids")


class RequestError(FingerprintError):
    """The server refused or failed a request; the message is the server's."""


@dataclass(frozen=True)
class Detection:
    """The server's answer for a batch of ``B`` images.

    Attributes:
        label: ``(B,) int64`` predicted class.
        probabilities: ``(B, C) float32``.
        score: ``(B,) float32`` standardized likelihood-ratio score (low = attacked).
        is_attacked: ``(B,) bool`` verdict at the served false-positive rate.
        fingerprint_ids: ``(B, m) int64`` the fingerprints the server drew for each image.
    """

    label: np.ndarray
    probabilities: np.ndarray
    score: np.ndarray
    is_attacked: np.ndarray
    fingerprint_ids: np.ndarray

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


class DetectorClient:
    """Blocking and concurrent calls to one Triton server over gRPC.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model: the ensemble (or any model with the same inputs and outputs).
        timeout_s: per-request client timeout.
    """

    def __init__(self, url: str, model: str = ENSEMBLE, timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.timeout_s = model, timeout_s

    def _inputs(self, images: np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.float32:
            raise InvalidInputError(f"images must be float32, got {images.dtype}")
        if images.ndim != 4 or len(images) == 0:
            raise InvalidInputError(f"images must be a non-empty (B, C, H, W) array, got shape {images.shape}")
        tensor = self._grpc.InferInput("images", list(images.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(images))
        return [tensor], [self._grpc.InferRequestedOutput(name) for name in OUTPUTS]

    @staticmethod
    def _parse(result) -> Detection:
        get = result.as_numpy
        return Detection(get("label")[:, 0], get("probabilities"), get("score")[:, 0], get("is_attacked")[:, 0],
                         get("fingerprint_ids"))

    def detect(self, images: np.ndarray) -> Detection:
        """Classify and check ``images (B, C, H, W) float32`` in one request."""
        from tritonclient.utils import InferenceServerException

        inputs, outputs = self._inputs(images)
        try:
            return self._parse(self.client.infer(self.model, inputs, outputs=outputs, client_timeout=self.timeout_s))
        except InferenceServerException as e:
            raise RequestError(e.message()) from None

    def submit(self, images: np.ndarray) -> "Future[Detection]":
        """Send a request without waiting; many may be in flight at once."""
        future: Future[Detection] = Future()
        inputs, outputs = self._inputs(images)

        def done(result, error) -> None:
            if error is not None:
                future.set_exception(RequestError(error.message()))
            else:
                future.set_result(self._parse(result))

        self.client.async_infer(self.model, inputs, done, outputs=outputs, client_timeout=self.timeout_s)
        return future

    def detector_parameters(self) -> dict[str, str]:
        """The served detector's parameters (``model_sha256``, ``false_positive_rate``), read from the
        configuration of the model, or of the ensemble step that detects."""
        from tritonclient.utils import InferenceServerException

        try:
            config = self.client.get_model_config(self.model, as_json=True)["config"]
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            for cfg in [config] + [self.client.get_model_config(s["model_name"], as_json=True)["config"] for s in steps]:
                params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
                if "false_positive_rate" in params:
                    return params
        except InferenceServerException as e:
            raise RequestError(e.message()) from None
        raise RequestError(f"model {self.model!r} has no fingerprint detector with a false_positive_rate parameter")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "DetectorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
