"""Reading a ``state_dict`` into a model, safely (``weights_only=True``: no pickled code runs), with
an error that names what does not fit.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.errors import InvalidInputError, ModelMismatchError


def load_weights(model: nn.Module, weights: Path) -> nn.Module:
    """Load a state_dict into ``model`` without unpickling code; a mismatch names the bad keys."""
    try:
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InvalidInputError(f"weights file not found: {weights}") from None
    except Exception as e:  # torch raises several types for corrupt or non-weights files
        raise ModelMismatchError(f"{weights} is not a readable state_dict: {e}") from e
    if not isinstance(state, dict):
        raise ModelMismatchError(f"{weights} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:5]}")
        raise ModelMismatchError(f"weights {weights} do not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.eval()
