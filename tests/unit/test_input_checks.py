"""Property-based fuzzing (hypothesis) of the served models' input checks, against element-by-element
references: a check must refuse exactly the malformed inputs, name the problem, and never raise."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from kernels.errors import InvalidInputError
from kernels.onnx_runtime import image_problem
from kernels.scoring import check_activations

ABOVE_ONE = float(np.nextafter(np.float32(1), np.float32(2)))  # the float32 values nearest the range's ends
BELOW_ZERO = -float(np.nextafter(np.float32(0), np.float32(1)))
SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0, -0.0, ABOVE_ONE, BELOW_ZERO])
VALUES = st.floats(-3, 3, width=32) | SPECIAL


def image_fault(images: np.ndarray, shape) -> str | None:
    """The obvious reference: look at every value in turn."""
    if images.ndim != 4:
        return "dimensions"
    if tuple(images.shape[1:]) != tuple(shape):
        return "shape"
    if images.shape[0] == 0:
        return "empty"
    values = [float(v) for v in images.ravel()]
    if any(math.isnan(v) for v in values):
        return "NaN"
    if any(not 0.0 <= v <= 1.0 for v in values):
        return "range"
    return None


WORDS = {"dimensions": "2^32", "shape": "must have shape", "empty": "empty batch", "NaN": "NaN", "range": "[0, 1]"}


@settings(max_examples=300, deadline=None)
@given(images=arrays(np.float32, array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=4), elements=VALUES))
def test_image_check_refuses_exactly_what_the_per_value_reference_refuses(images):
    fault = image_fault(images, (1, 2, 2))
    problem = image_problem(images, (1, 2, 2))
    assert (problem is None) == (fault is None), (images, problem)
    if fault:
        assert WORDS[fault] in problem


@settings(max_examples=300, deadline=None)
@given(acts=arrays(st.sampled_from([np.float32, np.float64]),
                   array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5), elements=VALUES))
def test_activation_check_refuses_exactly_malformed_activations_and_names_bad_rows(acts):
    d = 3
    fine = (acts.dtype == np.float32 and acts.ndim == 2 and acts.shape[1] == d and len(acts) > 0
            and all(math.isfinite(float(v)) for v in acts.ravel()))
    if fine:
        assert check_activations(acts, d) is acts
        return
    with pytest.raises(InvalidInputError) as refused:
        check_activations(acts, d)
    if acts.dtype == np.float32 and acts.ndim == 2 and acts.shape[1] == d and len(acts):
        bad = [i for i, row in enumerate(acts) if not all(math.isfinite(float(v)) for v in row)]
        assert str(bad[:10]) in str(refused.value)
