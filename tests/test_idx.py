"""IDX reader: tiny files written here (the Debian package is not needed)."""

import gzip
import os

import numpy as np
import pytest

from experiments.idx import IdxFiles, find_idx_files, read_idx, read_idx_set

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    dims = np.asarray(array.shape, ">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, gz=None):
    data = idx_bytes(array)
    gz = str(path).endswith(".gz") if gz is None else gz
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


def write_set(folder, n_train=12, n_test=10, gz=True, sep="-", size=(4, 5), seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, *size)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(os.path.join(folder, f"{split}-images{sep}idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(folder, f"{split}-labels{sep}idx1-ubyte{suffix}"), labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, dtype, gz):
    array = (np.arange(24).reshape(2, 3, 4) * 7 - 5).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("cut, words", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing data"),
    (lambda b: b"\x01\x02" + b[2:], "not an IDX file"),
    (lambda b: b[:2] + b"\x07" + b[3:], "not an IDX file"),
    (lambda b: b[:6], "cut short"),
    (lambda b: b"", "not an IDX file"),
])
def test_read_idx_refuses_damaged_files_naming_them(tmp_path, cut, words):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(cut(idx_bytes(np.zeros((3, 2, 2), np.uint8))))
    with pytest.raises(ValueError, match=words) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_a_gzip_stream_cut_short_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    data = gzip.compress(idx_bytes(np.ones((50, 8, 8), np.uint8)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable IDX file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("gz, sep", [(True, "-"), (False, "-"), (False, ".")])
def test_find_and_read_a_set(tmp_path, gz, sep):
    arrays = write_set(tmp_path, gz=gz, sep=sep)
    files = find_idx_files(tmp_path)
    assert isinstance(files, IdxFiles)
    train_x, train_y, test_x, test_y = read_idx_set(files)
    assert train_x.shape == (12, 4, 5, 1) and train_x.dtype == np.uint8
    np.testing.assert_array_equal(train_x[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(test_y, arrays["t10k"][1])
    assert train_y.dtype == np.int64


def test_missing_file_means_no_set(tmp_path):
    write_set(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert find_idx_files(tmp_path) is None


def test_label_count_and_range_are_checked(tmp_path):
    write_set(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match="expected 10 labels"):
        read_idx_set(find_idx_files(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        read_idx_set(find_idx_files(tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="apt package dataset-fashion-mnist absent")
def test_the_debian_fashion_mnist_files():
    train_x, train_y, test_x, test_y = read_idx_set(find_idx_files(FASHION_DIR))
    assert train_x.shape == (60000, 28, 28, 1) and test_x.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train_y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(test_y), np.full(10, 1000))
    pixels = train_x / 255.0
    assert abs(pixels.mean() - 0.2860) < 5e-5 and abs(pixels.std() - 0.3530) < 5e-5
