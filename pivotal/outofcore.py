"""Large N on one host: features written in chunks to a numpy memmap, K-means over it in blocks.

* :func:`write_features` runs a feature function over a (host) dataset in chunks of
  ``chunk_size`` examples and writes each chunk into an ``.npy`` file opened as ``np.memmap``;
  only one chunk's inputs and features are ever on the device. A sequence of feature functions
  (one per parameter snapshot, paper Alg. 3) writes their blocks side by side, the layout of
  :func:`pivotal.history_features`.
* :func:`compute_features` keeps the features on the device when they fit a memory budget and
  writes them to a memmap otherwise.
* :func:`kmeans_memmap` is :func:`pivotal.weighted_spherical_kmeans` over an on-disk ``(N, D)``
  array: every pass reads host blocks of rows that fit ``memory_budget_bytes``, sends them to the
  device, and accumulates the ``(M, D)`` S2 sums there. Same seeds for the same key (the k-means++
  subsample is gathered from the memmap), same stopping rule and empty-cluster restarts: the
  result equals the in-memory one up to float summation order.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import check_finite_array, check_int, check_key, check_real, leading_size
from pivotal.kmeans import KMeansResult, restart_on_empty, seed_centroids, seed_sample
from pivotal.lloyd import cluster_mass, lloyd_pass

__all__ = ["open_features_memmap", "write_features", "compute_features", "kmeans_memmap",
           "memmap_block_rows"]

PyTree = Any
FeatureFn = Callable[[PyTree], jax.Array]


def open_features_memmap(path: Union[str, os.PathLike], shape, dtype=np.float32, mode: str = "w+") -> np.memmap:
    """An ``.npy`` file opened as a memmap (``np.load(path, mmap_mode="r")`` reopens it)."""
    if mode in ("w+",):
        return np.lib.format.open_memmap(os.fspath(path), mode=mode, dtype=np.dtype(dtype),
                                         shape=tuple(int(s) for s in shape))
    return np.load(os.fspath(path), mmap_mode=mode)


def _as_fns(feature_fn) -> list:
    fns = list(feature_fn) if isinstance(feature_fn, (list, tuple)) else [feature_fn]
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("feature_fn must be a callable chunk -> (B, D) or a non-empty sequence of them")
    return fns


def _chunk(batch, start: int, size: int, n: int):
    """Rows ``start .. start+size`` (host numpy), the tail padded by repeating the last row so every
    chunk has one shape (one compilation); the caller drops the padded rows."""
    rows = np.minimum(np.arange(start, start + size), n - 1)
    contiguous = start + size <= n
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x[start:start + size] if contiguous else np.asarray(x)[rows]), batch)


def write_features(feature_fn: Union[FeatureFn, Sequence[FeatureFn]], batch: PyTree,
                   path: Union[str, os.PathLike], *, chunk_size: int, dtype=None) -> np.memmap:
    """Features of every example, computed ``chunk_size`` examples at a time, into a memmap.

    Args:
      feature_fn: ``chunk -> (B, D)`` (e.g. ``lambda b: rbc_features(*forward(params, b))``), or a
        sequence of them (one per snapshot) whose outputs are concatenated column-wise.
      batch: pytree of host arrays (numpy arrays or memmaps) with leading axis N.
      path: the ``.npy`` file to create.
      chunk_size: examples per device call.
      dtype: of the file; default that of the features.

    Returns:
      The ``(N, D)`` memmap (flushed).
    """
    fns = _as_fns(feature_fn)
    chunk_size = check_int(chunk_size, "chunk_size")
    n = leading_size(batch, "batch")
    chunk_size = min(chunk_size, n)
    first = _chunk(batch, 0, chunk_size, n)
    widths, dtypes = [], []
    for fn in fns:
        spec = jax.eval_shape(fn, first)
        if len(spec.shape) != 2 or spec.shape[0] != chunk_size:
            raise ValueError(f"feature_fn must map a chunk of {chunk_size} examples to ({chunk_size}, D); "
                             f"got {spec.shape}")
        widths.append(spec.shape[1])
        dtypes.append(spec.dtype)
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(jnp.result_type(*dtypes))
    mm = open_features_memmap(path, (n, sum(widths)), out_dtype)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    for start in range(0, n, chunk_size):
        chunk = first if start == 0 else _chunk(batch, start, chunk_size, n)
        rows = min(chunk_size, n - start)
        for k, fn in enumerate(fns):
            block = np.asarray(fn(chunk))
            check_finite_array(block[:rows], f"feature_fn {k}'s output in rows {start}..{start + rows}")
            mm[start:start + rows, offsets[k]:offsets[k + 1]] = block[:rows]
    mm.flush()
    return mm


def compute_features(feature_fn: Union[FeatureFn, Sequence[FeatureFn]], batch: PyTree, *, chunk_size: int,
                     memory_budget_bytes: Optional[int] = None, path=None, dtype=None):
    """The ``(N, D)`` features as a device array when they fit ``memory_budget_bytes`` (or no budget
    is given), else written with :func:`write_features` to ``path`` and returned as a memmap."""
    fns = _as_fns(feature_fn)
    n = leading_size(batch, "batch")
    chunk_size = min(check_int(chunk_size, "chunk_size"), n)
    first = _chunk(batch, 0, chunk_size, n)
    specs = [jax.eval_shape(fn, first) for fn in fns]
    width = sum(s.shape[1] for s in specs)
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(jnp.result_type(*[s.dtype for s in specs]))
    nbytes = n * width * out_dtype.itemsize
    if memory_budget_bytes is None or nbytes <= memory_budget_bytes:
        blocks = []
        for start in range(0, n, chunk_size):
            chunk = first if start == 0 else _chunk(batch, start, chunk_size, n)
            rows = min(chunk_size, n - start)
            blocks.append(jnp.concatenate([jnp.asarray(fn(chunk))[:rows] for fn in fns], axis=1))
        return jnp.concatenate(blocks).astype(out_dtype)
    if path is None:
        raise ValueError(f"the features ({nbytes} bytes) exceed memory_budget_bytes={memory_budget_bytes}: "
                         "pass path= for the memmap file")
    return write_features(fns, batch, path, chunk_size=chunk_size, dtype=out_dtype)


# --------------------------------------------------------------------------- K-means


def memmap_block_rows(num_features: int, num_clusters: int, itemsize: int, memory_budget_bytes: int) -> int:
    """Rows per block so that a block's device working set fits the budget.

    Per row: the row itself, its ``(M,)`` inner products and one-hot weights, a few scalars:
    ``itemsize * (D + 2 M + 4)`` bytes. Plus the ``(M, D)`` centroids and sums (3 copies).
    """
    fixed = 3 * num_clusters * num_features * itemsize
    per_row = itemsize * (num_features + 2 * num_clusters + 4)
    rows = (int(memory_budget_bytes) - fixed) // per_row
    if rows < 1:
        raise ValueError(f"memory_budget_bytes={memory_budget_bytes} cannot hold the centroids and one row "
                         f"({fixed + per_row} bytes for D={num_features}, M={num_clusters})")
    return int(rows)


class _RowReader:
    """Duck-typed ``(N, D)`` array over a memmap for the k-means++ seeding: it only reads
    ``shape``, ``dtype`` and ``G[rows]`` for a small sorted subsample of rows."""

    def __init__(self, mm):
        self._mm = mm
        self.shape = tuple(mm.shape)
        self.dtype = jnp.dtype(mm.dtype)
        self.ndim = 2

    def __getitem__(self, rows):
        return jnp.asarray(np.asarray(self._mm[np.asarray(rows)]))


@jax.jit
def _block_stats(Gb):
    norms = jnp.sqrt(jnp.sum(jnp.square(Gb), axis=1))
    return norms, jnp.all(jnp.isfinite(Gb)), jnp.any(Gb != 0)


@functools.partial(jax.jit, static_argnames=("weighted",))
def _block_step(Gb, nb, C, *, weighted):
    """One host block of a Lloyd step: ``(a, s, objective, num, den, count)`` of its rows."""
    a, s, obj, num = lloyd_pass(Gb, nb, C, weighted=weighted, block=Gb.shape[0])
    return (a, s, obj, num) + cluster_mass(nb, a, s, C.shape[0], weighted=weighted)


def _blocks(G, rows: int):
    """``(start, stop, block)`` with each block zero-padded to ``rows`` rows (one compilation; zero
    rows carry no weight in any sum)."""
    n = G.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        block = np.asarray(G[start:stop])
        if stop - start < rows:
            block = np.concatenate([block, np.zeros((rows - (stop - start),) + block.shape[1:], block.dtype)])
        yield start, stop, block


def kmeans_memmap(G, num_clusters: int, key, *, memory_budget_bytes: Optional[int] = None,
                  block_rows: Optional[int] = None, max_iters: int = 200, tol: float = 1e-4,
                  weighted: bool = True, seed_sample_size: Optional[int] = None, init=None,
                  cluster_capacity: Optional[int] = None):
    """:func:`pivotal.weighted_spherical_kmeans` over a host/on-disk ``(N, D)`` array in blocks.

    ``G`` is any array-like with ``shape``, ``dtype`` and row slicing (``np.memmap``, ``np.ndarray``,
    ``h5py``-style datasets). Each pass streams blocks of ``block_rows`` rows (default: as many as
    fit ``memory_budget_bytes``, see :func:`memmap_block_rows`) through the device, which keeps
    only the ``(M, D)`` centroids and S2 sums; the ``(N,)`` assignments and row norms live on the
    host. One pass per Lloyd step, one for the row norms, and the k-means++ seeding reads only its
    subsample of ``min(N, max(4096, 64 M))`` rows (``seed_sample_size``), which must fit.

    Returns a :class:`pivotal.kmeans.KMeansResult` (``assignments`` a host ``int32`` array) equal
    to the in-memory result for the same key up to float summation order.
    """
    n, dim = _check_memmap(G)
    num_clusters = check_int(num_clusters, "num_clusters")
    if num_clusters > n:
        raise ValueError(f"num_clusters must satisfy 1 <= num_clusters <= N = {n}; got {num_clusters}")
    max_iters = check_int(max_iters, "max_iters")
    check_real(tol, "tol", positive=False)
    capacity = num_clusters if cluster_capacity is None else check_int(cluster_capacity, "cluster_capacity",
                                                                       low=num_clusters)
    check_key(key)
    dtype = jnp.dtype(G.dtype)
    if block_rows is None:
        if memory_budget_bytes is None:
            raise ValueError("pass memory_budget_bytes or block_rows")
        block_rows = memmap_block_rows(dim, capacity, dtype.itemsize, memory_budget_bytes)
    rows = min(check_int(block_rows, "block_rows"), n)
    if init is not None:
        init = jnp.asarray(init, dtype)
        if init.shape != (num_clusters, dim):
            raise ValueError(f"init must have shape ({num_clusters}, {dim}); got {tuple(init.shape)}")
        if capacity > num_clusters:
            init = jnp.concatenate([init, jnp.zeros((capacity - num_clusters, dim), dtype)])

    norms = _memmap_norms(G, rows)
    sample = seed_sample(n, capacity, seed_sample_size)
    source = jnp.asarray(np.asarray(G[:])) if sample >= n else _RowReader(G)
    norms_dev = jnp.asarray(norms)
    tol_arr = jnp.asarray(tol, dtype)

    def run(run_key, m, init):
        if init is None:
            seeds = seed_centroids(source, norms_dev, run_key, jnp.asarray(m, jnp.int32), capacity=capacity,
                                   weighted=bool(weighted), sample_size=sample)
        else:
            seeds = jnp.where((jnp.arange(capacity) < m)[:, None], init, 0)
        *result, count = _memmap_lloyd(G, norms, jnp.asarray(seeds, dtype), rows, max_iters, tol_arr,
                                       bool(weighted))
        return result, count

    (centroids, assign, objective, it), m = restart_on_empty(run, key, num_clusters, init)
    centroids = centroids[:m] if m < capacity else centroids
    return KMeansResult(centroids, assign, objective, jnp.asarray(it, jnp.int32))


def _check_memmap(G) -> tuple[int, int]:
    """``(N, D)`` of a non-empty 2-D floating array-like."""
    if not (hasattr(G, "shape") and hasattr(G, "dtype")) or len(G.shape) != 2:
        raise ValueError(f"G must be a 2-D array-like (N, D) such as an np.memmap; got {type(G).__name__}")
    if not np.issubdtype(np.dtype(G.dtype), np.floating):
        raise TypeError(f"G must have a floating dtype; got {G.dtype}")
    n, dim = (int(s) for s in G.shape)
    if n < 1 or dim < 1:
        raise ValueError(f"G must be non-empty; got shape {(n, dim)}")
    return n, dim


def _memmap_norms(G, rows: int) -> np.ndarray:
    """Pass 0: the ``(N,)`` row norms on the host, checking every block for NaN/inf and that some
    row is nonzero."""
    norms = np.zeros((G.shape[0],), jnp.dtype(G.dtype))
    any_nonzero = False
    for start, stop, block in _blocks(G, rows):
        nb, finite, nonzero = _block_stats(jnp.asarray(block))
        if not bool(finite):
            raise ValueError(f"G contains NaN or inf values (rows {start}..{stop})")
        any_nonzero |= bool(nonzero)
        norms[start:stop] = np.asarray(nb)[: stop - start]
    if not any_nonzero:
        raise ValueError("G must have at least one nonzero row")
    return norms


def _memmap_lloyd(G, norms, seeds, rows: int, max_iters: int, tol_arr, weighted: bool):
    """One run of Algorithm 1 from ``seeds``, one host pass over the blocks per Lloyd step;
    returns ``(centroids, assignments, objective, iters, member_counts)``."""
    n, dim = G.shape
    capacity, dtype = seeds.shape[0], jnp.dtype(G.dtype)
    C_prev = seeds
    num = jnp.zeros((capacity, dim), dtype)
    den = jnp.zeros((capacity,), dtype)
    count = jnp.zeros((capacity,), jnp.int32)
    assign = np.full((n,), -1, np.int32)
    objective = jnp.zeros((), dtype)
    it = 0
    done = False
    while it < max_iters and not done:
        C = jnp.where((count > 0)[:, None], num / jnp.where(den > 0, den, 1)[:, None], C_prev)
        obj = jnp.zeros((), dtype)
        num = jnp.zeros((capacity, dim), dtype)
        den = jnp.zeros((capacity,), dtype)
        count = jnp.zeros((capacity,), jnp.int32)
        changed = 0
        for start, stop, block in _blocks(G, rows):
            nb = np.zeros((rows,), dtype)
            nb[: stop - start] = norms[start:stop]
            a, _, o, nm, dn, ct = _block_step(jnp.asarray(block), jnp.asarray(nb), C, weighted=weighted)
            obj, num, den, count = obj + o, num + nm, den + dn, count + ct
            a = np.asarray(a)[: stop - start]
            changed += int(np.sum(a != assign[start:stop]))
            assign[start:stop] = a
        stalled = bool(jnp.abs(obj - objective) <= tol_arr * jnp.abs(obj))
        done = changed == 0 or (stalled and it > 0)
        C_prev, objective, it = C, obj, it + 1
    return C_prev, assign, objective, it, count
