"""``nfp predict``: send image files or an ``.npz`` to a running server and print its verdicts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from client.grpc_client import ENSEMBLE, DetectorClient
from kernels.errors import InvalidInputError


def load_images(paths: list[Path], shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """Images as ``(N, C, H, W) float32`` in [0, 1], resized to the served shape, with their names."""
    from PIL import Image

    c, h, w = shape
    arrays, names = [], []
    for path in paths:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                key = next((k for k in ("x", "images") if k in f.files), None)
                if key is None:
                    raise InvalidInputError(f"{path}: expected an array 'x' or 'images', found {f.files}")
                x = f[key]
            x = x[:, None] if x.ndim == 3 else x
            if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
                x = x.transpose(0, 3, 1, 2)
            x = x.astype(np.float32) / 255.0 if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
            if x.shape[1:] != (c, h, w):
                raise InvalidInputError(f"{path}: images are {x.shape[1:]}, the server expects {(c, h, w)}")
            arrays.append(x)
            names += [f"{path.name}[{i}]" for i in range(len(x))]
        else:
            try:
                image = Image.open(path).convert("L" if c == 1 else "RGB").resize((w, h))
            except OSError as e:
                raise InvalidInputError(f"{path}: not a readable image ({e})") from None
            a = np.asarray(image, np.float32) / 255.0
            arrays.append((a[None] if c == 1 else a.transpose(2, 0, 1))[None])
            names.append(path.name)
    if not arrays:
        raise InvalidInputError("no images given")
    return np.concatenate(arrays), names


def predict(url: str, paths: list[Path], model: str = ENSEMBLE, timeout_s: float = 30.0) -> str:
    """The server's verdict for each image of ``paths``, one line each."""
    with DetectorClient(url, model, timeout_s) as client:
        images, names = load_images(paths, client.input_shape())
        result = client.detect(images)
    lines = [f"{'image':<28} {'label':>6} {'confidence':>10} {'score':>8}  verdict"]
    for i, name in enumerate(names):
        verdict = ("not checked" if not result.checked[i] else "ATTACKED" if result.is_attacked[i] else "clean")
        lines.append(f"{name:<28} {result.label[i]:>6} {result.confidence[i]:>10.3f} {result.score[i]:>8.2f}  {verdict}")
    return "\n".join(lines)
