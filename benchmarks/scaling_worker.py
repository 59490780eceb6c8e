"""One scaling measurement in a fresh process: ``python -m benchmarks.scaling_worker --what kmeans --n 50000``.

Prints one JSON line (the last line of stdout) with the timings and the memory of the call.

Memory: XLA's CPU buffers are not seen by ``tracemalloc``, so the process's resident set is read
instead: its high-water mark ``VmHWM`` from ``/proc/self/status`` (the same counter as
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which is used where ``/proc`` is missing; but
``ru_maxrss`` also takes the maximum with the peak recorded when a thread exits, so it cannot be
reset in a process with XLA's thread pools). The high-water mark is reset just before a call by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so ``call_extra`` = (high-water mark during the call) - (resident set just before it) is the
memory the call itself needed beyond the inputs, which were already resident. ``peak_minus_input``
is the process's peak over the whole run minus the input array's size (it includes the Python/JAX
runtime and compiled code). Where ``clear_refs`` cannot be written, the high-water mark is not reset
and ``call_extra`` is an upper bound that also includes data generation; ``hwm_reset`` says which.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    """The resident-set high-water mark: VmHWM (reset by clear_refs), else ru_maxrss."""
    hwm = _status_bytes("VmHWM")
    return _ru_maxrss_bytes() if hwm is None else hwm


def _rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    return _ru_maxrss_bytes() if rss is None else rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measured_call(fn):
    """(seconds, result, extra bytes) of one call with the high-water mark reset before it."""
    import jax

    ok = _reset_hwm()
    before = _rss_bytes()
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    seconds = time.perf_counter() - start
    return seconds, out, max(_maxrss_bytes() - before, 0), ok


def kmeans_case(n: int, dim: int, clusters: int, iters: int, repeats: int, block_size: int | None) -> dict:
    import jax
    import numpy as np

    from benchmarks.common import clustered_features
    from pivotal.kmeans import weighted_spherical_kmeans

    G = jax.device_put(clustered_features(n, dim, seed=0))
    G = jax.block_until_ready(G)
    import gc

    gc.collect()
    key = jax.random.key(0)
    kwargs = {"max_iters": iters, "tol": 0.0}
    if block_size:
        kwargs["block_size"] = block_size

    def call():
        return weighted_spherical_kmeans(G, clusters, key, **kwargs)

    first_s, res, first_extra, ok = _measured_call(call)
    runs = [_measured_call(call) for _ in range(repeats)]
    times = [r[0] for r in runs]
    extra = max(r[2] for r in runs)
    iters_run = int(np.asarray(res.num_iters))
    med = float(np.median(times))
    return {
        "input_bytes": int(G.size * G.dtype.itemsize),
        "output_bytes": int(res.centroids.size * 4 + res.assignments.size * 4),
        "time_s": med,
        "times_s": times,
        "first_call_s": first_s,
        "compile_s": max(first_s - med, 0.0),
        "num_iters": iters_run,
        "time_per_iter_s": med / max(iters_run, 1),
        "first_call_extra_bytes": first_extra,
        "call_extra_bytes": extra,
        "hwm_reset": ok,
    }


def gbc_case(n: int, chunk: int, repeats: int, input_dim: int, hidden: tuple[int, ...]) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.models import init_model, make_model
    from pivotal.features import gbc_features, label_free_loss

    module, _ = make_model("mlp", 10, (input_dim,), hidden=hidden)
    params, _ = init_model(module, jax.random.key(0), (input_dim,))
    batch = {"x": jax.random.normal(jax.random.key(1), (n, input_dim), jnp.float32)}
    batch = jax.block_until_ready(batch)

    def loss_fn(p, b):
        return label_free_loss(module.apply({"params": p}, b["x"]))

    key = jax.random.key(2)

    def call():
        return gbc_features(loss_fn, params, batch, key, num_layers=5, chunk_size=chunk)

    first_s, feats, first_extra, ok = _measured_call(call)
    out_bytes = int(feats.size * feats.dtype.itemsize)
    dim = int(feats.shape[1])
    del feats
    runs = []
    for _ in range(repeats):
        seconds, out, extra, _ = _measured_call(call)
        del out
        runs.append((seconds, extra))
    times = [r[0] for r in runs]
    med = float(np.median(times))
    extra = max(r[1] for r in runs)
    return {
        "input_bytes": int(n * input_dim * 4),
        "output_bytes": out_bytes,
        "feature_dim": dim,
        "time_s": med,
        "times_s": times,
        "first_call_s": first_s,
        "compile_s": max(first_s - med, 0.0),
        "first_call_extra_bytes": first_extra,
        "call_extra_bytes": extra,
        "call_extra_minus_output_bytes": extra - out_bytes,
        "hwm_reset": ok,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--what", choices=("kmeans", "gbc"), required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--block-size", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--hidden", type=str, default="32,32")
    a = p.parse_args(argv)
    if a.what == "kmeans":
        res = kmeans_case(a.n, a.dim, a.clusters, a.iters, a.repeats, a.block_size or None)
    else:
        hidden = tuple(int(h) for h in a.hidden.split(",") if h)
        res = gbc_case(a.n, a.chunk, a.repeats, a.input_dim, hidden)
    peak = _maxrss_bytes()
    res["n"] = a.n
    res["what"] = a.what
    res["peak_rss_last_call_bytes"] = peak
    res["peak_minus_input_bytes"] = peak - res["input_bytes"]
    res["ru_maxrss_process_bytes"] = _ru_maxrss_bytes()
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
