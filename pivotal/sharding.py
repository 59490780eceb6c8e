"""Data parallelism over the example axis with ``jax.sharding`` (issue 8).

JAX is the distributed engine: arrays carry a :class:`jax.sharding.NamedSharding`, jitted
functions are partitioned by XLA (GSPMD) from the shardings of their inputs, and where the
automatic partitioning would gather the example axis (chunked loops over rows, blocked passes)
the library runs the work once per shard with :func:`jax.shard_map` (:func:`per_shard`) and
writes the cross-shard sums as explicit ``psum`` all-reduces.

This module holds the user-facing helpers and re-exports the placement helpers the library uses
internally (``pivotal._placement``); nothing in the library imports it.

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

from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pivotal._checks import check_int, leading_size
from pivotal._placement import (  # Placement: also importable from here, as before
    AxisName,
    Placement,
    axis_names,
    check_mesh,
    example_placement,
    example_sharding,
    is_example_sharded,
    num_shards,
    pad_examples,
    per_shard,
    place_examples,
    replicate,
    to_host,
)
from pivotal.grads import per_example_grads
from pivotal.kmeans import weighted_spherical_kmeans
from pivotal.rbc import sketch_rbc_features

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


def data_mesh(num_devices: Optional[int] = None, axis: str = "data", *, devices=None) -> Mesh:
    """A 1-D mesh over ``num_devices`` devices (default: all of ``jax.devices()``, every host's).

    The axis type is ``Auto``: jit partitions from the input shardings (GSPMD), so the library's
    functions need no sharding annotations of their own.
    """
    pool = list(jax.devices() if devices is None else devices)
    num_devices = check_int(len(pool) if num_devices is None else num_devices, "num_devices")
    if num_devices > len(pool):
        raise ValueError(f"num_devices must be at most the {len(pool)} devices available; got {num_devices}")
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a non-empty string; got {axis!r}")
    return Mesh(np.asarray(pool[:num_devices]), (axis,))


def shard_examples(tree: PyTree, mesh: Mesh, axis: AxisName = "data") -> PyTree:
    """``device_put`` every leaf with its leading (example) axis split over ``axis``.

    Raises ``ValueError`` when the example count N is not divisible by the number of devices on
    ``axis``: pad explicitly with :func:`pad_examples` (harmless for K-means features) or pick a
    divisible batch size (padding a training batch would change its mean loss).
    """
    shards = check_mesh(mesh, axis)
    n = leading_size(tree, "tree", allow_empty=True)
    if n % shards:
        raise ValueError(
            f"the example axis (N={n}) must be divisible by the {shards} devices of mesh axis "
            f"{axis!r}; pad with pad_examples(tree, {shards}) or choose a divisible size")
    return place_examples(tree, (mesh, axis))


def _local_shards(mesh: Mesh, axis: AxisName) -> int:
    """How many distinct row blocks of ``axis`` this process's devices of ``mesh`` hold."""
    dims = [mesh.axis_names.index(name) for name in axis_names(axis)]
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
    shards = check_mesh(mesh, axis)
    n_local = leading_size(tree, "tree", allow_empty=True)
    local = _local_shards(mesh, axis)
    if local == 0:
        raise ValueError(f"the mesh {mesh.axis_names} must hold a device of this process "
                         f"(process {jax.process_index()}); it holds none")
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


def sharded_per_example_grads(loss_fn: Callable, params: PyTree, batch: PyTree, mesh: Mesh, *,
                              axis: AxisName = "data", chunk_size: Optional[int] = None,
                              **grad_kwargs) -> PyTree:
    """:func:`pivotal.per_example_grads` with the examples split over ``axis``.

    Places ``batch`` on ``mesh`` (example axis split over ``axis``) and ``params`` replicated,
    then calls ``per_example_grads``, which runs its chunk loop on each device over that device's
    own rows: memory per device is O(chunk_size x P) and the ``(N, ...)`` gradients come back
    sharded on their leading axis. N must be divisible by the number of devices on ``axis``.
    ``grad_kwargs`` (e.g. ``strategy="map"``) are forwarded to ``per_example_grads``.
    """
    shards = check_mesh(mesh, axis)
    n = leading_size(batch, "batch")
    if n % shards:
        raise ValueError(f"batch must have a number of examples divisible by the {shards} devices of {axis!r}; "
                         f"got N={n}")
    check_int(chunk_size, "chunk_size", allow_none=True)
    batch = place_examples(batch, (mesh, axis))
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
    return weighted_spherical_kmeans(G, num_clusters, key, mesh=mesh, mesh_axis=axis, **kmeans_kwargs)
