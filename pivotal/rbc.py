"""RBC features (paper Eq. 11-12): the exact last-layer gradient ``A_j outer h_j`` of each example.

* :func:`label_free_loss`: ``logsumexp(logits)``, the label-free part of the cross-entropy.
* :func:`rbc_features`: ``G_j = A_j h_j^T`` flattened, from one forward pass.
* :func:`sketch_rbc_features`: a Kronecker-structured random projection of the same rows,
  without forming the ``C x D`` outer products.
* :func:`make_rbc_feature_fn`: ``feature_fn(params, key)`` for :func:`pivotal.history_features`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pivotal._checks import ArgumentTypeError, check_finite_array, check_int, check_key, is_traced, value_range
from pivotal._placement import example_placement, per_shard, place_examples, replicate

__all__ = ["label_free_loss", "make_rbc_feature_fn", "rbc_features", "sketch_rbc_features"]

PyTree = Any


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
        raise ValueError(f"logits must have a class axis, shape (..., C); got shape {jnp.shape(logits)}")
    return jax.nn.logsumexp(logits, axis=-1)


def _check_inputs(penultimate, logits, labels) -> tuple[int, int]:
    """``(N, C)`` of the last layer's inputs ``(N, D)``, outputs ``(N, C)`` and optional labels."""
    if jnp.ndim(penultimate) != 2:
        raise ValueError(f"penultimate must have shape (N, D); got shape {jnp.shape(penultimate)}")
    if jnp.ndim(logits) != 2:
        raise ValueError(f"logits must have shape (N, C); got shape {jnp.shape(logits)}")
    n, _ = jnp.shape(penultimate)
    n_logits, num_classes = jnp.shape(logits)
    if n_logits != n:
        raise ValueError(f"logits must have as many rows as penultimate ({n}); got shape {jnp.shape(logits)}")
    check_finite_array(penultimate, "penultimate")
    check_finite_array(logits, "logits")
    if labels is not None:
        if jnp.shape(labels) != (n,):
            raise ValueError(f"labels must have shape (N,) = ({n},); got shape {jnp.shape(labels)}")
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise ArgumentTypeError(f"labels must be integers; got dtype {jnp.result_type(labels)}")
        bounds = value_range(labels)
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= num_classes):
            raise ValueError(
                f"labels must lie in [0, C) = [0, {num_classes}); got values in [{bounds[0]}, {bounds[1]}]")
    return n, num_classes


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
    n, num_classes = _check_inputs(penultimate, logits, labels)
    a = jax.nn.softmax(logits, axis=-1)
    if labels is not None:
        a = a - jax.nn.one_hot(labels, num_classes, dtype=a.dtype)
    h = jnp.asarray(penultimate, dtype=jnp.result_type(a, penultimate))
    kernel_grad = (a[:, :, None] * h[:, None, :]).reshape(n, -1)
    if include_bias:
        return jnp.concatenate([kernel_grad, a.astype(kernel_grad.dtype)], axis=1)
    return kernel_grad


@functools.partial(jax.jit, static_argnames=("sketch_classes", "sketch_dim", "has_labels"))
def _sketch(h, logits, labels, key, *, sketch_classes, sketch_dim, has_labels):
    num_classes, dim = logits.shape[1], h.shape[1]
    a = jax.nn.softmax(logits, axis=-1)
    if has_labels:
        a = a - jax.nn.one_hot(labels, num_classes, dtype=a.dtype)
    dtype = jnp.result_type(a, h)
    k_a, k_h = jax.random.split(key)
    P_a = jax.random.normal(k_a, (sketch_classes, num_classes), dtype)
    P_h = jax.random.normal(k_h, (sketch_dim, dim), dtype)
    pa = a.astype(dtype) @ P_a.T  # (N, kA)
    ph = h.astype(dtype) @ P_h.T  # (N, kh)
    scale = 1.0 / math.sqrt(sketch_classes * sketch_dim)
    return (pa[:, :, None] * ph[:, None, :]).reshape(h.shape[0], -1) * scale


def sketch_rbc_features(penultimate, logits, labels=None, *, key, sketch_classes: int,
                        sketch_dim: int):
    r"""A Kronecker-structured random projection of the RBC features ``A_j \otimes h_j``.

    ``S_j = (P_A A_j) \otimes (P_h h_j) / sqrt(k_A k_h)`` with independent standard Gaussian
    ``P_A (k_A, C)`` and ``P_h (k_h, D)``: this equals ``(P_A \otimes P_h) vec(A_j h_j^T)`` scaled,
    computed without forming the ``C x D`` outer product (cost O(N (C k_A + D k_h + k_A k_h))).
    Inner products are preserved in expectation,
    ``E <S_i, S_j> = E[<P_A A_i, P_A A_j>/k_A] E[<P_h h_i, P_h h_j>/k_h] = <A_i, A_j><h_i, h_j>
    = <G_i, G_j>``, with relative error shrinking like ``1/sqrt(k_A)`` + ``1/sqrt(k_h)``.
    One ``key`` fixes the projection for all rows, so rows computed in separate chunks or on
    separate devices are comparable. Row-wise, so it keeps the example sharding of its inputs.

    Args:
      penultimate: ``(N, D)`` last-layer inputs ``h_j``; logits: ``(N, C)``; labels: optional
        ``(N,)`` ints (label-aware ``A_j = softmax - onehot``), checked as in :func:`rbc_features`.
      key: ``jax.random`` key of the projection.
      sketch_classes, sketch_dim: ``k_A`` and ``k_h``.

    Returns:
      ``(N, k_A * k_h)`` sketched features.
    """
    h = jnp.asarray(penultimate) if not isinstance(penultimate, jax.Array) else penultimate
    z = jnp.asarray(logits) if not isinstance(logits, jax.Array) else logits
    if labels is not None:
        labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
    n, _ = _check_inputs(h, z, labels)
    sketch_classes = check_int(sketch_classes, "sketch_classes")
    sketch_dim = check_int(sketch_dim, "sketch_dim")
    check_key(key)
    dummy = labels if labels is not None else jnp.zeros((n,), jnp.int32)
    return _sketch(h, z, dummy, key, sketch_classes=sketch_classes, sketch_dim=sketch_dim,
                   has_labels=labels is not None)


def make_rbc_feature_fn(
    forward_fn: Callable[[PyTree, PyTree], tuple[jax.Array, jax.Array]],
    batch: PyTree,
    *,
    labels: jax.Array | None = None,
    include_bias: bool = False,
    chunk_size: int | None = None,
) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``feature_fn(params, key) -> (N, C*D)`` for :func:`pivotal.history_features`, RBC flavour.

    ``forward_fn(params, batch) -> (penultimate (B, D), logits (B, C))``. The forward
    pass runs in chunks of ``chunk_size`` examples (``lax.map``) to bound activation
    memory; the key is ignored (RBC is deterministic). On an example-sharded ``batch``
    the chunks run per shard, over each device's own rows, and the features come back
    sharded the same way.
    """
    check_int(chunk_size, "chunk_size", allow_none=True)

    def chunked_forward(params, rows):
        def one(example):
            out = forward_fn(params, jax.tree_util.tree_map(lambda x: x[None], example))
            return jax.tree_util.tree_map(lambda x: x[0], out)

        return jax.lax.map(one, rows, batch_size=chunk_size)

    placement = None if chunk_size is None or is_traced(batch) else example_placement(batch)
    rows = batch if placement is None else place_examples(batch, placement)
    if placement is not None:
        chunked_forward = jax.jit(per_shard(chunked_forward, placement, (False, True), (True, True)))

    def feature_fn(params, key=None):
        del key
        if chunk_size is None:
            h, z = forward_fn(params, batch)
        else:
            if placement is not None and not is_traced(params):
                params = replicate(params, placement[0])
            h, z = chunked_forward(params, rows)
        return rbc_features(h, z, labels, include_bias=include_bias)

    return feature_fn
