"""The squeezers of :mod:`kernels.squeezing` in torch: inside the exported ONNX graph (the served
classifier returns the logits of its squeezed copies) and in the white-box attacker's copy.

Values are those of the NumPy definitions (:class:`kernels.squeezing.Squeezer`, checked by the tests).
Gradients follow BPDA (Athalye, Carlini & Wagner, 2018, Sec. 4.1): rounding passes the gradient
straight through, the median passes it to the element it selects, so an attacker can differentiate
through feature squeezing, as He et al. (2017) did to break it.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.errors import InvalidInputError
from kernels.squeezing import Squeezer

MAX_MEDIAN = 3  # up to 3x3 a one-pixel border reflected symmetrically is the edge pixel repeated


class TorchSqueezer(nn.Module):
    """One :class:`kernels.squeezing.Squeezer` on ``(B, C, H, W)`` tensors."""

    def __init__(self, squeezer: Squeezer) -> None:
        super().__init__()
        if squeezer.kind == "median" and squeezer.value > MAX_MEDIAN:
            raise InvalidInputError(f"the exported median squeezer goes up to {MAX_MEDIAN}x{MAX_MEDIAN}, "
                                    f"got {squeezer.value}x{squeezer.value}")
        self.squeezer = squeezer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, n = self.squeezer.kind, self.squeezer.value
        if kind == "bits":
            levels = float(2 ** n - 1)
            return x + (torch.round(x * levels) / levels - x).detach()  # straight-through
        if n == 1:
            return x
        before, after = n // 2, n - 1 - n // 2
        padded = nn.functional.pad(x, (before, after, before, after), mode="replicate")
        h, w = x.shape[2], x.shape[3]
        windows = torch.stack([padded[:, :, i:i + h, j:j + w] for i in range(n) for j in range(n)], dim=-1)
        # the element of rank n*n // 2 (ascending): the smallest of the n*n - n*n // 2 largest
        return torch.topk(windows, n * n - n * n // 2, dim=-1).values[..., -1]

