"""Data parallelism over the example axis with ``jax.sharding`` (issue 8).

JAX is the distributed engine: arrays carry a :class:`jax.sharding.NamedSharding`, jitted
functions are partitioned by XLA (GSPMD) from the shardings of their inputs, and where the
automatic partitioning would gather the example axis (chunked ``lax.map``/``scan`` loops,
blocked ``fori_loop`` passes) the work is written per shard with :func:`jax.shard_map` and the
cross-shard sums are explicit ``psum`` all-reduces. Several hosts: call
``jax.distributed.initialize()`` first on every host; :func:`data_mesh` then spans
``jax.devices()`` (all hosts' devices) and everything below works unchanged.

Conventions:

* one mesh axis (default ``"data"``) shards the leading (example) axis of every per-example
  array; parameters, optimizer state and centroids are replicated (``P()``);
* :func:`shard_examples` refuses an example count that the number of devices does not divide
  (a ``ValueError`` naming both): silently padding a training batch would change its mean loss.
  Use :func:`pad_examples` to pad explicitly with zero rows where that is harmless (features
  for K-means: zero rows carry no weight there), or choose a divisible batch size.

What shards as is (GSPMD, no gather of the example axis): ``make_meta_step``'s ``step`` with the
batch and meta set sharded and the state replicated; ``per_example_grads`` and
``gbc_features`` with ``chunk_size=None``; ``rbc_features`` and ``history_features`` of them.
What needs the wrappers here: chunked per-example gradients (:func:`sharded_per_example_grads`)
and K-means (:func:`sharded_spherical_kmeans`: assignments stay local, centroid sums are
all-reduced).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "data_mesh",
    "example_sharding",
    "shard_examples",
    "pad_examples",
    "replicate",
    "is_example_sharded",
    "sharded_per_example_grads",
    "sharded_spherical_kmeans",
    "sketch_rbc_features",
]

PyTree = Any


# --------------------------------------------------------------------------- meshes


def data_mesh(num_devices: Optional[int] = None, axis: str = "data", *, devices=None) -> Mesh:
    """A 1-D mesh over ``num_devices`` devices (default: all of ``jax.devices()``, every host's).

    The axis type is ``Auto``: jit partitions from the input shardings (GSPMD), so the library's
    functions need no sharding annotations of their own.
    """
    pool = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(pool)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive integer, got {num_devices!r}")
    if num_devices > len(pool):
        raise ValueError(f"num_devices={num_devices} but only {len(pool)} devices are available")
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a non-empty string, got {axis!r}")
    return Mesh(np.asarray(pool[:num_devices]), (axis,))


def _check_mesh(mesh, axis: str) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see data_mesh), got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
    return int(mesh.shape[axis])


def example_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: the leading axis split over ``axis``."""
    _check_mesh(mesh, axis)
    return NamedSharding(mesh, P(axis))


def _leading_size(tree: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array leaf")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in sizes:
        raise ValueError(f"every leaf of {name} needs a leading example axis; found a scalar")
    if len(sizes) != 1:
        raise ValueError(f"all leaves of {name} must share the leading example axis, got {sorted(sizes)}")
    return sizes.pop()


def shard_examples(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """``device_put`` every leaf with its leading (example) axis split over ``axis``.

    Raises ``ValueError`` when the example count N is not divisible by the number of devices on
    ``axis``: pad explicitly with :func:`pad_examples` (harmless for K-means features) or pick a
    divisible batch size (padding a training batch would change its mean loss).
    """
    shards = _check_mesh(mesh, axis)
    n = _leading_size(tree, "tree")
    if n % shards:
        raise ValueError(
            f"the example axis (N={n}) must be divisible by the {shards} devices of mesh axis "
            f"{axis!r}; pad with pad_examples(tree, {shards}) or choose a divisible size")
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def pad_examples(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
    """Pads every leaf's leading axis with zeros up to a multiple of ``multiple``.

    Returns ``(padded_tree, num_valid)``; the first ``num_valid`` rows are the original ones.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    n = _leading_size(tree, "tree")
    extra = -n % int(multiple)
    if not extra:
        return tree, n

    def pad(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])

    return jax.tree_util.tree_map(pad, tree), n


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``device_put`` every leaf fully replicated on ``mesh`` (``P()``): parameters, states."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def is_example_sharded(x, mesh: Optional[Mesh] = None, axis: str = "data") -> bool:
    """Whether ``x`` is a jax array whose leading axis is split over ``axis`` (of ``mesh``)."""
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return False
    if mesh is not None and sharding.mesh != mesh:
        return False
    spec = tuple(sharding.spec)
    if not spec:
        return False
    first = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return axis in first and sharding.mesh.shape[axis] > 1


def _as_example_sharded(tree, mesh, axis):
    """Inputs placed on the mesh, example axis split; already-correct leaves are left alone."""
    sharding = NamedSharding(mesh, P(axis))

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


# --------------------------------------------------------------------------- per-example grads


@functools.partial(jax.jit, static_argnames=("loss_fn", "mesh", "axis", "chunk_size", "options"))
def _sharded_grads(loss_fn, params, batch, *, mesh, axis, chunk_size, options):
    from pivotal.features import per_example_grads

    def local(p, b):
        return per_example_grads(loss_fn, p, b, chunk_size=chunk_size, **dict(options))

    # check_vma=False: with varying-manual-axes typing the parameters enter device-invariant and
    # the transpose of their implicit invariant->varying cast psums the gradients over devices --
    # right for a mean gradient, wrong here: each example's gradient must stay on its device.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis),
                         check_vma=False)(params, batch)


def sharded_per_example_grads(loss_fn: Callable, params: PyTree, batch: PyTree, mesh: Mesh, *,
                              axis: str = "data", chunk_size: Optional[int] = None,
                              **grad_kwargs) -> PyTree:
    """:func:`pivotal.features.per_example_grads` with the examples split over ``axis``.

    Each device runs the chunked ``vmap(grad)`` over its own examples (``shard_map``), so memory
    per device is O(chunk_size x P) and the ``(N, ...)`` gradients come back sharded on their
    leading axis. (Under plain GSPMD the chunked ``lax.map`` scans over the sharded axis and XLA
    all-gathers the batch; with ``chunk_size=None`` ``per_example_grads`` shards as is.)
    N must be divisible by the number of devices on ``axis``. ``grad_kwargs`` (hashable values,
    e.g. ``strategy="map"``) are forwarded to ``per_example_grads``.
    """
    shards = _check_mesh(mesh, axis)
    n = _leading_size(batch, "batch")
    if n % shards:
        raise ValueError(f"batch has N={n} examples, not divisible by the {shards} devices of {axis!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    batch = _as_example_sharded(batch, mesh, axis)
    params = replicate(params, mesh)
    return _sharded_grads(loss_fn, params, batch, mesh=mesh, axis=axis,
                          chunk_size=None if chunk_size is None else min(int(chunk_size), n // shards),
                          options=tuple(sorted(grad_kwargs.items())))


# --------------------------------------------------------------------------- K-means


def _member_weights(norms, signs, weighted: bool):
    """Row j adds ``scale_j G_j`` to its cluster's numerator and ``mass_j`` to its denominator."""
    nonzero = norms > 0
    if weighted:
        return jnp.where(nonzero, signs, 0), norms
    safe = jnp.where(nonzero, norms, 1)
    return jnp.where(nonzero, signs / safe, 0), nonzero.astype(norms.dtype)


def _local_assign_and_sums(G, norms, C, *, weighted: bool, block: int):
    """One pass over this shard's rows in blocks: assignments, signs and partial S2 sums.

    Returns ``(a (n,), s (n,), objective, num (M, D), den (M,), count (M,))`` of the local rows.
    """
    n, dim = G.shape
    m = C.shape[0]
    dtype = G.dtype
    cnorm = jnp.sqrt(jnp.sum(jnp.square(C), axis=1))
    if weighted:
        directions, obj_scale = C, jnp.ones((m,), dtype)
    else:
        directions, obj_scale = C / jnp.where(cnorm > 0, cnorm, 1)[:, None], cnorm
    block = min(block, n)
    num_blocks = -(-n // block)

    def body(b, carry):
        a_all, s_all, obj, num = carry
        # The last block is shifted back to stay full; rows seen twice are masked by `fresh`.
        start = jnp.minimum(b * block, n - block)
        Gb = jax.lax.dynamic_slice_in_dim(G, start, block)
        nb = jax.lax.dynamic_slice_in_dim(norms, start, block)
        dots = Gb @ directions.T
        a = jnp.argmax(jnp.abs(dots), axis=1).astype(jnp.int32)
        d = jnp.take_along_axis(dots, a[:, None], axis=1)[:, 0]
        s = jnp.where(d < 0, -1, 1).astype(dtype)
        fresh = (start + jnp.arange(block)) >= b * block
        obj = obj + jnp.sum(jnp.where(fresh, jnp.abs(d) * obj_scale[a], 0))
        scale, _ = _member_weights(nb, s, weighted)
        W = jax.nn.one_hot(a, m, dtype=dtype) * jnp.where(fresh, scale, 0)[:, None]
        num = num + W.T @ Gb
        a_all = jax.lax.dynamic_update_slice_in_dim(a_all, a, start, 0)
        s_all = jax.lax.dynamic_update_slice_in_dim(s_all, s, start, 0)
        return a_all, s_all, obj, num

    init = (jnp.zeros((n,), jnp.int32), jnp.zeros((n,), dtype), jnp.zeros((), dtype),
            jnp.zeros((m, dim), dtype))
    a, s, obj, num = jax.lax.fori_loop(0, num_blocks, body, init)
    _, mass = _member_weights(norms, s, weighted)
    den = jax.ops.segment_sum(mass, a, m)
    count = jax.ops.segment_sum((norms > 0).astype(jnp.int32), a, m)
    return a, s, obj, num, den, count


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "weighted", "block_size"))
def _sharded_lloyd(G, seeds, max_iters, tol, *, mesh, axis, weighted, block_size):
    """Algorithm 1's Lloyd loop, one ``shard_map``: local assignments, ``psum`` of the S2 sums."""

    def local(G_loc, seeds, max_iters, tol):
        n_loc = G_loc.shape[0]
        m, dim = seeds.shape
        dtype = G_loc.dtype
        norms = jnp.sqrt(jnp.sum(jnp.square(G_loc), axis=1))

        def cond(st):
            return (st[6] < max_iters) & ~st[7]

        def body(st):
            C_prev, num, den, count, assign, objective, it, _ = st
            # Empty clusters keep their previous centroid (they may win members back).
            C = jnp.where((count > 0)[:, None], num / jnp.where(den > 0, den, 1)[:, None], C_prev)
            a, _, obj, num, den, count = _local_assign_and_sums(G_loc, norms, C, weighted=weighted,
                                                                block=block_size)
            obj, num, den, count = jax.lax.psum((obj, num, den, count), axis)
            changed = jax.lax.psum(jnp.sum(a != assign, dtype=jnp.int32), axis)
            stalled = jnp.abs(obj - objective) <= tol * jnp.abs(obj)
            done = (changed == 0) | (stalled & (it > 0))
            return C, num, den, count, a, obj, it + 1, done

        init = (seeds, jnp.zeros((m, dim), dtype), jnp.zeros((m,), dtype), jnp.zeros((m,), jnp.int32),
                jnp.full((n_loc,), -1, jnp.int32), jnp.zeros((), dtype), jnp.zeros((), jnp.int32),
                jnp.zeros((), bool))
        C, _, _, count, assign, obj, it, _ = jax.lax.while_loop(cond, body, init)
        return C, assign, obj, it, count

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(), P(), P()),
                       out_specs=(P(), P(axis), P(), P(), P()), check_vma=False)
    return fn(G, seeds, max_iters, tol)


@functools.partial(jax.jit, static_argnames=("capacity", "weighted", "sample_size"))
def _kmeanspp_seeds(G, key, num_seeds, *, capacity, weighted, sample_size):
    # The seeding of pivotal.kmeans (same key -> same seeds as weighted_spherical_kmeans); it reads
    # only a subsample of rows, so GSPMD gathers just those rows.
    from pivotal.kmeans import seed_centroids

    norms = jnp.sqrt(jnp.sum(jnp.square(G), axis=1))
    return seed_centroids(G, norms, key, num_seeds, capacity=capacity, weighted=weighted,
                           sample_size=sample_size)


def _seed_sample(n: int, capacity: int, seed_sample_size: Optional[int]) -> int:
    from pivotal.kmeans import seed_sample

    return seed_sample(n, capacity, seed_sample_size)


def _check_features(G, name="G"):
    if not hasattr(G, "shape") or not hasattr(G, "dtype"):
        G = np.asarray(G)
    if G.ndim != 2 or G.shape[0] < 1 or G.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D), got shape {tuple(G.shape)}")
    if not jnp.issubdtype(G.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {G.dtype}")
    return G


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def sharded_spherical_kmeans(G, num_clusters: int, key, mesh: Mesh, *, axis: str = "data",
                             max_iters: int = 200, tol: float = 1e-4, weighted: bool = True,
                             block_size: int = 2048, seed_sample_size: Optional[int] = None,
                             init=None, cluster_capacity: Optional[int] = None):
    """:func:`pivotal.weighted_spherical_kmeans` with the rows of ``G`` split over ``axis``.

    Same algorithm, same k-means++ seeds for the same key, same stopping rule and the same
    empty-cluster restarts, so the result equals the single-device one up to float summation
    order. Each Lloyd step runs per shard (``shard_map``): the assignment of the local rows in
    blocks of ``block_size`` and their partial S2 sums; the ``(M, D)`` numerators, ``(M,)``
    denominators and member counts and the objective are then all-reduced (``psum``), so only
    O(M x D) crosses devices per step and G is never gathered. N not divisible by the device
    count is padded with zero rows, which carry no weight (they are dropped from the result).

    Returns a :class:`pivotal.kmeans.KMeansResult` whose ``assignments`` stay sharded over
    ``axis`` (when N is divisible) and whose ``centroids`` are replicated.
    """
    from pivotal.kmeans import KMeansResult

    shards = _check_mesh(mesh, axis)
    G = _check_features(G)
    n, dim = G.shape
    num_clusters = _check_int(num_clusters, "num_clusters", 1)
    if num_clusters > n:
        raise ValueError(f"num_clusters must satisfy 1 <= num_clusters <= N = {n}, got {num_clusters}")
    max_iters = _check_int(max_iters, "max_iters", 1)
    block_size = _check_int(block_size, "block_size", 1)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not (0 <= tol < math.inf):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    capacity = num_clusters if cluster_capacity is None else _check_int(cluster_capacity, "cluster_capacity",
                                                                        num_clusters)
    if seed_sample_size is not None:
        _check_int(seed_sample_size, "seed_sample_size", 1)
    if init is not None:
        init = _check_features(init, "init")
        if tuple(init.shape) != (num_clusters, dim):
            raise ValueError(f"init must have shape ({num_clusters}, {dim}), got {tuple(init.shape)}")
        init = jnp.asarray(init, G.dtype)
        if capacity > num_clusters:
            init = jnp.concatenate([init, jnp.zeros((capacity - num_clusters, dim), G.dtype)])
    if not isinstance(G, jax.Array):
        G = jnp.asarray(G)
    finite, nonzero = jax.jit(lambda x: (jnp.all(jnp.isfinite(x)), jnp.any(x != 0)))(G)
    if not bool(finite):
        raise ValueError("G contains NaN or inf values")
    if not bool(nonzero):
        raise ValueError("G must have at least one nonzero row")

    Gp, _ = pad_examples(G, shards)
    Gp = _as_example_sharded(Gp, mesh, axis)
    sample = _seed_sample(n, capacity, seed_sample_size)
    block = min(block_size, Gp.shape[0] // shards)
    tol_arr = jnp.asarray(tol, G.dtype)
    m = num_clusters
    attempt = 0
    while True:
        run_key = key if attempt == 0 else jax.random.fold_in(key, attempt)
        if init is None:
            seeds = _kmeanspp_seeds(G, run_key, jnp.asarray(m, jnp.int32), capacity=capacity,
                                    weighted=bool(weighted), sample_size=sample)
        else:
            seeds = jnp.where((jnp.arange(capacity) < m)[:, None], init, 0)
        seeds = replicate(seeds, mesh)
        C, assign, obj, iters, members = _sharded_lloyd(
            Gp, seeds, jnp.asarray(max_iters, jnp.int32), tol_arr, mesh=mesh, axis=axis,
            weighted=bool(weighted), block_size=block)
        empty = np.asarray(members[:m]) == 0
        if not empty.any():
            if Gp.shape[0] != n:
                assign = assign[:n]
            return KMeansResult(C[:m] if m < capacity else C, assign, obj, iters)
        if init is not None:
            kept = init[:m][~empty]
            init = jnp.zeros_like(init).at[: kept.shape[0]].set(kept)
        m -= int(empty.sum())
        attempt += 1


# --------------------------------------------------------------------------- RBC sketch


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
        ``(N,)`` ints (label-aware ``A_j = softmax - onehot``), as in :func:`pivotal.rbc_features`.
      key: ``jax.random`` key of the projection.
      sketch_classes, sketch_dim: ``k_A`` and ``k_h``.

    Returns:
      ``(N, k_A * k_h)`` sketched features.
    """
    h = jnp.asarray(penultimate) if not isinstance(penultimate, jax.Array) else penultimate
    z = jnp.asarray(logits) if not isinstance(logits, jax.Array) else logits
    if h.ndim != 2:
        raise ValueError(f"penultimate must have shape (N, D), got {tuple(h.shape)}")
    if z.ndim != 2 or z.shape[0] != h.shape[0]:
        raise ValueError(f"logits must have shape (N={h.shape[0]}, C), got {tuple(z.shape)}")
    if not (jnp.issubdtype(h.dtype, jnp.floating) and jnp.issubdtype(z.dtype, jnp.floating)):
        raise TypeError(f"penultimate and logits must be floating, got {h.dtype} and {z.dtype}")
    sketch_classes = _check_int(sketch_classes, "sketch_classes", 1)
    sketch_dim = _check_int(sketch_dim, "sketch_dim", 1)
    if labels is not None:
        labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
        if labels.shape != (h.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be (N={h.shape[0]},) integers, got {labels.shape} {labels.dtype}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= z.shape[1]:
            raise ValueError(f"labels must lie in [0, {z.shape[1]}), got values in [{lo}, {hi}]")
    dummy = labels if labels is not None else jnp.zeros((h.shape[0],), jnp.int32)
    return _sketch(h, z, dummy, key, sketch_classes=sketch_classes, sketch_dim=sketch_dim,
                   has_labels=labels is not None)
