"""Cost of the host-side ``batch['index']`` range check of ``make_meta_step(...).step``.

LeNet-5 on 28x28x1 inputs, batch 256, ``direct_weights``, SGD with momentum, a meta set of 100,
as ``experiments.pipeline.train_meta`` runs it: each step gathers its batch on the device from a
device index array (``jnp.asarray(pool[...])``), runs ``trainer.step`` and reads the metrics.

Three loops, each timed with the check (``check_index=True``, the default) and without
(``check_index=False``), interleaved so that load from other processes hits both alike:

* ``sync``: ``check_finite(metrics)`` after every step, as the pipeline does (the check's
  reduction then waits only for the index gather);
* ``async``: ``--chain`` steps dispatched back to back, one block at the end (the check's
  reduction is queued behind the previous step: the worst case for a device index);
* ``numpy``: the index is a host numpy array (checked with ``np.min``/``np.max``).

Prints the median per-step time of each and the ratio checked / unchecked.

    python3 -m benchmarks.index_check [--repeats 30] [--chain 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pivotal
from experiments import models


def build(check_index: bool, n: int, batch: int):
    module, _ = models.make_model("lenet5", 10, (28, 28, 1))
    loss_fn = models.cross_entropy_loss_fn(module, has_state=False)
    trainer = pivotal.make_meta_step(loss_fn, pivotal.direct_weights(weight_lr=100.0),
                                     optimizer=optax.sgd(1.0, momentum=0.9), learning_rate=0.05,
                                     check_index=check_index)
    params, _ = models.init_model(module, jax.random.key(0), (28, 28, 1))
    state = trainer.init(params, jax.random.key(1), num_examples=n)
    return trainer, state


@jax.jit
def _gather(x, y, idx):
    return {"x": x[idx], "y": y[idx], "index": idx}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--chain", type=int, default=10)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    n, b = args.examples, args.batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 28, 28, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    meta = {"x": x[:100], "y": y[:100]}
    pool = np.arange(n)
    runs = {name: build(name == "checked", n, b) for name in ("checked", "unchecked")}
    states = {name: st for name, (_, st) in runs.items()}
    counter = [0]

    def one_step(name, numpy_index):
        trainer = runs[name][0]
        start = (counter[0] * b) % (n - b)
        counter[0] += 1
        host = pool[start:start + b]
        idx = host if numpy_index else jnp.asarray(host)
        batch = _gather(x, y, jnp.asarray(idx))
        batch["index"] = idx
        states[name], metrics = trainer.step(states[name], batch, meta, jax.random.key(counter[0]))
        return metrics

    def sync(name):
        t = time.perf_counter()
        pivotal.check_finite(one_step(name, False))
        return time.perf_counter() - t

    def numpy_sync(name):
        t = time.perf_counter()
        pivotal.check_finite(one_step(name, True))
        return time.perf_counter() - t

    def chained(name):
        t = time.perf_counter()
        for _ in range(args.chain):
            metrics = one_step(name, False)
        jax.block_until_ready((states[name], metrics))
        return (time.perf_counter() - t) / args.chain

    results = {}
    for mode, fn in (("sync", sync), ("async", chained), ("numpy", numpy_sync)):
        for _ in range(3):  # warm-up: compilation, caches
            for name in runs:
                fn(name)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name in runs:
                times[name].append(fn(name))
        med = {name: statistics.median(v) for name, v in times.items()}
        results[mode] = {"checked_ms": med["checked"] * 1e3, "unchecked_ms": med["unchecked"] * 1e3,
                         "ratio": med["checked"] / med["unchecked"]}
        print(f"{mode:6s} checked {med['checked'] * 1e3:8.2f} ms  unchecked "
              f"{med['unchecked'] * 1e3:8.2f} ms  ratio {med['checked'] / med['unchecked']:.4f}",
              flush=True)

    # The check alone, on a ready device index and on a numpy index.
    from pivotal.trainer import _check_index
    idx_dev = jax.block_until_ready(jnp.asarray(pool[:b]))
    idx_np = pool[:b]
    rule_state = states["checked"].rule_state
    for label, idx in (("device", idx_dev), ("numpy", idx_np)):
        _check_index(idx, rule_state)
        t = time.perf_counter()
        for _ in range(200):
            _check_index(idx, rule_state)
        results[f"check_alone_{label}_us"] = (time.perf_counter() - t) / 200 * 1e6
        print(f"check alone ({label} index): {results[f'check_alone_{label}_us']:.1f} us")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
