"""The learning problem of one seed: a noisy (and/or long-tailed) training set with its clean
labels and evaluation splits (:func:`make_problem`, the pipeline's first phase), and the oracle
cleaning that moves examples from the training pool into the meta set (:func:`split_pool`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments import noise as noise_lib
from experiments.config import ExperimentConfig
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


def make_problem(cfg: ExperimentConfig, seed: int) -> Problem:
    """Load the dataset (split by ``seed``), subsample long-tailed, inject label noise."""
    data = load_dataset(cfg.dataset, seed=seed, data_dir=cfg.data_dir)
    x, y = data.x_train, data.y_train
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
        labels = noise_lib.from_file(cfg.noise_file, key=cfg.noise_file_key, clean_labels=y)
        noisy = np.asarray(getattr(labels, "labels", labels))[data.train_index]
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

