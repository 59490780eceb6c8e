"""Meta re-weighting: Eq. S4, optimizer lookaheads, the three rules and the trainer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pivotal
from pivotal import (
    direct_weights,
    l2rw,
    make_meta_step,
    meta_weight_net,
    weight_gradient,
)


def mlp_init(key, sizes=(5, 7, 3), dtype=jnp.float32):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"layer{i}"] = {
            "w": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
            "b": jnp.full((b,), 0.01 * (i + 1), dtype),
        }
    return params


def mlp_apply(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def loss_fn(params, batch):
    logits = mlp_apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


TEACHER = jax.random.normal(jax.random.PRNGKey(99), (5, 3))


def make_data(key, n, dtype=jnp.float32, classes=3, dim=5):
    """Inputs with labels from a fixed linear teacher, so that training can fit them."""
    x = jax.random.normal(key, (n, dim)).astype(dtype)
    return {"x": x, "y": jnp.argmax(x @ TEACHER[:dim, :classes], axis=1), "index": jnp.arange(n)}


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def per_example_grad_matrix(params, batch):
    def single(x, y):
        g = jax.grad(lambda p: loss_fn(p, {"x": x[None], "y": y[None]})[0])(params)
        return jax.flatten_util.ravel_pytree(g)[0]

    return jax.vmap(single)(batch["x"], batch["y"])


def meta_loss_at(params, meta):
    return jnp.mean(loss_fn(params, meta))


def test_weight_gradient_equals_eq_s4(x64):
    key = jax.random.PRNGKey(0)
    params = mlp_init(key, dtype=jnp.float64)
    batch = make_data(jax.random.PRNGKey(1), 8, jnp.float64)
    meta = make_data(jax.random.PRNGKey(2), 4, jnp.float64)
    w = jax.random.uniform(jax.random.PRNGKey(3), (8,), jnp.float64)
    lr = 0.3
    got = weight_gradient(loss_fn, params, batch, w, meta, inner_lr=lr)

    # Independent recomputation of Eq. 2 and Eq. S4 from per-example gradients.
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    per_ex = per_example_grad_matrix(params, batch)  # (B, P)
    theta_hat = flat - lr * (w @ per_ex) / 8
    g_meta = jax.flatten_util.ravel_pytree(jax.grad(meta_loss_at)(unravel(theta_hat), meta))[0]
    expected = -(lr / 8) * per_ex @ g_meta
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)
    chex.assert_shape(got, (8,))


def test_unit_lr_sgd_optimizer_matches_plain_lookahead(x64):
    params = mlp_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_data(jax.random.PRNGKey(1), 6, jnp.float64)
    meta = make_data(jax.random.PRNGKey(2), 3, jnp.float64)
    w = jnp.linspace(0.1, 0.9, 6)
    plain = weight_gradient(loss_fn, params, batch, w, meta, inner_lr=0.2)
    via_optax = weight_gradient(loss_fn, params, batch, w, meta, inner_lr=0.2,
                                optimizer=optax.sgd(1.0))
    np.testing.assert_allclose(plain, via_optax, rtol=1e-10)


OPTIMIZERS = {
    "momentum": optax.sgd(1.0, momentum=0.8),
    "nesterov": optax.sgd(1.0, momentum=0.9, nesterov=True),
    "weight_decay": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1.0, momentum=0.8)),
    "adam": optax.adam(1.0),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weight_gradient_matches_finite_differences(x64, name):
    opt = OPTIMIZERS[name]
    params = mlp_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_data(jax.random.PRNGKey(1), 6, jnp.float64)
    meta = make_data(jax.random.PRNGKey(2), 4, jnp.float64)
    # A non-trivial optimizer state: two earlier steps' worth of momentum / moments.
    state = opt.init(params)
    for s in range(2):
        g = jax.grad(lambda p: jnp.mean(loss_fn(p, make_data(jax.random.PRNGKey(10 + s), 6,
                                                                jnp.float64))))(params)
        _, state = opt.update(g, state, params)
    lr = 0.05 if name == "adam" else 0.3
    w = jax.random.uniform(jax.random.PRNGKey(4), (6,), jnp.float64)
    got = weight_gradient(loss_fn, params, batch, w, meta, inner_lr=lr, optimizer=opt,
                          opt_state=state)

    def meta_of_w(weights):
        g = jax.grad(lambda p: jnp.sum(weights * loss_fn(p, batch)) / 6)(params)
        upd, _ = opt.update(g, state, params)
        theta_hat = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, upd)
        return meta_loss_at(theta_hat, meta)

    eps = 1e-6
    fd = np.array([(meta_of_w(w.at[j].add(eps)) - meta_of_w(w.at[j].add(-eps))) / (2 * eps)
                   for j in range(6)])
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-9)
    # The optimizer really matters: plain SGD gives a different gradient.
    plain = weight_gradient(loss_fn, params, batch, w, meta, inner_lr=lr)
    assert not np.allclose(plain, got, rtol=1e-3)


def rule_output(rule, params, batch, meta, lr=0.3, key=0, num_examples=None):
    n = batch["x"].shape[0] if num_examples is None else num_examples
    rule_state = rule.init(jax.random.PRNGKey(key), n)
    losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
    objective = pivotal.meta_objective(loss_fn, params, vjp_fn, meta, jnp.asarray(lr))
    return rule.update(rule_state, batch["index"], losses, objective)


def test_l2rw_weights_follow_negative_gradient_at_zero(x64):
    params = mlp_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_data(jax.random.PRNGKey(1), 10, jnp.float64)
    meta = make_data(jax.random.PRNGKey(2), 5, jnp.float64)
    out, _ = rule_output(l2rw(), params, batch, meta)
    grad0 = weight_gradient(loss_fn, params, batch, jnp.zeros(10), meta, inner_lr=0.3)
    w_hat = np.maximum(-np.asarray(grad0), 0)
    assert w_hat.sum() > 0 and (w_hat == 0).any()  # a meaningful case: some clamped to 0
    np.testing.assert_allclose(out.coeffs, w_hat / w_hat.sum(), rtol=1e-8)
    assert np.all(np.asarray(out.coeffs) >= 0)
    np.testing.assert_allclose(np.sum(out.coeffs), 1.0, rtol=1e-12)


def test_l2rw_uniform_when_all_weights_zero():
    # A meta loss that does not depend on the parameters: every gradient is zero.
    params = mlp_init(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1), 7)
    losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
    out, _ = l2rw().update((), batch["index"], losses, lambda c: jnp.sum(c) * 0.0)
    np.testing.assert_allclose(out.coeffs, np.full(7, 1 / 7), rtol=1e-6)


def test_direct_weights_stay_clipped_and_move_against_gradient():
    params = mlp_init(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1), 16)
    meta = make_data(jax.random.PRNGKey(2), 4)
    rule = direct_weights(weight_lr=1e4)
    out, state = rule_output(rule, params, batch, meta)
    w = np.asarray(state.weights)
    assert w.min() >= 1e-7 and w.max() <= 1.0
    assert np.any(w == 1.0) and np.any(w == np.float32(1e-7))  # the lr is big enough to clip
    # Small lr: the step is exactly w - lr * grad (no clipping).
    rule = direct_weights(weight_lr=1e-2, init=0.5)
    out, state = rule_output(rule, params, batch, meta)
    grad = weight_gradient(loss_fn, params, batch, jnp.full(16, 0.5), meta, inner_lr=0.3)
    np.testing.assert_allclose(state.weights, 0.5 - 1e-2 * np.asarray(grad), rtol=1e-6)
    np.testing.assert_allclose(out.coeffs, state.weights / 16, rtol=1e-6)


def test_direct_weights_init():
    uniform = direct_weights(weight_lr=1.0).init(jax.random.PRNGKey(0), 1000).weights
    assert 0.4 < float(jnp.mean(uniform)) < 0.6 and float(jnp.min(uniform)) >= 1e-7
    const = direct_weights(weight_lr=1.0, init=0.25).init(jax.random.PRNGKey(0), 5).weights
    np.testing.assert_array_equal(const, np.full(5, 0.25, np.float32))
    with pytest.raises(ValueError, match="init"):
        direct_weights(weight_lr=1.0, init=2.0)


def test_meta_weight_net_weights_in_unit_interval_and_net_learns():
    params = mlp_init(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1), 16)
    meta = make_data(jax.random.PRNGKey(2), 4)
    rule = meta_weight_net()
    state = rule.init(jax.random.PRNGKey(3), 16)
    losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
    objective = pivotal.meta_objective(loss_fn, params, vjp_fn, meta, jnp.asarray(0.3))
    out, new_state = rule.update(state, batch["index"], losses, objective)
    w = np.asarray(out.weights)
    assert np.all((w > 0) & (w < 1))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state.params,
                                     new_state.params)
    assert all(jax.tree_util.tree_leaves(changed))
    # The weights are the net applied to the (stop-gradient) losses with the new parameters.
    np.testing.assert_allclose(w, pivotal.weight_net_apply(new_state.params, losses), rtol=1e-6)


# ----------------------------------------------------------------------------- trainer


def trainer_setup(rule, **kwargs):
    params = mlp_init(jax.random.PRNGKey(0))
    train = make_data(jax.random.PRNGKey(1), 32)
    meta = make_data(jax.random.PRNGKey(2), 6)
    meta = {"x": meta["x"], "y": meta["y"]}
    trainer = make_meta_step(loss_fn, rule, **kwargs)
    state = trainer.init(params, jax.random.PRNGKey(5), num_examples=32)
    return trainer, state, train, meta


def test_step_is_deterministic_and_compiled_once():
    traces = []

    def counting_loss(params, batch):
        traces.append(1)
        return loss_fn(params, batch)

    trainer = make_meta_step(counting_loss, direct_weights(weight_lr=100.0),
                             optimizer=optax.sgd(1.0, momentum=0.9),
                             learning_rate=optax.piecewise_constant_schedule(0.1, {3: 0.1}))
    params = mlp_init(jax.random.PRNGKey(0))
    train = make_data(jax.random.PRNGKey(1), 32)
    meta = {k: v for k, v in make_data(jax.random.PRNGKey(2), 6).items() if k != "index"}

    def run():
        state = trainer.init(params, jax.random.PRNGKey(5), num_examples=32)
        for s in range(6):
            batch = {k: v[(s % 4) * 8:(s % 4) * 8 + 8] for k, v in train.items()}
            state, metrics = trainer.step(state, batch, meta, jax.random.PRNGKey(100 + s))
        return state, metrics

    state_a, metrics_a = run()
    n_traces = len(traces)
    state_b, metrics_b = run()
    assert len(traces) == n_traces  # the second run, 6 more steps, traced nothing new
    chex.assert_trees_all_equal(state_a, state_b)
    chex.assert_trees_all_equal(metrics_a, metrics_b)
    assert int(state_a.step) == 6
    np.testing.assert_allclose(metrics_a["lr"], 0.01, rtol=1e-6)  # the schedule was applied


def test_step_update_equals_reference_eq_2_to_4(x64):
    params = mlp_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    batch = make_data(jax.random.PRNGKey(1), 8, jnp.float64)
    meta = {k: v for k, v in make_data(jax.random.PRNGKey(2), 4, jnp.float64).items()
            if k != "index"}
    lr, weight_lr = 0.2, 5.0
    trainer = make_meta_step(loss_fn, direct_weights(weight_lr=weight_lr, init=0.5),
                             learning_rate=lr, meta_batch_size=4)
    state = trainer.init(params, jax.random.PRNGKey(0), num_examples=8)
    key = jax.random.PRNGKey(7)
    new_state, metrics = trainer.step(state, batch, meta, key)

    picks = jax.random.randint(key, (4,), 0, 4)
    meta_batch = jax.tree_util.tree_map(lambda a: a[picks], meta)
    w0 = jnp.full(8, 0.5)
    grad_w = weight_gradient(loss_fn, params, batch, w0, meta_batch, inner_lr=lr)
    w1 = jnp.clip(w0 - weight_lr * grad_w, 1e-7, 1.0)
    g = jax.grad(lambda p: jnp.sum(w1 * loss_fn(p, batch)) / 8)(params)
    expected = jax.tree_util.tree_map(lambda p, gg: p - lr * gg, params, g)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-10)
    np.testing.assert_allclose(pivotal.example_weights(new_state), w1, rtol=1e-10)
    assert bool(metrics["finite"])


@pytest.mark.parametrize("rule", [l2rw(), meta_weight_net(), direct_weights(weight_lr=50.0)],
                         ids=["l2rw", "mwn", "direct"])
def test_every_rule_trains(rule):
    trainer, state, train, meta = trainer_setup(rule, learning_rate=0.5)
    before = float(jnp.mean(loss_fn(state.params, meta)))
    for s in range(30):
        state, metrics = trainer.step(state, train, meta, jax.random.PRNGKey(s))
        pivotal.check_finite(metrics)
    assert float(jnp.mean(loss_fn(state.params, meta))) < 0.8 * before


def test_plain_step_is_ordinary_sgd():
    trainer, state, train, _ = trainer_setup(l2rw(), learning_rate=0.1)
    new_state, _ = trainer.plain_step(state, train)
    g = jax.grad(lambda p: jnp.mean(loss_fn(p, train)))(state.params)
    expected = jax.tree_util.tree_map(lambda p, gg: p - 0.1 * gg, state.params, g)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-5, atol=1e-7)


def test_stateful_model_threads_state():
    def stateful_loss(params, model_state, batch):
        losses = loss_fn(params, batch)
        return losses, {"count": model_state["count"] + 1}

    trainer = make_meta_step(stateful_loss, direct_weights(weight_lr=10.0), has_state=True)
    params = mlp_init(jax.random.PRNGKey(0))
    train = make_data(jax.random.PRNGKey(1), 8)
    meta = {"x": train["x"][:2], "y": train["y"][:2]}
    with pytest.raises(ValueError, match="model_state"):
        trainer.init(params, jax.random.PRNGKey(0), num_examples=8)
    state = trainer.init(params, jax.random.PRNGKey(0), num_examples=8,
                         model_state={"count": jnp.zeros((), jnp.int32)})
    state, _ = trainer.step(state, train, meta, jax.random.PRNGKey(1))
    state, _ = trainer.plain_step(state, train)
    assert int(state.model_state["count"]) == 2


def test_nan_loss_is_reported_and_state_kept():
    trainer, state, train, meta = trainer_setup(direct_weights(weight_lr=10.0))
    bad = dict(train, x=train["x"].at[0, 0].set(jnp.nan))
    new_state, metrics = trainer.step(state, bad, meta, jax.random.PRNGKey(0))
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(new_state, state)
    assert np.all(np.isfinite(pivotal.example_weights(new_state)))
    with pytest.raises(FloatingPointError, match="non-finite"):
        pivotal.check_finite(metrics)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    params = mlp_init(jax.random.PRNGKey(0))
    batch = make_data(jax.random.PRNGKey(1), 8)
    meta = make_data(jax.random.PRNGKey(2), 4)
    w = jnp.ones(8)
    with pytest.raises(ValueError, match="weights"):
        weight_gradient(loss_fn, params, batch, jnp.ones(7), meta, inner_lr=0.1)
    with pytest.raises(ValueError, match="batch"):
        weight_gradient(loss_fn, params, dict(batch, y=batch["y"][:5]), w, meta, inner_lr=0.1)
    with pytest.raises(ValueError, match="meta_batch"):
        empty = jax.tree_util.tree_map(lambda a: a[:0], meta)
        weight_gradient(loss_fn, params, batch, w, empty, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        weight_gradient(loss_fn, params, batch, w, meta, inner_lr=jnp.ones(3))
    with pytest.raises(ValueError, match="learning_rate"):
        make_meta_step(loss_fn, l2rw(), learning_rate=np.ones(2))
    with pytest.raises(TypeError, match="rule"):
        make_meta_step(loss_fn, "direct")
    trainer, state, train, meta = trainer_setup(l2rw())
    with pytest.raises(ValueError, match="index"):
        trainer.step(state, {"x": train["x"], "y": train["y"]}, meta, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="meta_set"):
        trainer.step(state, train, jax.tree_util.tree_map(lambda a: a[:0], meta),
                     jax.random.PRNGKey(0))
