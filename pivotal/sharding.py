"""Data parallelism over the example axis with ``jax.sharding`` (issue 8).

JAX is the distributed engine: arrays carry a :class:`jax.sharding.NamedSharding`, jitted
functions are partitioned by XLA (GSPMD) from the shardings of their inputs, and where the
automatic partitioning would gather the example axis (chunked loops over rows, blocked passes)
the library runs the work once per shard with :func:`jax.shard_map` (:func:`per_shard`) and
writes the cross-shard sums as explicit ``psum`` all-reduces.

Conventions:

* one mesh axis (default ``"data"``) shards the leading (example) axis of every per-example
  array; parameters, optimizer state and centroids are replicated (``P()``);
* the heavy functions respect the sharding of their inputs: pass example-sharded arrays (see
  :func:`shard_examples`) and the work runs where the rows live, the per-example outputs come
  back sharded the same way. :func:`example_placement` is how they find out;
* :func:`shard_examples` refuses an example count that the number of devices does not divide
  (a ``ValueError`` naming both): silently padding a training batch would change its mean loss.
  Use :func:`pad_examples` to pad explicitly with zero rows where that is harmless (features
  for K-means: zero rows carry no weight there), or choose a divisible batch size.

What runs sharded, with no gather of the example axis:

* ``make_meta_step``'s ``step`` with the batch and meta set sharded and the state replicated
  (GSPMD; the gradients are all-reduced by XLA);
* ``per_example_grads`` and ``gbc_features`` on a sharded batch: the chunk loop runs per shard,
  each device taking chunks of its own rows, so memory per device stays O(chunk x P); the layer
  importances of GBC are summed per shard and all-reduced; ``rbc_features``,
  ``make_rbc_feature_fn`` and ``history_features`` of them keep the example sharding;
* ``weighted_spherical_kmeans`` on sharded features (or with ``mesh=``): assignments local,
  the ``(M, D)`` S2 sums all-reduced once per Lloyd step; ``assign_clusters`` and
  ``cluster_centroids`` likewise; ``select_meta_samples`` on sharded features or with ``mesh=``.

Several processes (hosts): call ``jax.distributed.initialize(...)`` first in every process (see
``experiments/distributed.py`` and ``docs/SCALING.md``); :func:`data_mesh` then spans every
process's devices, :func:`shard_process_local_examples` builds the global example-sharded
arrays from each process's own rows, and everything above works unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "data_mesh",
    "example_sharding",
    "shard_examples",
    "shard_process_local_examples",
    "pad_examples",
    "replicate",
    "is_example_sharded",
    "example_placement",
    "num_shards",
    "place_examples",
    "per_shard",
    "to_host",
    "sharded_per_example_grads",
    "sharded_spherical_kmeans",
    "sketch_rbc_features",
]

PyTree = Any
# A mesh axis name, or several whose product splits one array dimension.
AxisName = Union[str, Sequence[str]]
# Where the example axis lives: (mesh, mesh axis or axes of the leading dimension).
Placement = tuple[Mesh, Union[str, tuple[str, ...]]]


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


def _axis_names(axis: AxisName) -> tuple[str, ...]:
    names = (axis,) if isinstance(axis, str) else tuple(axis) if isinstance(axis, (tuple, list)) else ()
    if not names or not all(isinstance(a, str) and a for a in names):
        raise ValueError(f"axis must be a mesh axis name or a tuple of them, got {axis!r}")
    return names


def _check_mesh(mesh, axis: AxisName) -> int:
    """Number of shards ``axis`` splits the example axis into on ``mesh``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see data_mesh), got {type(mesh).__name__}")
    names = _axis_names(axis)
    for name in names:
        if name not in mesh.axis_names:
            raise ValueError(f"axis {name!r} is not an axis of the mesh {mesh.axis_names}")
    return math.prod(int(mesh.shape[name]) for name in names)


def num_shards(placement: Placement) -> int:
    """How many row blocks ``placement`` splits the example axis into."""
    return _check_mesh(*placement)


def example_sharding(mesh: Mesh, axis: AxisName = "data") -> NamedSharding:
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


def shard_examples(tree: PyTree, mesh: Mesh, axis: AxisName = "data") -> PyTree:
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
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def _local_shards(mesh: Mesh, axis: AxisName) -> int:
    """How many distinct row blocks of ``axis`` this process's devices of ``mesh`` hold."""
    dims = [mesh.axis_names.index(name) for name in _axis_names(axis)]
    local = {device.id for device in mesh.local_devices}
    blocks = {tuple(index[d] for d in dims) for index, device in np.ndenumerate(mesh.devices)
              if device.id in local}
    return len(blocks)


def shard_process_local_examples(tree: PyTree, mesh: Mesh, axis: AxisName = "data") -> PyTree:
    """Global example-sharded arrays from the rows each process holds (multi-process runs).

    Every process calls this with its own rows: ``tree`` is a pytree whose leaves have a leading
    axis of ``n_local`` examples (numpy or jax arrays on this host), the same ``n_local`` and the
    same trailing shapes in every process. The result has ``N = n_local x num_processes`` rows
    (more precisely, ``n_local`` times the number of row blocks of ``axis`` over the number this
    process holds), split over ``axis`` so that every device holds exactly the rows its own
    process passed: nothing crosses the network. Process ``p``'s rows are global rows
    ``p * n_local ... (p + 1) * n_local - 1`` on a :func:`data_mesh` (its devices are ordered by
    process). With one process this is :func:`shard_examples`.

    Built with ``jax.make_array_from_process_local_data``. ``n_local`` must be divisible by the
    number of this process's devices on ``axis`` (``ValueError`` otherwise).
    """
    shards = _check_mesh(mesh, axis)
    n_local = _leading_size(tree, "tree")
    local = _local_shards(mesh, axis)
    if local == 0:
        raise ValueError(f"the mesh {mesh.axis_names} holds no device of this process "
                         f"(process {jax.process_index()})")
    if n_local % local:
        raise ValueError(
            f"this process's example count (n_local={n_local}) must be divisible by its {local} "
            f"devices on mesh axis {axis!r}")
    n = n_local * shards // local
    sharding = NamedSharding(mesh, P(axis))

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.make_array_from_process_local_data(sharding, x, (n,) + tuple(x.shape[1:]))

    return jax.tree_util.tree_map(put, tree)


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


def _put(x, sharding: NamedSharding):
    """``x`` placed with ``sharding``; no copy when it already is.

    With several processes ``jax.device_put`` refuses an array committed to one local device as
    the source of a sharding that spans processes; such an array goes through the host instead
    (every process must then pass the same value, as for numpy input).
    """
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``device_put`` every leaf fully replicated on ``mesh`` (``P()``): parameters, states.

    Leaves already replicated on ``mesh`` are returned as they are (no copy).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


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


def _leaf_placement(x) -> Optional[Placement]:
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or not np.ndim(x):
        return None
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding) or not tuple(sharding.spec) or sharding.spec[0] is None:
        return None
    axis = sharding.spec[0]
    axis = axis if isinstance(axis, str) else tuple(axis) if len(axis) > 1 else axis[0]
    shards = _check_mesh(sharding.mesh, axis)
    if shards < 2 or x.shape[0] % shards:
        return None
    return sharding.mesh, axis


def example_placement(tree: PyTree) -> Optional[Placement]:
    """``(mesh, axis)`` over which the example axis of ``tree`` is split, or None.

    Looks at the leaves in order and returns the placement of the first one that is a concrete
    jax array whose leading axis a :class:`NamedSharding` splits over mesh axes ``axis`` (a name,
    or a tuple of names) of two or more devices, evenly. None means "not example-sharded"
    (numpy input, one device, replicated, tracers under ``jit``): the caller runs as usual.
    This is how the library's heavy functions decide to run per shard.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        placement = _leaf_placement(leaf)
        if placement is not None:
            return placement
    return None


def _as_example_sharded(tree, mesh, axis):
    """Inputs placed on the mesh, example axis split; already-correct leaves are left alone."""
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def place_examples(tree: PyTree, placement: Placement) -> PyTree:
    """``tree`` with every leaf's example axis split as ``placement`` says (no copy where it is)."""
    return _as_example_sharded(tree, *placement)


def per_shard(fn: Callable, placement: Optional[Placement], in_rows: Sequence[bool], out_rows) -> Callable:
    """``fn`` run once per shard of the example axis, or ``fn`` itself when ``placement`` is None.

    ``jax.shard_map`` over ``placement = (mesh, axis)``: every positional argument flagged True in
    ``in_rows`` is split on its leading (example) axis, so each device's call sees its own rows;
    the others are replicated (every call sees all of them). ``out_rows`` flags the outputs the
    same way (a bool, or a tuple of bools matching a tuple output): flagged outputs are
    concatenated over the shards in row order, the others must be equal on every shard (results
    of ``psum`` over ``axis``, which ``fn`` may call when ``placement`` is given).

    Varying-manual-axes checking is off (``check_vma=False``): with it, replicated parameters
    enter device-invariant and the transpose of their implicit invariant->varying cast would
    all-reduce per-example gradients over devices, mixing examples that must stay apart.
    """
    if placement is None:
        return fn
    mesh, axis = placement
    spec = lambda rows: P(axis) if rows else P()
    outs = spec(out_rows) if isinstance(out_rows, bool) else tuple(spec(r) for r in out_rows)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(r) for r in in_rows), out_specs=outs,
                         check_vma=False)


def to_host(x) -> np.ndarray:
    """``np.asarray(x)``, also for an array sharded over several processes (multi-host runs).

    ``np.asarray`` needs every shard on this process; an array split over the devices of several
    processes is first made replicated on its mesh (an all-gather), so every process gets the
    whole of it. Meant for small per-example vectors such as ``(N,)`` norms or assignments.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    if not isinstance(x.sharding, NamedSharding):
        raise TypeError(f"to_host needs a NamedSharding for an array spread over processes, got {x.sharding}")
    replicated = NamedSharding(x.sharding.mesh, P())
    return np.asarray(jax.jit(lambda v: v, out_shardings=replicated)(x))


def _check_int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- thin wrappers


def sharded_per_example_grads(loss_fn: Callable, params: PyTree, batch: PyTree, mesh: Mesh, *,
                              axis: AxisName = "data", chunk_size: Optional[int] = None,
                              **grad_kwargs) -> PyTree:
    """:func:`pivotal.features.per_example_grads` with the examples split over ``axis``.

    Places ``batch`` on ``mesh`` (example axis split over ``axis``) and ``params`` replicated,
    then calls ``per_example_grads``, which runs its chunk loop on each device over that device's
    own rows: memory per device is O(chunk_size x P) and the ``(N, ...)`` gradients come back
    sharded on their leading axis. N must be divisible by the number of devices on ``axis``.
    ``grad_kwargs`` (e.g. ``strategy="map"``) are forwarded to ``per_example_grads``.
    """
    from pivotal.features import per_example_grads

    shards = _check_mesh(mesh, axis)
    n = _leading_size(batch, "batch")
    if n % shards:
        raise ValueError(f"batch has N={n} examples, not divisible by the {shards} devices of {axis!r}")
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    batch = _as_example_sharded(batch, mesh, axis)
    return per_example_grads(loss_fn, replicate(params, mesh), batch, chunk_size=chunk_size, **grad_kwargs)


def sharded_spherical_kmeans(G, num_clusters: int, key, mesh: Mesh, *, axis: AxisName = "data",
                             **kmeans_kwargs):
    """:func:`pivotal.weighted_spherical_kmeans` with the rows of ``G`` split over ``axis``.

    The same as ``weighted_spherical_kmeans(G, num_clusters, key, mesh=mesh, mesh_axis=axis,
    **kmeans_kwargs)``: same algorithm, same k-means++ seeds for the same key, same stopping rule
    and empty-cluster restarts, so the result equals the single-device one up to float summation
    order. Each Lloyd step runs per shard: the assignment of the local rows in blocks and their
    partial S2 sums; only the ``(M, D)`` numerators, ``(M,)`` denominators and member counts and
    the objective are all-reduced (``psum``), so G is never gathered. N not divisible by the
    device count is padded with zero rows, which carry no weight (they are dropped from the
    result).

    Returns a :class:`pivotal.kmeans.KMeansResult` whose ``assignments`` stay sharded over
    ``axis`` (when N is divisible) and whose ``centroids`` are replicated.
    """
    from pivotal.kmeans import weighted_spherical_kmeans

    return weighted_spherical_kmeans(G, num_clusters, key, mesh=mesh, mesh_axis=axis, **kmeans_kwargs)


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
