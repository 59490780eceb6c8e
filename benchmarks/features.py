"""Sections 2-3: RBC against GBC features on LeNet-5; GBC against a per-example reference loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import init_model, time_call, time_side_by_side
from benchmarks.config import Config, log


def _snapshots(cfg: Config, ds, module, params) -> list:
    """Parameter snapshots from a few plain SGD steps each (the values only steer GBC's layer draw)."""
    from experiments.models import cross_entropy_loss_fn
    from pivotal import l2rw, make_meta_step

    trainer = make_meta_step(cross_entropy_loss_fn(module, False), l2rw(), learning_rate=0.1)
    state = trainer.init(params, jax.random.key(3), num_examples=len(ds.y_train))
    rng = np.random.default_rng(1)
    snaps = []
    for _ in range(cfg.feat_snapshots):
        for _ in range(cfg.feat_steps_between):
            idx = rng.choice(len(ds.y_train), 256, replace=False)
            batch = {"x": ds.x_train[idx], "y": ds.y_train[idx], "index": idx.astype(np.int32)}
            state, _ = trainer.plain_step(state, batch)
        snaps.append(state.params)
    return snaps


def bench_features(cfg: Config, ds) -> dict:
    from experiments.models import features_fn
    from pivotal.features import (
        gbc_features,
        history_features,
        label_free_loss,
        layer_groups_of,
        per_example_grads,
        rbc_features,
    )

    module, _, params0, _ = init_model("lenet5", ds.input_shape)
    snaps = _snapshots(cfg, ds, module, params0)
    n = min(cfg.feat_n, len(ds.y_train))
    x = jnp.asarray(ds.x_train[:n])
    batch = {"x": x}
    forward = features_fn(module, False)

    def lf_loss(p, b):  # label-free GBC loss (label noise setting)
        return label_free_loss(module.apply({"params": p}, b["x"]))

    def rbc_fn(p, key):
        del key
        h, logits = forward(p, None, x)
        return rbc_features(h, logits)

    def gbc_fn(p, key):
        return gbc_features(lf_loss, p, batch, key, num_layers=5, chunk_size=cfg.gbc_chunk)

    def gbc_patches_fn(p, key):
        return gbc_features(lf_loss, p, batch, key, num_layers=5, chunk_size=cfg.gbc_patches_chunk,
                            strategy="patches")

    key = jax.random.key(4)
    timings = time_side_by_side(
        {
            "rbc": lambda: history_features(rbc_fn, snaps, key),
            "gbc": lambda: history_features(gbc_fn, snaps, key),
            "gbc_patches": lambda: history_features(gbc_patches_fn, snaps, key),
        },
        repeats=cfg.feat_repeats,
        warmup_rounds=cfg.feat_warmup_rounds,
    )
    rbc_dim = int(history_features(rbc_fn, snaps, key).shape[1])
    gbc_feats = history_features(gbc_fn, snaps, key)
    gbc_dim = int(gbc_feats.shape[1])
    # Breakdown of one GBC call: importance pass vs per-example pass.
    from pivotal import gbc as feat_mod

    params = snaps[-1]
    gkey = jax.random.key(5)
    feats, info = gbc_features(lf_loss, params, batch, gkey, num_layers=5, chunk_size=cfg.gbc_chunk,
                               return_info=True)
    imp = time_call(lambda: feat_mod._leaf_sq_norms_of_mean_grad(lf_loss, params, batch, cfg.gbc_chunk),
                    repeats=cfg.feat_repeats)
    rbc_res = {
        "time": timings["rbc"],
        "feature_dim": rbc_dim,
    }
    gbc_res = {
        "time": timings["gbc"],
        "feature_dim": gbc_dim,
        "chunk_size": cfg.gbc_chunk,
        "num_layers": 5,
        "importance_pass_median_s": imp["median_s"],
    }
    out = {
        "model": "lenet5",
        "n": n,
        "snapshots": len(snaps),
        "rbc": rbc_res,
        "gbc": gbc_res,
        "gbc_patches": {"time": timings["gbc_patches"], "chunk_size": cfg.gbc_patches_chunk,
                        "max_abs_diff": float(jnp.max(jnp.abs(
                            history_features(gbc_patches_fn, snaps, key) - gbc_feats)))},
        "ratio": min(timings["gbc"]["median_s"], timings["gbc_patches"]["median_s"]) / timings["rbc"]["median_s"],
        "ratio_vmap": timings["gbc"]["median_s"] / timings["rbc"]["median_s"],
        "ratio_patches": timings["gbc_patches"]["median_s"] / timings["rbc"]["median_s"],
        "rbc_definition": "features_fn forward (penultimate + logits) on all N + rbc_features (label-free), per snapshot",
        "gbc_definition": "gbc_features(label_free_loss, num_layers=5) per snapshot (importance pass + per-example pass)",
    }
    log(f"gbc/rbc: {out['ratio']:.1f}")

    # 3. the reference loop: one jitted single-example backward per example, full parameters (as
    # the PyTorch code does), then the drawn layers copied to the host and concatenated.
    groups = layer_groups_of(params)
    names = list(groups)
    leaf_ids, leaf_scales = [], []
    for block, scale in zip(info.blocks, info.scales):
        for i in groups[block]:
            leaf_ids.append(i)
            leaf_scales.append(float(scale))

    @jax.jit
    def grad_one(p, x1):
        return jax.grad(lambda q: lf_loss(q, {"x": x1})[0])(p)

    x_host = np.asarray(ds.x_train[:n])

    def loop(count):
        rows = []
        for j in range(count):
            g = jax.tree_util.tree_leaves(grad_one(params, x_host[j:j + 1]))
            rows.append(np.concatenate([s * np.ravel(np.asarray(g[i])) for i, s in zip(leaf_ids, leaf_scales)]))
        return np.stack(rows)

    count = min(cfg.loop_examples, n)
    loop_t = time_call(lambda: loop(count), repeats=1)
    ref = loop(min(count, 8))
    max_err = float(np.max(np.abs(ref - np.asarray(feats[: ref.shape[0]]))))
    scale_ref = float(np.max(np.abs(ref))) or 1.0
    ours = time_call(lambda: gbc_features(lf_loss, params, batch, gkey, num_layers=5, chunk_size=cfg.gbc_chunk),
                     repeats=cfg.feat_repeats)
    full = time_call(lambda: per_example_grads(lf_loss, params, batch, chunk_size=cfg.gbc_chunk),
                     repeats=cfg.feat_repeats)
    per_example = loop_t["median_s"] / count
    loop_total = per_example * n
    out["loop"] = {
        "examples_timed": count,
        "extrapolated": True,
        "note": f"loop timed on {count} of {n} examples, extrapolated linearly to N={n}",
        "per_example_s": per_example,
        "loop_total_s": loop_total,
        "loop_compile_s": loop_t["compile_s"],
        "ours_gbc": ours,
        "ours_per_example_grads_all_params": full,
        "speedup_gbc": loop_total / ours["median_s"],
        "speedup_per_example_grads": loop_total / full["median_s"],
        "max_abs_diff_vs_ours": max_err,
        "relative_diff_vs_ours": max_err / scale_ref,
        "drawn_blocks": list(info.blocks),
        "layers": names,
    }
    log(f"gbc vs loop: {out['loop']['speedup_gbc']:.1f}x")
    return out
