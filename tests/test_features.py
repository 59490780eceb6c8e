"""Tests for pivotal.features: RBC, per-example gradients, GBC, snapshot history."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pivotal.features import (
    gbc_features,
    history_features,
    label_free_loss,
    layer_groups_of,
    make_gbc_feature_fn,
    make_rbc_feature_fn,
    per_example_grads,
    rbc_features,
    sample_snapshot_epochs,
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


class Net(nn.Module):
    """Two tanh layers and a Dense head; returns (penultimate, logits)."""

    hidden: int = 6
    penultimate: int = 5
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="hidden")(x))
        h = jnp.tanh(nn.Dense(self.penultimate, name="penult")(h))
        return h, nn.Dense(self.classes, name="head")(h)


def make_problem(n=8, in_dim=3, seed=0):
    # Cached so that tests share loss_fn objects, hence the compiled per-example kernels;
    # keyed on the x64 flag so float64 tests get float64 arrays.
    return _make_problem(n, in_dim, seed, bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=None)
def _make_problem(n, in_dim, seed, x64_enabled):
    model = Net()
    k_init, k_x, k_y = jax.random.split(jax.random.PRNGKey(seed), 3)
    dtype = jnp.float64 if x64_enabled else jnp.float32
    x = jax.random.normal(k_x, (n, in_dim), dtype=dtype)
    y = jax.random.randint(k_y, (n,), 0, model.classes)
    params = jax.jit(model.init)(k_init, x[:1])
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    batch = {"x": x, "y": y, "index": jnp.arange(n)}

    def ce_loss(p, b):
        _, z = model.apply(p, b["x"])
        return optax.softmax_cross_entropy_with_integer_labels(z, b["y"])

    def lf_loss(p, b):
        _, z = model.apply(p, b["x"])
        return label_free_loss(z)

    return model, params, batch, ce_loss, lf_loss


def flat_grads(grads):
    """(N, P) matrix from a per-example gradient pytree."""
    leaves = jax.tree_util.tree_leaves(grads)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


# ---------------------------------------------------------------------------
# RBC
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("label_aware", [False, True])
def test_rbc_equals_head_kernel_and_bias_gradient(x64, label_aware):
    model, params, batch, ce_loss, lf_loss = make_problem()
    loss_fn = ce_loss if label_aware else lf_loss
    # Reference: vmap(grad) of the single-example loss w.r.t. the whole parameter tree.
    single = lambda p, x, y: loss_fn(p, {"x": x[None], "y": y[None]})[0]
    grads = jax.jit(jax.vmap(jax.grad(single), in_axes=(None, 0, 0)))(params, batch["x"], batch["y"])
    kernel = grads["params"]["head"]["kernel"]  # (N, D, C)
    bias = grads["params"]["head"]["bias"]  # (N, C)
    n, d, c = kernel.shape

    h, z = model.apply(params, batch["x"])
    labels = batch["y"] if label_aware else None
    feats = rbc_features(h, z, labels, include_bias=True)
    chex.assert_shape(feats, (n, c * d + c))
    chex.assert_type(feats, jnp.float64)
    expected_kernel = jnp.transpose(kernel, (0, 2, 1)).reshape(n, c * d)
    np.testing.assert_allclose(feats[:, : c * d], expected_kernel, atol=1e-12, rtol=1e-6)
    np.testing.assert_allclose(feats[:, c * d :], bias, atol=1e-12, rtol=1e-6)
    np.testing.assert_array_equal(rbc_features(h, z, labels), feats[:, : c * d])


def test_rbc_label_free_rows_nonnegative_when_h_nonnegative():
    # softmax > 0 and h >= 0 give all-positive features (why the paper's S2 needs no sign).
    h = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (4, 3)))
    z = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    assert bool(jnp.all(rbc_features(h, z) >= 0))
    # label-aware rows: the A_j entries sum to zero per example.
    y = jnp.array([0, 1, 2, 3])
    a = rbc_features(h, z, y, include_bias=True)[:, -5:]
    np.testing.assert_allclose(a.sum(axis=1), 0.0, atol=1e-6)


def test_rbc_is_jittable():
    h = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    z = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    y = jnp.array([0, 4, 2, 3])
    np.testing.assert_allclose(jax.jit(rbc_features)(h, z, y), rbc_features(h, z, y), rtol=1e-6)


def test_rbc_bad_inputs():
    h = jnp.ones((4, 3))
    z = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match="penultimate"):
        rbc_features(jnp.ones(4), z)
    with pytest.raises(ValueError, match="logits"):
        rbc_features(h, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="labels"):
        rbc_features(h, z, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels.*\[0, C\)"):
        rbc_features(h, z, jnp.array([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="labels"):
        rbc_features(h, z, jnp.array([0, -1, 2, 3]))
    with pytest.raises(TypeError, match="labels"):
        rbc_features(h, z, jnp.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="NaN"):
        rbc_features(h.at[0, 0].set(jnp.nan), z)


def test_label_free_loss_gradient_is_softmax():
    z = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
    np.testing.assert_allclose(label_free_loss(z), jax.nn.logsumexp(z, axis=1), rtol=1e-6)
    g = jax.grad(lambda z: label_free_loss(z).sum())(z)
    np.testing.assert_allclose(g, jax.nn.softmax(z), rtol=1e-5, atol=1e-7)
    # CE = label-free - label-dependent (Lemma 1).
    y = jnp.array([0, 1, 2, 3, 0, 1])
    ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(ce, label_free_loss(z) - z[jnp.arange(6), y], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits"):
        label_free_loss(jnp.float32(1.0))


# ---------------------------------------------------------------------------
# per_example_grads
# ---------------------------------------------------------------------------


def test_per_example_grads_chunked_matches_python_loop(x64):
    _, params, batch, ce_loss, _ = make_problem()
    # Reference: one jax.grad call per example on a batch of one, in a Python loop.
    grad_of_one = jax.jit(jax.grad(lambda p, example: ce_loss(p, example)[0]))
    refs = [grad_of_one(params, jax.tree_util.tree_map(lambda x: x[j : j + 1], batch)) for j in range(8)]
    # 8 examples: all at once, chunks of 1, chunks of 3 (remainder 2), exactly 8, and more than N.
    for chunk_size in (None, 1, 3, 8, 50):
        grads = per_example_grads(ce_loss, params, batch, chunk_size=chunk_size)
        chex.assert_trees_all_equal_structs(grads, params)
        for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
            chex.assert_shape(g, (8,) + p.shape)
        for j, ref in enumerate(refs):
            got = jax.tree_util.tree_map(lambda g: g[j], grads)
            chex.assert_trees_all_close(got, ref, rtol=1e-10, atol=1e-12)


def test_per_example_grads_chunked_equals_unchunked():
    _, params, batch, _, lf_loss = make_problem()
    full = per_example_grads(lf_loss, params, batch)
    chex.assert_trees_all_close(per_example_grads(lf_loss, params, batch, chunk_size=3), full, rtol=1e-5, atol=1e-6)


def test_per_example_grads_bad_inputs():
    _, params, batch, ce_loss, _ = make_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_grads(ce_loss, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="leading size"):
        per_example_grads(ce_loss, params, {"x": batch["x"], "y": batch["y"][:3]})
    with pytest.raises(ValueError, match=r"\(B,\)"):
        per_example_grads(lambda p, b: ce_loss(p, b).mean(), params, batch)
    with pytest.raises(TypeError, match="loss_fn"):
        per_example_grads("not a function", params, batch)


# ---------------------------------------------------------------------------
# GBC
# ---------------------------------------------------------------------------


def test_layer_groups_default_and_overrides():
    _, params, _, _, _ = make_problem()
    groups = layer_groups_of(params)
    assert list(groups) == ["params/head", "params/hidden", "params/penult"]
    assert all(len(v) == 2 for v in groups.values())  # {bias, kernel}
    by_kind = layer_groups_of(params, lambda path: path.rsplit("/", 1)[1])
    assert sorted(by_kind) == ["bias", "kernel"]
    explicit = layer_groups_of(params, {"top": ["params/head/kernel", "params/head/bias"],
                                        "rest": ["params/hidden/kernel", "params/hidden/bias",
                                                 "params/penult/kernel", "params/penult/bias"]})
    assert [len(v) for v in explicit.values()] == [2, 4]
    with pytest.raises(ValueError, match="cover every leaf"):
        layer_groups_of(params, [["params/head/kernel"]])
    with pytest.raises(ValueError, match="unknown leaf path"):
        layer_groups_of(params, [["params/nope"]])
    with pytest.raises(ValueError, match="more than once"):
        layer_groups_of(params, [["params/head/kernel"], ["params/head/kernel"]])


def _split_blocks(feats, info):
    edges = np.cumsum(info.block_sizes)[:-1]
    return np.split(np.asarray(feats), edges, axis=1)


@pytest.mark.slow  # averages many layer draws: ~20 s alone
def test_gbc_gram_is_unbiased_for_full_gradient_gram(x64):
    # Small net (3 layers), R = 2 draws per call. The Gram matrix of one call is an
    # unbiased estimate of the full per-example-gradient Gram matrix; the mean of K
    # independent draws has relative Frobenius error ~ sigma_1 / sqrt(K) where sigma_1
    # is the single-draw relative RMS error (measured below, ~0.4 here). With K = 200
    # the expected error is ~0.03; we allow 0.1 (> 3.5 sigma). A mis-scaled estimator
    # (blocks scaled by sqrt(count / R), i.e. ignoring p_l) has a systematic bias that
    # does not shrink with K (~0.65 here), which we check exceeds 0.2.
    _, params, batch, ce_loss, _ = make_problem(n=8, seed=4)
    full = flat_grads(per_example_grads(ce_loss, params, batch))
    gram_full = np.asarray(full @ full.T)
    norm_full = np.linalg.norm(gram_full)

    num_draws, k = 2, 200
    keys = jax.random.split(jax.random.PRNGKey(123), k)
    grams, wrong_grams = [], []
    probs = None
    for key in keys:
        feats, info = gbc_features(ce_loss, params, batch, key, num_layers=num_draws, return_info=True)
        probs = info.probabilities
        feats = np.asarray(feats)
        grams.append(feats @ feats.T)
        # Re-scale each block by sqrt(count/R) instead of sqrt(count/(R p)).
        blocks = _split_blocks(feats, info)
        wrong = np.concatenate(
            [b / s * np.sqrt(c / num_draws) for b, s, c in zip(blocks, info.scales, info.counts)], axis=1
        )
        wrong_grams.append(wrong @ wrong.T)

    # The layer distribution must be far enough from uniform for the mis-scaling to show.
    assert probs.max() / probs.min() > 2.0
    single_err = np.mean([np.linalg.norm(g - gram_full) ** 2 for g in grams]) ** 0.5 / norm_full
    err = np.linalg.norm(np.mean(grams, axis=0) - gram_full) / norm_full
    wrong_err = np.linalg.norm(np.mean(wrong_grams, axis=0) - gram_full) / norm_full
    assert single_err > 0.2  # one draw is far off: it is the averaging that converges
    assert err < 0.1, (err, single_err)
    assert wrong_err > 0.2, wrong_err


def test_gbc_merged_and_unmerged_blocks_have_same_inner_products(x64):
    _, params, batch, ce_loss, _ = make_problem()
    key = jax.random.PRNGKey(7)
    merged, info_m = gbc_features(ce_loss, params, batch, key, num_layers=6, return_info=True)
    unmerged, info_u = gbc_features(ce_loss, params, batch, key, num_layers=6, merge_repeats=False, return_info=True)
    assert info_m.draws == info_u.draws
    assert len(info_u.blocks) == 6 and info_m.counts.sum() == 6
    assert merged.shape[1] < unmerged.shape[1]
    np.testing.assert_allclose(merged @ merged.T, unmerged @ unmerged.T, rtol=1e-10, atol=1e-14)


def test_gbc_blocks_are_scaled_per_example_gradients(x64):
    _, params, batch, _, lf_loss = make_problem()
    feats, info = gbc_features(lf_loss, params, batch, jax.random.PRNGKey(0), num_layers=3,
                               chunk_size=3, return_info=True)
    grads = per_example_grads(lf_loss, params, batch)
    np.testing.assert_allclose(info.probabilities.sum(), 1.0)
    mean_grads = jax.tree_util.tree_map(lambda g: g.mean(axis=0), grads)["params"]
    for name, a in zip(info.layer_names, info.importance):
        layer = mean_grads[name.split("/")[1]]
        np.testing.assert_allclose(a, sum(float(jnp.sum(v**2)) for v in layer.values()), rtol=1e-9)
    for block, name, scale, count in zip(_split_blocks(feats, info), info.blocks, info.scales, info.counts):
        p = info.probabilities[info.layer_names.index(name)]
        np.testing.assert_allclose(scale, np.sqrt(count / (3 * p)))
        layer = grads["params"][name.split("/")[1]]
        expected = np.concatenate([np.asarray(layer[leaf]).reshape(8, -1) for leaf in ("bias", "kernel")], axis=1)
        np.testing.assert_allclose(block, scale * expected, rtol=1e-9, atol=1e-14)


def test_gbc_deterministic_given_key_and_chunk_invariant():
    _, params, batch, ce_loss, _ = make_problem()
    key = jax.random.PRNGKey(5)
    a, info_a = gbc_features(ce_loss, params, batch, key, return_info=True)
    b, info_b = gbc_features(ce_loss, params, batch, key, chunk_size=4, return_info=True)
    assert info_a.draws == info_b.draws
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(info_a.importance, info_b.importance, rtol=1e-4)


def test_gbc_never_draws_zero_importance_layers():
    # The "dead" layer's output is multiplied by 0, so its gradient (and A_l) is exactly 0.
    params = {"live": {"w": jnp.ones((3, 2))}, "dead": {"w": jnp.ones((3, 2))}}

    def loss_fn(p, b):
        return jnp.sum(b["x"] @ p["live"]["w"], axis=1) ** 2 + 0.0 * jnp.sum(b["x"] @ p["dead"]["w"], axis=1)

    batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (5, 3))}
    for seed in range(20):
        _, info = gbc_features(loss_fn, params, batch, jax.random.PRNGKey(seed), num_layers=5, return_info=True)
        assert info.blocks == ("live",)
        assert info.probabilities[info.layer_names.index("dead")] == 0.0


def test_gbc_bad_inputs():
    _, params, batch, ce_loss, _ = make_problem()
    key = jax.random.PRNGKey(0)
    zero_loss = lambda p, b: 0.0 * ce_loss(p, b)
    with pytest.raises(ValueError, match="importance"):
        gbc_features(zero_loss, params, batch, key)
    with pytest.raises(ValueError, match="num_layers"):
        gbc_features(ce_loss, params, batch, key, num_layers=0)
    with pytest.raises(ValueError, match="chunk_size"):
        gbc_features(ce_loss, params, batch, key, chunk_size=-2)
    with pytest.raises(TypeError, match="key"):
        gbc_features(ce_loss, params, batch, 3)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        gbc_features(lambda p, b: ce_loss(p, b).sum(), params, batch, key)
    nan_params = jax.tree_util.tree_map(lambda x: x * jnp.nan, params)
    with pytest.raises(ValueError, match="not finite"):
        gbc_features(ce_loss, nan_params, batch, key)


def test_remainder_chunks_and_strategies_give_identical_results(x64):
    # N = 8 with chunks of 3: the last chunk is shifted back to rows 5..7 (overlap 1).
    _, params, batch, ce_loss, lf_loss = make_problem()
    full = per_example_grads(ce_loss, params, batch)
    for strategy, chunk_size in (("vmap", 3), ("map", 3), ("map", None)):
        got = per_example_grads(ce_loss, params, batch, chunk_size=chunk_size, strategy=strategy)
        chex.assert_trees_all_close(got, full, rtol=1e-12, atol=1e-14)
    # Under jit the chunks run in a lax.fori_loop: same values.
    jitted = jax.jit(lambda p, b: per_example_grads(ce_loss, p, b, chunk_size=3))(params, batch)
    chex.assert_trees_all_close(jitted, full, rtol=1e-12, atol=1e-14)
    key = jax.random.PRNGKey(11)
    ref, info_ref = gbc_features(lf_loss, params, batch, key, num_layers=4, return_info=True)
    for kwargs in ({"chunk_size": 3, "importance_chunk_size": 3}, {"chunk_size": 5, "strategy": "map"}):
        got, info = gbc_features(lf_loss, params, batch, key, num_layers=4, return_info=True, **kwargs)
        assert info.draws == info_ref.draws
        np.testing.assert_allclose(info.importance, info_ref.importance, rtol=1e-12)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)


def test_map_strategy_long_chunks_use_a_loop(x64, monkeypatch):
    from pivotal import grads as feat_mod

    monkeypatch.setattr(feat_mod, "_MAX_UNROLL", 2)
    _, params, batch, ce_loss, _ = make_problem()
    got = per_example_grads(ce_loss, params, batch, chunk_size=5, strategy="map")
    chex.assert_trees_all_close(got, per_example_grads(ce_loss, params, batch), rtol=1e-12, atol=1e-14)


def test_gbc_subsampled_importance(x64):
    _, params, batch, ce_loss, _ = make_problem(n=8, seed=4)
    key = jax.random.PRNGKey(2)
    feats, info = gbc_features(ce_loss, params, batch, key, num_layers=3, importance_sample_size=3,
                               return_info=True)
    chex.assert_shape(feats, (8, int(info.block_sizes.sum())))
    np.testing.assert_allclose(info.probabilities.sum(), 1.0)
    again, info2 = gbc_features(ce_loss, params, batch, key, num_layers=3, importance_sample_size=3,
                                return_info=True)
    np.testing.assert_array_equal(feats, again)
    np.testing.assert_array_equal(info.importance, info2.importance)
    _, full_info = gbc_features(ce_loss, params, batch, key, num_layers=3, return_info=True)
    assert not np.allclose(info.importance, full_info.importance)  # p is an estimate
    # A sample as large as N is the full batch.
    _, same = gbc_features(ce_loss, params, batch, key, num_layers=3, importance_sample_size=8, return_info=True)
    np.testing.assert_allclose(same.importance, full_info.importance, rtol=1e-12)
    # The importance rows are the mean-gradient of the drawn rows.
    sub_keys = {tuple(gbc_features(ce_loss, params, batch, jax.random.PRNGKey(s), num_layers=3,
                                   importance_sample_size=3, return_info=True)[1].importance.round(12))
                for s in range(5)}
    assert len(sub_keys) > 1
    with pytest.raises(ValueError, match="importance_sample_size"):
        gbc_features(ce_loss, params, batch, key, importance_sample_size=0)
    with pytest.raises(ValueError, match="importance_chunk_size"):
        gbc_features(ce_loss, params, batch, key, importance_chunk_size=0)
    with pytest.raises(ValueError, match="strategy"):
        gbc_features(ce_loss, params, batch, key, strategy="loop")
    with pytest.raises(ValueError, match="strategy"):
        per_example_grads(ce_loss, params, batch, strategy="loop")


@pytest.mark.slow
def test_gbc_subsampled_importance_gram_still_unbiased(x64):
    # Conditionally on the estimated p the layer draw and the 1/sqrt(R p) scaling use the
    # same p, so E[G G^T | p] is the full Gram matrix; averaged over keys (each with its
    # own row subsample and layer draw) the mean Gram converges to it. Same tolerances
    # as test_gbc_gram_is_unbiased_for_full_gradient_gram.
    _, params, batch, ce_loss, _ = make_problem(n=8, seed=4)
    full = flat_grads(per_example_grads(ce_loss, params, batch))
    gram_full = np.asarray(full @ full.T)
    norm_full = np.linalg.norm(gram_full)
    grams, probs = [], set()
    for key in jax.random.split(jax.random.PRNGKey(321), 200):
        feats, info = gbc_features(ce_loss, params, batch, key, num_layers=2, importance_sample_size=3,
                                   return_info=True)
        assert np.all(info.probabilities > 0)
        probs.add(tuple(info.probabilities.round(10)))
        feats = np.asarray(feats)
        grams.append(feats @ feats.T)
    assert len(probs) > 10  # p really is re-estimated per key
    err = np.linalg.norm(np.mean(grams, axis=0) - gram_full) / norm_full
    assert err < 0.1, err


# ---------------------------------------------------------------------------
# GBC sketch
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _make_wide_problem(x64_enabled):
    """A wider Net (16 -> 32 -> 24 -> 10) on 12 examples, so that sketching has columns to cut."""
    model = Net(hidden=32, penultimate=24, classes=10)
    k_init, k_x, k_y = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.float64 if x64_enabled else jnp.float32
    x = jax.random.normal(k_x, (12, 16), dtype=dtype)
    y = jax.random.randint(k_y, (12,), 0, model.classes)
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), jax.jit(model.init)(k_init, x[:1]))

    def ce_loss(p, b):
        _, z = model.apply(p, b["x"])
        return optax.softmax_cross_entropy_with_integer_labels(z, b["y"])

    return params, {"x": x, "y": y}, ce_loss


def make_wide_problem():
    return _make_wide_problem(bool(jax.config.jax_enable_x64))


def _all_one_layer(path):
    return "all"


def test_gbc_sketch_default_unchanged(x64):
    # sketch_dim=None is the exact path; a sketch at least as wide as every leaf keeps every
    # side exact (no projection at all), so it gives the same features bit for bit.
    _, params, batch, ce_loss, _ = make_problem()
    key = jax.random.PRNGKey(3)
    for kwargs in ({}, {"chunk_size": 3}, {"merge_repeats": False, "num_layers": 6}):
        ref, info_ref = gbc_features(ce_loss, params, batch, key, return_info=True, **kwargs)
        plain, info = gbc_features(ce_loss, params, batch, key, return_info=True, sketch_dim=None, **kwargs)
        np.testing.assert_array_equal(plain, ref)
        np.testing.assert_array_equal(info.block_sizes, info_ref.block_sizes)
        for wide in (10**6, (100, 100)):
            got, info_wide = gbc_features(ce_loss, params, batch, key, return_info=True, sketch_dim=wide,
                                          sketch_key=jax.random.PRNGKey(9), **kwargs)
            np.testing.assert_array_equal(got, ref)
            np.testing.assert_array_equal(info_wide.block_sizes, info_ref.block_sizes)


@pytest.mark.slow
def test_gbc_sketch_is_unbiased_for_fixed_layer_draw(x64):
    # The layer draw is fixed (same `key`); only the sketch key varies. The mean over K = 200
    # sketch keys of the sketched Gram matrix S S^T converges to the exact GBC Gram G G^T: its
    # relative Frobenius error is ~ sigma_1 / sqrt(K), sigma_1 the single-sketch relative RMS
    # error (~1.0 here: 40 of 1,336 columns), i.e. ~0.07 (0.085 measured); we allow 0.15. A
    # mis-scaled sketch (the blocks without their importance factor sqrt(c / (R p)), which
    # this draw puts at 1.13 and 1.42) stays biased however many keys are averaged (0.38).
    params, batch, ce_loss = make_wide_problem()
    key = jax.random.PRNGKey(1)
    exact, info = gbc_features(ce_loss, params, batch, key, num_layers=2, return_info=True)
    assert len(info.blocks) == 2 and np.all(info.scales > 1.1)
    exact = np.asarray(exact)
    gram = exact @ exact.T
    norm = np.linalg.norm(gram)
    grams, wrong_grams = [], []
    for sketch_key in jax.random.split(jax.random.PRNGKey(7), 200):
        feats, sk_info = gbc_features(ce_loss, params, batch, key, num_layers=2, sketch_dim=(4, 4),
                                      sketch_key=sketch_key, return_info=True)
        assert sk_info.blocks == info.blocks
        np.testing.assert_array_equal(sk_info.scales, info.scales)
        feats = np.asarray(feats)
        grams.append(feats @ feats.T)
        blocks = _split_blocks(feats, sk_info)
        wrong = np.concatenate([b / s for b, s in zip(blocks, sk_info.scales)], axis=1)
        wrong_grams.append(wrong @ wrong.T)
    assert feats.shape[1] < exact.shape[1] / 10
    single_err = np.mean([np.linalg.norm(g - gram) ** 2 for g in grams]) ** 0.5 / norm
    err = np.linalg.norm(np.mean(grams, axis=0) - gram) / norm
    wrong_err = np.linalg.norm(np.mean(wrong_grams, axis=0) - gram) / norm
    print(f"GBC sketch (4, 4), fixed layer draw: Gram relative error {single_err:.3f} for one sketch key, "
          f"{err:.3f} for the mean over 200 keys, {wrong_err:.3f} mis-scaled")
    assert single_err > 0.3  # one sketch is far off: it is the averaging that converges
    assert err < 0.15, (err, single_err)
    assert wrong_err > 0.3, wrong_err


@pytest.mark.slow
def test_gbc_sketch_error_shrinks_with_width(x64):
    # Mean relative inner-product error |<S_i, S_j> - <G_i, G_j>| / (|G_i| |G_j|) over all
    # pairs (i, j) and 50 sketch keys, and the relative RMS (Frobenius) error of one sketch's
    # Gram matrix, for the same layer draw at three widths per leaf. Printed with `-s`;
    # docs/SCALING.md ("GBC sketch") quotes the numbers.
    params, batch, ce_loss = make_wide_problem()
    key = jax.random.PRNGKey(1)
    exact = np.asarray(gbc_features(ce_loss, params, batch, key, num_layers=3))
    gram = exact @ exact.T
    norms = np.sqrt(np.diag(gram))
    scale = np.outer(norms, norms)
    errors, widths = {}, {}
    for sketch_dim in (16, 64, 256):
        per_key, gram_errors = [], []
        for sketch_key in jax.random.split(jax.random.PRNGKey(11), 50):
            feats = np.asarray(gbc_features(ce_loss, params, batch, key, num_layers=3, sketch_dim=sketch_dim,
                                            sketch_key=sketch_key))
            per_key.append(np.mean(np.abs(feats @ feats.T - gram) / scale))
            gram_errors.append(np.linalg.norm(feats @ feats.T - gram) ** 2)
        errors[sketch_dim], widths[sketch_dim] = np.mean(per_key), feats.shape[1]
        print(f"GBC sketch_dim={sketch_dim}: {widths[sketch_dim]} of {exact.shape[1]} columns, mean relative "
              f"inner-product error {errors[sketch_dim]:.3f} (std over keys {np.std(per_key):.3f}), "
              f"Gram RMS relative error {np.mean(gram_errors) ** 0.5 / np.linalg.norm(gram):.3f}")
    assert widths[16] < widths[64] < widths[256] < exact.shape[1]
    assert errors[16] > errors[64] > errors[256], errors
    assert errors[256] < 0.5 * errors[16], errors


def test_gbc_sketch_shapes_and_values():
    # A conv-shaped (3, 3, 2, 4) kernel is sketched as an (18, 4) matrix, the scalar kept exact;
    # each block is scale * ravel(P_a^T g P_b) with the projections of fold_in(sketch_key, leaf).
    from pivotal.gbc import _as_matrix_shape, _leaf_projection, _sketch_widths

    params = {"conv": {"kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4)), "gain": jnp.array(1.5)},
              "dense": {"kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 30)),
                        "bias": 0.1 * jnp.ones(30)}}

    def loss_fn(p, b):
        h = jnp.tanh(b["x"].reshape(b["x"].shape[0], -1) @ p["conv"]["kernel"].reshape(18, 4)) * p["conv"]["gain"]
        return jnp.sum(jnp.tanh(h @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2, axis=1)

    batch = {"x": jax.random.normal(jax.random.PRNGKey(2), (7, 3, 3, 2))}
    key, sketch_key = jax.random.PRNGKey(4), jax.random.PRNGKey(5)
    assert _as_matrix_shape((3, 3, 2, 4)) == (18, 4) and _as_matrix_shape((30,)) == (1, 30)
    assert _as_matrix_shape(()) == (1, 1)
    # int k: at most k columns per leaf, split near-square; (k_a, k_b): rows x columns.
    assert _sketch_widths((3, 3, 2, 4), 8) == (4, 2) and _sketch_widths((4, 30), 8) == (2, 4)
    assert _sketch_widths((30,), 8) == (1, 8) and _sketch_widths((), 8) == (1, 1)
    assert _sketch_widths((4, 30), 120) == (4, 30) and _sketch_widths((4, 30), 100) == (4, 25)
    assert _sketch_widths((784, 256), 256) == (16, 16)
    assert _sketch_widths((3, 3, 2, 4), (5, 3)) == (5, 3) and _sketch_widths((30,), (5, 3)) == (1, 3)
    grads = per_example_grads(loss_fn, params, batch)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    index_of = {jax.tree_util.keystr(path): i for i, path in enumerate(paths)}
    for sketch_dim, width in ((8, {"conv": 8 + 1, "dense": 8 + 8}), ((5, 3), {"conv": 15 + 1, "dense": 12 + 3})):
        feats, info = gbc_features(loss_fn, params, batch, key, num_layers=4, sketch_dim=sketch_dim,
                                   sketch_key=sketch_key, return_info=True)
        np.testing.assert_array_equal(info.block_sizes, [width[name] for name in info.blocks])
        chex.assert_shape(feats, (7, sum(width[name] for name in info.blocks)))
        for block, name, scale in zip(_split_blocks(feats, info), info.blocks, info.scales):
            columns = []
            for path, leaf in jax.tree_util.tree_flatten_with_path(grads[name])[0]:
                shape = np.shape(leaf)[1:]
                index = index_of[jax.tree_util.keystr((jax.tree_util.DictKey(name),) + path)]
                left, right = _leaf_projection(jax.random.fold_in(sketch_key, index), shape,
                                               _sketch_widths(shape, sketch_dim), np.dtype(np.float32))
                g = np.asarray(leaf).reshape((7,) + _as_matrix_shape(shape))
                if left is not None:
                    g = np.einsum("ak,nab->nkb", left, g)
                if right is not None:
                    g = np.einsum("nab,bk->nak", g, right)
                columns.append(g.reshape(7, -1))
            np.testing.assert_allclose(block, scale * np.concatenate(columns, axis=1), rtol=1e-4, atol=1e-6)


def test_gbc_sketch_bad_arguments():
    _, params, batch, ce_loss, _ = make_problem()
    key = jax.random.PRNGKey(0)
    for bad in (0, -3, 2.5, True, "16", (4,), (4, 0), (2, 3, 4), (4, 2.0), [1, -1]):
        with pytest.raises(ValueError, match="sketch_dim"):
            gbc_features(ce_loss, params, batch, key, sketch_dim=bad)
    with pytest.raises(ValueError, match="sketch_key"):
        gbc_features(ce_loss, params, batch, key, sketch_key=jax.random.PRNGKey(1))
    with pytest.raises(TypeError, match="sketch_key"):
        gbc_features(ce_loss, params, batch, key, sketch_dim=4, sketch_key=3)
    # A list pair is accepted like a tuple.
    got = gbc_features(ce_loss, params, batch, key, sketch_dim=[2, 3], sketch_key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(
        got, gbc_features(ce_loss, params, batch, key, sketch_dim=(2, 3), sketch_key=jax.random.PRNGKey(1)))


@pytest.mark.slow
def test_gbc_sketch_deterministic_across_chunks_calls_and_snapshots(x64):
    _, params, batch, ce_loss, lf_loss = make_problem()
    key, sketch_key = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
    ref = gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4, sketch_key=sketch_key)
    np.testing.assert_array_equal(
        ref, gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4, sketch_key=sketch_key))
    # Every chunk (the shifted last one too) and either strategy applies the same projection.
    for kwargs in ({"chunk_size": 3}, {"chunk_size": 5, "strategy": "map"}):
        got = gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4, sketch_key=sketch_key, **kwargs)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    other = gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4, sketch_key=jax.random.PRNGKey(7))
    assert not np.allclose(other, ref)
    # Default sketch key: fold_in(key, 2).
    np.testing.assert_array_equal(
        gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4),
        gbc_features(ce_loss, params, batch, key, num_layers=4, sketch_dim=4, sketch_key=jax.random.fold_in(key, 2)))
    # The projection depends on the sketch key alone, not on the layer-draw key: with one layer
    # (p = 1, scale 1) two draw keys give the same sketch, and so do two snapshots of the history.
    one = functools.partial(gbc_features, lf_loss, params, batch, layer_groups=_all_one_layer, num_layers=2,
                            sketch_dim=(2, 3), sketch_key=sketch_key)
    np.testing.assert_array_equal(one(jax.random.PRNGKey(1)), one(jax.random.PRNGKey(2)))
    fn = make_gbc_feature_fn(lf_loss, batch, layer_groups=_all_one_layer, num_layers=2, sketch_dim=(2, 3),
                             sketch_key=sketch_key)
    history = history_features(fn, [params, params], jax.random.PRNGKey(8))
    width = history.shape[1] // 2
    np.testing.assert_array_equal(history[:, :width], history[:, width:])
    np.testing.assert_array_equal(history[:, :width], one(jax.random.PRNGKey(1)))


def _sharded_sketch_worker() -> dict:
    """Run in a subprocess with 4 CPU devices: sketched GBC on an example-sharded batch."""
    from jax.sharding import NamedSharding, PartitionSpec

    import pivotal

    assert jax.device_count() == 4, jax.devices()
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"l1": {"kernel": 0.5 * jax.random.normal(keys[0], (5, 16)), "bias": jnp.zeros(16)},
              "l2": {"kernel": 0.5 * jax.random.normal(keys[1], (16, 3)), "bias": jnp.zeros(3)}}

    def loss_fn(p, b):
        z = jnp.tanh(b["x"] @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"] + p["l2"]["bias"]
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    rng = np.random.RandomState(0)
    batch = {"x": rng.randn(64, 5).astype(np.float32), "y": (np.arange(64) % 3).astype(np.int32)}
    mesh = pivotal.data_mesh()
    sharded = pivotal.shard_examples(batch, mesh)
    out = {}
    for tag, kwargs in (("whole", {}), ("chunked", {"chunk_size": 5, "importance_chunk_size": 6})):
        ref = gbc_features(loss_fn, params, batch, keys[2], num_layers=3, sketch_dim=(3, 2), sketch_key=keys[3],
                           **kwargs)
        got = gbc_features(loss_fn, params, sharded, keys[2], num_layers=3, sketch_dim=(3, 2), sketch_key=keys[3],
                           **kwargs)
        ref, got_host = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        out[f"{tag}_rel"] = float(np.max(np.abs(got_host - ref)) / np.max(np.abs(ref)))
        out[f"{tag}_shape"] = list(got.shape)
        out[f"{tag}_sharded"] = (isinstance(got.sharding, NamedSharding) and len(got.sharding.device_set) == 4
                                 and tuple(got.sharding.spec)[:1] == tuple(PartitionSpec("data")))
    return out


@pytest.mark.slow
def test_gbc_sketch_sharded_equals_one_device():
    # XLA_FLAGS must be set before jax starts: the comparison runs in a subprocess with 4 CPU
    # devices (this file as a script), as in tests/test_sharding.py.
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "sketch-worker"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    for tag in ("whole", "chunked"):
        assert result[f"{tag}_rel"] <= 1e-5, result
        assert result[f"{tag}_sharded"], result
        # Each layer sketched to 8 columns ((3, 2) kernel + (1, 2) bias); one or two layers drawn.
        assert result[f"{tag}_shape"][0] == 64 and result[f"{tag}_shape"][1] in (8, 16), result


# ---------------------------------------------------------------------------
# Snapshot history
# ---------------------------------------------------------------------------


def test_sample_snapshot_epochs():
    key = jax.random.PRNGKey(0)
    epochs = sample_snapshot_epochs(20, 7, 4, key)
    chex.assert_shape(epochs, (4,))
    assert np.all(np.diff(epochs) > 0) and epochs.min() >= 8 and epochs.max() <= 19
    np.testing.assert_array_equal(epochs, sample_snapshot_epochs(20, 7, 4, key))
    draws = {tuple(sample_snapshot_epochs(20, 7, 4, jax.random.PRNGKey(s))) for s in range(10)}
    assert len(draws) > 1
    # Every epoch after t* can be drawn (uniform over t*+1..T-1).
    seen = set(np.concatenate([sample_snapshot_epochs(12, 7, 2, jax.random.PRNGKey(s)) for s in range(40)]))
    assert seen == {8, 9, 10, 11}
    np.testing.assert_array_equal(sample_snapshot_epochs(101, 20, 4, key, every=20), [40, 60, 80, 100])
    np.testing.assert_array_equal(sample_snapshot_epochs([0, 5, 10, 15], 5, 2, key), [10, 15])


def test_sample_snapshot_epochs_fallbacks_and_errors():
    key = jax.random.PRNGKey(0)
    with pytest.warns(UserWarning, match="only 2"):
        np.testing.assert_array_equal(sample_snapshot_epochs(10, 7, 5, key), [8, 9])
    with pytest.warns(UserWarning, match="falling back"):
        np.testing.assert_array_equal(sample_snapshot_epochs(10, 9, 3, key), [9])
    with pytest.raises(ValueError, match="best_epoch"):
        sample_snapshot_epochs(10, 10, 3, key)
    with pytest.raises(ValueError, match="num_snapshots"):
        sample_snapshot_epochs(10, 2, 0, key)
    with pytest.raises(ValueError, match="num_epochs"):
        sample_snapshot_epochs(0, 0, 1, key)


def test_history_features_deterministic_and_ordered():
    model, params0, batch, _, lf_loss = make_problem()
    # Ten snapshots: perturbed copies of the parameters, all distinct.
    snapshots = [
        jax.tree_util.tree_map(lambda p, t=t: p * (1.0 + 0.1 * t), params0) for t in range(10)
    ]
    forward = lambda p, b: model.apply(p, b["x"])
    rbc_fn = make_rbc_feature_fn(forward, batch)
    key = jax.random.PRNGKey(3)
    feats, epochs = history_features(rbc_fn, snapshots, key, best_epoch=4, num_snapshots=3, return_epochs=True)
    assert np.all(np.diff(epochs) > 0) and epochs.min() > 4
    h0, _ = model.apply(params0, batch["x"])
    d = 4 * h0.shape[1]
    chex.assert_shape(feats, (8, 3 * d))
    for k, epoch in enumerate(epochs):
        h, z = model.apply(snapshots[epoch], batch["x"])
        np.testing.assert_allclose(feats[:, k * d : (k + 1) * d], rbc_features(h, z), rtol=1e-6)
    again = history_features(rbc_fn, snapshots, key, best_epoch=4, num_snapshots=3)
    np.testing.assert_array_equal(feats, again)
    # Chunked forward pass gives the same features.
    chunked = history_features(make_rbc_feature_fn(forward, batch, chunk_size=4), snapshots, key,
                               best_epoch=4, num_snapshots=3)
    np.testing.assert_allclose(chunked, feats, rtol=1e-5, atol=1e-7)

    # GBC through the same door: explicit epochs, block k uses fold_in(base, epoch).
    gbc_fn = make_gbc_feature_fn(lf_loss, batch, num_layers=2)
    g = history_features(gbc_fn, dict(enumerate(snapshots)), key, epochs=[8, 2])
    _, base = jax.random.split(key)
    expected = jnp.concatenate([gbc_fn(snapshots[e], jax.random.fold_in(base, e)) for e in (2, 8)], axis=1)
    np.testing.assert_array_equal(g, expected)
    np.testing.assert_array_equal(g, history_features(gbc_fn, dict(enumerate(snapshots)), key, epochs=[2, 8]))


def test_history_features_bad_inputs():
    fn = lambda p, k: p
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="epochs"):
        history_features(fn, [jnp.ones((3, 2))], key, epochs=[1])
    with pytest.raises(ValueError, match="same examples"):
        history_features(fn, [jnp.ones((3, 2)), jnp.ones((4, 2))], key)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        history_features(fn, [jnp.ones(3)], key)
    with pytest.raises(ValueError, match="both"):
        history_features(fn, [jnp.ones((3, 2))], key, best_epoch=0)
    with pytest.raises(TypeError, match="feature_fn"):
        history_features(None, [jnp.ones((3, 2))], key)


if __name__ == "__main__" and sys.argv[1:] == ["sketch-worker"]:
    print("RESULT " + json.dumps(_sharded_sketch_worker()), flush=True)
