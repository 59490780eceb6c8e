"""make_meta_step(meta_gradient="first_order"): equals its formula (float64); exact stays the default."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pivotal import direct_weights, make_meta_step, per_example_grads, weight_gradient


def _init(key, dims=(5, 7, 3)):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "body": {"kernel": jax.random.normal(k1, dims[:2]), "bias": jnp.zeros(dims[1])},
        "head": {"kernel": jax.random.normal(k2, dims[1:]) / 3, "bias": 0.1 * jax.random.normal(k3, dims[2:])},
    }


def _loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["body"]["kernel"] + params["body"]["bias"])
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def _data(key, n, dims=(5, 7, 3)):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, dims[0])), "y": jax.random.randint(ky, (n,), 0, dims[2])}


def _formula(params, batch, meta_batch, layer):
    """d_j = <grad_L mean f_meta(theta), grad_L f_j(theta)>, with explicit per-example gradients."""
    meta_grad = jax.grad(lambda p: jnp.mean(_loss_fn(p, meta_batch)))(params)[layer]
    per_ex = per_example_grads(_loss_fn, params, batch)[layer]
    return sum(jnp.einsum("n...,...->n", per_ex[k], meta_grad[k]) for k in meta_grad)


CASES = [
    ("head", None, 0.1),
    ("body", "body", 0.05),
    ("head-momentum", "head", 0.1),
]


@pytest.mark.parametrize("name,layer,lr", CASES, ids=[c[0] for c in CASES])
def test_first_order_equals_its_formula(name, layer, lr):
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _init(jax.random.key(0)))
        batch = _data(jax.random.key(1), 12)
        batch = {"x": batch["x"].astype(jnp.float64), "y": batch["y"], "index": jnp.arange(12)}
        meta_set = _data(jax.random.key(2), 4)
        meta_set["x"] = meta_set["x"].astype(jnp.float64)
        optimizer = optax.sgd(1.0, momentum=0.9) if "momentum" in name else None
        weight_lr = 40.0
        trainer = make_meta_step(_loss_fn, direct_weights(weight_lr=weight_lr), learning_rate=lr,
                                 optimizer=optimizer, meta_gradient="first_order", meta_layer=layer)
        state = trainer.init(params, jax.random.key(3), num_examples=12)
        key = jax.random.key(4)
        new_state, metrics = trainer.step(state, batch, meta_set, key)

        picks = jax.random.randint(key, (4,), 0, 4)  # the step's meta batch draw
        meta_batch = jax.tree_util.tree_map(lambda a: a[picks], meta_set)
        d = _formula(params, {"x": batch["x"], "y": batch["y"]}, meta_batch, layer or "head")
        w = state.rule_state.weights
        grad_w = -(lr / 12) * d  # d objective / d w_j = -(alpha/B) d_j
        w_new = jnp.clip(w - weight_lr * grad_w, 1e-7, 1.0)
        np.testing.assert_allclose(new_state.rule_state.weights, w_new, rtol=1e-12, atol=1e-14)
        assert not np.allclose(w_new, w)  # the formula moved the weights: the check can fail
        meta0 = jnp.mean(_loss_fn(params, meta_batch))
        np.testing.assert_allclose(metrics["meta_loss"], meta0 - lr * jnp.dot(w / 12, d), rtol=1e-12)

        # the real update is the usual one with the new weights
        grads = jax.grad(lambda p: jnp.sum(w_new / 12 * _loss_fn(p, batch)))(params)
        opt = optimizer or optax.sgd(1.0)
        updates, _ = opt.update(grads, opt.init(params), params)
        expected = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates)
        for got, want in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_formula_is_the_small_lr_limit_of_eq_s4():
    """With one layer (L = all parameters) and alpha -> 0, theta_hat -> theta: Eq. S4's limit."""
    with jax.enable_x64(True):
        params = {"head": jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _init(jax.random.key(0))["head"])}
        batch = _data(jax.random.key(1), 8, (7, 7, 3))
        batch["x"] = batch["x"].astype(jnp.float64)
        meta_batch = _data(jax.random.key(2), 3, (7, 7, 3))
        meta_batch["x"] = meta_batch["x"].astype(jnp.float64)

        def linear_loss(p, b):
            logits = b["x"] @ p["head"]["kernel"] + p["head"]["bias"]
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], axis=1)[:, 0]

        lr = 1e-5
        exact = weight_gradient(linear_loss, params, batch, jnp.full(8, 0.5), meta_batch, inner_lr=lr)
        meta_grad = jax.grad(lambda p: jnp.mean(linear_loss(p, meta_batch)))(params)
        per_ex = per_example_grads(linear_loss, params, batch)
        d = sum(jnp.einsum("n...,...->n", g, m) for g, m in zip(jax.tree_util.tree_leaves(per_ex),
                                                                 jax.tree_util.tree_leaves(meta_grad)))
        np.testing.assert_allclose(-(lr / 8) * d, exact, rtol=1e-4)
        lr = 1.0  # at a large step the approximation differs: the test could fail
        exact = weight_gradient(linear_loss, params, batch, jnp.full(8, 0.5), meta_batch, inner_lr=lr)
        assert not np.allclose(-(lr / 8) * d, exact, rtol=1e-4)


def test_exact_is_the_default_and_bit_identical():
    params = _init(jax.random.key(0))
    batch = dict(_data(jax.random.key(1), 8), index=jnp.arange(8))
    meta_set = _data(jax.random.key(2), 3)
    steps = [make_meta_step(_loss_fn, direct_weights(weight_lr=10.0), **kw) for kw in ({}, {"meta_gradient": "exact"})]
    outs = []
    for t in steps:
        s = t.init(params, jax.random.key(3), num_examples=8)
        outs.append(jax.tree_util.tree_leaves(t.step(s, batch, meta_set, jax.random.key(4))))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    ({"meta_gradient": "second"}, "meta_gradient"),
    ({"meta_gradient": "first_order", "meta_layer": "nope"}, "meta_layer"),
    ({"meta_gradient": "first_order", "meta_layer": 3}, "meta_layer"),
])
def test_bad_meta_gradient_arguments(kwargs, match):
    params = _init(jax.random.key(0))
    batch = dict(_data(jax.random.key(1), 8), index=jnp.arange(8))
    with pytest.raises((ValueError, TypeError), match=match):
        t = make_meta_step(_loss_fn, direct_weights(weight_lr=10.0), **kwargs)
        s = t.init(params, jax.random.key(3), num_examples=8)
        t.step(s, batch, _data(jax.random.key(2), 3), jax.random.key(4))
