import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from export.data.datasets import load_dataset, read_idx, split_dataset
from kernels.errors import DatasetError


def test_mnist_5k_is_float_channels_first_in_unit_range(mnist):
    assert mnist.x.shape == (5000, 1, 28, 28) and mnist.x.dtype == np.float32
    assert mnist.x.min() == 0.0 and mnist.x.max() == 1.0
    assert np.bincount(mnist.y).tolist() == [500] * 10


def test_splits_are_disjoint_stratified_and_reproducible(mnist):
    a, b = split_dataset(mnist.y, seed=3), split_dataset(mnist.y, seed=3)
    parts = list(a.as_dict().values())
    assert sum(len(p) for p in parts) == 5000
    assert len(np.unique(np.concatenate(parts))) == 5000
    for p, q in zip(parts, b.as_dict().values()):
        np.testing.assert_array_equal(p, q)
    assert np.bincount(mnist.y[a.fit]).tolist() == [300] * 10
    assert np.bincount(mnist.y[a.test]).tolist() == [100] * 10
    assert not np.array_equal(a.fit, split_dataset(mnist.y, seed=4).fit)


def test_a_per_class_subset_keeps_the_split_shares_and_only_that_many_images_per_class(mnist):
    s = split_dataset(mnist.y, seed=3, per_class=50)
    picked = np.concatenate(list(s.as_dict().values()))
    assert len(np.unique(picked)) == 500 and np.bincount(mnist.y[picked]).tolist() == [50] * 10
    assert np.bincount(mnist.y[s.fit]).tolist() == [30] * 10
    with pytest.raises(DatasetError, match="per_class must be at least 3"):
        split_dataset(mnist.y, per_class=2)


def test_bad_split_fractions_are_refused(mnist):
    with pytest.raises(DatasetError, match="summing to 1"):
        split_dataset(mnist.y, fractions=(0.5, 0.5, 0.5))


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(DatasetError, match="unknown data set 'cifar'.*mnist"):
        load_dataset("cifar")


def _write_images(folder, n, size, mode="L"):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_reads_one_class_per_subfolder(tmp_path):
    _write_images(tmp_path / "cat", 3, (8, 6), "RGB")
    _write_images(tmp_path / "dog", 2, (8, 6), "RGB")
    ds = load_dataset(str(tmp_path))
    assert ds.x.shape == (5, 3, 6, 8) and ds.class_names == ("cat", "dog")
    assert ds.y.tolist() == [0, 0, 0, 1, 1]


def test_image_folder_errors_name_the_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty"))
    _write_images(tmp_path / "mixed" / "a", 2, (8, 8))
    _write_images(tmp_path / "mixed" / "b", 2, (9, 8))
    with pytest.raises(DatasetError, match="mixed sizes"):
        load_dataset(str(tmp_path / "mixed"))
    _write_images(tmp_path / "hollow" / "a", 2, (8, 8))
    (tmp_path / "hollow" / "b").mkdir()
    with pytest.raises(DatasetError, match="'b' holds no images"):
        load_dataset(str(tmp_path / "hollow"))


def test_npz_accepts_uint8_channels_last(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 0, 1]))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.x.shape == (4, 3, 5, 5)
    np.testing.assert_allclose(ds.x[1, 2], x[1, :, :, 2] / 255.0, atol=1e-7)


def test_npz_with_nan_or_missing_keys_is_refused(tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.full((2, 4, 4), np.nan, np.float32), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((2, 4, 4)))
    with pytest.raises(DatasetError, match="expected arrays 'x' and 'y'"):
        load_dataset(str(tmp_path / "keys.npz"))


def test_idx_reader_reads_gzipped_unsigned_bytes(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "t-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + data.tobytes())
    np.testing.assert_array_equal(read_idx(path), data)
