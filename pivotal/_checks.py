"""Argument checks of the whole library: one definition of each, one message style.

Every public function checks its arguments with these before any computation. A message names
the argument and what it must be, then what it got: ``"<name> must ...; got <value>"``.

* :func:`check_key`: one ``jax.random`` key, typed (``jax.random.key(seed)``, shape ``()``) or
  raw (``jax.random.PRNGKey(seed)``, ``uint32`` of shape ``(2,)``); for the default threefry
  implementation the two hold the same bits, so every function gives the same result for both.
* :func:`check_int`, :func:`check_real`, :func:`check_choice`: scalar options.
* :func:`leading_size`, :func:`check_losses`, :func:`check_loss_fn`: the example axis of a batch
  and the ``(B,)`` shape of per-example losses.
* :func:`check_finite_array`, :func:`value_range`, :func:`check_indices`, :func:`as_features`: array
  contents, reduced where the array lives (only scalars reach the host).

Values inside ``jax.jit`` (tracers) have no value to inspect: only their shapes are checked.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a float where an integer belongs, a string for a number).

    Also a ``ValueError``: before the checks were one set, some functions raised ``TypeError``
    and others ``ValueError`` for the same mistake, and callers catch either.
    """


def is_traced(*trees) -> bool:
    """True when any leaf is a tracer: value checks are skipped under ``jit``."""
    return any(isinstance(leaf, jax.core.Tracer)
               for tree in trees for leaf in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- scalars


def check_int(value, name: str, *, low: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int >= low`` (not a bool, not a float); None passes with ``allow_none``."""
    if value is None and allow_none:
        return None
    expected = "a positive integer" if low == 1 else f"an integer >= {low}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ArgumentTypeError(f"{name} must be {expected}; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return int(value)


def check_real(value, name: str, *, positive: bool = True) -> None:
    """``value`` a finite real scalar, ``> 0`` (``positive``) or ``>= 0``: a Python, numpy or jax
    scalar. A traced value is only checked to be a scalar."""
    expected = "a positive finite number" if positive else "a finite number >= 0"
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar; got an array of shape {np.shape(value)}")
    if is_traced(value):
        return
    real = isinstance(value, numbers.Real) or (
        isinstance(value, (np.ndarray, jax.Array))
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)))
    if isinstance(value, (bool, np.bool_)) or not real:
        raise ArgumentTypeError(f"{name} must be {expected}; got {value!r}")
    number = float(value)
    if not (np.isfinite(number) and (number > 0 if positive else number >= 0)):
        raise ValueError(f"{name} must be {expected}; got {value!r}")


def check_choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


def check_key(key, name: str = "key") -> None:
    """``key`` is one ``jax.random`` key: typed of shape ``()`` or raw ``uint32`` of shape ``(2,)``."""
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a jax.random key; got {type(key).__name__}")
    shape = tuple(getattr(key, "shape", ()))
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and shape == (2,)
    if not (typed or raw):
        raise TypeError(f"{name} must be a single jax.random key (jax.random.key(seed) or "
                        f"jax.random.PRNGKey(seed)); got dtype {dtype} with shape {shape}")


# --------------------------------------------------------------------------- batches and losses


def leading_size(tree: PyTree, name: str, *, allow_empty: bool = False) -> int:
    """The common leading (example) axis of every leaf of ``tree``; raises if they differ, or if
    it is 0 (unless ``allow_empty``)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf; got {tree!r}")
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(f"every leaf of {name} needs a leading example axis; got a scalar")
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(f"all leaves of {name} must have the same leading size N (the example axis); "
                         f"got sizes {sorted(sizes)}")
    size = sizes.pop()
    if size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: it needs at least one example")
    return size


def check_losses(losses, batch_size: int, name: str = "loss_fn") -> None:
    """``losses`` (an array, a tracer or an abstract value) has shape ``(batch_size,)``."""
    shape = getattr(losses, "shape", None)
    if shape is None or tuple(shape) != (batch_size,):
        got = type(losses) if shape is None else tuple(shape)
        raise ValueError(f"{name} must return per-example losses of shape (B,) = ({batch_size},); got {got}")


def check_loss_fn(loss_fn: Callable, params: PyTree, batch: PyTree) -> None:
    """``loss_fn`` is callable and, abstractly evaluated on a batch of one, returns shape (1,)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch) -> (B,); got {type(loss_fn)}")
    one = jax.tree_util.tree_map(lambda x: x[:1], batch)
    check_losses(jax.eval_shape(loss_fn, params, one), 1, "loss_fn(params, batch) on a batch of one")


# --------------------------------------------------------------------------- array contents


# max |x| rather than all(isfinite(x)): XLA:CPU fuses abs into a max-reduction but materialises
# the (N, D) boolean of all(isfinite(x)) (measured: 20 MiB at 80k x 256). NaN and inf propagate
# through the max, so the test is exact.
_all_finite = jax.jit(lambda x: jnp.isfinite(jnp.max(jnp.abs(x))))
_min_max = jax.jit(lambda x: (jnp.min(x), jnp.max(x)))


def check_finite_array(x, name: str) -> None:
    """A floating ``x`` holds no NaN or inf; reduced on the device for a jax array, so it also
    works on arrays sharded over several processes. Tracers and non-float arrays pass."""
    if is_traced(x):
        return
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    if not np.size(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return
    finite = bool(np.all(np.isfinite(x))) if isinstance(x, np.ndarray) else bool(_all_finite(x))
    if not finite:
        raise ValueError(f"{name} contains NaN or inf values")


def value_range(x) -> tuple[int, int] | None:
    """``(min, max)`` of a non-empty integer ``x``, or None for a tracer or an empty array.

    Host arrays are reduced on the host (microseconds); a jax array where it lives, with two
    scalars copied back.
    """
    if is_traced(x) or not np.size(x):
        return None
    if isinstance(x, jax.Array):
        low, high = jax.device_get(_min_max(x))
    else:
        host = np.asarray(x)
        low, high = host.min(), host.max()
    return int(low), int(high)


def check_indices(values, n: int, name: str, *, unique: bool) -> np.ndarray:
    """1-D integer indices in ``[0, n)`` (no repeats when ``unique``), as a sorted unique int64
    numpy array; None or empty gives an empty one."""
    if values is None:
        return np.zeros((0,), np.int64)
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros((0,), np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of indices; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer indices; got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} indices must lie in [0, {n}); got values in [{arr.min()}, {arr.max()}]")
    uniq = np.unique(arr)
    if unique and uniq.size != arr.size:
        raise ValueError(f"{name} must not contain duplicate indices; got {arr.size - uniq.size} repeats")
    return uniq.astype(np.int64)


def as_features(G, name: str, *, finite: bool = True) -> jax.Array:
    """``G`` checked to be a 2-D floating array with at least one row and column (and finite
    values, with ``finite``), as a jax array."""
    if not hasattr(G, "shape") or not hasattr(G, "dtype"):
        try:
            G = np.asarray(G)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be an array; got {type(G).__name__}") from exc
    if G.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {tuple(G.shape)}")
    if not jnp.issubdtype(G.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype; got {G.dtype}")
    if G.shape[0] < 1 or G.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column; got shape {tuple(G.shape)}")
    G = jnp.asarray(G)
    if finite:
        check_finite_array(G, name)
    return G
