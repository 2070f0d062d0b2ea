"""The client's callback resolves every future, whatever the server sent back."""
from concurrent.futures import Future

import numpy as np
import pytest

from client.grpc_client import OUTPUTS, RequestError, resolve


class Response:
    """Stands for a tritonclient InferResult: outputs by name."""

    def __init__(self, **arrays):
        self.arrays = arrays

    def as_numpy(self, name):
        return self.arrays.get(name)


def full_response(batch):
    return Response(label=np.zeros((batch, 1), np.int64), probabilities=np.full((batch, 3), 1 / 3, np.float32),
                    score=np.zeros((batch, 1), np.float32), is_attacked=np.zeros((batch, 1), bool),
                    checked=np.ones((batch, 1), bool), fingerprint_ids=np.zeros((batch, 4), np.int64))


@pytest.mark.parametrize("response, message", [
    (Response(label=np.zeros((2, 1), np.int64)), "lacks output 'probabilities'"),  # another model's answer
    (full_response(1), "lacks output 'label' for 2 images"),  # wrong batch
    (object(), "bad response: AttributeError"),  # not a response at all
])
def test_a_response_that_cannot_be_parsed_fails_the_future_at_once(response, message):
    future: Future = Future()
    resolve(future, response, None, 2, "127.0.0.1:1")
    with pytest.raises(RequestError, match=message):
        future.result(timeout=0)


def test_a_good_response_and_a_server_error_resolve_too():
    ok: Future = Future()
    resolve(ok, full_response(2), None, 2, "127.0.0.1:1")
    assert ok.result(timeout=0).checked.tolist() == [True, True] and ok.result().fingerprint_ids.shape == (2, 4)
    secret: Future = Future()  # a server written without audit answers no draws
    resolve(secret, Response(**{k: v for k, v in full_response(2).arrays.items() if k in OUTPUTS}), None, 2, "x:1")
    assert secret.result(timeout=0).fingerprint_ids is None

    from tritonclient.utils import InferenceServerException

    failed: Future = Future()
    resolve(failed, None, InferenceServerException("model busy", status="StatusCode.INTERNAL"), 2, "127.0.0.1:1")
    with pytest.raises(RequestError, match="model busy"):
        failed.result(timeout=0)
