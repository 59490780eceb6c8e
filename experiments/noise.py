"""Label noise and class imbalance injectors (pure numpy, seeded).

Every injector is deterministic per ``seed`` (``np.random.default_rng(seed)``)
and validates its input before drawing anything. Noise injectors return
:class:`NoisyLabels` ``(labels, is_noisy, rate)`` where ``rate`` is the realised
fraction of changed labels; the imbalance injector returns the kept indices.

- :func:`uniform`: each label replaced with probability ``rate``.
- :func:`adversarial`: exactly ``round(rate * N)`` labels mapped by a fixed
  class permutation, by default ``c -> (c + 1) mod K``.
- :func:`long_tailed`: class ``c`` keeps ``floor(n_max * factor ** (-c / (K - 1)))``.
- :func:`long_tailed_noisy`: imbalance, then noise (paper Table 9).
- :func:`from_file`: real-noise label files (CIFAR-N exports).
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

import numpy as np

__all__ = [
    "LongTailedNoisy",
    "NoisyLabels",
    "adversarial",
    "from_file",
    "long_tailed",
    "long_tailed_counts",
    "long_tailed_noisy",
    "uniform",
]


class NoisyLabels(NamedTuple):
    """Result of a noise injector.

    Attributes:
      labels: int32 (N,) noisy labels.
      is_noisy: bool (N,), ``labels != clean labels``.
      rate: realised noise rate, ``is_noisy.mean()`` (0.0 when N = 0).
    """

    labels: np.ndarray
    is_noisy: np.ndarray
    rate: float


class LongTailedNoisy(NamedTuple):
    """Result of :func:`long_tailed_noisy`.

    Attributes:
      indices: int64 (M,) kept positions into the original labels, sorted.
      noisy: :class:`NoisyLabels` for ``labels[indices]`` (length M).
    """

    indices: np.ndarray
    noisy: NoisyLabels


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_labels(labels, num_classes: int, name: str = "labels") -> np.ndarray:
    """Returns ``labels`` as int64 (N,) after checking shape, dtype and range."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        # Float files (e.g. CSV exports) are fine as long as they hold whole numbers.
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) (num_classes={num_classes}), "
            f"got range [{arr.min()}, {arr.max()}]")
    return arr


def _check_rate(rate) -> float:
    if not isinstance(rate, (int, float, np.floating, np.integer)) or isinstance(rate, bool) \
            or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    return float(rate)


def _result(clean: np.ndarray, noisy: np.ndarray) -> NoisyLabels:
    is_noisy = noisy != clean
    rate = float(is_noisy.mean()) if is_noisy.size else 0.0
    return NoisyLabels(noisy.astype(np.int32), is_noisy, rate)


# ----------------------------------------------------------------------------
# Noise injectors
# ----------------------------------------------------------------------------

def _uniform(clean, rate, num_classes, rng, include_true):
    """Core of :func:`uniform` on validated int64 labels (N,)."""
    hit = rng.random(clean.size) < rate
    if include_true:
        replacement = rng.integers(0, num_classes, clean.size)
    else:
        # A shift of 1..K-1 is uniform over the K-1 other classes.
        replacement = (clean + rng.integers(1, num_classes, clean.size)) % num_classes
    return _result(clean, np.where(hit, replacement, clean))


def uniform(labels, rate: float, num_classes: int, *, seed, include_true: bool = False
            ) -> NoisyLabels:
    """Uniform (symmetric) label noise.

    Each example is hit independently with probability ``rate``. A hit label
    becomes one of the other K-1 classes uniformly (the paper's definition), so
    the realised rate is Binomial(N, rate) / N. With ``include_true=True`` the
    new label is drawn from all K classes, as Meta-Weight-Net does, and the
    realised rate is about ``rate * (K - 1) / K``.

    Args:
      labels: int (N,) clean labels in ``[0, num_classes)``.
      rate: probability of a hit, in [0, 1).
      num_classes: K >= 2.
      seed: anything ``np.random.default_rng`` accepts.
      include_true: draw replacements from all K classes.

    Returns:
      :class:`NoisyLabels`.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _check_labels(labels, num_classes)
    rate = _check_rate(rate)
    return _uniform(clean, rate, num_classes, np.random.default_rng(seed), include_true)


def _check_mapping(mapping, num_classes: int) -> np.ndarray:
    """Returns the class map as int64 (K,); default ``c -> (c + 1) mod K``."""
    if mapping is None:
        return (np.arange(num_classes) + 1) % num_classes
    arr = np.asarray(mapping)
    if arr.shape != (num_classes,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"mapping must be an int array of shape ({num_classes},), got "
            f"{arr.dtype} {arr.shape}")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ValueError(f"mapping values must lie in [0, {num_classes}), got {arr.tolist()}")
    fixed = np.flatnonzero(arr == np.arange(num_classes))
    if fixed.size:
        raise ValueError(
            f"mapping must send every class to a different class; fixed points at "
            f"classes {fixed.tolist()}")
    return arr.astype(np.int64)


def _adversarial(clean, rate, mapping, rng):
    """Core of :func:`adversarial` on validated inputs."""
    chosen = rng.choice(clean.size, size=round(rate * clean.size), replace=False)
    noisy = clean.copy()
    noisy[chosen] = mapping[clean[chosen]]
    return _result(clean, noisy)


def adversarial(labels, rate: float, num_classes: int, *, seed, mapping=None
                ) -> NoisyLabels:
    """Adversarial (class-dependent, deterministic) label noise.

    A random subset of exactly ``round(rate * N)`` examples gets
    ``mapping[label]``; the rest keep their label. The realised rate is exact
    because the mapping has no fixed points.

    Args:
      labels: int (N,) clean labels in ``[0, num_classes)``.
      rate: fraction of examples to corrupt, in [0, 1).
      num_classes: K >= 2.
      seed: anything ``np.random.default_rng`` accepts.
      mapping: int (K,) with ``mapping[c] != c`` for every c; default
        ``c -> (c + 1) mod K`` (so class 0 -> class 1, as in the paper).

    Returns:
      :class:`NoisyLabels`.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _check_labels(labels, num_classes)
    rate = _check_rate(rate)
    table = _check_mapping(mapping, num_classes)
    return _adversarial(clean, rate, table, np.random.default_rng(seed))


# ----------------------------------------------------------------------------
# Class imbalance
# ----------------------------------------------------------------------------

def long_tailed_counts(n_max: int, factor: float, num_classes: int) -> np.ndarray:
    """Target size of each class: ``floor(n_max * factor ** (-c / (K - 1)))``.

    Class 0 keeps ``n_max`` and class K-1 keeps ``n_max / factor`` (Cui et al.
    2019's profile; floor as their ``int()`` cast, plus 1e-9 so that round-off
    just below a whole number cannot lose an example). Every class keeps at
    least 1. Returns int64 (K,).
    """
    num_classes = _check_num_classes(num_classes)
    _check_factor(factor)
    exponents = np.arange(num_classes) / (num_classes - 1)
    counts = np.floor(n_max * float(factor) ** -exponents + 1e-9).astype(np.int64)
    return np.maximum(counts, 1)


def _check_factor(factor) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.integer, np.floating)) \
            or not np.isfinite(factor) or factor < 1:
        raise ValueError(f"factor must be a finite number >= 1 (e.g. 10, 100, 200), got {factor!r}")
    return float(factor)


def _long_tailed(clean, factor, num_classes, rng):
    """Core of :func:`long_tailed` on validated int64 labels (N,)."""
    available = np.bincount(clean, minlength=num_classes)
    targets = np.minimum(long_tailed_counts(int(available.max()), factor, num_classes),
                         available)
    kept = [rng.choice(np.flatnonzero(clean == c), size=k, replace=False)
            for c, k in enumerate(targets)]
    return np.sort(np.concatenate(kept)).astype(np.int64)


def long_tailed(labels, factor: float, num_classes: int, *, seed) -> np.ndarray:
    """Long-tailed subsample: the indices of the examples to keep.

    Class ``c`` keeps ``min(n_c, long_tailed_counts(n_max, factor, K)[c])``
    examples chosen at random, where ``n_max`` is the size of the largest class
    (for balanced sets such as CIFAR, the size of every class). The imbalance
    factor is then (size of class 0) / (size of class K-1).

    Args:
      labels: int (N,) labels in ``[0, num_classes)``.
      factor: imbalance factor >= 1 (1 keeps everything of a balanced set).
      num_classes: K >= 2.
      seed: anything ``np.random.default_rng`` accepts.

    Returns:
      int64 (M,) sorted positions into ``labels``.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _check_labels(labels, num_classes)
    factor = _check_factor(factor)
    return _long_tailed(clean, factor, num_classes, np.random.default_rng(seed))


_NOISE_KINDS = ("uniform", "adversarial")


def long_tailed_noisy(labels, factor: float, rate: float, num_classes: int, *, seed,
                      noise: str = "uniform") -> LongTailedNoisy:
    """Imbalance, then label noise on what is kept (paper Table 9: factor + 40 % uniform).

    The subsample and the noise use independent streams spawned from ``seed``,
    so changing ``rate`` does not change which examples are kept.

    Args:
      labels: int (N,) clean labels.
      factor: imbalance factor >= 1.
      rate: noise rate in [0, 1).
      num_classes: K >= 2.
      seed: an int or ``np.random.SeedSequence``.
      noise: ``"uniform"`` or ``"adversarial"`` (default mappings).

    Returns:
      :class:`LongTailedNoisy` ``(indices (M,), noisy)``.
    """
    num_classes = _check_num_classes(num_classes)
    clean = _check_labels(labels, num_classes)
    factor = _check_factor(factor)
    rate = _check_rate(rate)
    if noise not in _NOISE_KINDS:
        raise ValueError(f"noise must be one of {list(_NOISE_KINDS)}, got {noise!r}")
    keep_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    kept = _long_tailed(clean, factor, num_classes, np.random.default_rng(keep_seq))
    noise_rng = np.random.default_rng(noise_seq)
    if noise == "uniform":
        noisy = _uniform(clean[kept], rate, num_classes, noise_rng, include_true=False)
    else:
        noisy = _adversarial(clean[kept], rate, _check_mapping(None, num_classes), noise_rng)
    return LongTailedNoisy(kept, noisy)


# ----------------------------------------------------------------------------
# Real noise from files
# ----------------------------------------------------------------------------

_FILE_FORMATS = (".npz", ".npy", ".csv")


def _read_csv_columns(path: str) -> dict[str, np.ndarray]:
    """Columns of a CSV as float arrays; headerless files give ``{"0": ..., "1": ...}``."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise ValueError(f"path {path!r}: empty CSV file")
    try:
        [float(v) for v in rows[0]]
        header, body = [str(i) for i in range(len(rows[0]))], rows
    except ValueError:
        header, body = [h.strip() for h in rows[0]], rows[1:]
    try:
        table = np.array([[float(v) for v in row] for row in body], np.float64)
    except ValueError as err:
        raise ValueError(f"path {path!r}: non-numeric CSV value ({err})") from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise ValueError(f"path {path!r}: every CSV row needs {len(header)} values")
    table = table.reshape(len(body), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}


def _read_label_columns(path: str) -> dict[str, np.ndarray]:
    """All label arrays in ``path``, by name (a ``.npy`` holds one, named ``"labels"``)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _FILE_FORMATS:
        raise ValueError(
            f"path must end in one of {list(_FILE_FORMATS)}, got {path!r} (convert a CIFAR-N "
            f".pt file with torch: np.savez(out, **{{k: np.asarray(v) for k, v in "
            f"torch.load(pt).items()}}))")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path!r}")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    if suffix == ".npy":
        return {"labels": np.load(path, allow_pickle=False)}
    return _read_csv_columns(path)


def from_file(path, *, key: str | None = None, clean_labels=None,
              num_classes: int | None = None) -> NoisyLabels:
    """Real-noise labels (e.g. CIFAR-10N / CIFAR-100N) from a file.

    Accepted formats (CIFAR-N ships torch ``.pt`` dicts; export them first):

    - ``.npz`` with one array per label set, e.g. ``clean_label``,
      ``worse_label``, ``aggre_label``, ``random_label1`` (CIFAR-10N) or
      ``noisy_label`` (CIFAR-100N); ``key`` picks one.
    - ``.npy``: a single 1-D integer array (``key`` must be None or "labels").
    - ``.csv``: columns with a header row (``key`` names the column) or a
      single headerless column.

    The clean labels for ``is_noisy``/``rate`` are ``clean_labels`` if given,
    else the file's ``clean_label`` array.

    Args:
      path: the file.
      key: which label set; required when the file holds several.
      clean_labels: int (N,) ground truth (e.g. ``Dataset.y_train``).
      num_classes: K; default ``max(clean) + 1``.

    Returns:
      :class:`NoisyLabels`.
    """
    path = os.fspath(path)
    columns = _read_label_columns(path)
    if key is None:
        candidates = [k for k in columns if k != "clean_label"]
        if len(candidates) != 1:
            raise ValueError(f"key must name one of {sorted(columns)} for {path!r}, got None")
        key = candidates[0]
    if key not in columns:
        raise ValueError(f"key must be one of {sorted(columns)} for {path!r}, got {key!r}")
    if clean_labels is None:
        if "clean_label" not in columns:
            raise ValueError(
                f"clean_labels is required: {path!r} has no 'clean_label' entry "
                f"(it has {sorted(columns)})")
        clean_labels = columns["clean_label"]
    clean_arr = np.asarray(clean_labels)
    if num_classes is None:
        num_classes = max(int(np.max(clean_arr)) + 1, 2) if clean_arr.size else 2
    num_classes = _check_num_classes(num_classes)
    clean = _check_labels(clean_arr, num_classes, "clean_labels")
    noisy = _check_labels(columns[key], num_classes, f"labels {key!r} in {path!r}")
    if noisy.size != clean.size:
        raise ValueError(
            f"labels {key!r} in {path!r} have length {noisy.size}, clean_labels {clean.size}")
    return _result(clean, noisy)
