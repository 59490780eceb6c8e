"""The learning problem of one seed: a noisy (and/or long-tailed) training set with its clean
labels and evaluation splits (:func:`make_problem`, the pipeline's first phase), and the oracle
cleaning that moves examples from the training pool into the meta set (:func:`split_pool`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments import noise as noise_lib
from experiments.config import ExperimentConfig
from experiments.dataset_core import stratified_take
from experiments.datasets import load_dataset


class Problem(NamedTuple):
    """A noisy (and/or imbalanced) training set with its clean labels and eval splits."""

    name: str
    x_train: np.ndarray  # (N, ...)
    y_noisy: np.ndarray  # (N,) labels the learner sees
    y_clean: np.ndarray  # (N,) ground truth, used only by the cleaning oracle and metrics
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    noise_rate: float  # realised

    @property
    def is_clean(self) -> np.ndarray:
        return self.y_noisy == self.y_clean


# Entropy word of the --train-size subsample's generator (independent of the split's stream).
_TRAIN_SIZE_STREAM = 0x7A1


def subsample(y: np.ndarray, train_size: int, seed: int, dataset: str = "") -> np.ndarray:
    """Sorted positions of a stratified subsample of ``train_size`` of the labels ``y``.

    Each class keeps its share of ``y`` (:func:`~experiments.dataset_core.stratified_take`),
    drawn by ``np.random.default_rng([seed, _TRAIN_SIZE_STREAM])``: the same seed, the same
    subsample. ``ValueError`` when ``train_size`` exceeds ``len(y)``.
    """
    if train_size > len(y):
        raise ValueError(f"train_size (--train-size) {train_size} must be at most the "
                         f"{len(y)} examples of the training split of {dataset or 'the data'}")
    return stratified_take(np.asarray(y), train_size,
                           np.random.default_rng([seed, _TRAIN_SIZE_STREAM]))


def make_problem(cfg: ExperimentConfig, seed: int) -> Problem:
    """Load the dataset (split by ``seed``), keep a ``cfg.train_size`` subsample of the
    training split (stratified on the clean labels), subsample long-tailed, inject label
    noise (after the subsampling, so the noise rate holds on the examples trained on)."""
    data = load_dataset(cfg.dataset, seed=seed, data_dir=cfg.data_dir)
    x, y, source = data.x_train, data.y_train, data.train_index
    if cfg.train_size is not None:
        kept = subsample(y, cfg.train_size, seed, cfg.dataset)
        x, y, source = x[kept], y[kept], source[kept]
    k = data.num_classes
    if cfg.imbalance is not None and cfg.imbalance > 1:
        kept = noise_lib.long_tailed(y, cfg.imbalance, k, seed=seed)
        x, y = x[kept], y[kept]
    if cfg.noise == "uniform":
        noisy = noise_lib.uniform(y, cfg.rate, k, seed=seed).labels
    elif cfg.noise == "adversarial":
        noisy = noise_lib.adversarial(y, cfg.rate, k, seed=seed).labels
    elif cfg.noise == "file":
        if cfg.imbalance is not None:
            raise ValueError("noise='file' cannot be combined with imbalance")
        labels = noise_lib.from_file(cfg.noise_file, key=cfg.noise_file_key,
                                     clean_labels=data.y_train)
        noisy = np.asarray(getattr(labels, "labels", labels))[source]
    else:
        noisy = y.copy()
    noisy = np.asarray(noisy, np.int32)
    return Problem(cfg.dataset, x, noisy, np.asarray(y, np.int32), data.x_val, data.y_val,
                   data.x_test, data.y_test, k, tuple(data.input_shape),
                   float(np.mean(noisy != y)))


def split_pool(problem: Problem, meta_indices: np.ndarray):
    """Oracle cleaning: meta examples carry ground-truth labels and leave the training pool.

    Returns ``(pool_indices (N - M,), meta_set {"x", "y"})``.
    """
    meta_indices = np.asarray(meta_indices, np.int64)
    if len(np.unique(meta_indices)) != len(meta_indices):
        raise ValueError("meta_indices must be unique")
    pool = np.setdiff1d(np.arange(len(problem.y_noisy)), meta_indices)
    meta = {"x": problem.x_train[meta_indices], "y": problem.y_clean[meta_indices]}
    return pool, meta

