"""GBC features (paper Eq. 13-14): per-example gradients of a few importance-sampled layers.

:func:`gbc_features` runs in four steps:

1. the layer importances ``A_l = ||(1/N) sum_j grad_l f_j||^2`` from the gradient of the mean
   loss, one backward pass per chunk (:func:`layer_importance`), and ``p_l = A_l / sum A_l``;
2. ``R`` draws of a layer from ``p``, one draw shared by all examples, repeats merged into
   one block scaled by ``sqrt(c_l / (R p_l))``;
3. the column plan: which leaves, which scales, optionally a Gaussian sketch per leaf;
4. the feature pass: per-example gradients of the drawn leaves only, chunk by chunk into a
   preallocated ``(N, D)`` output.

:func:`gbc_layer_draw` runs steps 1-3 alone (what would be drawn, and the width ``D``, before any
per-example gradient); :func:`gbc_block_widths` gives the blocks' widths under any sketch.
:func:`make_gbc_feature_fn` wraps :func:`gbc_features` for :func:`pivotal.history_features`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import (
    ArgumentTypeError, check_choice, check_int, check_key, check_loss_fn, is_traced, leading_size)
from pivotal._placement import num_shards, per_shard
from pivotal._rows import chunk_starts, chunked_rows, placed, slice_rows, write_rows, zeros_rows
from pivotal.grads import STRATEGIES, layer_groups_of, leaf_grads, map_examples, single_example_loss

__all__ = ["RECOMMENDED_IMPORTANCE_CHUNK_SIZE", "GBCInfo", "gbc_block_widths", "gbc_features", "gbc_layer_draw",
           "leaf_sketch_widths", "make_gbc_feature_fn"]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

#: Suggested batch size for the importance pass of :func:`gbc_features` (one backward
#: pass of a summed loss per chunk: no per-example gradients, so larger chunks are cheap).
RECOMMENDED_IMPORTANCE_CHUNK_SIZE = 128


# ---------------------------------------------------------------------------
# Step 1: importance pass
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "size", "placement"), donate_argnums=(0,))
def _grad_of_sum_step(total, start, skip, params, batch, loss_fn, size, placement=None):
    """``total + grad sum_{i >= skip} f_i`` over the rows ``start : start + size``.

    ``total`` leaves have a leading axis of one partial sum per shard (size 1 unsharded); with
    ``placement`` each shard adds the gradient of its own rows to its own partial sum.
    """

    def add(total, start, skip, params, batch):
        chunk = slice_rows(batch, start, size)
        keep = jnp.arange(size) >= skip

        def masked_sum(p):
            losses = loss_fn(p, chunk)
            return jnp.sum(jnp.where(keep, losses, jnp.zeros_like(losses)))

        return jax.tree_util.tree_map(lambda t, g: t + g[None], total, jax.grad(masked_sum)(params))

    return per_shard(add, placement, (True, False, False, False, True), True)(total, start, skip, params, batch)


@jax.jit
def _sq_norms_of_mean(total, n):
    return jnp.stack([jnp.sum(jnp.square(jnp.sum(g, axis=0) / n)) for g in jax.tree_util.tree_leaves(total)])


def _leaf_sq_norms_of_mean_grad(loss_fn, params, batch, chunk_size):
    """``||(1/N) sum_j grad_leaf f_j||^2`` for every leaf (a ``(num_leaves,)`` array).

    The mean gradient is one backward pass of the summed loss per chunk of
    ``chunk_size`` rows, accumulated in place; per-example gradients are never formed,
    and memory is O(chunk x activations). The last chunk is shifted back to end at N
    and its rows already counted are masked out of the sum. On an example-sharded
    batch every device sums the gradients of its own rows' chunks; the partial sums are
    added (all-reduced) once at the end.
    """
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    placement, batch, params = placed(batch, params)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shards = 1 if placement is None else num_shards(placement)
    c, starts = chunk_starts(n // shards, chunk_size)
    # Rows of chunk b that chunk b - 1 already covered (only a shifted last chunk has any).
    skips = [b * c - start for b, start in enumerate(starts)]
    traced = is_traced(params, batch)
    skip_arr = jnp.asarray(skips, dtype=jnp.int32)
    # One partial sum per shard: (shards, *leaf) zeros, split over the devices like the rows.
    shard_sum = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + jnp.shape(x), jnp.result_type(x)), params)
    zeros = zeros_rows(shards, shard_sum, placement)
    if traced:
        starts_arr = jnp.asarray(starts, dtype=jnp.int32)
        total = jax.lax.fori_loop(
            0, len(starts),
            lambda i, t: _grad_of_sum_step(t, starts_arr[i], skip_arr[i], params, batch, loss_fn, c), zeros,
        )
    else:
        total = zeros
        for start, skip in zip(starts, skips):
            total = _grad_of_sum_step(total, np.int32(start), np.int32(skip), params, batch, loss_fn, c, placement)
    return _sq_norms_of_mean(total, n)


# ---------------------------------------------------------------------------
# Step 4: feature pass
# ---------------------------------------------------------------------------


def _sketch_leaf(g, projection):
    """``left^T g right`` flattened, ``g`` viewed as a matrix (see :func:`_as_matrix_shape`).

    ``projection = (left (a, k_a) or None, right (b, k_b) or None)``; None is the identity
    (that side kept exact). The product is taken in the cheaper order.
    """
    left, right = projection
    g = jnp.reshape(g, _as_matrix_shape(jnp.shape(g)))
    a, b = g.shape
    k_a = a if left is None else left.shape[1]
    k_b = b if right is None else right.shape[1]
    left_first = k_a * b * (a + k_b) <= a * k_b * (b + k_a)
    if left is not None and left_first:
        g = left.T @ g
    if right is not None:
        g = g @ right
    if left is not None and not left_first:
        g = left.T @ g
    return jnp.ravel(g)


def _selected_chunk(loss_fn, params, chunk, leaf_ids, leaf_scales, strategy, projections=None):
    """``(c, D)``: per-example gradients of the leaves ``leaf_ids`` only, flattened and scaled.

    ``leaf_ids`` lists the leaves in column order (a leaf may repeat); ``leaf_scales``
    holds one factor per entry; ``projections`` (None: no sketch) one ``(left, right)``
    pair per entry, applied by :func:`_sketch_leaf` before the scale, so only the
    sketched columns of a chunk are ever written.

    Only the selected leaves are differentiated; the others are closed-over constants,
    so XLA neither forms their weight gradients nor backpropagates below the lowest
    selected layer.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    # A leaf may appear in several blocks (unmerged repeated draws): differentiate it once.
    unique_ids = tuple(sorted(set(leaf_ids)))
    slot = {leaf: k for k, leaf in enumerate(unique_ids)}
    selected = tuple(leaves[i] for i in unique_ids)

    def loss_of_selected(sub, example):
        full = list(leaves)
        for i, value in zip(unique_ids, sub):
            full[i] = value
        return single_example_loss(loss_fn)(jax.tree_util.tree_unflatten(treedef, full), example)

    def row(grads):
        if projections is None:
            blocks = [jnp.ravel(grads[slot[i]]) for i in leaf_ids]
        else:
            blocks = [_sketch_leaf(grads[slot[i]], projections[k]) for k, i in enumerate(leaf_ids)]
        return jnp.concatenate([leaf_scales[k] * block for k, block in enumerate(blocks)])

    if strategy == "patches":  # the chunk's gradients at once, then each example's row
        return jax.vmap(row)(leaf_grads(loss_of_selected, selected, chunk, strategy))
    grad_one = jax.grad(loss_of_selected)
    return map_examples(lambda example: row(grad_one(selected, example)), chunk, strategy)


@functools.partial(jax.jit, static_argnames=("loss_fn", "leaf_ids", "size", "strategy", "placement"),
                   donate_argnums=(0,))
def _selected_step(out, start, params, batch, leaf_scales, projections, loss_fn, leaf_ids, size, strategy,
                   placement=None):
    def write(out, start, params, batch, leaf_scales, projections):
        chunk = slice_rows(batch, start, size)
        rows = _selected_chunk(loss_fn, params, chunk, leaf_ids, leaf_scales, strategy, projections)
        return write_rows(out, rows, start)

    return per_shard(write, placement, (True, False, False, True, False, False), True)(
        out, start, params, batch, leaf_scales, projections)


def _selected_leaf_features(loss_fn, params, batch, leaf_ids, leaf_scales, chunk_size, strategy="vmap",
                            projections=None):
    """``(N, D)`` GBC features of the leaves ``leaf_ids``, chunk by chunk into a preallocated output."""
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    # The scales and projections travel with the parameters: replicated alongside them on a
    # sharded batch, so every shard and every chunk applies the same ones.
    return chunked_rows(
        lambda p, chunk: _selected_chunk(loss_fn, p[0], chunk, leaf_ids, p[1], strategy, p[2]),
        batch,
        chunk_size,
        lambda out, start, p, b, c, placement: _selected_step(out, start, p[0], b, p[1], p[2], loss_fn, leaf_ids,
                                                              c, strategy, placement),
        (params, leaf_scales, projections),
    )


# ---------------------------------------------------------------------------
# Step 3: sketch widths and projections
# ---------------------------------------------------------------------------


def _check_sketch_dim(sketch_dim) -> int | tuple[int, int] | None:
    """``sketch_dim`` as None, an int or a pair of ints; ValueError for anything else."""
    if sketch_dim is None:
        return None
    try:
        if isinstance(sketch_dim, (tuple, list)) and len(sketch_dim) == 2:
            return check_int(sketch_dim[0], "sketch_dim[0]"), check_int(sketch_dim[1], "sketch_dim[1]")
        return check_int(sketch_dim, "sketch_dim")
    except ValueError:
        raise ValueError(f"sketch_dim must be None, a positive integer k (columns per leaf) or a pair (k_a, k_b) "
                         f"of positive integers; got {sketch_dim!r}") from None


def _as_matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(a, b)``: a leaf of ``shape`` as a matrix, its last axis against all the others.

    A Dense kernel ``(d_in, d_out)`` stays as it is, a conv kernel ``(kh, kw, c_in, c_out)``
    becomes ``(kh kw c_in, c_out)``, a vector ``(d,)`` is ``(1, d)`` and a scalar ``(1, 1)``.
    """
    if len(shape) < 2:
        return 1, math.prod(shape)
    return math.prod(shape[:-1]), shape[-1]


def _sketch_widths(shape: Sequence[int], sketch_dim: int | tuple[int, int]) -> tuple[int, int]:
    """``(k_a, k_b)``: the sketched widths of a leaf of ``shape`` (``k == side``: kept exact)."""
    a, b = _as_matrix_shape(shape)
    if isinstance(sketch_dim, tuple):
        return min(a, sketch_dim[0]), min(b, sketch_dim[1])
    if a * b <= sketch_dim:
        return a, b
    # Near-square split of the k columns: the smaller side first, the larger takes what is left.
    k_small = min(a, b, math.isqrt(sketch_dim))
    k_large = min(max(a, b), sketch_dim // k_small)
    return (k_small, k_large) if a <= b else (k_large, k_small)


@functools.partial(jax.jit, static_argnames=("shape", "widths", "dtype"))
def _leaf_projection(key, shape, widths, dtype):
    """``(left (a, k_a), right (b, k_b))``: standard Gaussian over ``sqrt(k)``, None where ``k`` is the side."""
    sides = _as_matrix_shape(shape)
    return tuple(
        None if k == side else jax.random.normal(side_key, (side, k), dtype) / math.sqrt(k)
        for side_key, side, k in zip(jax.random.split(key), sides, widths)
    )


# ---------------------------------------------------------------------------
# gbc_features: steps 1-4
# ---------------------------------------------------------------------------


class GBCInfo(NamedTuple):
    """What :func:`gbc_features` drew.

    Attributes:
      layer_names: ``(L,)`` every layer's name, in leaf order.
      importance: ``(L,)`` ``A_l = ||(1/N) sum_j grad_l f_j||^2``.
      probabilities: ``(L,)`` ``p_l = A_l / sum_l A_l``.
      draws: ``(R,)`` names of the ``num_layers`` draws, in draw order.
      blocks: names of the feature blocks, in column order.
      counts: ``(len(blocks),)`` how many draws each block stands for.
      scales: ``(len(blocks),)`` the factor each block's gradient was multiplied by.
      block_sizes: ``(len(blocks),)`` columns of each block (the layer's parameter count;
        with ``sketch_dim``, its sketched width).
    """

    layer_names: tuple[str, ...]
    importance: np.ndarray
    probabilities: np.ndarray
    draws: tuple[str, ...]
    blocks: tuple[str, ...]
    counts: np.ndarray
    scales: np.ndarray
    block_sizes: np.ndarray


def gbc_features(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    num_layers: int = 5,
    chunk_size: int | None = None,
    layer_groups=None,
    merge_repeats: bool = True,
    return_info: bool = False,
    strategy: str = "vmap",
    importance_chunk_size: int | None = None,
    importance_sample_size: int | None = None,
    sketch_dim: int | tuple[int, int] | None = None,
    sketch_key: jax.Array | None = None,
):
    r"""GBC features (paper Eq. 13-14): importance-sampled per-example layer gradients.

    The full-gradient inner product splits over layers (Eq. 13),
    ``<g_i, g_j> = sum_l <g_il, g_jl>`` with ``g_jl = grad_{theta_l} f_j``. With the layer
    importance and sampling probability (Eq. 14)

    .. math::
        A_l = \Big\|\frac{1}{N}\sum_j \nabla_{\theta_l} f_j\Big\|_F^2, \qquad p_l = A_l / \sum_{l'} A_{l'},

    ``R = num_layers`` layers ``l_1..l_R`` are drawn i.i.d. from ``p`` (with
    replacement; one draw shared by all examples so every ``G_j`` has the same layout)
    and the feature is ``G_j = [g_{j l_r} / sqrt(R p_{l_r})]_{r=1..R}``. Then

    .. math::
        \mathbb{E}\,\langle G_i, G_j\rangle = \sum_r \mathbb{E}\frac{\langle g_{il_r}, g_{jl_r}\rangle}{R\,p_{l_r}}
        = \sum_l \langle g_{il}, g_{jl}\rangle = \langle g_i, g_j\rangle,

    an unbiased estimate of the full-gradient Gram matrix. With ``merge_repeats`` (the
    default) a layer drawn ``c_l`` times appears once, scaled by ``sqrt(c_l / (R p_l))``:
    identical inner products, narrower features. Blocks are ordered by layer (leaf
    order); with ``merge_repeats=False`` there are R blocks in draw order.

    ``A_l`` comes from the gradient of the mean loss, one backward pass per chunk of
    ``importance_chunk_size`` rows, never from per-example gradients. Per-example
    gradients (see :func:`per_example_grads`, chunks of ``chunk_size``, ``strategy``)
    are then taken only w.r.t. the drawn layers' leaves. Layers with ``A_l = 0`` are
    never drawn. Memory: the ``(N, D)`` output plus one chunk, whatever N. On an
    example-sharded ``batch`` both passes run per device over its own rows (the mean
    gradient's partial sums are all-reduced once) and the features come back sharded.

    Subsampled importance (``importance_sample_size = m < N``): ``A_l`` is computed from
    the mean gradient over ``m`` rows drawn uniformly without replacement (with a key
    derived from ``key``), so the importance pass costs O(m), not O(N). ``p`` is then an
    estimate of the full-batch ``p``, but the estimator stays unbiased conditionally on
    it: the layers are drawn from this ``p`` and scaled by ``1/sqrt(R p_l)`` with the same
    ``p``, and the identity above holds for any ``p`` with ``p_l > 0`` wherever
    ``g_{jl} != 0``. A layer whose subsample gradient vanishes exactly (``p_l = 0``) is
    never drawn, which only biases its (then typically negligible) term.
    The layout depends on the draw, so this function is not jittable as a whole; its two
    passes are jit-compiled and cached on ``(loss_fn, chunk_size, drawn leaves)``.

    For label noise, build ``loss_fn`` on :func:`label_free_loss` (the paper's label-free
    gradient); for class imbalance, use the cross-entropy.

    Sketch (``sketch_dim``): bounds the width per leaf instead of the layer's size. Each drawn
    leaf's per-example gradient, viewed as an ``(a, b)`` matrix ``g`` (its last axis against
    the others: a Dense kernel ``(d_in, d_out)`` as it is, a conv kernel
    ``(kh, kw, c_in, c_out)`` as ``(kh kw c_in, c_out)``, a vector ``(d,)`` as ``(1, d)``), is
    replaced inside the chunk step by

    .. math::
        s = P_a^\top g\, P_b / \sqrt{k_a k_b}, \qquad P_a \in \mathbb{R}^{a \times k_a},\;
        P_b \in \mathbb{R}^{b \times k_b} \text{ independent standard Gaussian},

    flattened (``k_a k_b`` columns) and multiplied by the same ``sqrt(c_l / (R p_l))``. This
    is ``(P_a \otimes P_b)^T vec(g) / sqrt(k_a k_b)`` (row-major ``vec``): a Kronecker-
    structured projection whose matrices hold ``a k_a + b k_b`` numbers, never ``a b k_a k_b``.
    A side whose width equals its size is kept exact (``P = I``, no projection, no error).
    Since ``E[P P^T] / k = I`` on each side and the sides are independent,
    ``E <S_i, S_j> = <G_i, G_j>`` over the projection: the sketch is unbiased for the
    unsketched features, hence (over the layer draw too) for the full gradient Gram matrix.
    Its variance grows as the sketch narrows: see ``docs/SCALING.md`` ("GBC sketch") for
    measured errors.

    * ``sketch_dim=k``: at most ``k`` columns per leaf. A leaf of at most ``k`` entries is
      kept exact; otherwise the smaller side gets ``k_s = min(side, isqrt(k))`` columns and
      the larger ``min(side, k // k_s)`` (so a vector longer than ``k`` gets a plain Gaussian
      projection to ``k``, a ``(784, 256)`` kernel with ``k = 256`` a ``16 x 16`` sketch).
    * ``sketch_dim=(k_a, k_b)``: ``min(a, k_a) x min(b, k_b)`` columns per leaf (a vector:
      ``min(d, k_b)``, its length being the ``b`` side).

    Leaf ``i`` (in ``tree_leaves`` order) is projected with matrices drawn from
    ``fold_in(sketch_key, i)``: the same for every chunk, every shard, every layer draw and
    every call given the same ``sketch_key`` and parameter structure (pass one ``sketch_key``
    to :func:`make_gbc_feature_fn` to share the projection across the snapshots of
    :func:`history_features`). With ``sketch_key=None`` it is derived from ``key``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: parameter pytree.
      batch: pytree of N examples (leading axis N on every leaf).
      key: ``jax.random`` key for the layer draw.
      num_layers: R, the number of draws.
      chunk_size: examples per chunk of the per-example pass (memory O(chunk x P));
        None = all at once. On CPU, :data:`RECOMMENDED_CHUNK_SIZE` (16) is a good value.
      layer_groups: how leaves form layers; see :func:`layer_groups_of` (default: one
        layer per parent path, e.g. one Flax module's ``{kernel, bias}``).
      merge_repeats: merge repeated draws of a layer into one block.
      return_info: also return a :class:`GBCInfo`.
      strategy: how a chunk's per-example gradients are taken, ``"vmap"``, ``"map"`` or
        ``"patches"``; see :func:`per_example_grads`. Does not change the result beyond float rounding.
      importance_chunk_size: rows per backward pass of the importance pass. Default:
        None (all rows at once) when ``chunk_size`` is None, else
        ``max(chunk_size, RECOMMENDED_IMPORTANCE_CHUNK_SIZE)``: that pass forms no
        per-example gradients, so it affords larger chunks.
      importance_sample_size: estimate ``A_l`` from this many random rows (None = all N;
        values >= N use all N).
      sketch_dim: None (default: exact gradients), an int ``k`` (at most ``k`` columns per
        leaf) or a pair ``(k_a, k_b)`` (rows x columns of each leaf's sketch); see above.
      sketch_key: ``jax.random`` key of the sketch's projections (only with ``sketch_dim``);
        None = ``fold_in(key, 2)``.

    Returns:
      ``(N, D)`` features, D the summed size of the blocks (the drawn layers' parameter
      counts, or with ``sketch_dim`` their sketched widths); ``(features, info)`` with
      ``return_info``.
    """
    p = _plan(loss_fn, params, batch, key, num_layers=num_layers, chunk_size=chunk_size,
              layer_groups=layer_groups, strategy=strategy, importance_chunk_size=importance_chunk_size,
              importance_sample_size=importance_sample_size, sketch_dim=sketch_dim, sketch_key=sketch_key,
              merge_repeats=merge_repeats)
    batch, sketch_dim, leaves, leaf_ids = p.batch, p.sketch_dim, p.leaves, p.leaf_ids
    dtype = jnp.result_type(*[leaves[i] for i in leaf_ids])
    projections = None
    if sketch_dim is not None:
        sketch_key = jax.random.fold_in(key, 2) if sketch_key is None else sketch_key
        projections = _projections(sketch_key, leaves, leaf_ids, sketch_dim, np.dtype(dtype))
    features = _selected_leaf_features(
        loss_fn, params, batch, tuple(leaf_ids), jnp.asarray(p.leaf_scales, dtype=dtype), chunk_size, strategy,
        projections,
    )
    return (features, p.info) if return_info else features


def _draw_blocks(probs, key, num_layers, merge_repeats):
    """Step 2: ``(draws, block_layers, counts, scales)``, the ``R`` layer draws from ``p`` and the
    blocks they make (repeats merged, or one block per draw), each scaled by ``sqrt(c_l / (R p_l))``."""
    # Sampling on log p sends p = 0 to -inf, so zero-importance layers are never drawn.
    with np.errstate(divide="ignore"):
        log_p = jnp.asarray(np.log(probs), dtype=jnp.float32)
    draws = np.asarray(jax.random.categorical(key, log_p, shape=(num_layers,)))
    if merge_repeats:
        block_layers, counts = np.unique(draws, return_counts=True)
    else:
        block_layers, counts = draws, np.ones_like(draws)
    scales = np.sqrt(counts / (num_layers * probs[block_layers]))
    return draws, block_layers, counts, scales


def _info(groups, importance, probs, draws, block_layers, counts, scales, block_sizes) -> "GBCInfo":
    names = tuple(groups)
    return GBCInfo(
        layer_names=names,
        importance=importance,
        probabilities=probs,
        draws=tuple(names[i] for i in draws),
        blocks=tuple(names[i] for i in block_layers),
        counts=np.asarray(counts),
        scales=np.asarray(scales),
        block_sizes=np.asarray(block_sizes),
    )


def gbc_layer_draw(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: jax.Array,
    *,
    num_layers: int = 5,
    chunk_size: int | None = None,
    layer_groups=None,
    merge_repeats: bool = True,
    importance_chunk_size: int | None = None,
    importance_sample_size: int | None = None,
    sketch_dim: int | tuple[int, int] | None = None,
) -> GBCInfo:
    """Steps 1-3 of :func:`gbc_features` without the feature pass: what it would draw.

    Returns the :class:`GBCInfo` that ``gbc_features(..., return_info=True)`` returns for the
    same arguments (same importances, same layer draw from ``key``, same ``block_sizes``), at the
    cost of the importance pass alone (one backward pass of the summed loss per chunk, no
    per-example gradient). ``D = info.block_sizes.sum()`` is the width of the features, known
    before they are formed, e.g. to decide whether ``(N, D)`` fits in memory;
    :func:`gbc_block_widths` gives the widths of the same blocks under other ``sketch_dim``.
    ``chunk_size`` only sets the default ``importance_chunk_size``, as in :func:`gbc_features`.
    """
    return _plan(loss_fn, params, batch, key, num_layers=num_layers, chunk_size=chunk_size,
                 layer_groups=layer_groups, strategy="vmap", importance_chunk_size=importance_chunk_size,
                 importance_sample_size=importance_sample_size, sketch_dim=sketch_dim, sketch_key=None,
                 merge_repeats=merge_repeats).info


def leaf_sketch_widths(shape: Sequence[int], sketch_dim) -> tuple[int, int]:
    """``(k_a, k_b)``: the widths a leaf of ``shape`` (viewed as an ``(a, b)`` matrix, its last
    axis against the others) gets from :func:`gbc_features`' ``sketch_dim`` (None: ``(a, b)``,
    exact); ``k_a k_b`` columns. E.g. ``(784, 256)`` with ``k = 256``: ``(16, 16)``."""
    return _leaf_widths(tuple(int(d) for d in shape), _check_sketch_dim(sketch_dim))


def gbc_block_widths(params: PyTree, blocks: Sequence[str], *, sketch_dim=None, layer_groups=None) -> np.ndarray:
    """``(B,)`` columns of each named layer block (e.g. ``GBCInfo.blocks``) of GBC features.

    A block has one column per parameter of its layer (``sketch_dim=None``), or per leaf the
    sketched widths ``k_a k_b`` of :func:`gbc_features`' ``sketch_dim`` (an int ``k``: at most
    ``k`` per leaf; a pair ``(k_a, k_b)``). Shapes only: nothing is computed on the device.
    """
    sketch_dim = _check_sketch_dim(sketch_dim)
    groups = layer_groups_of(params, layer_groups)
    unknown = [b for b in blocks if b not in groups]
    if unknown:
        raise ValueError(f"blocks must name layers of params ({list(groups)}); got unknown {unknown}")
    leaves = jax.tree_util.tree_leaves(params)
    return np.array([sum(math.prod(_leaf_widths(np.shape(leaves[i]), sketch_dim)) for i in groups[b]) for b in blocks],
                    dtype=np.int64)


class _Plan(NamedTuple):
    """Steps 1-3 of :func:`gbc_features`: the checked inputs, the layer draw, the column plan."""

    batch: PyTree
    sketch_dim: Any
    leaves: list
    leaf_ids: list
    leaf_scales: Any
    info: "GBCInfo"


def _plan(loss_fn, params, batch, key, *, num_layers, chunk_size, layer_groups, strategy,
          importance_chunk_size, importance_sample_size, sketch_dim, sketch_key, merge_repeats) -> _Plan:
    """Checks, the importance pass, the layer draw from ``key`` and the column plan: what
    :func:`gbc_features` and :func:`gbc_layer_draw` share, so that both draw the same blocks."""
    sketch_dim, n, groups = _check_gbc_args(
        loss_fn, params, batch, key, num_layers=num_layers, chunk_size=chunk_size, layer_groups=layer_groups,
        strategy=strategy, importance_chunk_size=importance_chunk_size,
        importance_sample_size=importance_sample_size, sketch_dim=sketch_dim, sketch_key=sketch_key)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    if importance_chunk_size is None and chunk_size is not None:
        importance_chunk_size = max(chunk_size, RECOMMENDED_IMPORTANCE_CHUNK_SIZE)
    importance, probs = _layer_probabilities(loss_fn, params, batch, key, groups, n, importance_chunk_size,
                                             importance_sample_size)
    draws, block_layers, counts, scales = _draw_blocks(probs, key, num_layers, merge_repeats)
    leaves = jax.tree_util.tree_leaves(params)
    leaf_ids, leaf_scales, block_sizes = _column_plan(groups, leaves, block_layers, scales, sketch_dim)
    info = _info(groups, importance, probs, draws, block_layers, counts, scales, block_sizes)
    return _Plan(batch, sketch_dim, leaves, leaf_ids, leaf_scales, info)


def _check_gbc_args(loss_fn, params, batch, key, *, num_layers, chunk_size, layer_groups, strategy,
                    importance_chunk_size, importance_sample_size, sketch_dim, sketch_key):
    """:func:`gbc_features`' checks, before any computation; returns ``(sketch_dim, N, layer groups)``."""
    check_int(num_layers, "num_layers")
    check_int(chunk_size, "chunk_size", allow_none=True)
    check_int(importance_chunk_size, "importance_chunk_size", allow_none=True)
    check_int(importance_sample_size, "importance_sample_size", allow_none=True)
    check_choice(strategy, "strategy", STRATEGIES)
    check_key(key)
    sketch_dim = _check_sketch_dim(sketch_dim)
    if sketch_key is not None:
        if sketch_dim is None:
            raise ValueError("sketch_key is only used with sketch_dim; pass sketch_dim too (or no sketch_key)")
        check_key(sketch_key, "sketch_key")
    n = leading_size(batch, "batch")
    groups = layer_groups_of(params, layer_groups)
    for i, leaf in enumerate(jax.tree_util.tree_leaves(params)):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ArgumentTypeError(f"every leaf of params must be floating point; got dtype "
                                    f"{jnp.result_type(leaf)} for leaf {i}")
    check_loss_fn(loss_fn, params, batch)
    return sketch_dim, n, groups


def _layer_probabilities(loss_fn, params, batch, key, groups, n, chunk_size, sample_size):
    """``(A, p)``: float64 layer importances ``A_l = ||(1/N) sum_j grad_l f_j||^2`` and
    ``p_l = A_l / sum A_l``, over ``sample_size`` rows drawn with ``fold_in(key, 1)`` when it is < N."""
    importance_batch = batch
    if sample_size is not None and sample_size < n:
        # A key of its own (fold_in), so the layer draw still uses `key` itself.
        rows = jax.random.choice(jax.random.fold_in(key, 1), n, shape=(sample_size,), replace=False)
        rows = jnp.sort(rows)
        importance_batch = jax.tree_util.tree_map(lambda x: x[rows], batch)
    leaf_sq = np.asarray(
        jax.device_get(_leaf_sq_norms_of_mean_grad(loss_fn, params, importance_batch, chunk_size)),
        np.float64,
    )
    importance = np.array([leaf_sq[ids].sum() for ids in groups.values()], dtype=np.float64)
    if not np.all(np.isfinite(importance)):
        raise ValueError("layer importances A_l are not finite: the loss or its gradient has NaN/inf at params")
    total = importance.sum()
    if total <= 0:
        raise ValueError(
            "every layer importance A_l = ||mean gradient||^2 is zero: the mean loss is stationary at "
            "params, so there is no layer distribution to sample from"
        )
    return importance, importance / total


def _leaf_widths(shape, sketch_dim) -> tuple[int, int]:
    """Columns of a leaf as ``(a, b)``: its matrix shape, or its sketched widths ``(k_a, k_b)``."""
    return _as_matrix_shape(shape) if sketch_dim is None else _sketch_widths(shape, sketch_dim)


def _column_plan(groups, leaves, block_layers, scales, sketch_dim):
    """``(leaf_ids, leaf_scales, block_sizes)``: the leaves of the drawn blocks in column order
    (a leaf repeats when its layer is drawn unmerged), one scale per entry, columns per block."""
    names = tuple(groups)
    leaf_ids: list[int] = []
    leaf_scales: list[float] = []
    block_sizes: list[int] = []
    for layer, scale in zip(block_layers, scales):
        ids = groups[names[layer]]
        leaf_ids.extend(ids)
        leaf_scales.extend([scale] * len(ids))
        block_sizes.append(int(sum(math.prod(_leaf_widths(np.shape(leaves[i]), sketch_dim)) for i in ids)))
    return leaf_ids, leaf_scales, block_sizes


def _projections(sketch_key, leaves, leaf_ids, sketch_dim, dtype):
    """One ``(left, right)`` projection pair per entry of ``leaf_ids``, drawn from
    ``fold_in(sketch_key, leaf index)`` alone: the same arrays for a repeated leaf."""
    by_leaf = {i: _leaf_projection(jax.random.fold_in(sketch_key, i), tuple(np.shape(leaves[i])),
                                   _leaf_widths(np.shape(leaves[i]), sketch_dim), dtype) for i in set(leaf_ids)}
    return tuple(by_leaf[i] for i in leaf_ids)


def make_gbc_feature_fn(loss_fn: LossFn, batch: PyTree, **gbc_kwargs) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``feature_fn(params, key) -> (N, D)`` for :func:`pivotal.history_features`, GBC flavour.

    Each snapshot gets its own importances and its own layer draw (from its key), as in
    Alg. 3. ``gbc_kwargs`` go to :func:`gbc_features` (``num_layers``, ``chunk_size``,
    ``layer_groups``, ``merge_repeats``, ``strategy``, ``importance_chunk_size``,
    ``importance_sample_size``, ``sketch_dim``, ``sketch_key``). With ``sketch_dim``, a
    ``sketch_key`` given here projects every snapshot's gradients with the same matrices;
    without one each snapshot derives its own from its key (unbiased either way).
    """
    if gbc_kwargs.get("return_info"):
        raise ValueError("return_info must be False inside a history feature_fn")

    def feature_fn(params, key):
        return gbc_features(loss_fn, params, batch, key, **gbc_kwargs)

    return feature_fn
