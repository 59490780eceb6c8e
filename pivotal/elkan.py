"""Lloyd iterations that skip the rows whose assignment cannot change (Elkan-style bounds).

The assignment step of :mod:`pivotal.lloyd` scores every row against every centroid,
``sigma_ji = |<G_j, e_i>|`` with the search directions ``e_i`` (``C_i``, or ``C_i / ||C_i||``
when ``weighted=False``; see :func:`pivotal.lloyd.search_directions`), and takes
``a_j = argmax_i sigma_ji``. Once the centroids settle most rows keep their cluster, and their
M-way scores can be skipped. When the directions move from ``e_i`` to ``e'_i``, Cauchy-Schwarz
bounds every score's change by the row norm times the direction's displacement:

    | |<G_j, e'_i>| - |<G_j, e_i>| |  <=  |<G_j, e'_i - e_i>|  <=  ||G_j|| delta_i,
    delta_i = ||e'_i - e_i||.

Each row keeps (Elkan 2003, one upper bound per row and cluster, adapted to |cos|)

    lower_j  <=  s_j <G_j, e_{a_j}>     (its own score, signed by its S2 sign s_j)
    upper_ji >=  |<G_j, e_i>|           (every cluster's score)

set to the computed scores whenever the row is scored, and loosened after each centroid update
by ``lower_j -= ||G_j|| delta_{a_j}``, ``upper_ji += ||G_j|| delta_i``. A row with

    lower_j  >  max_{i != a_j} upper_ji + margin_j

keeps both its cluster (its own score beats every other) and its sign (``lower_j > 0``), so it
is neither read nor scored. The others are gathered, in blocks, and scored against all M
directions exactly as :func:`pivotal.lloyd.lloyd_pass` scores them (a full pass when most rows
fail). ``margin_j = ||G_j|| E tau`` absorbs float rounding, so that a skipped row keeps the
cluster the plain loop's floating-point argmax would give it: ``E`` is the largest direction
norm seen so far and ``tau = 4 ((D + 2) eps + 2 u) + 8 t eps`` bounds the error of two dot
products (``|fl(<x, e>) - <x, e>| <= ((D + 2) eps + 2 u) ||x|| ||e||``, ``u`` the unit roundoff
of the matrix-product inputs: ``eps`` on CPU, ``2**-8`` for float32 elsewhere, where XLA may use
TF32/bfloat16 passes) on each side of the test plus the rounding of ``t`` bound updates.

The S2 sums are refreshed exactly as the plain loop refreshes them (:func:`pivotal.lloyd.sum_updater`,
rebuilt in the same pass or patched from the changed rows, with the same decision rule), so
the centroids are those of the plain loop bit for bit whenever the assignments agree; the
assignments, signs, iteration count and centroids are the plain loop's. The objective of a step
that scored only some rows is ``sum_i <C_i, S_i>`` over the S2 numerators ``S_i = sum_{j in i}
s_j G_j`` (weighted; equal to ``sum_j |<G_j, C_{a_j}>|`` in exact arithmetic, so it differs
from the plain loop's in the last bits) or, unweighted, one row-wise pass
``sum_j ||C_{a_j}|| |<G_j, e_{a_j}>|`` (D, not M D, multiply-adds per row).

Cost per step: O(N M) bound updates, O(N) compaction, and M D multiply-adds per failing row.
Memory: the ``(N, M)`` upper bounds (of the shard's rows) on top of the plain loop's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pivotal._rows import block_start, fresh_rows, num_blocks, row_norms
from pivotal.lloyd import (
    cluster_mass,
    converged,
    lloyd_pass,
    loop_start,
    next_centroids,
    score_block,
    search_directions,
    sum_updater,
)

__all__ = ["elkan_loop", "rounding_margin"]

# Score every row in one full pass (no gather) when more than this fraction of them fails its
# bound test: the gather then costs more than the rows it saves.
FULL_PASS_ABOVE = 0.75


class _ElkanState(NamedTuple):
    centroids: jax.Array  # (M, D) centroids used by the latest assignment
    num: jax.Array  # (M, D) S2 numerators of this shard's rows
    den: jax.Array  # (M,)
    count: jax.Array  # (M,) int32 nonzero members
    assign: jax.Array  # (n,) int32, -1 before the first step
    signs: jax.Array  # (n,)
    num_changed: jax.Array  # this shard's rows whose (cluster, sign) changed in the latest step
    objective: jax.Array
    it: jax.Array
    done: jax.Array
    lower: jax.Array  # (n,) lower bounds of s_j <G_j, e_{a_j}>
    upper: jax.Array  # (n, M) upper bounds of |<G_j, e_i>|
    scale: jax.Array  # largest direction norm seen so far (E)
    scored: jax.Array  # rows scored so far, this shard (a statistic)


def rounding_margin(dtype, dim: int, it) -> jax.Array:
    """``tau`` of the module docstring: the bound test's float margin per unit ``||G_j|| E``."""
    eps = float(jnp.finfo(dtype).eps)
    inputs = eps
    if jnp.dtype(dtype) == jnp.float32 and jax.default_backend() != "cpu":
        inputs = max(eps, 2.0 ** -8)  # TF32 / bfloat16 passes of default-precision products
    return jnp.asarray(4 * ((dim + 2) * eps + 2 * inputs), dtype) + 8 * eps * it.astype(dtype)


def _gather_scores(G, directions, fail, num_fail, chunk: int, a, s, lower, upper):
    """Scores the failing rows, gathered ``chunk`` at a time, and writes their assignment, sign and
    (exact) bounds; returns the updated ``(a, s, lower, upper)``."""
    n = G.shape[0]
    slots = num_blocks(n, chunk) * chunk
    # Compact the failing rows' indices (a cumsum and a scatter); unused slots hold n, which
    # gathers zeros and scatters nowhere.
    slot = jnp.where(fail, jnp.cumsum(fail, dtype=jnp.int32) - 1, slots)
    idx = jnp.full((slots,), n, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    dtype = G.dtype

    def body(c, carry):
        a, s, lower, upper = carry
        rows = jax.lax.dynamic_slice_in_dim(idx, c * chunk, chunk)
        Gb = G.at[rows].get(mode="fill", fill_value=0)
        ab, db, dots = score_block(Gb, directions)
        sb = jnp.where(db < 0, -1, 1).astype(dtype)
        return (a.at[rows].set(ab, mode="drop"), s.at[rows].set(sb, mode="drop"),
                lower.at[rows].set(jnp.abs(db), mode="drop"), upper.at[rows].set(jnp.abs(dots), mode="drop"))

    count = (num_fail + chunk - 1) // chunk
    return jax.lax.fori_loop(0, count, body, (a, s, lower, upper))


def _own_objective(G, assign, directions, obj_scale, block: int):
    """``sum_j obj_scale_{a_j} |<G_j, e_{a_j}>|`` in one blocked row-wise pass."""
    n = G.shape[0]
    block = min(block, n)

    def body(b, obj):
        start = block_start(b, n, block)
        Gb = jax.lax.dynamic_slice_in_dim(G, start, block)
        ab = jax.lax.dynamic_slice_in_dim(assign, start, block)
        d = jnp.abs(jnp.sum(Gb * directions[ab], axis=1)) * obj_scale[ab]
        return obj + jnp.sum(jnp.where(fresh_rows(b, start, block), d, 0))

    return jax.lax.fori_loop(0, num_blocks(n, block), body, jnp.zeros((), G.dtype))


def elkan_loop(G, norms, seeds, max_iters, tol, *, weighted, block_size, sparse_tiers, axis=None,
               with_stats: bool = False):
    """:func:`pivotal.lloyd.lloyd_loop` with the bound test of the module docstring: same
    arguments, same outputs ``(centroids, assignments, objective, iters, member_counts)`` (and,
    with ``with_stats``, the number of row scorings summed over the steps, all shards).

    Per shard inside ``jax.shard_map`` as the plain loop: the bounds, the bound test and the
    choice between a full pass and a gathered one are local, and the same quantities as in the
    plain loop are all-reduced.
    """
    n, dim = G.shape
    m = seeds.shape[0]
    dtype = G.dtype
    block = min(block_size, n)
    chunk = min(block, 1024)
    nonzero = norms > 0
    total = (lambda x: x) if axis is None else functools.partial(jax.lax.psum, axis_name=axis)
    rebuild_above = sparse_tiers[-1]
    full_above = int(FULL_PASS_ABOVE * n)
    update_sums, rebuild_sums = sum_updater(G, norms, m, weighted=weighted, block=block, sparse_tiers=sparse_tiers)

    def full_with_sums(st, C, directions, fail, num_fail, lower, upper):
        a, s, obj, num, scores = lloyd_pass(G, norms, C, weighted=weighted, block=block, with_scores=True)
        own = jnp.take_along_axis(scores, a[:, None], axis=1)[:, 0]
        return (a, s, obj, num) + cluster_mass(norms, a, s, m, weighted=weighted) + (own, scores)

    def full_then_update(st, C, directions, fail, num_fail, lower, upper):
        a, s, obj, _, scores = lloyd_pass(G, norms, C, weighted=weighted, block=block, with_sums=False,
                                          with_scores=True)
        own = jnp.take_along_axis(scores, a[:, None], axis=1)[:, 0]
        sums = update_sums(a, s, st.assign, st.signs, st.num, st.den, st.count)
        return (a, s, obj) + sums + (own, scores)

    def gathered(st, C, directions, fail, num_fail, lower, upper):
        a, s, lower, upper = _gather_scores(G, directions, fail, num_fail, chunk, st.assign, st.signs, lower, upper)
        num, den, count = jax.lax.cond(st.num_changed > rebuild_above, rebuild_sums, update_sums,
                                       a, s, st.assign, st.signs, st.num, st.den, st.count)
        if weighted:  # sum_j s_j <G_j, C_{a_j}> = sum_i <C_i, S_i>
            obj = jnp.sum(C * num)
        else:
            obj = _own_objective(G, a, directions, row_norms(C), block)
        return a, s, obj, num, den, count, lower, upper

    def cond(st: _ElkanState):
        return (st.it < max_iters) & ~st.done

    def body(st: _ElkanState):
        num, den, count = total((st.num, st.den, st.count))
        C = next_centroids(num, den, count, st.centroids)
        directions = search_directions(C, weighted)
        delta = row_norms(directions - search_directions(st.centroids, weighted))
        scale = jnp.maximum(st.scale, jnp.max(row_norms(directions)))
        own = jnp.maximum(st.assign, 0)
        lower = st.lower - norms * delta[own]
        upper = st.upper + norms[:, None] * delta[None, :]
        other = jnp.max(jnp.where(jnp.arange(m)[None, :] == own[:, None], -jnp.inf, upper), axis=1)
        margin = norms * scale * rounding_margin(dtype, dim, st.it)
        # Zero rows score 0 everywhere: cluster 0, sign +1, from the first step on.
        keep = (st.assign >= 0) & ((lower > other + margin) | ~nonzero)
        fail = ~keep
        num_fail = jnp.sum(fail, dtype=jnp.int32)
        # The sums follow the plain loop's rule (rebuilt in the pass after a step that moved many
        # rows), so its centroids are reproduced bit for bit.
        branch = jnp.where(num_fail > full_above, jnp.where(st.num_changed > rebuild_above, 0, 1), 2)
        a, s, obj, num, den, count, lower, upper = jax.lax.switch(
            branch, (full_with_sums, full_then_update, gathered), st, C, directions, fail, num_fail, lower, upper
        )
        scored = st.scored + jnp.where(branch == 2, num_fail, n)
        obj, moved = total((obj, jnp.sum(a != st.assign, dtype=jnp.int32)))
        done = converged(obj, st.objective, moved, st.it, tol)
        num_changed = jnp.sum((a != st.assign) | (s != st.signs), dtype=jnp.int32)
        return _ElkanState(C, num, den, count, a, s, num_changed, obj, st.it + 1, done, lower, upper, scale,
                           scored)

    # Lloyd's starting state (the first ten fields) and bounds that fail every test.
    init = _ElkanState(
        *loop_start(seeds, n, dtype),
        lower=jnp.zeros((n,), dtype),
        upper=jnp.zeros((n, m), dtype),
        scale=jnp.max(row_norms(search_directions(seeds, weighted))),
        scored=jnp.zeros((), jnp.int32),
    )
    st = jax.lax.while_loop(cond, body, init)
    members = total(jax.ops.segment_sum(nonzero.astype(jnp.int32), st.assign, m))
    out = (st.centroids, st.assign, st.objective, st.it, members)
    return out + (total(st.scored),) if with_stats else out
