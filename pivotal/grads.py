"""Per-example gradients, chunked, and the layers GBC samples from.

* :func:`per_example_grads`: ``grad_theta f_j(theta)`` for every example, in chunks of a fixed
  size written into a preallocated output (``vmap(grad)`` or an un-batched ``grad`` per
  example), per shard on an example-sharded batch.
* :func:`layer_groups_of`: the partition of the parameter leaves into "layers".
* :func:`single_example_loss`, :func:`map_examples`: the per-example machinery GBC shares.

Every ``loss_fn`` here has the signature ``loss_fn(params, batch) -> (B,)``: one loss
per example, where ``batch`` is any pytree whose leaves share a leading axis ``B``.
Example ``j``'s loss must depend on example ``j`` only (no batch statistics such as
BatchNorm in training mode; pass the running statistics in ``params`` or close over
them), because per-example gradients evaluate ``loss_fn`` on batches of one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pivotal._checks import check_choice, check_int, check_loss_fn, leading_size
from pivotal._patches import per_example_leaf_grads
from pivotal._placement import per_shard
from pivotal._rows import chunked_rows, slice_rows, write_rows

__all__ = ["RECOMMENDED_CHUNK_SIZE", "STRATEGIES", "layer_groups_of", "map_examples", "per_example_grads",
           "single_example_loss"]

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]


def single_example_loss(loss_fn: LossFn) -> Callable[[PyTree, PyTree], jax.Array]:
    """``(params, example) -> scalar``: ``loss_fn`` on a batch of one example."""

    def loss_one(params, example):
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        return loss_fn(params, one)[0]

    return loss_one


# Strategies for the examples inside one chunk (see :func:`per_example_grads`).
STRATEGIES = ("vmap", "map", "patches")
# Above this many examples per chunk, strategy="map" runs a compiled loop rather than
# unrolling single-example gradients into straight-line code (compile time grows with it).
_MAX_UNROLL = 64

#: Suggested ``chunk_size`` for per-example gradients on CPU. On XLA:CPU, LeNet-5 runs
#: fastest with chunks of 8-32 examples: ``vmap(grad)`` turns convolution-kernel gradients
#: into grouped convolutions that slow down as chunks grow, while small chunks pay a
#: dispatch per chunk. On accelerators larger chunks (hundreds) are usually better.
RECOMMENDED_CHUNK_SIZE = 16


def map_examples(fn: Callable, chunk: PyTree, strategy: str):
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


def leaf_grads(loss_of_leaves: Callable, leaves: tuple, chunk: PyTree, strategy: str) -> tuple:
    """Per-example gradients ``(B, *leaf.shape)`` of ``loss_of_leaves(leaves, example) -> scalar``
    with respect to each of ``leaves`` (a tuple of arrays), by ``strategy``."""
    if strategy == "patches":
        return per_example_leaf_grads(loss_of_leaves, leaves, chunk)
    grad_one = jax.grad(loss_of_leaves)
    return map_examples(lambda example: grad_one(leaves, example), chunk, strategy)


def _grads_chunk(loss_fn, params, chunk, strategy):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    one = single_example_loss(loss_fn)
    loss_of_leaves = lambda ls, example: one(jax.tree_util.tree_unflatten(treedef, list(ls)), example)
    return jax.tree_util.tree_unflatten(treedef, list(leaf_grads(loss_of_leaves, tuple(leaves), chunk, strategy)))


@functools.partial(jax.jit, static_argnames=("loss_fn", "size", "strategy", "placement"), donate_argnums=(0,))
def _grads_step(out, start, params, batch, loss_fn, size, strategy, placement=None):
    def write(out, start, params, batch):
        chunk = slice_rows(batch, start, size)
        return write_rows(out, _grads_chunk(loss_fn, params, chunk, strategy), start)

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
    * ``"patches"``: ``vmap(grad)`` for every leaf except the kernels of ungrouped
      convolutions, whose per-example gradients are formed as products of the input's
      patches and the output gradient, ``dL_j/dW[o, i, s] = sum_p dL_j/dy[o, p] x_j[i, p + s]``
      (one batched forward and backward, no grouped convolution; :mod:`pivotal._patches`).

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
      strategy: ``"vmap"``, ``"map"`` or ``"patches"``, see above.

    Returns:
      A pytree like ``params`` whose leaves have shape ``(N, *leaf.shape)``.
    """
    check_int(chunk_size, "chunk_size", allow_none=True)
    check_choice(strategy, "strategy", STRATEGIES)
    leading_size(batch, "batch")
    check_loss_fn(loss_fn, params, batch)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    return chunked_rows(
        lambda p, chunk: _grads_chunk(loss_fn, p, chunk, strategy),
        batch,
        chunk_size,
        lambda out, start, p, b, c, placement: _grads_step(out, start, p, b, loss_fn, c, strategy, placement),
        params,
    )


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
        raise ValueError("params must have at least one array leaf; got none")
    groups: dict[str, list[int]] = {}
    if layer_groups is None or callable(layer_groups):
        for index, path in enumerate(paths):
            if layer_groups is None:
                name = path.rsplit("/", 1)[0] if "/" in path else ""
            else:
                name = layer_groups(path)
                if not isinstance(name, Hashable):
                    raise TypeError(f"layer_groups must map a leaf path to a hashable name; got {name!r}")
            groups.setdefault(str(name), []).append(index)
        return groups

    if isinstance(layer_groups, Mapping):
        named = [(str(name), list(members)) for name, members in layer_groups.items()]
    elif isinstance(layer_groups, Sequence) and not isinstance(layer_groups, str):
        named = [(f"group_{i}", list(members)) for i, members in enumerate(layer_groups)]
    else:
        raise TypeError(
            "layer_groups must be None, a callable leaf_path -> name, a mapping name -> leaf paths, "
            f"or a sequence of lists of leaf paths; got {type(layer_groups)}"
        )
    position = {path: index for index, path in enumerate(paths)}
    seen: set[str] = set()
    for name, members in named:
        if not members:
            raise ValueError(f"layer_groups group {name!r} must not be empty")
        for path in members:
            if path not in position:
                raise ValueError(f"layer_groups must name leaf paths of params ({paths}); "
                                 f"got an unknown leaf path {path!r}")
            if path in seen:
                raise ValueError(f"layer_groups must list each leaf path once; got {path!r} more than once")
            seen.add(path)
        groups[name] = [position[path] for path in members]
    missing = [path for path in paths if path not in seen]
    if missing:
        raise ValueError(f"layer_groups must cover every leaf of params; missing {missing}")
    return groups
