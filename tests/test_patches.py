"""strategy="patches": convolution kernels' per-example gradients as patch x output-gradient
products (pivotal/_patches.py), equal to vmap(grad) to float64 rounding, over a table of
convolutions; and which kernels take the fast path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pivotal import gbc_features, per_example_grads
from pivotal._patches import _patched_convs
from pivotal.grads import single_example_loss


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _conv(x, w, *, strides=None, padding="VALID", lhs_dil=None, rhs_dil=None, dn=("NHWC", "HWIO", "NHWC"),
          groups=1):
    n = x.ndim - 2
    return lax.conv_general_dilated(x, w, strides or (1,) * n, padding, lhs_dil, rhs_dil, dn,
                                    feature_group_count=groups)


# name: (input shape of one example, kernel shape, conv kwargs, kernels expected on the fast path)
CASES = {
    "valid": ((9, 9, 2), (3, 3, 2, 4), {}, 1),
    "strided_same": ((9, 8, 3), (3, 2, 3, 5), dict(strides=(2, 3), padding="SAME"), 1),
    "explicit_padding_dilated": ((10, 10, 2), (3, 3, 2, 3), dict(padding=((2, 1), (0, 3)), rhs_dil=(2, 1)), 1),
    "nchw_oihw": ((2, 7, 7), (4, 2, 3, 3), dict(dn=("NCHW", "OIHW", "NCHW")), 1),
    "one_d": ((12, 3), (4, 3, 2), dict(dn=("NWC", "WIO", "NWC"), strides=(2,)), 1),
    "transposed": ((5, 5, 2), (3, 3, 2, 3), dict(lhs_dil=(2, 2), padding=((1, 1), (2, 2))), 1),
    "grouped": ((6, 6, 4), (3, 3, 2, 4), dict(groups=2), 0),
}


def _problem(case, n=6):
    shape, kshape, kwargs, _ = CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n,) + shape)
    params = {"w": 0.4 * rng.standard_normal(kshape), "b": 0.1 * rng.standard_normal(3)}

    def loss_fn(p, batch):
        h = jnp.tanh(_conv(batch["x"], p["w"], **kwargs)).reshape(batch["x"].shape[0], -1)
        z = h[:, :3] * p["b"] + jnp.sum(h ** 2, axis=1, keepdims=True) * 0.1
        return jax.nn.logsumexp(z, -1) - z[jnp.arange(z.shape[0]), batch["y"]]

    batch = {"x": jnp.asarray(x), "y": jnp.asarray(rng.integers(0, 3, n))}
    return params, batch, loss_fn


@pytest.mark.parametrize("case", sorted(CASES))
def test_patches_equal_vmap_grad(x64, case):
    params, batch, loss_fn = _problem(case)
    want = per_example_grads(loss_fn, params, batch, chunk_size=4)
    got = per_example_grads(loss_fn, params, batch, chunk_size=4, strategy="patches")
    for k in params:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
        np.testing.assert_allclose(got[k], want[k], rtol=1e-11, atol=1e-13)
    # The kernels that take the fast path: a test that would pass unchanged if none did is none.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    one = single_example_loss(loss_fn)
    jaxpr = jax.make_jaxpr(lambda ls, ex: one(jax.tree_util.tree_unflatten(treedef, list(ls)), ex))(
        tuple(leaves), jax.tree_util.tree_map(lambda x: x[0], batch)).jaxpr
    assert len(_patched_convs(jaxpr, len(leaves))) == CASES[case][3]


def test_kernels_used_elsewhere_keep_vmap(x64):
    """Weight sharing (two convs) and a kernel that also enters a product: not patched, same grads."""
    rng = np.random.default_rng(1)
    params = {"w": 0.3 * rng.standard_normal((3, 3, 2, 2)), "v": 0.3 * rng.standard_normal((3, 3, 2, 2))}
    batch = {"x": jnp.asarray(rng.standard_normal((5, 8, 8, 2)))}

    def loss_fn(p, b):
        h = jnp.tanh(_conv(_conv(b["x"], p["w"], padding="SAME"), p["w"]))
        g = jnp.tanh(_conv(b["x"], p["v"])) * jnp.sum(p["v"])
        return jnp.sum(h ** 2, axis=(1, 2, 3)) + jnp.sum(g, axis=(1, 2, 3))

    want = per_example_grads(loss_fn, params, batch)
    got = per_example_grads(loss_fn, params, batch, strategy="patches")
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-11, atol=1e-13)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    one = single_example_loss(loss_fn)
    jaxpr = jax.make_jaxpr(lambda ls, ex: one(jax.tree_util.tree_unflatten(treedef, list(ls)), ex))(
        tuple(leaves), jax.tree_util.tree_map(lambda x: x[0], batch)).jaxpr
    assert _patched_convs(jaxpr, len(leaves)) == []


@pytest.mark.parametrize("sketch_dim", [None, 4])
def test_gbc_features_patches_equal_vmap(x64, sketch_dim):
    params, batch, loss_fn = _problem("strided_same", n=7)
    key = jax.random.PRNGKey(3)
    want = gbc_features(loss_fn, params, batch, key, num_layers=3, chunk_size=3, sketch_dim=sketch_dim)
    got = gbc_features(loss_fn, params, batch, key, num_layers=3, chunk_size=3, sketch_dim=sketch_dim,
                       strategy="patches")
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_flax_cnn_float32_and_under_jit():
    """A Flax LeNet-5 on ``nn.Conv``'s lax convolutions (the experiments' LeNet-5 computes its
    convolutions as matrix products, which the patches path leaves to vmap): both conv kernels
    patched, float32 tolerance, under jit."""
    import flax.linen as nn
    import pivotal

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
            x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
            return nn.Dense(10)(nn.relu(nn.Dense(84)(x.reshape((x.shape[0], -1)))))

    module = CNN()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    loss_fn = lambda p, b: pivotal.label_free_loss(module.apply({"params": p}, b["x"]))
    batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (10, 28, 28, 1))}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    one = single_example_loss(loss_fn)
    jaxpr = jax.make_jaxpr(lambda ls, ex: one(jax.tree_util.tree_unflatten(treedef, list(ls)), ex))(
        tuple(leaves), jax.tree_util.tree_map(lambda x: x[0], batch)).jaxpr
    assert len(_patched_convs(jaxpr, len(leaves))) == 2
    want = per_example_grads(loss_fn, params, batch, chunk_size=4)
    got = jax.jit(lambda p, b: per_example_grads(loss_fn, p, b, chunk_size=4, strategy="patches"))(params, batch)
    for path, w, g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree_util.tree_leaves(want),
                          jax.tree_util.tree_leaves(got)):
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(g / scale, w / scale, atol=2e-6, err_msg=str(path[0]))
