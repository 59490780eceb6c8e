"""Section 6: ``per_example_grads`` throughput (each strategy), side by side with the batched
forward + backward of the same model on the same examples in training batches (the floor: a
per-example gradient costs about as much as its share of a batched one)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import init_model, time_call, time_side_by_side
from benchmarks.config import Config, log


def _lenet(cfg: Config, ds) -> tuple[list, dict]:
    from experiments.models import frozen_loss_fn
    from pivotal._rows import zeros_rows
    from pivotal.features import per_example_grads

    module, _, params, _ = init_model("lenet5", ds.input_shape)
    loss = frozen_loss_fn(module, None)
    n, b = cfg.lenet_n, min(cfg.meta_batch, cfg.lenet_n)
    reps = int(np.ceil(n / len(ds.y_train)))
    batch = {"x": jnp.asarray(np.concatenate([ds.x_train] * reps)[:n]),
             "y": jnp.asarray(np.concatenate([ds.y_train] * reps)[:n])}
    # The floor: one pass over the N examples in training batches (forward + backward, no update).
    batched = jax.jit(jax.grad(lambda p, xb: jnp.mean(loss(p, xb))))
    minibatches = [jax.tree_util.tree_map(lambda a, s=s: a[s:s + b], batch) for s in range(0, n - b + 1, b)]
    fns = {"batched": lambda: [batched(params, mb) for mb in minibatches]}
    # What a fresh (N, P) output costs by itself (zero-filled, first touch of its pages): part of
    # every per_example_grads call and of none of the batched passes.
    out_shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape, a.dtype), params)
    fns["output"] = lambda: zeros_rows(n, out_shapes, None)
    for strategy in cfg.lenet_strategies:
        for chunk in cfg.lenet_chunks:
            fns[f"{strategy}_{chunk}"] = (lambda c=chunk, s=strategy:
                                          per_example_grads(loss, params, batch, chunk_size=c, strategy=s))
    timings = time_side_by_side(fns, repeats=cfg.thr_repeats)
    rows = []
    for strategy in cfg.lenet_strategies:
        for chunk in cfg.lenet_chunks:
            t = timings[f"{strategy}_{chunk}"]
            rows.append({"model": "lenet5", "input": "28x28x1", "n": n, "strategy": strategy,
                         "chunk_size": chunk, "examples_per_s": n / t["median_s"], **t})
            log(f"throughput lenet5 {strategy} chunk {chunk}: {n / t['median_s']:.0f}/s")
    best = max(rows, key=lambda r: r["examples_per_s"])
    batched_rate = len(minibatches) * b / timings["batched"]["median_s"]
    output_s = timings["output"]["median_s"]
    best_s = n / best["examples_per_s"]
    versus = {
        "n": n,
        "batched": {"examples_per_s": batched_rate, "batch_size": b, **timings["batched"]},
        "best_chunk_size": best["chunk_size"],
        "best_strategy": best["strategy"],
        "ratio": best["examples_per_s"] / batched_rate,
        "output": {"bytes": sum(s.size * s.dtype.itemsize for s in jax.tree_util.tree_leaves(out_shapes)),
                   **timings["output"]},
        "output_share": output_s / best_s,
        "ratio_without_output": (n / max(best_s - output_s, 1e-12)) / batched_rate,
        "definition": ("per_example_grads(all parameters) examples/s at its best strategy and chunk "
                       "size over jit(grad(mean loss)) examples/s in training batches of "
                       f"{b} over the same examples, timed in alternating rounds"),
    }
    log(f"per-example vs batched: {versus['ratio']:.2f} (batched {batched_rate:.0f}/s at {b}, "
        f"best {best['strategy']} chunk {best['chunk_size']}; its output's allocation "
        f"{versus['output_share']:.0%} of its time, {versus['ratio_without_output']:.2f} without)")
    return rows, versus


def bench_throughput(cfg: Config, ds) -> dict:
    from experiments.models import frozen_loss_fn
    from pivotal.features import per_example_grads

    rows, versus = _lenet(cfg, ds)
    if cfg.resnet_n > 0:
        shape = (32, 32, 3)
        module, _, params, state = init_model("resnet34", shape)
        loss = frozen_loss_fn(module, state)
        rn = cfg.resnet_n
        batch = {
            "x": jax.random.normal(jax.random.key(9), (rn, *shape), jnp.float32),
            "y": jnp.arange(rn, dtype=jnp.int32) % 10,
        }
        for chunk in cfg.resnet_chunks:
            t = time_call(lambda: per_example_grads(loss, params, batch, chunk_size=chunk),
                          repeats=cfg.thr_repeats)
            rows.append({"model": "resnet34", "input": "32x32x3, frozen BatchNorm", "n": rn,
                         "chunk_size": chunk, "examples_per_s": rn / t["median_s"], **t})
            log(f"throughput resnet34 chunk {chunk}: {rn / t['median_s']:.1f}/s")
    return {"rows": rows, "versus_batched": versus}
