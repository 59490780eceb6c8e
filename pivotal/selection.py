"""Meta-sample selection by weighted K-means (paper Algorithm 2, selection step).

Given per-example features ``G (N, D)`` (RBC or GBC, see ``pivotal.features``) and the indices of
the meta samples chosen so far, one round of Algorithm 2

1. removes the existing meta samples from the candidates;
2. removes the ``exclude_fraction`` of the remaining candidates that are most similar to any
   existing meta sample, the similarity being the weighted cosine S1,
   ``sim_j = max_e ||G_e|| |cos(G_j, G_e)|``;
3. clusters the rest into ``budget`` clusters with :func:`weighted_spherical_kmeans` (empty
   clusters lower the count, so fewer than ``budget`` samples may come back);
4. returns, for each cluster, the member closest to its centroid (largest ``|cos|``).
"""

from __future__ import annotations

import math
import numbers
import warnings

import jax.numpy as jnp
import numpy as np

from pivotal._checks import check_indices, check_int, check_key
from pivotal._placement import example_placement, num_shards, place_examples, to_host
from pivotal._rows import row_norms
from pivotal.kmeans import (DEFAULT_BLOCK_SIZE, as_scaled_features, assign_clusters, assign_rows,
                            weighted_spherical_kmeans)

__all__ = ["select_meta_samples", "remaining_candidates"]


def _padded_size(n: int) -> int:
    """``n`` rounded up to a coarse grid (<= 1/8 extra rows), so that rounds of selection with
    slightly different candidate counts reuse one compiled K-means."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def _candidates(G, existing: np.ndarray, exclude_fraction: float, *, stacklevel: int):
    """Cheap part: ``(candidates before exclusion, number to drop)``; warns about zero rows."""
    n = G.shape[0]
    norms = to_host(row_norms(G))
    is_existing = np.zeros(n, bool)
    is_existing[existing] = True
    zero = (norms == 0) & ~is_existing
    num_zero = int(zero.sum())
    if num_zero:
        warnings.warn(
            f"features has {num_zero} all-zero candidate rows; they have no direction and are "
            "excluded from selection",
            stacklevel=stacklevel + 1,
        )
    candidates = np.flatnonzero(~is_existing & ~zero)
    num_drop = math.floor(exclude_fraction * candidates.size) if existing.size else 0
    return candidates, num_drop, num_zero


def _drop_most_similar(G, candidates, existing, num_drop: int, block_size: int) -> np.ndarray:
    if not num_drop:
        return candidates
    # S1 similarity to the nearest existing meta sample, computed in row blocks (gathered one
    # block at a time on one device: no copy of the candidates' rows).
    if example_placement(G) is None:
        _, sim = assign_rows(G, jnp.asarray(candidates), G[existing], weighted=True,
                             block_size=block_size)
    else:
        _, sim = assign_clusters(G[candidates], G[existing], weighted=True, block_size=block_size)
    order = np.argsort(-to_host(sim), kind="stable")
    return np.sort(candidates[order[num_drop:]])


def _check_fraction(exclude_fraction) -> float:
    if (isinstance(exclude_fraction, bool) or not isinstance(exclude_fraction, numbers.Real)
            or not 0 <= exclude_fraction < 1):
        raise ValueError(f"exclude_fraction must be a number in [0, 1); got {exclude_fraction!r}")
    return float(exclude_fraction)


def remaining_candidates(features, *, existing=None, exclude_fraction: float = 0.5,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """The rows :func:`select_meta_samples` clusters: Algorithm 2's "remove those training samples
    that are close to D_meta".

    Drops the rows in ``existing`` and all-zero rows (with a warning), then, when ``existing`` is
    non-empty, the ``floor(exclude_fraction * num_candidates)`` candidates with the largest S1
    similarity to an existing meta sample, ``max_e ||G_e|| |cos(G_j, G_e)|`` (ties: the lower
    index is dropped first).

    Args:
      features: ``(N, D)`` finite float features.
      existing: optional ``(E,)`` unique indices in ``[0, N)``.
      exclude_fraction: in ``[0, 1)``.
      block_size: rows per block of the similarity computation.

    Returns:
      Sorted int64 numpy array of the remaining row indices.
    """
    G, _ = as_scaled_features(features, "features")  # exact power-of-two rescale if extreme
    existing = check_indices(existing, G.shape[0], "existing", unique=True)
    exclude_fraction = _check_fraction(exclude_fraction)
    block_size = check_int(block_size, "block_size")
    candidates, num_drop, _ = _candidates(G, existing, exclude_fraction, stacklevel=2)
    return _drop_most_similar(G, candidates, existing, num_drop, block_size)


def select_meta_samples(
    features,
    budget: int,
    key,
    *,
    existing=None,
    exclude_fraction: float = 0.5,
    weighted: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mesh=None,
    mesh_axis: str = "data",
    **kmeans_kwargs,
) -> np.ndarray:
    """Selects up to ``budget`` new meta samples (paper Algorithm 2).

    Candidates are the rows of ``features`` not in ``existing`` and not all-zero (a zero row has
    no direction; those rows are dropped with a warning). When ``existing`` is non-empty,
    ``floor(exclude_fraction * num_candidates)`` candidates with the largest S1 similarity to an
    existing meta sample, ``max_e ||G_e|| |cos(G_j, G_e)|``, are dropped (ties: the lower index
    goes first; see :func:`remaining_candidates`). The rest is clustered into ``budget`` clusters
    by weighted spherical K-means (``weighted=False``: the RBC-K ablation), and each cluster
    contributes the member with the largest ``|cos|`` to its centroid (ties: the lower index).

    Args:
      features: ``(N, D)`` finite float features ``G``.
      budget: number of clusters M, ``1 <= M <=`` number of candidates left after exclusion.
      key: ``jax.random`` key for the K-means seeding; same inputs and key give the same result.
      existing: optional ``(E,)`` indices of meta samples already chosen (unique, in ``[0, N)``).
      exclude_fraction: fraction of candidates to drop for being close to ``existing``, in
        ``[0, 1)``; ignored when ``existing`` is empty.
      weighted: weighted (S1/S2) or unweighted K-means.
      block_size: rows per block of every pass over the data.
      mesh: optional ``jax.sharding.Mesh``: the candidates' rows are split over ``mesh_axis``
        and the K-means and the final assignment run sharded (local assignments, all-reduced
        centroid sums; see :func:`weighted_spherical_kmeans`). Default: the example sharding of
        ``features`` when it has one, else one device. Same result either way for device counts
        that are powers of two up to 512. (The candidates are zero-padded to a multiple of the
        device count; with other counts and more than 4096 candidates the k-means++ subsample
        is then drawn from a differently padded array: a valid run, not an identical one.)
      mesh_axis: the mesh axis of the example dimension.
      **kmeans_kwargs: forwarded to :func:`weighted_spherical_kmeans` (``max_iters``, ``tol``,
        ``seed_sample_size``).

    Returns:
      ``(K,)`` int32 numpy array of row indices into ``features``, ``K <= budget``, unique, none
      in ``existing``, one per non-empty cluster, in cluster order.
    """
    # Features whose squared norms would overflow (e.g. entries ~1e18 in float32) are rescaled
    # by a common power of two: exact, and the selection does not depend on a common factor.
    G, _ = as_scaled_features(features, "features")
    n = G.shape[0]
    budget = check_int(budget, "budget")
    exclude_fraction = _check_fraction(exclude_fraction)
    existing = check_indices(existing, n, "existing", unique=True)
    check_key(key)
    block_size = check_int(block_size, "block_size")
    for name in ("num_clusters", "init"):
        if name in kmeans_kwargs:
            raise TypeError(f"select_meta_samples got an unexpected keyword argument {name!r}")
    placement = example_placement(G) if mesh is None else (mesh, mesh_axis)
    if placement is not None:
        num_shards(placement)  # validates the mesh and the axis

    candidates, num_drop, num_zero = _candidates(G, existing, exclude_fraction, stacklevel=2)
    num_left = candidates.size - num_drop
    if budget > num_left:
        raise ValueError(
            f"budget ({budget}) exceeds the number of candidates left ({num_left}: {n} rows minus "
            f"{existing.size} existing, {num_zero} all-zero and {num_drop} excluded as too similar "
            "to existing meta samples)"
        )
    candidates = _drop_most_similar(G, candidates, existing, num_drop, block_size)

    # Zero padding rows carry no weight in the K-means (documented there); they only keep the
    # compiled shapes stable across rounds, and split evenly over the devices.
    padded = _padded_size(candidates.size)
    if placement is not None:
        padded = -(-padded // num_shards(placement)) * num_shards(placement)
    # One gather: the indices past N ("fill") give the zero padding rows without a second copy.
    rows = np.concatenate([candidates, np.full(padded - candidates.size, n, candidates.dtype)])
    Gc = jnp.take(G, jnp.asarray(rows), axis=0, mode="fill", fill_value=0)
    if placement is not None:
        Gc = place_examples(Gc, placement)
    # Budgets rounded up to a multiple of 8 share one compiled K-means (surplus clusters are zero).
    kmeans_kwargs.setdefault("cluster_capacity", -(-budget // 8) * 8)
    # Both respect the sharding of Gc.
    result = weighted_spherical_kmeans(Gc, budget, key, weighted=weighted, block_size=block_size,
                                       **kmeans_kwargs)

    # |cos| of every candidate to its own centroid. The S1 argmax reproduces result.assignments,
    # and the S1 value divided by ||C_a|| is |cos|.
    assign, sim = assign_clusters(Gc, result.centroids, weighted=weighted, block_size=block_size)
    assign = to_host(assign)[: candidates.size]
    sim = to_host(sim)[: candidates.size]
    if weighted:
        cnorm = np.asarray(row_norms(result.centroids))
        sim = sim / cnorm[assign]
    # Per cluster, the largest |cos| first, then the lowest index.
    order = np.lexsort((np.arange(candidates.size), -sim, assign))
    first = np.ones(order.size, bool)
    first[1:] = assign[order][1:] != assign[order][:-1]
    picks = order[first]
    return candidates[picks].astype(np.int32)
