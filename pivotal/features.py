"""Per-example gradient features for meta-sample selection (paper Eq. 11-14, Alg. 3).

Selection clusters one vector ``G_j`` per training example whose inner products
approximate the inner products of full per-example loss gradients
``<grad f_i(theta), grad f_j(theta)>`` (paper Eq. 7-9). This module builds them:

* :func:`rbc_features` -- RBC (Eq. 11-12): the exact gradient of the last linear
  layer's kernel, ``A_j outer h_j``, from one forward pass.
* :func:`gbc_features` -- GBC (Eq. 13-14): per-example gradients of a few layers
  importance-sampled with probability ``p_l = A_l / sum_l A_l``, scaled so the
  feature inner products are unbiased for the full-gradient inner products;
  optionally sketched (``sketch_dim``) to a bounded width per layer, still unbiased.
* :func:`per_example_grads` -- chunked per-example gradients (``vmap(grad)`` or an
  un-batched ``grad`` per example), the workhorse of GBC.
* :func:`sample_snapshot_epochs` / :func:`history_features` -- Alg. 3: features from
  several parameter snapshots after the best-validation epoch, concatenated.

Every ``loss_fn`` here has the signature ``loss_fn(params, batch) -> (B,)``: one loss
per example, where ``batch`` is any pytree whose leaves share a leading axis ``B``.
Example ``j``'s loss must depend on example ``j`` only (no batch statistics such as
BatchNorm in training mode; pass the running statistics in ``params`` or close over
them), because per-example gradients evaluate ``loss_fn`` on batches of one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pivotal.reweight import leading_size
from pivotal.sharding import (
    example_placement,
    example_sharding,
    num_shards,
    per_shard,
    place_examples,
    replicate,
)

__all__ = [
    "RECOMMENDED_CHUNK_SIZE",
    "RECOMMENDED_IMPORTANCE_CHUNK_SIZE",
    "GBCInfo",
    "gbc_features",
    "history_features",
    "label_free_loss",
    "layer_groups_of",
    "make_gbc_feature_fn",
    "make_rbc_feature_fn",
    "per_example_grads",
    "rbc_features",
    "sample_snapshot_epochs",
]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


_min_max = jax.jit(lambda x: (jnp.min(x), jnp.max(x)))


def _value_range(x) -> tuple[int, int] | None:
    """``(min, max)`` of a non-empty integer ``x``, or None for a tracer (value checks are skipped
    under jit) or an empty array. Reduced on the device(s): only two scalars reach the host, so
    it also works on arrays sharded over several processes."""
    if isinstance(x, jax.core.Tracer) or not np.size(x):
        return None
    return tuple(int(v) for v in jax.device_get(_min_max(x)))


def _check_finite(name: str, x) -> None:
    if isinstance(x, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return
    # Reduce on the device: only one bool crosses to the host.
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"`{name}` contains NaN or inf values.")


def _check_positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_loss_fn(loss_fn: LossFn, params: PyTree, batch: PyTree) -> None:
    """Abstractly evaluate ``loss_fn`` on a batch of one: it must return shape (1,)."""
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(params, batch) -> (B,), got {type(loss_fn)}.")
    one = jax.tree_util.tree_map(lambda x: x[:1], batch)
    out = jax.eval_shape(loss_fn, params, one)
    if not hasattr(out, "shape") or tuple(out.shape) != (1,):
        shape = getattr(out, "shape", type(out))
        raise ValueError(
            f"`loss_fn(params, batch)` must return per-example losses of shape (B,); "
            f"on a batch of one it returned {shape}, expected (1,)."
        )


# ---------------------------------------------------------------------------
# RBC
# ---------------------------------------------------------------------------


def label_free_loss(logits: jax.Array) -> jax.Array:
    r"""Label-free part of the cross-entropy: ``logsumexp(logits, axis=-1)``.

    Cross-entropy splits as ``CE(z, y) = logsumexp(z) - z_y``, so its gradient w.r.t.
    the parameters is ``J^T softmax(z) - J^T onehot(y)`` (paper Lemma 1 / Eq. S15, with
    ``J = dz/dtheta``). The first term, which needs no label, is the gradient of this
    function. GBC uses it under label noise, where the observed labels are untrusted.

    Args:
      logits: ``(..., C)`` unnormalised scores.

    Returns:
      ``(...)``: one value per row, e.g. ``(B,)`` for ``(B, C)`` logits.
    """
    if jnp.ndim(logits) < 1:
        raise ValueError(f"`logits` must have a class axis, shape (..., C); got shape {jnp.shape(logits)}.")
    return jax.nn.logsumexp(logits, axis=-1)


def rbc_features(
    penultimate: jax.Array,
    logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    include_bias: bool = False,
) -> jax.Array:
    r"""RBC features ``G_j = A_j h_j^T`` (paper Eq. 11-12), flattened.

    With ``h_j`` (D,) the input of the last linear layer and ``z_j = W h_j + b`` its
    output (the logits),

    .. math::
        A_j = \mathrm{softmax}(z_j) - \mathrm{onehot}(y_j) \quad\text{(label-aware)},\qquad
        A_j = \mathrm{softmax}(z_j) \quad\text{(label-free, ``labels is None``)},

    and ``G_j = A_j h_j^T`` is exactly ``d f_j / d W`` (shape (C, D)) for
    ``f_j = CE(z_j, y_j)`` (label-aware) or ``f_j = logsumexp(z_j)`` (label-free). A Flax
    ``Dense`` kernel is stored as (D, C), so this is the per-example kernel gradient
    transposed. The cost is one outer product per example: the output itself is
    O(N C D), so there is nothing to gain from chunking; slice the inputs if the
    output does not fit.

    Args:
      penultimate: ``(N, D)`` inputs ``h_j`` of the last linear layer.
      logits: ``(N, C)`` outputs ``z_j`` of the last linear layer.
      labels: optional ``(N,)`` integer labels in ``[0, C)``.
      include_bias: also append ``A_j`` itself, the gradient of the bias ``b``.

    Returns:
      ``(N, C * D)`` (``(N, C * D + C)`` with ``include_bias``), row ``j`` being
      ``A_j outer h_j`` flattened row-major over (C, D), then ``A_j``.
    """
    if jnp.ndim(penultimate) != 2:
        raise ValueError(f"`penultimate` must have shape (N, D); got shape {jnp.shape(penultimate)}.")
    if jnp.ndim(logits) != 2:
        raise ValueError(f"`logits` must have shape (N, C); got shape {jnp.shape(logits)}.")
    n, _ = jnp.shape(penultimate)
    n_logits, num_classes = jnp.shape(logits)
    if n_logits != n:
        raise ValueError(
            f"`logits` must have as many rows as `penultimate` ({n}); got shape {jnp.shape(logits)}."
        )
    _check_finite("penultimate", penultimate)
    _check_finite("logits", logits)

    a = jax.nn.softmax(logits, axis=-1)
    if labels is not None:
        if jnp.shape(labels) != (n,):
            raise ValueError(f"`labels` must have shape (N,) = ({n},); got shape {jnp.shape(labels)}.")
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"`labels` must be integers; got dtype {jnp.result_type(labels)}.")
        bounds = _value_range(labels)
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= num_classes):
            raise ValueError(
                f"`labels` must lie in [0, C) = [0, {num_classes}); got values in [{bounds[0]}, {bounds[1]}]."
            )
        a = a - jax.nn.one_hot(labels, num_classes, dtype=a.dtype)

    h = jnp.asarray(penultimate, dtype=jnp.result_type(a, penultimate))
    kernel_grad = (a[:, :, None] * h[:, None, :]).reshape(n, -1)
    if include_bias:
        return jnp.concatenate([kernel_grad, a.astype(kernel_grad.dtype)], axis=1)
    return kernel_grad


# ---------------------------------------------------------------------------
# Per-example gradients
# ---------------------------------------------------------------------------


def _single_example_loss(loss_fn: LossFn) -> Callable[[PyTree, PyTree], jax.Array]:
    """``(params, example) -> scalar``: ``loss_fn`` on a batch of one example."""

    def loss_one(params, example):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        return loss_fn(params, one)[0]

    return loss_one


# Strategies for the examples inside one chunk (see :func:`per_example_grads`).
_STRATEGIES = ("vmap", "map")
# Above this many examples per chunk, strategy="map" runs a compiled loop rather than
# unrolling single-example gradients into straight-line code (compile time grows with it).
_MAX_UNROLL = 64

#: Suggested ``chunk_size`` for per-example gradients on CPU. On XLA:CPU, LeNet-5 runs
#: fastest with chunks of 8-32 examples: ``vmap(grad)`` turns convolution-kernel gradients
#: into grouped convolutions that slow down as chunks grow, while small chunks pay a
#: dispatch per chunk. On accelerators larger chunks (hundreds) are usually better.
RECOMMENDED_CHUNK_SIZE = 16
#: Suggested batch size for the importance pass of :func:`gbc_features` (one backward
#: pass of a summed loss per chunk: no per-example gradients, so larger chunks are cheap).
RECOMMENDED_IMPORTANCE_CHUNK_SIZE = 128


def _check_strategy(strategy) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}; got {strategy!r}.")


def _map_examples(fn: Callable, chunk: PyTree, strategy: str):
    """``fn`` applied to every example of ``chunk``, outputs stacked on a leading axis.

    ``"vmap"``: ``jax.vmap(fn)``. ``"map"``: one un-batched call per example (no vmap, so
    convolution-kernel gradients stay ordinary convolutions instead of grouped ones),
    unrolled into straight-line code for up to ``_MAX_UNROLL`` examples and a compiled
    ``lax.map`` loop beyond.
    """
    if strategy == "vmap":
        return jax.vmap(fn)(chunk)
    size = jax.tree_util.tree_leaves(chunk)[0].shape[0]
    if size > _MAX_UNROLL:
        return jax.lax.map(fn, chunk)
    outs = [fn(jax.tree_util.tree_map(lambda x, i=i: x[i], chunk)) for i in range(size)]
    return jax.tree_util.tree_map(lambda *rows: jnp.stack(rows), *outs)


def _chunk_starts(n: int, chunk_size: int | None) -> tuple[int, list[int]]:
    """``(c, starts)``: chunks of ``c = min(chunk_size, n)`` rows starting at ``starts``.

    Every chunk is full: when ``c`` does not divide ``n`` the last chunk is shifted back
    so that it ends at ``n`` (it overlaps the previous one), as in ``pivotal.kmeans``.
    One chunk shape means one compiled kernel and no remainder to concatenate.
    """
    c = n if chunk_size is None else min(chunk_size, n)
    starts = list(range(0, n - c + 1, c))
    if starts[-1] + c < n:
        starts.append(n - c)
    return c, starts


def _is_traced(*trees) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for tree in trees for leaf in jax.tree_util.tree_leaves(tree))


def _slice_rows(batch: PyTree, start, size: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0), batch)


def _write_rows(out: PyTree, rows: PyTree, start) -> PyTree:
    return jax.tree_util.tree_map(
        lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r.astype(o.dtype), start, axis=0), out, rows
    )


def _run_chunks(step: Callable, init: PyTree, starts: list[int], traced: bool) -> PyTree:
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


def _placed(batch: PyTree, params: PyTree):
    """``(placement, batch, params)``: where the rows of ``batch`` live (None: one device, or
    under a trace), with the batch's other leaves moved there and ``params`` replicated."""
    placement = None if _is_traced(batch, params) else example_placement(batch)
    if placement is None:
        return None, batch, params
    return placement, place_examples(batch, placement), replicate(params, placement[0])


def _zeros_rows(n: int, row_shapes: PyTree, placement) -> PyTree:
    """Preallocated ``(n, ...)`` outputs, example-sharded like the batch when ``placement`` is given."""
    device = None if placement is None else example_sharding(*placement)
    return jax.tree_util.tree_map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype, device=device), row_shapes)


def _chunked_rows(chunk_fn: Callable, batch: PyTree, chunk_size: int | None, step_fn: Callable, params: PyTree) -> PyTree:
    """Rows ``chunk_fn(params, chunk)`` for all examples, written chunk by chunk into a preallocated output.

    ``step_fn(out, start, params, batch, size, placement)`` must compute ``chunk_fn`` on the rows
    ``start : start + size`` and write them into ``out`` (jitted with ``out`` donated), per shard
    when ``placement`` is given (:func:`pivotal.sharding.per_shard`).

    On an example-sharded batch every device runs the chunk loop over its own rows (the chunk
    starts are those of one shard: all shards have the same size), and the output is sharded
    the same way: no row leaves its device.
    """
    placement, batch, params = _placed(batch, params)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shards = 1 if placement is None else num_shards(placement)
    c, starts = _chunk_starts(n // shards, chunk_size)
    row_shapes = jax.eval_shape(lambda p, b: chunk_fn(p, _slice_rows(b, 0, c)), params, batch)
    out = _zeros_rows(n, row_shapes, placement)
    return _run_chunks(lambda state, start: step_fn(state, start, params, batch, c, placement), out, starts,
                       _is_traced(batch, params))


def _grads_chunk(loss_fn, params, chunk, strategy):
    grad_one = jax.grad(_single_example_loss(loss_fn))
    return _map_examples(lambda example: grad_one(params, example), chunk, strategy)


@functools.partial(jax.jit, static_argnames=("loss_fn", "size", "strategy", "placement"), donate_argnums=(0,))
def _grads_step(out, start, params, batch, loss_fn, size, strategy, placement=None):
    def write(out, start, params, batch):
        chunk = _slice_rows(batch, start, size)
        return _write_rows(out, _grads_chunk(loss_fn, params, chunk, strategy), start)

    return per_shard(write, placement, (True, False, False, True), True)(out, start, params, batch)


def per_example_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    strategy: str = "vmap",
) -> PyTree:
    r"""Per-example gradients ``grad_theta f_j(theta)`` for every example of ``batch``.

    ``f_one(params, example)`` is ``loss_fn`` applied to a batch holding that one
    example. The examples go through in chunks of ``chunk_size`` (None = all at once),
    each chunk's gradients written into a preallocated ``(N, ...)`` output, so memory is
    the O(N x P) output plus O(chunk_size x P) for one chunk, whatever N. N need not be
    divisible by ``chunk_size``: the last chunk is shifted back to end at N (its overlap
    with the previous chunk is recomputed), so every chunk has the same shape.

    ``chunk_size=None`` keeps the all-at-once behaviour; for large N pass a chunk size.
    On CPU :data:`RECOMMENDED_CHUNK_SIZE` (16) is a good choice; on accelerators, larger.

    Within a chunk, ``strategy`` picks how the examples are processed (same results up
    to float rounding):

    * ``"vmap"`` (default): ``vmap(grad(f_one))``, one batched computation per chunk.
    * ``"map"``: ``grad(f_one)`` once per example without vmap, unrolled in the compiled
      chunk (a ``lax.map`` loop for chunks over 64 examples). Under vmap a convolution
      kernel's gradient becomes a grouped convolution, which some backends (XLA:CPU) run
      slowly; ``"map"`` keeps ordinary convolutions. Use it with small chunks (4-32).

    Computations are jit-compiled and cached on ``(loss_fn, chunk size, strategy)``: pass
    the same ``loss_fn`` object across calls to avoid recompiling.

    Sharded: when ``batch`` is split over devices on its example axis (see
    :func:`pivotal.sharding.shard_examples`), every device runs the chunk loop over its own
    rows (``shard_map``; ``params`` are replicated): memory per device is its share of the
    output plus one chunk, nothing crosses devices, and the gradients come back sharded the
    same way. Same values as on one device. Called on concrete
    arrays, the chunks are driven from Python (one dispatch per chunk); under
    ``jax.jit`` by a ``lax.fori_loop``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: parameter pytree (P parameters in all).
      batch: pytree whose leaves have a leading axis N.
      chunk_size: examples per chunk; None = all at once.
      strategy: ``"vmap"`` or ``"map"``, see above.

    Returns:
      A pytree like ``params`` whose leaves have shape ``(N, *leaf.shape)``.
    """
    _check_positive_int("chunk_size", chunk_size, allow_none=True)
    _check_strategy(strategy)
    leading_size(batch, "batch")
    _check_loss_fn(loss_fn, params, batch)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    return _chunked_rows(
        lambda p, chunk: _grads_chunk(loss_fn, p, chunk, strategy),
        batch,
        chunk_size,
        lambda out, start, p, b, c, placement: _grads_step(out, start, p, b, loss_fn, c, strategy, placement),
        params,
    )


# ---------------------------------------------------------------------------
# GBC
# ---------------------------------------------------------------------------


def _leaf_path_str(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def layer_groups_of(
    params: PyTree,
    layer_groups: Callable[[str], Hashable] | Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None = None,
) -> dict[str, list[int]]:
    """The "layers" GBC samples from: a partition of the leaves of ``params``.

    Leaves are named by their path joined with ``/`` (e.g. ``"params/Dense_0/kernel"``).

    * ``layer_groups=None`` (default): leaves that share the same parent path form one
      layer, named by that parent (``"params/Dense_0"`` holds its ``kernel`` and
      ``bias``) -- one Flax module = one layer. Leaves directly at the root share the
      layer ``""``.
    * a callable ``leaf_path -> group name``: leaves with equal names form one layer.
    * a mapping ``{group name: [leaf paths]}`` or a sequence of lists of leaf paths
      (named ``"group_0"``, ``"group_1"``, ...): every leaf must appear exactly once.

    Returns:
      ``{layer name: [leaf indices in tree_leaves order]}`` in order of first leaf.
    """
    paths = [_leaf_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError("`params` has no array leaves.")
    groups: dict[str, list[int]] = {}
    if layer_groups is None or callable(layer_groups):
        for index, path in enumerate(paths):
            if layer_groups is None:
                name = path.rsplit("/", 1)[0] if "/" in path else ""
            else:
                name = layer_groups(path)
                if not isinstance(name, Hashable):
                    raise TypeError(f"`layer_groups` must map a leaf path to a hashable name; got {name!r}.")
            groups.setdefault(str(name), []).append(index)
        return groups

    if isinstance(layer_groups, Mapping):
        named = [(str(name), list(members)) for name, members in layer_groups.items()]
    elif isinstance(layer_groups, Sequence) and not isinstance(layer_groups, str):
        named = [(f"group_{i}", list(members)) for i, members in enumerate(layer_groups)]
    else:
        raise TypeError(
            "`layer_groups` must be None, a callable leaf_path -> name, a mapping name -> leaf paths, "
            f"or a sequence of lists of leaf paths; got {type(layer_groups)}."
        )
    position = {path: index for index, path in enumerate(paths)}
    seen: set[str] = set()
    for name, members in named:
        if not members:
            raise ValueError(f"`layer_groups` group {name!r} is empty.")
        for path in members:
            if path not in position:
                raise ValueError(f"`layer_groups` names an unknown leaf path {path!r}; known paths: {paths}.")
            if path in seen:
                raise ValueError(f"`layer_groups` lists leaf path {path!r} more than once.")
            seen.add(path)
        groups[name] = [position[path] for path in members]
    missing = [path for path in paths if path not in seen]
    if missing:
        raise ValueError(f"`layer_groups` must cover every leaf of `params`; missing {missing}.")
    return groups


@functools.partial(jax.jit, static_argnames=("loss_fn", "size", "placement"), donate_argnums=(0,))
def _grad_of_sum_step(total, start, skip, params, batch, loss_fn, size, placement=None):
    """``total + grad sum_{i >= skip} f_i`` over the rows ``start : start + size``.

    ``total`` leaves have a leading axis of one partial sum per shard (size 1 unsharded); with
    ``placement`` each shard adds the gradient of its own rows to its own partial sum.
    """

    def add(total, start, skip, params, batch):
        chunk = _slice_rows(batch, start, size)
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
    placement, batch, params = _placed(batch, params)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    shards = 1 if placement is None else num_shards(placement)
    c, starts = _chunk_starts(n // shards, chunk_size)
    # Rows of the shifted last chunk that the previous chunk already covered.
    skips = {start: (starts[i - 1] + c - start if i and starts[i - 1] + c > start else 0)
             for i, start in enumerate(starts)}
    traced = _is_traced(params, batch)
    skip_arr = jnp.asarray([skips[s] for s in starts], dtype=jnp.int32)
    # One partial sum per shard: (shards, *leaf) zeros, split over the devices like the rows.
    shard_sum = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + jnp.shape(x), jnp.result_type(x)), params)
    zeros = _zeros_rows(shards, shard_sum, placement)
    if traced:
        starts_arr = jnp.asarray(starts, dtype=jnp.int32)
        total = jax.lax.fori_loop(
            0, len(starts),
            lambda i, t: _grad_of_sum_step(t, starts_arr[i], skip_arr[i], params, batch, loss_fn, c), zeros,
        )
    else:
        total = zeros
        for start in starts:
            total = _grad_of_sum_step(total, np.int32(start), np.int32(skips[start]), params, batch, loss_fn, c,
                                      placement)
    return _sq_norms_of_mean(total, n)


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
        return _single_example_loss(loss_fn)(jax.tree_util.tree_unflatten(treedef, full), example)

    grad_one = jax.grad(loss_of_selected)

    def feature_one(example):
        grads = grad_one(selected, example)
        if projections is None:
            blocks = [jnp.ravel(grads[slot[i]]) for i in leaf_ids]
        else:
            blocks = [_sketch_leaf(grads[slot[i]], projections[k]) for k, i in enumerate(leaf_ids)]
        return jnp.concatenate([leaf_scales[k] * block for k, block in enumerate(blocks)])

    return _map_examples(feature_one, chunk, strategy)


@functools.partial(jax.jit, static_argnames=("loss_fn", "leaf_ids", "size", "strategy", "placement"),
                   donate_argnums=(0,))
def _selected_step(out, start, params, batch, leaf_scales, projections, loss_fn, leaf_ids, size, strategy,
                   placement=None):
    def write(out, start, params, batch, leaf_scales, projections):
        chunk = _slice_rows(batch, start, size)
        rows = _selected_chunk(loss_fn, params, chunk, leaf_ids, leaf_scales, strategy, projections)
        return _write_rows(out, rows, start)

    return per_shard(write, placement, (True, False, False, True, False, False), True)(
        out, start, params, batch, leaf_scales, projections)


def _selected_leaf_features(loss_fn, params, batch, leaf_ids, leaf_scales, chunk_size, strategy="vmap",
                            projections=None):
    """``(N, D)`` GBC features of the leaves ``leaf_ids``, chunk by chunk into a preallocated output."""
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    # The scales and projections travel with the parameters: replicated alongside them on a
    # sharded batch, so every shard and every chunk applies the same ones.
    return _chunked_rows(
        lambda p, chunk: _selected_chunk(loss_fn, p[0], chunk, leaf_ids, p[1], strategy, p[2]),
        batch,
        chunk_size,
        lambda out, start, p, b, c, placement: _selected_step(out, start, p[0], b, p[1], p[2], loss_fn, leaf_ids,
                                                              c, strategy, placement),
        (params, leaf_scales, projections),
    )


# ---------------------------------------------------------------------------
# GBC sketch
# ---------------------------------------------------------------------------


def _check_sketch_dim(sketch_dim) -> int | tuple[int, int] | None:
    """``sketch_dim`` as None, an int or a pair of ints; ValueError for anything else."""
    is_positive = lambda k: not isinstance(k, bool) and isinstance(k, (int, np.integer)) and k >= 1
    if sketch_dim is None:
        return None
    if isinstance(sketch_dim, (tuple, list)) and len(sketch_dim) == 2 and all(map(is_positive, sketch_dim)):
        return int(sketch_dim[0]), int(sketch_dim[1])
    if is_positive(sketch_dim):
        return int(sketch_dim)
    raise ValueError(
        f"`sketch_dim` must be None, a positive integer k (columns per leaf) or a pair (k_a, k_b) of positive "
        f"integers; got {sketch_dim!r}."
    )


def _check_key(name: str, key) -> None:
    if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape == (2,))):
        raise TypeError(f"`{name}` must be a jax.random key; got {type(key)} {getattr(key, 'shape', '')}.")


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
      strategy: how a chunk's per-example gradients are taken, ``"vmap"`` or ``"map"``;
        see :func:`per_example_grads`. Does not change the result beyond float rounding.
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
    _check_positive_int("num_layers", num_layers)
    _check_positive_int("chunk_size", chunk_size, allow_none=True)
    _check_positive_int("importance_chunk_size", importance_chunk_size, allow_none=True)
    _check_positive_int("importance_sample_size", importance_sample_size, allow_none=True)
    _check_strategy(strategy)
    _check_key("key", key)
    sketch_dim = _check_sketch_dim(sketch_dim)
    if sketch_key is not None:
        if sketch_dim is None:
            raise ValueError("`sketch_key` is only used with `sketch_dim`; pass `sketch_dim` too (or no `sketch_key`).")
        _check_key("sketch_key", sketch_key)
    n = leading_size(batch, "batch")
    groups = layer_groups_of(params, layer_groups)
    leaves = jax.tree_util.tree_leaves(params)
    for i, leaf in enumerate(leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"every leaf of `params` must be floating point; leaf {i} has dtype {jnp.result_type(leaf)}.")
    _check_loss_fn(loss_fn, params, batch)

    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    if importance_chunk_size is None and chunk_size is not None:
        importance_chunk_size = max(chunk_size, RECOMMENDED_IMPORTANCE_CHUNK_SIZE)
    importance_batch = batch
    if importance_sample_size is not None and importance_sample_size < n:
        # A key of its own (fold_in), so the layer draw below still uses `key` itself.
        rows = jax.random.choice(jax.random.fold_in(key, 1), n, shape=(importance_sample_size,), replace=False)
        rows = jnp.sort(rows)
        importance_batch = jax.tree_util.tree_map(lambda x: x[rows], batch)
    leaf_sq = np.asarray(
        jax.device_get(_leaf_sq_norms_of_mean_grad(loss_fn, params, importance_batch, importance_chunk_size)),
        np.float64,
    )
    names = tuple(groups)
    importance = np.array([leaf_sq[ids].sum() for ids in groups.values()], dtype=np.float64)
    if not np.all(np.isfinite(importance)):
        raise ValueError("layer importances A_l are not finite: the loss or its gradient has NaN/inf at `params`.")
    total = importance.sum()
    if total <= 0:
        raise ValueError(
            "every layer importance A_l = ||mean gradient||^2 is zero: the mean loss is stationary at "
            "`params`, so there is no layer distribution to sample from."
        )
    probs = importance / total

    # Sampling on log p sends p = 0 to -inf, so zero-importance layers are never drawn.
    with np.errstate(divide="ignore"):
        log_p = jnp.asarray(np.log(probs), dtype=jnp.float32)
    draws = np.asarray(jax.random.categorical(key, log_p, shape=(num_layers,)))

    if merge_repeats:
        block_layers, counts = np.unique(draws, return_counts=True)
    else:
        block_layers, counts = draws, np.ones_like(draws)
    scales = np.sqrt(counts / (num_layers * probs[block_layers]))

    leaf_ids: list[int] = []
    leaf_scales: list[float] = []
    block_sizes: list[int] = []
    # Columns of each leaf: its size, or its sketched width k_a k_b.
    widths = {i: (_as_matrix_shape(np.shape(leaves[i])) if sketch_dim is None
                  else _sketch_widths(np.shape(leaves[i]), sketch_dim)) for ids in groups.values() for i in ids}
    for layer, scale in zip(block_layers, scales):
        ids = groups[names[layer]]
        leaf_ids.extend(ids)
        leaf_scales.extend([scale] * len(ids))
        block_sizes.append(int(sum(math.prod(widths[i]) for i in ids)))

    dtype = jnp.result_type(*[leaves[i] for i in leaf_ids])
    projections = None
    if sketch_dim is not None:
        sketch_key = jax.random.fold_in(key, 2) if sketch_key is None else sketch_key
        # One projection per leaf, from (sketch_key, leaf index) alone; the same arrays for repeats.
        by_leaf = {i: _leaf_projection(jax.random.fold_in(sketch_key, i), tuple(np.shape(leaves[i])), widths[i],
                                       np.dtype(dtype)) for i in set(leaf_ids)}
        projections = tuple(by_leaf[i] for i in leaf_ids)
    features = _selected_leaf_features(
        loss_fn, params, batch, tuple(leaf_ids), jnp.asarray(leaf_scales, dtype=dtype), chunk_size, strategy,
        projections,
    )
    if not return_info:
        return features
    info = GBCInfo(
        layer_names=names,
        importance=importance,
        probabilities=probs,
        draws=tuple(names[i] for i in draws),
        blocks=tuple(names[i] for i in block_layers),
        counts=np.asarray(counts),
        scales=np.asarray(scales),
        block_sizes=np.asarray(block_sizes),
    )
    return features, info


# ---------------------------------------------------------------------------
# Snapshot history (Alg. 3)
# ---------------------------------------------------------------------------


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
        _check_positive_int("num_epochs", num_epochs)
        available = np.arange(num_epochs)
    elif isinstance(num_epochs, Sequence) or isinstance(num_epochs, np.ndarray):
        available = np.unique(np.asarray(num_epochs))
        if available.size == 0 or available.ndim != 1 or not np.issubdtype(available.dtype, np.integer):
            raise ValueError(f"`num_epochs` as a sequence must hold at least one integer epoch index; got {num_epochs!r}.")
    else:
        raise TypeError(f"`num_epochs` must be an int or a sequence of epoch indices; got {type(num_epochs)}.")
    if isinstance(best_epoch, bool) or not isinstance(best_epoch, (int, np.integer)):
        raise TypeError(f"`best_epoch` must be an int; got {type(best_epoch)}.")
    if best_epoch < 0 or best_epoch > available.max():
        raise ValueError(f"`best_epoch` must lie in [0, {available.max()}]; got {best_epoch}.")
    _check_positive_int("num_snapshots", num_snapshots)
    _check_positive_int("every", every, allow_none=True)

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
        raise TypeError(f"`feature_fn` must be callable as feature_fn(params, key); got {type(feature_fn)}.")
    if isinstance(snapshots, Mapping):
        available = sorted(int(e) for e in snapshots)
    elif isinstance(snapshots, Sequence) and not isinstance(snapshots, str):
        available = list(range(len(snapshots)))
    else:
        raise TypeError(f"`snapshots` must be a sequence indexed by epoch or a mapping epoch -> params; got {type(snapshots)}.")
    if not available:
        raise ValueError("`snapshots` is empty.")

    key_epochs, key_features = jax.random.split(key)
    if epochs is not None:
        chosen = np.unique(np.asarray(epochs))
        if chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer):
            raise ValueError(f"`epochs` must be a non-empty sequence of integer epochs; got {epochs!r}.")
        unknown = [int(e) for e in chosen if int(e) not in set(available)]
        if unknown:
            raise ValueError(f"`epochs` names snapshots that do not exist: {unknown}; available: {available}.")
    elif best_epoch is not None or num_snapshots is not None:
        if best_epoch is None or num_snapshots is None:
            raise ValueError("pass both `best_epoch` and `num_snapshots` (or `epochs`, or neither).")
        chosen = sample_snapshot_epochs(available, best_epoch, num_snapshots, key_epochs, every=every)
    else:
        chosen = np.asarray(available)

    blocks = []
    n_rows = None
    for epoch in chosen:
        block = feature_fn(snapshots[int(epoch)], jax.random.fold_in(key_features, int(epoch)))
        if jnp.ndim(block) != 2:
            raise ValueError(f"`feature_fn` must return (N, D); for epoch {int(epoch)} it returned shape {jnp.shape(block)}.")
        if n_rows is not None and block.shape[0] != n_rows:
            raise ValueError(
                f"`feature_fn` returned {block.shape[0]} rows for epoch {int(epoch)} but {n_rows} before; "
                "every snapshot must describe the same examples in the same order."
            )
        n_rows = block.shape[0]
        blocks.append(block)
    features = jnp.concatenate(blocks, axis=1)
    chosen = np.asarray(chosen, dtype=np.int64)
    return (features, chosen) if return_epochs else features


def make_rbc_feature_fn(
    forward_fn: Callable[[PyTree, PyTree], tuple[jax.Array, jax.Array]],
    batch: PyTree,
    *,
    labels: jax.Array | None = None,
    include_bias: bool = False,
    chunk_size: int | None = None,
) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``feature_fn(params, key) -> (N, C*D)`` for :func:`history_features`, RBC flavour.

    ``forward_fn(params, batch) -> (penultimate (B, D), logits (B, C))``. The forward
    pass runs in chunks of ``chunk_size`` examples (``lax.map``) to bound activation
    memory; the key is ignored (RBC is deterministic). On an example-sharded ``batch``
    the chunks run per shard, over each device's own rows, and the features come back
    sharded the same way.
    """
    _check_positive_int("chunk_size", chunk_size, allow_none=True)

    def chunked_forward(params, rows):
        def one(example):
            out = forward_fn(params, jax.tree_util.tree_map(lambda x: x[None], example))
            return jax.tree_util.tree_map(lambda x: x[0], out)

        return jax.lax.map(one, rows, batch_size=chunk_size)

    placement = None if chunk_size is None or _is_traced(batch) else example_placement(batch)
    rows = batch if placement is None else place_examples(batch, placement)
    if placement is not None:
        chunked_forward = jax.jit(per_shard(chunked_forward, placement, (False, True), (True, True)))

    def feature_fn(params, key=None):
        del key
        if chunk_size is None:
            h, z = forward_fn(params, batch)
        else:
            if placement is not None and not _is_traced(params):
                params = replicate(params, placement[0])
            h, z = chunked_forward(params, rows)
        return rbc_features(h, z, labels, include_bias=include_bias)

    return feature_fn


def make_gbc_feature_fn(loss_fn: LossFn, batch: PyTree, **gbc_kwargs) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``feature_fn(params, key) -> (N, D)`` for :func:`history_features`, GBC flavour.

    Each snapshot gets its own importances and its own layer draw (from its key), as in
    Alg. 3. ``gbc_kwargs`` go to :func:`gbc_features` (``num_layers``, ``chunk_size``,
    ``layer_groups``, ``merge_repeats``, ``strategy``, ``importance_chunk_size``,
    ``importance_sample_size``, ``sketch_dim``, ``sketch_key``). With ``sketch_dim``, a
    ``sketch_key`` given here projects every snapshot's gradients with the same matrices;
    without one each snapshot derives its own from its key (unbiased either way).
    """
    if gbc_kwargs.get("return_info"):
        raise ValueError("`return_info` cannot be used inside a history feature_fn.")

    def feature_fn(params, key):
        return gbc_features(loss_fn, params, batch, key, **gbc_kwargs)

    return feature_fn
