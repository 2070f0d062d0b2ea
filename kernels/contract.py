"""A served classifier's interface (its contract): what the guarded repository keeps, what clients send.

The offline pipeline works on images ``(B, C, H, W)`` float in [0, 1]. A model the user already serves
may take ``UINT8`` NHWC pixels under another input name (``export.models.onnx_import`` imports it); the
writer serves that contract unchanged; the served models read their input back from their configs
and clients turn their images into it (:class:`ServedInput`). A torch-started pipeline has the default contract: ``images`` FP32
NCHW in [0, 1], output ``logits``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernels.errors import InvalidInputError

CONTRACT = "contract.json"  # in a pipeline folder whose classifier was imported
DTYPES = {"TYPE_FP32": (1, np.float32), "TYPE_FP16": (10, np.float16), "TYPE_UINT8": (2, np.uint8)}  # + ONNX elem type


def served_images(images: np.ndarray, input_type: str = "TYPE_FP32", layout: str = "NCHW",
                  scale: float = 1.0) -> np.ndarray:
    """Images ``(B, C, H, W)`` float in [0, 1] in a served input's layout, scale and dtype (UINT8 rounded)."""
    x = images.transpose(0, 2, 3, 1) if layout == "NHWC" else images
    x = x * scale if scale != 1.0 else x
    dtype = DTYPES[input_type][1]
    return np.ascontiguousarray(np.round(x).astype(dtype) if dtype == np.uint8 else x.astype(dtype, copy=False))


@dataclass(frozen=True)
class Contract:
    """A served classifier's interface.

    Attributes:
        input_name, input_type: the image input (``TYPE_UINT8``, ``TYPE_FP16`` or ``TYPE_FP32``).
        dims: one image's dims as served, e.g. ``[224, 224, 3]`` (NHWC) or ``[3, 224, 224]``.
        layout: ``"NCHW"`` or ``"NHWC"``.
        scale: the input value of a white pixel (255 for UINT8; 1 for float unless told).
        outputs: the model's outputs, ``{"name", "data_type", "dims"}`` each, served unchanged.
        logits: the output the detector reads (pre-softmax scores, one per class).
    """

    input_name: str
    input_type: str
    dims: list[int]
    layout: str
    scale: float
    outputs: list[dict[str, Any]]
    logits: str

    def __post_init__(self) -> None:
        if self.input_type not in DTYPES:
            raise InvalidInputError(f"input {self.input_name!r} is {self.input_type}; images must be one of {sorted(DTYPES)}")
        if self.layout not in ("NCHW", "NHWC") or len(self.dims) != 3:
            raise InvalidInputError(f"input {self.input_name!r} must be one image, NCHW or NHWC, got {self.layout} {self.dims}")
        if self.logits not in [o["name"] for o in self.outputs]:
            raise InvalidInputError(f"the logits output {self.logits!r} is not among the model's outputs "
                                    f"{[o['name'] for o in self.outputs]}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        d = self.dims
        return (d[0], d[1], d[2]) if self.layout == "NCHW" else (d[2], d[0], d[1])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Contract":
        return cls(**d)

    def served_images(self, images: np.ndarray) -> np.ndarray:
        """Images ``(B, C, H, W)`` float in [0, 1] as this model takes them (layout, scale, dtype)."""
        return served_images(images, self.input_type, self.layout, self.scale)


@dataclass(frozen=True)
class ServedInput:
    """A served model's image input as its Triton config states it (the JSON form): what the models check
    and what clients send. The writer records the contract's scale as the ``input_scale`` parameter."""

    name: str = "images"
    data_type: str = "TYPE_FP32"
    dims: tuple[int, ...] = ()
    layout: str = "NCHW"
    scale: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ServedInput":
        (image,) = config["input"]
        scale = config.get("parameters", {}).get("input_scale", {}).get("string_value", "1")
        return cls(image["name"], image.get("data_type", "TYPE_FP32"), tuple(int(d) for d in image["dims"]),
                   "NHWC" if image.get("format") == "FORMAT_NHWC" else "NCHW", float(scale))

    @property
    def high(self) -> float | None:
        """The largest valid value, checked by the served models; None where the dtype bounds it (UINT8)."""
        return None if self.data_type == "TYPE_UINT8" else self.scale

    def images(self, images: np.ndarray) -> np.ndarray:
        """Images ``(B, C, H, W)`` float in [0, 1] as this input takes them."""
        return served_images(images, self.data_type, self.layout, self.scale)


def default_contract(image_shape, num_classes: int) -> Contract:
    """The interface of a torch-started pipeline's exported model."""
    return Contract("images", "TYPE_FP32", list(image_shape), "NCHW", 1.0,
                    [{"name": "logits", "data_type": "TYPE_FP32", "dims": [num_classes]}], "logits")


def load_contract(out: Path) -> Contract | None:
    """The contract of an imported model in the pipeline folder ``out``, or None (a torch-started one)."""
    path = Path(out) / CONTRACT
    return Contract.from_json(json.loads(path.read_text())) if path.is_file() else None
