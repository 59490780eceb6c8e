"""fashion_mnist and mnist from IDX files: tiny files written here; a slow test reads Debian's."""

import os

import numpy as np
import pytest

from experiments import datasets
from experiments.dataset_core import FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD
from experiments.datasets import DatasetNotFoundError, load_dataset
from test_idx import FASHION_DIR, write_idx, write_set


@pytest.mark.parametrize("name, mean, std", [
    ("fashion_mnist", FASHION_MNIST_MEAN, FASHION_MNIST_STD), ("mnist", MNIST_MEAN, MNIST_STD)])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_sets_split_like_the_tfds_sets(tmp_path, name, mean, std, gz):
    raw = write_set(tmp_path, n_train=30, n_test=40, gz=gz, size=(28, 28))
    d = load_dataset(name, seed=3, data_dir=tmp_path)
    assert (d.name, d.num_classes, d.input_shape) == (name, 10, (28, 28, 1))
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (30, 4, 36)
    # Train: the whole official training split in file order.
    np.testing.assert_array_equal(d.train_index, np.arange(30))
    np.testing.assert_array_equal(d.y_train, raw["train"][1])
    np.testing.assert_allclose(d.x_train[..., 0], (raw["train"][0] / 255 - mean[0]) / std[0],
                               atol=1e-5)
    # Validation = a seeded random 10 % of the official test split, test = the rest.
    val = np.sort(np.random.default_rng(3).permutation(40)[:4])
    np.testing.assert_array_equal(d.val_index, val)
    np.testing.assert_array_equal(d.test_index, np.setdiff1d(np.arange(40), val))
    np.testing.assert_array_equal(d.y_val, raw["t10k"][1][val])
    np.testing.assert_allclose(d.x_test[..., 0], (raw["t10k"][0][d.test_index] / 255 - mean[0])
                               / std[0], atol=1e-5)
    assert d.metadata["mean"] == mean and d.metadata["std"] == std


def test_split_is_deterministic_per_seed(tmp_path):
    write_set(tmp_path, n_train=20, n_test=50, size=(28, 28))
    a, b, c = (load_dataset("fashion_mnist", seed=s, data_dir=tmp_path) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.val_index, b.val_index)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.val_index, c.val_index)


def test_fashion_mnist_defaults_to_the_debian_folder(tmp_path, monkeypatch):
    write_set(tmp_path, n_train=20, n_test=10, size=(28, 28))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path))
    assert len(load_dataset("fashion_mnist").y_train) == 20


@pytest.mark.parametrize("where", ["default", "data_dir"])
def test_missing_fashion_mnist_names_the_apt_package_and_tfds_name(tmp_path, monkeypatch, where):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "absent"))
    data_dir = None if where == "default" else tmp_path
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", data_dir=data_dir)
    message = str(info.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "'fashion_mnist'" in message
    assert str(tmp_path / "absent" if data_dir is None else tmp_path) in message


def test_a_truncated_file_is_an_error_naming_it(tmp_path):
    write_set(tmp_path, n_train=20, n_test=10, size=(28, 28))
    path = os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz")
    write_idx(path, np.zeros(9, np.uint8))  # 9 labels for 10 images
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*expected 10 labels"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


def test_mnist_without_idx_files_keeps_its_tfds_path(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", data_dir=tmp_path)  # an empty folder: no IDX files, no tfds copy
    message = str(info.value)
    assert "could not open TFDS dataset 'mnist'" in message and "four IDX files" in message


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_the_debian_fashion_mnist_set():
    d = load_dataset("fashion_mnist", seed=0)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (60000, 1000, 9000)
    assert np.bincount(d.y_train).tolist() == [6000] * 10
    # Normalised with the stated constants: the training images have mean ~0, std ~1.
    assert abs(float(d.x_train.mean())) < 1e-3 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert d.metadata["source"] == FASHION_DIR
