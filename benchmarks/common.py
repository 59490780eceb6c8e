"""Shared helpers of the benchmarks: timing, synthetic data, small formatting utilities."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def _ready(out: Any) -> Any:
    return jax.block_until_ready(out)


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> dict:
    """Times ``fn()`` (wrapped in ``jax.block_until_ready``).

    The first call (tracing + compilation + one run) is timed on its own; ``warmup - 1`` further
    untimed calls follow; then ``repeats`` timed calls. ``compile_s`` is the first call's excess
    over the steady-state median: the tracing/compilation cost as the user pays it.
    """
    start = time.perf_counter()
    _ready(fn())
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        _ready(fn())
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        _ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "first_call_s": first,
        "compile_s": max(first - median, 0.0),
    }


def time_side_by_side(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup_rounds: int = 1
                      ) -> dict[str, dict]:
    """Times several functions in interleaved rounds (a, b, a, b, ...), so that load from other
    processes on a shared machine hits all of them alike; each gets its own first-call timing."""
    firsts = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        _ready(fn())
        firsts[name] = time.perf_counter() - start
    for _ in range(warmup_rounds):  # untimed rounds: caches, allocator, thread pools
        for fn in fns.values():
            _ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            _ready(fn())
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in fns:
        median = statistics.median(times[name])
        out[name] = {
            "median_s": median,
            "min_s": min(times[name]),
            "times_s": times[name],
            "first_call_s": firsts[name],
            "compile_s": max(firsts[name] - median, 0.0),
        }
    return out


def clustered_features(n: int, dim: int, *, seed: int = 0, latent: int = 16, blobs: int = 200,
                       spread: float = 0.5, noise: float = 0.3) -> np.ndarray:
    """Synthetic ``(n, dim)`` float32 features with cluster structure and random norms.

    ``blobs`` Gaussian blobs (random centres, within-blob std ``spread``) in a ``latent``-dimensional
    subspace, embedded in ``dim`` dimensions by a random orthonormal map, plus isotropic noise; rows
    are then given log-normal norms (sigma 0.5), as gradient features have. With more blobs than
    clusters the 50-cluster partition is not obvious, so Lloyd iterations keep moving points for
    well over 50 iterations (every method runs its full iteration budget).
    """
    rng = np.random.default_rng(seed)
    latent = min(latent, dim)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    centres = rng.standard_normal((blobs, latent)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 16384
    for start in range(0, n, step):  # in pieces: keeps the generator's transient memory small
        m = min(step, n - start)
        labels = rng.integers(0, blobs, m)
        z = centres[labels] + spread * rng.standard_normal((m, latent)).astype(np.float32)
        x = z @ basis + (noise * np.sqrt(latent / dim)) * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= rng.lognormal(0.0, 0.5, m).astype(np.float32)[:, None]
        out[start:start + m] = x
    return out


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(num: float | None) -> str:
    if num is None:
        return "-"
    return f"{num / 2**20:.0f} MiB"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mnist5k():
    """The embedded MNIST-5k splits (the data of the meta-step, feature and throughput sections)."""
    from experiments.datasets import load_dataset

    return load_dataset("mnist5k", seed=0)


def init_model(name: str, input_shape, **kwargs):
    """``(module, has_state, params, model_state)`` of an experiments-layer model, key 0."""
    from experiments.models import init_model as init, make_model

    module, has_state = make_model(name, 10, input_shape, **kwargs)
    params, state = init(module, jax.random.key(0), input_shape)
    return module, has_state, params, state
