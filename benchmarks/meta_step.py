"""Section 1: the meta re-weighting step (exact and first-order) against the plain step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import init_model, time_side_by_side
from benchmarks.config import Config, log


def bench_meta_step(cfg: Config, ds) -> dict:
    """Per model: the exact step (Eq. 3 through the lookahead), the first-order step
    (``meta_gradient="first_order"``) and the plain step, timed in alternating rounds."""
    from experiments.models import cross_entropy_loss_fn
    from pivotal import direct_weights, make_meta_step

    rng = np.random.default_rng(0)
    n_train = len(ds.y_train)
    idx = rng.choice(n_train, cfg.meta_batch, replace=False)
    batch = {
        "x": jnp.asarray(ds.x_train[idx]),
        "y": jnp.asarray(ds.y_train[idx]),
        "index": jnp.asarray(idx, jnp.int32),
    }
    meta_set = {"x": jnp.asarray(ds.x_val[: cfg.meta_set]), "y": jnp.asarray(ds.y_val[: cfg.meta_set])}
    lr = 0.1
    out = {}
    for name in cfg.meta_models:
        module, _, params, _ = init_model(name, ds.input_shape)
        loss_fn = cross_entropy_loss_fn(module, False)
        rule = direct_weights(weight_lr=cfg.meta_batch / lr)
        exact = make_meta_step(loss_fn, rule, learning_rate=lr)
        first = make_meta_step(loss_fn, rule, learning_rate=lr, meta_gradient="first_order")
        state = exact.init(params, jax.random.key(1), num_examples=n_train)
        key = jax.random.key(2)
        timings = time_side_by_side(
            {
                "meta": lambda: exact.step(state, batch, meta_set, key),
                "first_order": lambda: first.step(state, batch, meta_set, key),
                "plain": lambda: exact.plain_step(state, batch),
            },
            repeats=cfg.meta_repeats,
        )
        plain = timings["plain"]["median_s"]
        out[name] = {
            "meta_step": timings["meta"],
            "first_order_step": timings["first_order"],
            "plain_step": timings["plain"],
            "ratio": timings["meta"]["median_s"] / plain,
            "first_order_ratio": timings["first_order"]["median_s"] / plain,
            "batch": cfg.meta_batch,
            "meta_set": cfg.meta_set,
            "rule": "direct_weights",
            "optimizer": "sgd (default)",
        }
        log(f"meta step {name}: exact {out[name]['ratio']:.2f}, first-order "
            f"{out[name]['first_order_ratio']:.2f}")
    return out
