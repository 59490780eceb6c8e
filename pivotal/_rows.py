"""The row-block engine: every pass over N rows walks blocks of one fixed size.

Every block is full: when the size ``c`` does not divide ``N``, the last block is shifted back
so that it ends at ``N`` (it overlaps the previous one), ``start_b = min(b c, N - c)`` for
``b = 0 .. ceil(N / c) - 1``. One block shape means one compiled kernel, no padded copy of the
data and no remainder to concatenate. Row-wise outputs write the overlapping rows twice with
the same values; sums mask them out (:func:`fresh_rows`).

Two drivers use it:

* :func:`blocked_rows`, a ``lax.fori_loop`` over blocks inside one compiled computation
  (K-means, diagnostics);
* :func:`chunked_rows`, a host loop over a jitted chunk step that writes into a preallocated,
  donated output (per-example gradients, GBC), per shard on example-sharded input.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import is_traced
from pivotal._placement import example_placement, example_sharding, num_shards, place_examples, replicate

PyTree = Any


def num_blocks(n: int, size: int) -> int:
    return -(-n // size)


def block_start(b, n: int, size: int):
    """Start of block ``b`` (traced or not): ``min(b size, n - size)``."""
    return jnp.minimum(b * size, n - size)


def fresh_rows(b, start, size: int):
    """``(size,)`` bool: the rows of block ``b`` (starting at ``start``) that block ``b - 1`` did not
    already cover; all of them except in a shifted last block."""
    return (start + jnp.arange(size)) >= b * size


def chunk_starts(n: int, size: int | None) -> tuple[int, list[int]]:
    """``(c, starts)`` on the host: blocks of ``c = min(size, n)`` rows (None: one block of all n)."""
    c = n if size is None else min(size, n)
    return c, [min(b * c, n - c) for b in range(num_blocks(n, c))]


@jax.jit
def row_norms(G: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(G), axis=1))


def blocked_rows(fn: Callable, G: jax.Array, row_args: tuple, block: int, rows=None):
    """Applies ``fn(G_b, *row_args_b) -> pytree of (B, ...)`` to row blocks, returns ``(N, ...)``.

    ``row_args`` are arrays with leading axis N, sliced alongside ``G``. Overlapping rows of the last
    block are written twice with identical values, so ``fn`` must be row-wise.

    ``rows``: optional ``(R,)`` int indices; the pass then walks the rows ``G[rows]`` (and
    ``row_args`` must have R rows), gathering one block at a time: the same blocks, hence the same
    values, as on ``G[rows]``, without that ``(R, D)`` copy.
    """
    n = G.shape[0] if rows is None else rows.shape[0]
    block = min(block, n)
    out_struct = jax.eval_shape(
        fn,
        jax.ShapeDtypeStruct((block,) + G.shape[1:], G.dtype),
        *[jax.ShapeDtypeStruct((block,) + a.shape[1:], a.dtype) for a in row_args],
    )
    init = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype), out_struct)

    def body(b, out):
        start = block_start(b, n, block)
        if rows is None:
            Gb = jax.lax.dynamic_slice_in_dim(G, start, block)
        else:
            Gb = jnp.take(G, jax.lax.dynamic_slice_in_dim(rows, start, block), axis=0)
        args_b = [jax.lax.dynamic_slice_in_dim(a, start, block) for a in row_args]
        res = fn(Gb, *args_b)
        return jax.tree.map(lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r, start, 0), out, res)

    return jax.lax.fori_loop(0, num_blocks(n, block), body, init)


# --------------------------------------------------------------------------- host-driven chunks


def slice_rows(batch: PyTree, start, size: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0), batch)


def write_rows(out: PyTree, rows: PyTree, start) -> PyTree:
    return jax.tree_util.tree_map(
        lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r.astype(o.dtype), start, axis=0), out, rows
    )


def run_chunks(step: Callable, init: PyTree, starts: list[int], traced: bool) -> PyTree:
    """``state = step(state, start)`` for every chunk start.

    Concrete inputs: a host loop over a jitted ``step`` whose ``state`` buffer is donated,
    so the output is written in place and memory stays at the output plus one chunk.
    (XLA:CPU runs convolutions inside a device-side ``while`` loop several times slower
    than the same convolutions at top level, so the host loop is also the faster one;
    each dispatch costs microseconds against a chunk's milliseconds.) Under a trace: a
    ``lax.fori_loop`` with the same in-place updates.
    """
    if not traced:
        state = init
        for start in starts:
            state = step(state, np.int32(start))
        return state
    starts_arr = jnp.asarray(starts, dtype=jnp.int32)
    return jax.lax.fori_loop(0, len(starts), lambda i, state: step(state, starts_arr[i]), init)


def placed(batch: PyTree, params: PyTree):
    """``(placement, batch, params)``: where the rows of ``batch`` live (None: one device, or
    under a trace), with the batch's other leaves moved there and ``params`` replicated."""
    placement = None if is_traced(batch, params) else example_placement(batch)
    if placement is None:
        return None, batch, params
    return placement, place_examples(batch, placement), replicate(params, placement[0])


def zeros_rows(n: int, row_shapes: PyTree, placement) -> PyTree:
    """Preallocated ``(n, ...)`` outputs, example-sharded like the batch when ``placement`` is given."""
    device = None if placement is None else example_sharding(*placement)
    return jax.tree_util.tree_map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype, device=device), row_shapes)


def chunked_rows(chunk_fn: Callable, batch: PyTree, chunk_size: int | None, step_fn: Callable,
                 params: PyTree) -> PyTree:
    """Rows ``chunk_fn(params, chunk)`` for all examples, written chunk by chunk into a preallocated output.

    ``step_fn(out, start, params, batch, size, placement)`` must compute ``chunk_fn`` on the rows
    ``start : start + size`` and write them into ``out`` (jitted with ``out`` donated), per shard
    when ``placement`` is given (:func:`pivotal._placement.per_shard`).

    On an example-sharded batch every device runs the chunk loop over its own rows (the chunk
    starts are those of one shard: all shards have the same size), and the output is sharded
    the same way: no row leaves its device.
    """
    placement, batch, params = placed(batch, params)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shards = 1 if placement is None else num_shards(placement)
    c, starts = chunk_starts(n // shards, chunk_size)
    row_shapes = jax.eval_shape(lambda p, b: chunk_fn(p, slice_rows(b, 0, c)), params, batch)
    out = zeros_rows(n, row_shapes, placement)
    return run_chunks(lambda state, start: step_fn(state, start, params, batch, c, placement), out, starts,
                      is_traced(batch, params))
