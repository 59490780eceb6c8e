"""The quantities the paper reports about its selection objective, as functions.

* :func:`msso_objective`: the meta-sample search objective (Eq. 8) of a meta set.
* :func:`mco_objective`: the M-clustering objective (Eq. 9) of a set of centroids.
* :func:`theorem1_ratio`: the per-example dominance ratio ``D_j`` of Theorem 1 (Table 4).
* :func:`stable_examples`: the examples whose nearest centroid survives adding the labels back
  (Theorem 2, Table 5).

All of them take features ``G (N, D)`` row by row in blocks, so memory is ``O(block x M)`` besides
the inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pivotal._checks import as_features, check_int
from pivotal._rows import blocked_rows
from pivotal.kmeans import DEFAULT_BLOCK_SIZE, assign_clusters

__all__ = ["msso_objective", "mco_objective", "theorem1_ratio", "stable_examples"]


def _pair(features, others, others_name: str):
    G = as_features(features, "features")
    C = as_features(others, others_name)
    if C.shape[1] != G.shape[1]:
        raise ValueError(
            f"{others_name} must have as many columns as features ({G.shape[1]}); got shape {tuple(C.shape)}"
        )
    dtype = jnp.result_type(G.dtype, C.dtype)
    return G.astype(dtype), C.astype(dtype)


@jax.jit
def _msso(G, meta):
    # sum_i <G_j, G_meta_i> = <G_j, sum_i G_meta_i>: one matrix-vector product.
    return jnp.sum(jnp.abs(G @ jnp.sum(meta, axis=0)))


def msso_objective(features, meta_features) -> jax.Array:
    """Meta-sample search objective, paper Eq. 8, for a given meta set.

    ``MSSO = sum_j |sum_i <G_j, G_meta_i>|``. With centroids in place of ``meta_features`` it is
    the left-hand side of Theorem 1.

    Args:
      features: ``(N, D)`` features of the training examples.
      meta_features: ``(M, D)`` features of the meta samples (or centroids).

    Returns:
      A scalar.
    """
    G, meta = _pair(features, meta_features, "meta_features")
    return _msso(G, meta)


def _terms(G, C, block_size):
    """Per-row ``(sum_i |<G_j, C_i>|, P_j, N_j)`` with P/N the sums of the positive/negative terms."""

    def fn(Gb):
        dots = Gb @ C.T
        pos = jnp.sum(jnp.where(dots > 0, dots, 0), axis=1)
        neg = -jnp.sum(jnp.where(dots < 0, dots, 0), axis=1)
        return pos + neg, pos, neg

    return blocked_rows(fn, G, (), block_size)


@functools.partial(jax.jit, static_argnames="block_size")
def _mco(G, C, block_size):
    return jnp.sum(_terms(G, C, block_size)[0])


def mco_objective(features, centroids, *, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """M-clustering objective, paper Eq. 9, for given centroids.

    ``MCO = sum_j sum_i |<G_j, C_i>| = sum_j ||G_j|| sum_i ||C_i|| |cos(G_j, C_i)|`` (Eq. 10).
    Note that this sums over all centroids, while the K-means objective
    (``KMeansResult.objective``) keeps only each example's own centroid.

    Args:
      features: ``(N, D)``.
      centroids: ``(M, D)``.
      block_size: rows per block.

    Returns:
      A scalar.
    """
    G, C = _pair(features, centroids, "centroids")
    return _mco(G, C, check_int(block_size, "block_size"))


@functools.partial(jax.jit, static_argnames="block_size")
def _ratio(G, C, block_size):
    _, pos, neg = _terms(G, C, block_size)
    hi, lo = jnp.maximum(pos, neg), jnp.minimum(pos, neg)
    return jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1), jnp.inf)


def theorem1_ratio(features, centroids, *, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Per-example dominance ratio ``D_j`` of Theorem 1 (the paper's Table 4 reports its statistics).

    ``P_j = sum_{i: <G_j, C_i> > 0} <G_j, C_i>``, ``N_j = |sum_{i: <G_j, C_i> < 0} <G_j, C_i>|`` and
    ``D_j = max(P_j, N_j) / min(P_j, N_j)``, ``inf`` when one side is empty (all nonzero terms
    share a sign, or all terms are zero, e.g. for a zero row).

    Theorem 1: with ``D = min_j D_j``, ``(D - 1) / (D + 1) <= MSSO / MCO <= 1`` where both are
    evaluated at the same centroids, ``msso_objective(G, C) / mco_objective(G, C)``. Per example,
    ``|P_j - N_j| / (P_j + N_j) = (D_j - 1) / (D_j + 1)``, which is increasing in ``D_j``; summing
    over j gives the bound. (The theorem is vacuous when ``D = 1``.)

    Args:
      features: ``(N, D)``.
      centroids: ``(M, D)`` centroids (or meta-sample features).
      block_size: rows per block.

    Returns:
      ``(N,)`` ratios, each ``>= 1`` or ``inf``.
    """
    G, C = _pair(features, centroids, "centroids")
    return _ratio(G, C, check_int(block_size, "block_size"))


def _check_same_rows(reference, other, reference_name: str, other_name: str) -> None:
    if other.shape[0] != reference.shape[0]:
        raise ValueError(f"{other_name} must have one row per row of {reference_name} "
                         f"({reference.shape[0]}); got {other.shape[0]}")


def stable_examples(
    label_free_features,
    label_aware_features,
    label_free_centroids,
    label_aware_centroids,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Examples whose nearest centroid is the same with and without labels (Theorem 2, Table 5).

    The paper clusters label-free features ``G~_j`` (only the ``softmax`` part of the
    cross-entropy gradient, Eq. S15-S16) and asks which examples would still be nearest to the
    same centroid if the similarity were measured on the label-aware gradients ``G_j`` against the
    label-aware counterparts of the centroids (``G_meta,i`` in Theorem 2). Example j is *stable*
    when

        argmax_i |<G~_j, C~_i>|  ==  argmax_i |<G_j, C_i>|,

    i.e. its weighted-S1 assignment (``||C_i|| |cos|``; ``||G_j||`` does not depend on i) agrees
    across the two feature spaces. Ties go to the lowest index, as in :func:`assign_clusters`.

    Row i of the two centroid arrays must describe the same cluster. The paper's choice (Theorem 2)
    is the selected meta samples themselves: ``label_free_features[meta]`` and
    ``label_aware_features[meta]``. Another is the K-means centroids in the label-free space and,
    in the label-aware space, the S2 centroids of the same clusters,
    ``cluster_centroids(label_aware_features, result.assignments, M, reference=...)``.

    Args:
      label_free_features: ``(N, D)`` label-free features ``G~`` (e.g. RBC with ``labels=None``).
      label_aware_features: ``(N, D')`` label-aware features ``G`` of the same examples, same order.
      label_free_centroids: ``(M, D)``.
      label_aware_centroids: ``(M, D')``.
      block_size: rows per block.

    Returns:
      ``(N,)`` boolean mask; ``mask.sum()`` is the count the paper's Table 5 reports.
    """
    free = as_features(label_free_features, "label_free_features")
    aware = as_features(label_aware_features, "label_aware_features")
    _check_same_rows(free, aware, "label_free_features", "label_aware_features")
    c_free = as_features(label_free_centroids, "label_free_centroids")
    c_aware = as_features(label_aware_centroids, "label_aware_centroids")
    _check_same_rows(c_free, c_aware, "label_free_centroids", "label_aware_centroids")
    for name, feats, cents in (("label_free_centroids", free, c_free), ("label_aware_centroids", aware, c_aware)):
        if cents.shape[1] != feats.shape[1]:
            raise ValueError(f"{name} must have {feats.shape[1]} columns like its features; got shape "
                             f"{tuple(cents.shape)}")
    a_free, _ = assign_clusters(free, c_free, weighted=True, block_size=block_size)
    a_aware, _ = assign_clusters(aware, c_aware, weighted=True, block_size=block_size)
    return a_free == a_aware
