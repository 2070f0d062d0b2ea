"""A small gRPC client of the guarded classifier served by Triton.

Example::

    client = DetectorClient("127.0.0.1:8001")
    result = client.detect(images)          # images: (B, C, H, W) float32 in [0, 1]
    result.label, result.is_attacked        # (B,) int64, (B,) bool

    futures = [client.submit(batch) for batch in batches]   # concurrent requests
    results = [f.result() for f in futures]                  # each resolves within timeout_s

    async with AsyncDetectorClient("127.0.0.1:8001") as client:   # asyncio (tritonclient.grpc.aio)
        result = await client.detect(images)
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from kernels.contract import ServedInput
from kernels.errors import FingerprintError, InvalidInputError

ENSEMBLE = "guarded_classifier"
OUTPUTS = ("label", "probabilities", "score", "is_attacked", "checked")  # and fingerprint_ids where audited


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
        checked: ``(B,) bool`` whether the server could check the image (False: its predicted class has
            too few fingerprints; then score is NaN and is_attacked False).
        fingerprint_ids: ``(B, m) int64`` the fingerprints the server drew for each image (-1 unchecked),
            from a server written with ``audit`` only; None otherwise (the draws stay secret).
        query_flagged: ``(B,) bool`` the image is a near-copy of a recent query (the server's query memory,
            the mark of a query-based black-box attack); None from a server written without one.
    """

    label: np.ndarray
    probabilities: np.ndarray
    score: np.ndarray
    is_attacked: np.ndarray
    checked: np.ndarray
    fingerprint_ids: np.ndarray | None = None
    query_flagged: np.ndarray | None = None

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


def _inputs(grpc, images: np.ndarray, served: ServedInput = ServedInput()):
    """The request tensors of ``images (B, C, H, W) float32`` in [0, 1], in the ``served`` input's name,
    layout, scale and dtype, for the tritonclient module ``grpc``."""
    images = np.asarray(images)
    if images.dtype != np.float32:
        raise InvalidInputError(f"images must be float32, got {images.dtype}")
    if images.ndim != 4 or len(images) == 0:
        raise InvalidInputError(f"images must be a non-empty (B, C, H, W) array, got shape {images.shape}")
    x = served.images(images)
    tensor = grpc.InferInput(served.name, list(x.shape), served.data_type.removeprefix("TYPE_"))
    tensor.set_data_from_numpy(x)
    return [tensor]  # no outputs named: the server answers all it has (fingerprint_ids only if audited)


def parse(result, batch: int) -> Detection:
    """The :class:`Detection` of a response for ``batch`` images; :class:`RequestError` if it is not one
    (an output missing or of the wrong size)."""
    arrays = {}
    for name in OUTPUTS:
        a = result.as_numpy(name)
        if a is None or len(a) != batch:
            raise RequestError(f"the server's response lacks output {name!r} for {batch} images "
                               f"(got {None if a is None else a.shape}): is this a guarded classifier?")
        arrays[name] = a
    flagged = result.as_numpy("query_flagged")
    return Detection(arrays["label"][:, 0], arrays["probabilities"], arrays["score"][:, 0],
                     arrays["is_attacked"][:, 0], arrays["checked"][:, 0], result.as_numpy("fingerprint_ids"),
                     None if flagged is None else flagged[:, 0])


def _server_error(e, url: str) -> RequestError:
    """A one-line :class:`RequestError` from a tritonclient exception; names an unreachable server."""
    message = e.message() if hasattr(e, "message") else str(e)
    status = str(e.status()) if hasattr(e, "status") else ""
    if "UNAVAILABLE" in status or "failed to connect" in message.lower():
        return RequestError(f"no Triton server answers at {url} ({message.splitlines()[0]})")
    return RequestError(message.splitlines()[0] if message else type(e).__name__)


def resolve(future: "Future[Detection]", result, error, batch: int, url: str) -> None:
    """The gRPC callback of :meth:`DetectorClient.submit`: resolve ``future`` on every path. Anything
    raised here would vanish in gRPC's thread and leave the caller waiting forever."""
    try:
        if error is not None:
            raise _server_error(error, url)
        future.set_result(parse(result, batch))
    except Exception as e:
        future.set_exception(e if isinstance(e, RequestError) else RequestError(f"bad response: {e!r}"))


class DetectorClient:
    """Blocking and concurrent calls to one Triton server over gRPC.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model: the ensemble (or any model with the same inputs and outputs).
        timeout_s: per-request deadline: a request still unanswered then fails with
            :class:`RequestError` (also the futures of :meth:`submit`).
    """

    def __init__(self, url: str, model: str = ENSEMBLE, timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.timeout_s = model, timeout_s
        self._served: ServedInput | None = None

    @property
    def served_input(self) -> ServedInput:
        """The model's image input, read from its config on first use: images are sent as it takes them
        (a model imported with its own contract may take UINT8 NHWC pixels)."""
        if self._served is None:
            from tritonclient.utils import InferenceServerException

            try:
                config = self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)
            except InferenceServerException as e:
                raise _server_error(e, self.url) from None
            self._served = ServedInput.from_config(config["config"])
        return self._served

    def detect(self, images: np.ndarray) -> Detection:
        """Classify and check ``images (B, C, H, W) float32`` in [0, 1] in one request."""
        from tritonclient.utils import InferenceServerException

        inputs = _inputs(self._grpc, images, self.served_input)
        try:
            result = self.client.infer(self.model, inputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise _server_error(e, self.url) from None
        return parse(result, len(images))

    def submit(self, images: np.ndarray) -> "Future[Detection]":
        """Send a request without waiting; many may be in flight at once. The future always resolves:
        with the detection, or with :class:`RequestError` (server error, unparsable answer, deadline)."""
        future: Future[Detection] = Future()
        inputs = _inputs(self._grpc, images, self.served_input)
        batch = len(images)

        self.client.async_infer(self.model, inputs, lambda result, error: resolve(future, result, error, batch, self.url),
                                client_timeout=self.timeout_s)
        return future

    def detector_parameters(self) -> dict[str, str]:
        """The served detector's parameters (``model_sha256``, ``false_positive_rate``), read from the
        configuration of the model, or of the ensemble step that detects."""
        from tritonclient.utils import InferenceServerException

        try:
            config = self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)["config"]
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            for cfg in [config] + [self.client.get_model_config(s["model_name"], as_json=True,
                                                                client_timeout=self.timeout_s)["config"]
                                   for s in steps]:
                params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
                if "false_positive_rate" in params:
                    return params
        except InferenceServerException as e:
            raise _server_error(e, self.url) from None
        raise RequestError(f"model {self.model!r} has no fingerprint detector with a false_positive_rate parameter")

    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the served model expects, from the server's model metadata."""
        from tritonclient.utils import InferenceServerException

        try:
            meta = self.client.get_model_metadata(self.model, as_json=True, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise _server_error(e, self.url) from None
        return tuple(int(d) for d in meta["inputs"][0]["shape"][-3:])  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "DetectorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncDetectorClient:
    """The asyncio client (tritonclient's ``grpc.aio``): ``await client.detect(images)``; run many with
    ``asyncio.gather``. Same arguments, answers and errors as :class:`DetectorClient`."""

    def __init__(self, url: str, model: str = ENSEMBLE, timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        self._grpc = grpcclient
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.client = aioclient.InferenceServerClient(url)
        self._served: ServedInput | None = None

    async def detect(self, images: np.ndarray) -> Detection:
        from tritonclient.utils import InferenceServerException

        try:
            if self._served is None:
                config = await self.client.get_model_config(self.model, as_json=True, client_timeout=self.timeout_s)
                self._served = ServedInput.from_config(config["config"])
            inputs = _inputs(self._grpc, images, self._served)
            result = await self.client.infer(self.model, inputs, client_timeout=self.timeout_s)
        except InferenceServerException as e:
            raise _server_error(e, self.url) from None
        return parse(result, len(images))

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "AsyncDetectorClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
