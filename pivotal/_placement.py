"""Where the example axis lives, and how the library runs work there.

A *placement* is ``(mesh, axis)``: the leading (example) axis of every per-example array is split
over the mesh axis (or axes) ``axis``; parameters, optimizer state and centroids are replicated
(``P()``). The heavy functions ask :func:`example_placement` where their rows are and, when they
are split, run once per shard with :func:`per_shard` (``jax.shard_map``), writing the cross-shard
sums as explicit ``psum`` all-reduces; otherwise they run as usual.

The user-facing helpers built on these (``data_mesh``, ``shard_examples``, ...) are in
:mod:`pivotal.sharding`, which re-exports the public names here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pivotal._checks import check_int, leading_size

PyTree = Any
# A mesh axis name, or several whose product splits one array dimension.
AxisName = Union[str, Sequence[str]]
# Where the example axis lives: (mesh, mesh axis or axes of the leading dimension).
Placement = tuple[Mesh, Union[str, tuple[str, ...]]]


def axis_names(axis: AxisName) -> tuple[str, ...]:
    names = (axis,) if isinstance(axis, str) else tuple(axis) if isinstance(axis, (tuple, list)) else ()
    if not names or not all(isinstance(a, str) and a for a in names):
        raise ValueError(f"axis must be a mesh axis name or a tuple of them; got {axis!r}")
    return names


def check_mesh(mesh, axis: AxisName) -> int:
    """Number of shards ``axis`` splits the example axis into on ``mesh``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see data_mesh); got {type(mesh).__name__}")
    names = axis_names(axis)
    for name in names:
        if name not in mesh.axis_names:
            raise ValueError(f"axis {name!r} must be an axis of the mesh {mesh.axis_names}")
    return math.prod(int(mesh.shape[name]) for name in names)


def num_shards(placement: Placement) -> int:
    """How many row blocks ``placement`` splits the example axis into."""
    return check_mesh(*placement)


def example_sharding(mesh: Mesh, axis: AxisName = "data") -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: the leading axis split over ``axis``."""
    check_mesh(mesh, axis)
    return NamedSharding(mesh, P(axis))


def put(x, sharding: NamedSharding):
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
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``device_put`` every leaf fully replicated on ``mesh`` (``P()``): parameters, states.

    Leaves already replicated on ``mesh`` are returned as they are (no copy).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: put(x, sharding), tree)


def place_examples(tree: PyTree, placement: Placement) -> PyTree:
    """``tree`` with every leaf's example axis split as ``placement`` says (no copy where it is)."""
    mesh, axis = placement
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree_util.tree_map(lambda x: put(x, sharding), tree)


def pad_examples(tree: PyTree, multiple: int) -> tuple[PyTree, int]:
    """Pads every leaf's leading axis with zeros up to a multiple of ``multiple``.

    Returns ``(padded_tree, num_valid)``; the first ``num_valid`` rows are the original ones.
    """
    multiple = check_int(multiple, "multiple")
    n = leading_size(tree, "tree", allow_empty=True)
    extra = -n % multiple
    if not extra:
        return tree, n

    def pad(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])

    return jax.tree_util.tree_map(pad, tree), n


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
    shards = check_mesh(sharding.mesh, axis)
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
        raise TypeError(f"to_host needs a NamedSharding for an array spread over processes; got {x.sharding}")
    replicated = NamedSharding(x.sharding.mesh, P())
    return np.asarray(jax.jit(lambda v: v, out_shardings=replicated)(x))
