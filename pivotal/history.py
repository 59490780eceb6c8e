"""Checkpoint history (paper Alg. 3): features from several parameter snapshots, concatenated.

* :func:`sample_snapshot_epochs`: the snapshots, drawn uniformly from the epochs after the
  best-validation epoch ``t*``.
* :func:`spaced_snapshot_epochs`: the deterministic alternative for long runs that keep only
  a few snapshots (the paper's "every 20 epochs after t*"), and :func:`snapshots_to_keep`, the
  rolling set a run keeps on disk so that those epochs exist whatever ``t*`` turns out to be.
* :func:`history_features`: ``G_j = [F(theta_{t_1})_j, ..., F(theta_{t_K})_j]`` for any
  ``feature_fn(params, key)``, e.g. :func:`pivotal.rbc.make_rbc_feature_fn` or
  :func:`pivotal.gbc.make_gbc_feature_fn`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import check_int, check_key

__all__ = ["history_features", "sample_snapshot_epochs", "snapshot_key", "snapshots_to_keep",
           "spaced_snapshot_epochs"]

PyTree = Any


def sample_snapshot_epochs(
    num_epochs: int | Sequence[int],
    best_epoch: int,
    num_snapshots: int,
    key: jax.Array,
    *,
    every: int | None = None,
) -> np.ndarray:
    """Epochs whose parameter snapshots feed the features (paper Alg. 3, first line).

    Convention: epochs are 0-based. ``num_epochs = T`` means snapshots ``0..T-1`` exist
    (or pass the sequence of cached epoch indices). The candidates are the epochs
    strictly after the best-validation epoch ``t*`` (``t*+1 .. T-1``); with ``every=k``
    only ``t*+k, t*+2k, ...`` (the paper's "every 20 epochs after t*"). ``num_snapshots``
    of them are drawn uniformly without replacement and returned sorted.

    * Fewer candidates than ``num_snapshots``: all are returned, with a warning.
    * No candidate (t* is the last epoch): the last available epoch is returned, with a
      warning.

    Returns:
      ``(K,)`` sorted int64 epoch indices, deterministic given ``key``.
    """
    if isinstance(num_epochs, (int, np.integer)) and not isinstance(num_epochs, bool):
        check_int(num_epochs, "num_epochs")
        available = np.arange(num_epochs)
    elif isinstance(num_epochs, Sequence) or isinstance(num_epochs, np.ndarray):
        available = np.unique(np.asarray(num_epochs))
        if available.size == 0 or available.ndim != 1 or not np.issubdtype(available.dtype, np.integer):
            raise ValueError(f"num_epochs as a sequence must hold at least one integer epoch index; got {num_epochs!r}")
    else:
        raise TypeError(f"num_epochs must be an int or a sequence of epoch indices; got {type(num_epochs)}")
    check_int(best_epoch, "best_epoch", low=0)
    if best_epoch > available.max():
        raise ValueError(f"best_epoch must lie in [0, {available.max()}]; got {best_epoch}")
    check_int(num_snapshots, "num_snapshots")
    check_int(every, "every", allow_none=True)
    check_key(key)

    candidates = available[available > best_epoch]
    if every is not None:
        candidates = candidates[(candidates - best_epoch) % every == 0]
    if candidates.size == 0:
        warnings.warn(
            f"no snapshot after best_epoch={best_epoch}; falling back to the last epoch {available.max()}.",
            stacklevel=2,
        )
        return np.array([available.max()], dtype=np.int64)
    if candidates.size < num_snapshots:
        warnings.warn(
            f"asked for {num_snapshots} snapshots but only {candidates.size} epochs follow "
            f"best_epoch={best_epoch}; using all of them.",
            stacklevel=2,
        )
        return candidates.astype(np.int64)
    chosen = np.asarray(jax.random.choice(key, candidates.size, shape=(num_snapshots,), replace=False))
    return np.sort(candidates[chosen]).astype(np.int64)


def _check_rule_args(num_epochs, best_epoch, num_snapshots, every) -> None:
    check_int(num_epochs, "num_epochs")
    check_int(best_epoch, "best_epoch", low=0)
    if best_epoch >= num_epochs:
        raise ValueError(f"best_epoch must lie in [0, num_epochs - 1 = {num_epochs - 1}]; got {best_epoch}")
    check_int(num_snapshots, "num_snapshots")
    check_int(every, "every")


def spaced_snapshot_epochs(num_epochs: int, best_epoch: int, num_snapshots: int, every: int) -> np.ndarray:
    r"""The ``K`` snapshot epochs of a run of ``T`` epochs with best-validation epoch ``t*``,
    spaced at most ``every`` apart (paper Alg. 3 with its "every 20 epochs after t*").

    Epochs are 0-based; ``a = T - 1 - t*`` epochs follow ``t*``.

    * ``a >= K``: ``t* + d, t* + 2d, ..., t* + K d`` with ``d = min(every, floor(a / K))``:
      the paper's grid when the run is long enough after ``t*`` (``a >= K every``), else the
      same ``K`` epochs squeezed evenly into what follows ``t*``. ``K`` distinct epochs, all
      after ``t*`` and ``<= T - 1``.
    * ``a < K``: the last ``min(K, T)`` epochs of the run, ``max(0, T - K) .. T - 1``: every
      epoch after ``t*``, ``t*`` itself, then the epochs before it nearest first. (``a = K - 1``
      still gives ``K`` epochs at or after ``t*``.)

    Deterministic: no key. :func:`snapshots_to_keep` is what a run must keep on disk for it.

    Returns:
      ``(min(K, T),)`` sorted int64 epochs.
    """
    _check_rule_args(num_epochs, best_epoch, num_snapshots, every)
    after = num_epochs - 1 - best_epoch
    if after >= num_snapshots:
        step = min(every, after // num_snapshots)
        return best_epoch + step * np.arange(1, num_snapshots + 1, dtype=np.int64)
    return np.arange(max(0, num_epochs - num_snapshots), num_epochs, dtype=np.int64)


def snapshots_to_keep(num_epochs: int, best_epoch: int, epoch: int, num_snapshots: int, every: int) -> np.ndarray:
    r"""The snapshots a run of ``T`` epochs keeps on disk after ``epoch``, when its best
    validation so far was at ``best_epoch <= epoch``: those that
    :func:`spaced_snapshot_epochs` may still ask for.

    ``(spaced_snapshot_epochs(T, best_epoch, K, every) \cup \{T - K, ..., T - 1\}) \cap [0, epoch]``.

    Why this suffices: with ``t*`` the final best epoch (the first maximum, as the run keeps
    it), at every epoch ``x >= t*`` the best so far is ``t*``, so each of ``t*``'s spaced epochs
    after ``t*`` is kept when it is trained and stays kept; its epochs before ``t*`` (only when
    fewer than ``K`` follow it) lie in the last ``K`` epochs, which are always kept. Each new
    best replaces the previous best's epochs, so at most ``2K`` snapshots are on disk at once
    (``K`` for the best so far, ``K`` for the end of the run).

    Returns:
      sorted int64 epochs ``<= epoch``.
    """
    _check_rule_args(num_epochs, best_epoch, num_snapshots, every)
    check_int(epoch, "epoch", low=best_epoch)
    if epoch >= num_epochs:
        raise ValueError(f"epoch must lie in [best_epoch, num_epochs - 1 = {num_epochs - 1}]; got {epoch}")
    tail = np.arange(max(0, num_epochs - num_snapshots), num_epochs, dtype=np.int64)
    keep = np.union1d(spaced_snapshot_epochs(num_epochs, best_epoch, num_snapshots, every), tail)
    return keep[keep <= epoch]


def snapshot_key(key: jax.Array, epoch: int) -> jax.Array:
    """The key :func:`history_features` (called with ``key``) gives snapshot ``epoch``'s
    ``feature_fn``: ``fold_in(k_base, epoch)`` with ``k_epochs, k_base = split(key)``; the
    epoch draw of :func:`sample_snapshot_epochs` there uses ``k_epochs``. E.g. to predict what
    a GBC ``feature_fn`` will draw (:func:`pivotal.gbc.gbc_layer_draw`) before forming it."""
    check_key(key)
    check_int(epoch, "epoch", low=0)
    return jax.random.fold_in(jax.random.split(key)[1], int(epoch))


def history_features(
    feature_fn: Callable[[PyTree, jax.Array], jax.Array],
    snapshots: Sequence[PyTree] | Mapping[int, PyTree],
    key: jax.Array,
    *,
    epochs: Sequence[int] | None = None,
    best_epoch: int | None = None,
    num_snapshots: int | None = None,
    every: int | None = None,
    return_epochs: bool = False,
):
    """Concatenate features from several parameter snapshots (paper Alg. 3).

    ``G_j = [F(theta_{t_1})_j, ..., F(theta_{t_K})_j]`` with ``F = feature_fn``: its
    inner products sum those of the per-snapshot features, i.e. the sum over time steps
    in the paper's Eq. 9, estimated on the sampled ``t_1 < ... < t_K``.

    Which snapshots:

    * ``epochs`` given: exactly those (sorted; indices into ``snapshots``).
    * else ``best_epoch`` and ``num_snapshots`` given: drawn by
      :func:`sample_snapshot_epochs` over the epochs of ``snapshots``.
    * else every snapshot.

    ``snapshots`` is a sequence indexed by epoch, or a mapping ``{epoch: params}`` (only
    some epochs cached). Example order is whatever ``feature_fn`` produces and must be
    the same for every snapshot (build it on one fixed, unshuffled batch); block ``k``
    comes from the ``k``-th chosen epoch in increasing order.

    Keys: ``key`` is split into one key for the epoch draw and a base key; snapshot
    ``t`` gets ``fold_in(base, t)``, so its block does not depend on which other epochs
    were drawn. For RBC ``feature_fn`` can ignore the key (see
    :func:`make_rbc_feature_fn`); GBC uses it for its layer draw
    (:func:`make_gbc_feature_fn`).

    Args:
      feature_fn: ``feature_fn(params, key) -> (N, D_k)``.
      snapshots: the cached parameters.
      key: ``jax.random`` key.

    Returns:
      ``(N, sum_k D_k)``; ``(features, epochs)`` with ``return_epochs``.
    """
    if not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable as feature_fn(params, key); got {type(feature_fn)}")
    if isinstance(snapshots, Mapping):
        available = sorted(int(e) for e in snapshots)
    elif isinstance(snapshots, Sequence) and not isinstance(snapshots, str):
        available = list(range(len(snapshots)))
    else:
        raise TypeError(f"snapshots must be a sequence indexed by epoch or a mapping epoch -> params; "
                        f"got {type(snapshots)}")
    if not available:
        raise ValueError("snapshots must hold at least one snapshot; got none")
    check_key(key)

    key_epochs, key_features = jax.random.split(key)
    if epochs is not None:
        chosen = np.unique(np.asarray(epochs))
        if chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
            raise ValueError(f"epochs must be a non-empty sequence of integer epochs; got {epochs!r}")
        unknown = [int(e) for e in chosen if int(e) not in set(available)]
        if unknown:
            raise ValueError(f"epochs must name existing snapshots ({available}); got unknown epochs {unknown}")
    elif best_epoch is not None or num_snapshots is not None:
        if best_epoch is None or num_snapshots is None:
            raise ValueError("best_epoch and num_snapshots must be passed both (or epochs, or neither); got one")
        chosen = sample_snapshot_epochs(available, best_epoch, num_snapshots, key_epochs, every=every)
    else:
        chosen = np.asarray(available)

    blocks = []
    n_rows = None
    for epoch in chosen:
        block = feature_fn(snapshots[int(epoch)], jax.random.fold_in(key_features, int(epoch)))  # = snapshot_key
        if jnp.ndim(block) != 2:
            raise ValueError(f"feature_fn must return (N, D); got shape {jnp.shape(block)} for epoch {int(epoch)}")
        if n_rows is not None and block.shape[0] != n_rows:
            raise ValueError(
                f"feature_fn must describe the same examples in the same order for every snapshot; got "
                f"{block.shape[0]} rows for epoch {int(epoch)} but {n_rows} before"
            )
        n_rows = block.shape[0]
        blocks.append(block)
    features = jnp.concatenate(blocks, axis=1)
    chosen = np.asarray(chosen, dtype=np.int64)
    return (features, chosen) if return_epochs else features
