"""Lloyd iterations of the weighted spherical K-means (paper Algorithm 1, Eq. S1-S2).

    assignment (S1):  a_j = argmax_i ||C_i|| |cos(G_j, C_i)|   (= argmax_i |<G_j, C_i>|)
    update (S2):      C_i = sum_{j: a_j = i} s_j G_j / sum_{j: a_j = i} ||G_j||,
                      s_j = sign(<G_j, C_i>)  (+1 where the inner product is exactly 0);

with ``weighted=False`` (the RBC-K ablation) the assignment is ``argmax_i |cos(G_j, C_i)|`` and the
centroid the mean of the sign-aligned unit vectors. Zero rows carry no weight in any sum.

* :func:`lloyd_pass`: one blocked pass, the assignments and the S2 numerators in one read of
  the data, used by every Lloyd loop of the library (in memory, per shard, per host block);
* :func:`lloyd_loop`: the incremental Lloyd loop of one K-means run, in one ``lax.while_loop``;
* :func:`search_directions`, :func:`assign_block`, :func:`member_weights`,
  :func:`cluster_mass`, :func:`blocked_cluster_sums`, :func:`sum_updater`,
  :func:`next_centroids`, :func:`converged`: the S1/S2 pieces they are made of (shared with the
  bounded loop of :mod:`pivotal.elkan`).

See :mod:`pivotal.kmeans` for the seeding, the restarts and the user-facing functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pivotal._rows import block_start, fresh_rows, num_blocks, row_norms

__all__ = ["assign_block", "blocked_cluster_sums", "cluster_mass", "converged", "lloyd_loop", "lloyd_pass", "loop_start",
           "member_weights", "next_centroids", "score_block", "search_directions", "sparse_tier_sizes", "sum_updater"]


def search_directions(C: jax.Array, weighted: bool) -> jax.Array:
    """Directions whose |inner product| with G_j is maximised by the assignment step, ``(M, D)``.

    S1 is ``||C_i|| |cos(G_j, C_i)| = |<G_j, C_i>| / ||G_j||``; ``||G_j||`` does not depend on i,
    so the weighted argmax is that of ``|<G_j, C_i>|``. Unweighted, the centroids are normalised
    first (a zero centroid stays zero and never wins).
    """
    if weighted:
        return C
    norms = row_norms(C)
    return C / jnp.where(norms > 0, norms, 1)[:, None]


def score_block(Gb, directions):
    """Assignment of one block and its scores: ``(a (B,) int32, d (B,) = <G_j, dir_{a_j}>,
    dots (B, M) = G_b dir^T)``."""
    dots = Gb @ directions.T  # (B, M)
    a = jnp.argmax(jnp.abs(dots), axis=1).astype(jnp.int32)
    d = jnp.take_along_axis(dots, a[:, None], axis=1)[:, 0]
    return a, d, dots


def assign_block(Gb, directions):
    """Assignment of one block: ``(a (B,) int32, d (B,) = <G_j, dir_{a_j}>)``."""
    a, d, _ = score_block(Gb, directions)
    return a, d


def member_weights(norms, signs, weighted: bool):
    """Per-row ``(scale (N,), mass (N,))``: row j adds ``scale_j G_j`` and ``mass_j`` to its cluster."""
    nonzero = norms > 0
    if weighted:
        return jnp.where(nonzero, signs, 0), norms
    return jnp.where(nonzero, signs / jnp.where(nonzero, norms, 1), 0), nonzero.astype(norms.dtype)


def blocked_cluster_sums(G: jax.Array, assignments: jax.Array, scale: jax.Array, num_clusters: int,
                          block: int) -> jax.Array:
    """``(M, D)`` sums ``S_i = sum_{j: a_j = i} scale_j G_j``, one ``(M, B) x (B, D)`` product per block.

    The one-hot weights are built per block, so nothing of size N x M is materialised.
    """
    n = G.shape[0]
    block = min(block, n)

    def body(b, acc):
        start = block_start(b, n, block)
        Gb = jax.lax.dynamic_slice_in_dim(G, start, block)
        ab = jax.lax.dynamic_slice_in_dim(assignments, start, block)
        sb = jax.lax.dynamic_slice_in_dim(scale, start, block)
        # Rows already covered by the previous block must not be counted twice.
        fresh = fresh_rows(b, start, block)
        W = jax.nn.one_hot(ab, num_clusters, dtype=G.dtype) * jnp.where(fresh, sb, 0)[:, None]
        return acc + W.T @ Gb

    init = jnp.zeros((num_clusters, G.shape[1]), G.dtype)
    return jax.lax.fori_loop(0, num_blocks(n, block), body, init)


def lloyd_pass(G, norms, C, *, weighted: bool, block: int, with_sums: bool = True, with_scores: bool = False):
    """One blocked pass of a Lloyd step over the rows of ``G`` under centroids ``C``.

    The assignment (S1, or |cos| when ``weighted=False``) of every row and, with ``with_sums``,
    the S2 numerator of those assignments, built in the same pass (one ``(M, B) x (B, D)``
    product per block of ``block`` rows), so the data is read once. Used by every Lloyd loop of
    the library: on all rows, per shard inside ``shard_map`` (the sums are then partial and
    all-reduced by the caller) and per host block by :func:`pivotal.outofcore.kmeans_memmap`.

    Args:
      G: ``(n, D)`` rows; norms: ``(n,)`` their norms; C: ``(M, D)`` centroids.

    Returns:
      ``(assignments (n,) int32, signs (n,) = sign <G_j, C_{a_j}> (+1 on 0), objective, num)``
      with ``objective = sum_j |<G_j, C_{a_j}>|`` and ``num (M, D) = sum_{j in i} scale_j G_j``
      (zeros without ``with_sums``); ``scale_j`` as in :func:`member_weights`. With
      ``with_scores``, a fifth output: the ``(n, M)`` scores ``|<G_j, dir_i>|`` of every row and
      search direction (what :mod:`pivotal.elkan` starts its bounds from).
    """
    n, dim = G.shape
    m = C.shape[0]
    dtype = G.dtype
    block = min(block, n)
    directions = search_directions(C, weighted)
    # |<G_j, C_i>| = |<G_j, C_i / ||C_i||>| ||C_i|| when the search directions are normalised.
    obj_scale = jnp.ones((m,), dtype) if weighted else row_norms(C)

    def body(b, carry):
        a_all, s_all, obj, num = carry[:4]
        start = block_start(b, n, block)
        Gb = jax.lax.dynamic_slice_in_dim(G, start, block)
        a, d, dots = score_block(Gb, directions)
        s = jnp.where(d < 0, -1, 1).astype(dtype)
        # Rows already covered by the previous block must not be counted twice.
        fresh = fresh_rows(b, start, block)
        obj = obj + jnp.sum(jnp.where(fresh, jnp.abs(d) * obj_scale[a], 0))
        if with_sums:
            scale, _ = member_weights(jax.lax.dynamic_slice_in_dim(norms, start, block), s, weighted)
            W = jax.nn.one_hot(a, m, dtype=dtype) * jnp.where(fresh, scale, 0)[:, None]
            num = num + W.T @ Gb
        a_all = jax.lax.dynamic_update_slice_in_dim(a_all, a, start, 0)
        s_all = jax.lax.dynamic_update_slice_in_dim(s_all, s, start, 0)
        if with_scores:
            return a_all, s_all, obj, num, jax.lax.dynamic_update_slice_in_dim(carry[4], jnp.abs(dots), start, 0)
        return a_all, s_all, obj, num

    init = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), dtype), jnp.zeros((), dtype),
            jnp.zeros((m, dim), dtype))
    if with_scores:
        init += (jnp.zeros((n, m), dtype),)
    return jax.lax.fori_loop(0, num_blocks(n, block), body, init)


def cluster_mass(norms, assignments, signs, num_clusters: int, *, weighted: bool):
    """``(den (M,), count (M,) int32)``: the S2 denominators and nonzero member counts."""
    _, mass = member_weights(norms, signs, weighted)
    nonzero = (norms > 0).astype(jnp.int32)
    return (jax.ops.segment_sum(mass, assignments, num_clusters),
            jax.ops.segment_sum(nonzero, assignments, num_clusters))


def sparse_tier_sizes(n: int, block: int) -> tuple[int, ...]:
    """Static sizes of the changed-row buffers of the incremental update (smallest that fits wins).

    Capped at two blocks so the gathered rows never cost more memory than the blocked passes.
    """
    cap = max(1, 2 * min(block, n))
    # Small problems get one tier: the saving is negligible there, the compile time is not.
    divisors = (256, 32, 8) if n >= 16384 else (8,)
    return tuple(sorted({min(cap, max(1, n // k)) for k in divisors}))


def sum_updater(G, norms, num_clusters: int, *, weighted: bool, block: int, sparse_tiers):
    """``(update, rebuild)``: the two ways a Lloyd loop refreshes its S2 sums after an assignment.

    Both map ``(a, s, a_old, s_old, num, den, count)`` to the new ``(num (M, D), den (M,),
    count (M,) int32)`` of ``(a, s)`` over the rows of ``G``. ``rebuild`` recomputes them, one
    ``(M, B) x (B, D)`` product per block. ``update`` patches them from the rows whose
    (cluster, sign) changed: it keeps them when nothing moved, gathers the changed rows into the
    smallest of the static ``sparse_tiers`` buffers that fits (an ``(M, K) x (K, D)`` product),
    and rebuilds when more rows moved than the largest buffer holds.
    """
    n = G.shape[0]
    m = num_clusters
    dtype = G.dtype
    nonzero = norms > 0

    def make_patch(size):
        def patch(a, s, a_old, s_old, num, den, count):
            # Only rows whose (cluster, sign) changed move mass: subtract their old contribution
            # and add the new one.
            changed = (a != a_old) | (s != s_old)
            # Compact the changed rows' indices into `size` slots (a cumsum and a scatter; cheaper
            # to compile than jnp.nonzero). Unused slots point at row 0 and are masked by `valid`.
            slot = jnp.where(changed, jnp.cumsum(changed) - 1, size)
            idx = jnp.zeros((size,), jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
            valid = (jnp.arange(size) < jnp.sum(changed)).astype(dtype)
            scale_new, mass = member_weights(norms[idx], s[idx], weighted)
            scale_old, _ = member_weights(norms[idx], s_old[idx], weighted)
            # one_hot(-1) is all zeros: rows never assigned before remove nothing.
            oh_new = jax.nn.one_hot(a[idx], m, dtype=dtype) * valid[:, None]
            oh_old = jax.nn.one_hot(a_old[idx], m, dtype=dtype) * valid[:, None]
            W = oh_new * scale_new[:, None] - oh_old * scale_old[:, None]
            num = num + W.T @ G[idx]
            den = den + (oh_new - oh_old).T @ mass
            count = count + jnp.round((oh_new - oh_old).T @ nonzero[idx].astype(dtype)).astype(jnp.int32)
            # Clear the float residue of clusters that just emptied, so they read as exactly empty.
            num = jnp.where((count > 0)[:, None], num, 0)
            den = jnp.where(count > 0, den, 0)
            return num, den, count

        return patch

    def rebuild(a, s, a_old, s_old, num, den, count):
        del a_old, s_old, num, den, count
        scale, _ = member_weights(norms, s, weighted)
        return (blocked_cluster_sums(G, a, scale, m, block),) + cluster_mass(norms, a, s, m, weighted=weighted)

    def keep(a, s, a_old, s_old, num, den, count):
        del a, s, a_old, s_old
        return num, den, count

    branches = (keep,) + tuple(make_patch(c) for c in sparse_tiers) + (rebuild,)

    def update(a, s, a_old, s_old, num, den, count):
        num_changed = jnp.sum((a != a_old) | (s != s_old), dtype=jnp.int32)
        tier = jnp.searchsorted(jnp.asarray(sparse_tiers, jnp.int32), num_changed).astype(jnp.int32)
        # Branch 0 keeps the sums (nothing moved), then the tiers, then a full rebuild.
        branch = jnp.where(num_changed == 0, 0, 1 + tier).astype(jnp.int32)
        return jax.lax.switch(branch, branches, a, s, a_old, s_old, num, den, count)

    return update, rebuild


def next_centroids(num, den, count, previous):
    """S2 centroids from the all-reduced sums; empty clusters keep their previous centroid (they
    may win members back later)."""
    return jnp.where((count > 0)[:, None], num / jnp.where(den > 0, den, 1)[:, None], previous)


def converged(objective, previous, moved, it, tol):
    """The stopping rule: no row moved, or (after the first step) the objective changed by at most
    ``tol`` relative."""
    stalled = jnp.abs(objective - previous) <= tol * jnp.abs(objective)
    return (moved == 0) | (stalled & (it > 0))


class _LoopState(NamedTuple):
    centroids: jax.Array  # (M, D) centroids used by the latest assignment
    num: jax.Array  # (M, D) sum_{j in i} scale_j G_j for (assign, signs), over this shard's rows
    den: jax.Array  # (M,) sum_{j in i} mass_j, this shard's rows
    count: jax.Array  # (M,) int32 nonzero members among this shard's rows
    assign: jax.Array  # (n,) int32, -1 before the first step
    signs: jax.Array  # (n,)
    num_changed: jax.Array  # this shard's rows whose (cluster, sign) changed in the latest step
    objective: jax.Array  # over all rows
    it: jax.Array
    done: jax.Array


def loop_start(seeds, n: int, dtype) -> _LoopState:
    """The state before the first Lloyd step: no row assigned, empty sums, all ``n`` rows changed."""
    m, dim = seeds.shape
    return _LoopState(
        centroids=seeds,
        num=jnp.zeros((m, dim), dtype),
        den=jnp.zeros((m,), dtype),
        count=jnp.zeros((m,), jnp.int32),
        assign=jnp.full((n,), -1, jnp.int32),
        signs=jnp.zeros((n,), dtype),
        num_changed=jnp.asarray(n, jnp.int32),
        objective=jnp.zeros((), dtype),
        it=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool),
    )


def lloyd_loop(G, norms, seeds, max_iters, tol, *, weighted, block_size, sparse_tiers, axis=None):
    """Lloyd steps of Algorithm 1 from ``seeds`` until no row moves, the objective stalls or
    ``max_iters``; returns ``(centroids, assignments, objective, iters, member_counts)``.

    ``G (n, D)`` and ``norms (n,)`` are all the rows or, inside ``jax.shard_map`` with ``axis``
    the mesh axis of the rows, this shard's rows. The S2 sums of the local rows are kept between
    steps; each step all-reduces (``psum`` over ``axis``; nothing without it) only the ``(M, D)``
    numerators, ``(M,)`` denominators and member counts, the objective and the count of moved
    rows, so every shard computes the same centroids and stops at the same step.

    Each step is one blocked pass computing ``G_b C^T`` and the assignments (:func:`lloyd_pass`).
    The local sums are then updated from the rows whose (cluster, sign) changed: a gather of
    those rows and an ``(M, K) x (K, D)`` product (:func:`sum_updater`). While many rows still
    move (the first few steps) the sums are instead rebuilt inside the same pass, one
    ``(M, B) x (B, D)`` product per block, so the data is read once per step either way.
    """
    n, dim = G.shape
    m = seeds.shape[0]
    dtype = G.dtype
    block = min(block_size, n)
    nonzero = norms > 0
    total = (lambda x: x) if axis is None else functools.partial(jax.lax.psum, axis_name=axis)
    # Above this many moved rows, rebuilding the sums is cheaper than patching them.
    rebuild_above = sparse_tiers[-1]
    update_sums, _ = sum_updater(G, norms, m, weighted=weighted, block=block, sparse_tiers=sparse_tiers)

    def rebuild_step(st: _LoopState, C):
        a, s, obj, num = lloyd_pass(G, norms, C, weighted=weighted, block=block)
        return (a, s, obj, num) + cluster_mass(norms, a, s, m, weighted=weighted)

    def patch_step(st: _LoopState, C):
        a, s, obj, _ = lloyd_pass(G, norms, C, weighted=weighted, block=block, with_sums=False)
        return (a, s, obj) + update_sums(a, s, st.assign, st.signs, st.num, st.den, st.count)

    def cond(st: _LoopState):
        return (st.it < max_iters) & ~st.done

    def body(st: _LoopState):
        num, den, count = total((st.num, st.den, st.count))
        C = next_centroids(num, den, count, st.centroids)
        # Whether the sums are rebuilt in the pass is predicted from the previous step's movement
        # (per shard: no collective runs inside the branches).
        a, s, obj, num, den, count = jax.lax.cond(
            st.num_changed > rebuild_above, rebuild_step, patch_step, st, C
        )
        obj, moved = total((obj, jnp.sum(a != st.assign, dtype=jnp.int32)))
        done = converged(obj, st.objective, moved, st.it, tol)
        num_changed = jnp.sum((a != st.assign) | (s != st.signs), dtype=jnp.int32)
        return _LoopState(C, num, den, count, a, s, num_changed, obj, st.it + 1, done)

    st = jax.lax.while_loop(cond, body, loop_start(seeds, n, dtype))
    members = total(jax.ops.segment_sum(nonzero.astype(jnp.int32), st.assign, m))
    return st.centroids, st.assign, st.objective, st.it, members
