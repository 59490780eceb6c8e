"""Flax models: shapes, the paper's architectures, the head convention, BatchNorm state."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import (
    margin_distance_fn,
    MLP,
    MODELS,
    apply_in_chunks,
    cross_entropy_loss_fn,
    features_fn,
    frozen_loss_fn,
    init_model,
    make_model,
    predict_fn,
    toeplitz_conv,
)
from jax import lax

# (name, one example's shape, expected width D of the penultimate features h)
SMALL_MODELS = [("mlp", (2,), 100), ("lenet5", (28, 28, 1), 84)]


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def resnet():
    """ResNet-34 initialised once for the whole module (its compile dominates the cost)."""
    module, has_state = make_model("resnet34", 10, (32, 32, 3))
    params, state = init_model(module, jax.random.key(0), (32, 32, 3))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    batch = {"x": x, "y": jnp.array([3, 7])}
    return module, has_state, params, state, batch


@pytest.fixture(scope="module")
def lenet():
    module, has_state = make_model("lenet5", 10, (28, 28, 1))
    params, _ = init_model(module, jax.random.key(0), (28, 28, 1))
    return module, has_state, params


@pytest.mark.parametrize("name,shape,width", SMALL_MODELS)
def test_small_models_shapes_and_head_identity(name, shape, width):
    module, has_state = make_model(name, 10, shape)
    assert not has_state
    params, state = init_model(module, jax.random.key(0), shape)
    assert state is None
    x = jax.random.normal(jax.random.key(1), (5, *shape))
    h, logits = module.apply({"params": params}, x, return_features=True)
    assert h.shape == (5, width) and logits.shape == (5, 10)
    kernel, bias = params["head"]["kernel"], params["head"]["bias"]
    assert kernel.shape == (width, 10)
    np.testing.assert_allclose(h @ kernel + bias, logits, rtol=1e-5, atol=1e-5)
    # The default call returns just the logits, identical to the feature call's.
    np.testing.assert_array_equal(module.apply({"params": params}, x), logits)


def test_lenet5_matches_the_paper_architecture(lenet):
    _, _, params = lenet
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["conv1"]["kernel"] == (5, 5, 1, 6)
    assert shapes["conv2"]["kernel"] == (5, 5, 6, 16)
    # 28 -VALID5-> 24 -pool-> 12 -VALID5-> 8 -pool-> 4, 16 * 4 * 4 = 256 (paper's fc 256).
    assert shapes["fc1"]["kernel"] == (256, 120)
    assert shapes["fc2"]["kernel"] == (120, 84)
    assert shapes["head"]["kernel"] == (84, 10)
    expected = (
        (5 * 5 * 1 * 6 + 6)
        + (5 * 5 * 6 * 16 + 16)
        + (256 * 120 + 120)
        + (120 * 84 + 84)
        + (84 * 10 + 10)
    )
    assert expected == 44_426
    assert _count(params) == expected


# name: (input (B, H, W, C), kernel HWIO, padding, strides): the cases toeplitz_conv computes as a
# matrix product, and two that it hands to lax unchanged (strided, grouped).
TOEPLITZ_CASES = {
    "lenet5_conv1": ((3, 28, 28, 1), (5, 5, 1, 6), "VALID", (1, 1), 1),
    "lenet5_conv2": ((2, 12, 12, 6), (5, 5, 6, 16), "VALID", (1, 1), 1),
    "same_rectangular": ((2, 9, 7, 3), (3, 2, 3, 4), "SAME", (1, 1), 1),
    "explicit_padding": ((2, 9, 7, 3), (3, 2, 3, 4), ((1, 2), (0, 1)), (1, 1), 1),
    "one_by_one": ((2, 5, 5, 3), (1, 1, 3, 2), "VALID", (1, 1), 1),
    "strided_fallback": ((2, 9, 9, 2), (3, 3, 2, 3), "SAME", (2, 2), 1),
    "grouped_fallback": ((2, 6, 6, 4), (3, 3, 2, 4), "VALID", (1, 1), 2),
}


@pytest.mark.parametrize("case", sorted(TOEPLITZ_CASES))
def test_toeplitz_conv_equals_lax_conv_and_its_gradients(case):
    shape, kshape, padding, strides, groups = TOEPLITZ_CASES[case]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, w = jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.standard_normal(kshape))
        dn = lax.conv_dimension_numbers(shape, kshape, ("NHWC", "HWIO", "NHWC"))

        def conv(fn, x, w):
            return fn(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)

        want, got = conv(lax.conv_general_dilated, x, w), conv(toeplitz_conv, x, w)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        loss = lambda fn: lambda x, w: jnp.sum(jnp.sin(conv(fn, x, w)))
        for want_g, got_g in zip(jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w),
                                 jax.grad(loss(toeplitz_conv), (0, 1))(x, w)):
            np.testing.assert_allclose(got_g, want_g, rtol=1e-12, atol=1e-12)


def test_lenet5_is_flax_conv_with_the_toeplitz_product(lenet):
    """Same parameters from the same key as plain ``nn.Conv`` layers, the same function up to
    float32 rounding: only how the convolutions are computed differs."""
    module, _, params = lenet

    class LaxLeNet5(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(6, (5, 5), padding="VALID", name="conv1")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            x = nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(120, name="fc1")(x))
            return nn.Dense(10, name="head")(nn.relu(nn.Dense(84, name="fc2")(x)))

    reference, _ = init_model(LaxLeNet5(), jax.random.key(0), (28, 28, 1))
    chex.assert_trees_all_equal(params, reference)
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    np.testing.assert_allclose(module.apply({"params": params}, x),
                               LaxLeNet5().apply({"params": reference}, x), rtol=1e-5, atol=1e-5)


def test_lenet5_accepts_images_without_channel_axis(lenet):
    module, has_state, params = lenet
    predict = predict_fn(module, has_state)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28))
    np.testing.assert_allclose(
        predict(params, None, x), predict(params, None, x[..., None]), rtol=1e-6
    )


def test_mlp_hidden_sizes_and_empty_hidden():
    module = MLP(hidden=(7,), num_classes=3)
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 2)))["params"]
    assert set(params) == {"dense0", "head"}
    assert params["head"]["kernel"].shape == (7, 3)
    linear = MLP(hidden=(), num_classes=3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 2))
    lp = linear.init(jax.random.key(0), x)["params"]
    h, _ = linear.apply({"params": lp}, x, return_features=True)
    np.testing.assert_array_equal(h, x.reshape(2, 8))


def test_resnet34_shapes_param_count_and_head_identity(resnet):
    module, has_state, params, state, batch = resnet
    assert has_state
    assert set(state) == {"batch_stats"}
    h, logits = features_fn(module, has_state)(params, state, batch["x"])
    assert h.shape == (2, 512) and logits.shape == (2, 10)
    np.testing.assert_allclose(
        h @ params["head"]["kernel"] + params["head"]["bias"], logits, rtol=1e-4, atol=1e-4
    )

    # Hand count of the CIFAR ResNet-34: 3x3 convs without bias, BN scale+shift, 1x1
    # projections where the width or stride changes. Equals the PyTorch reference's count.
    def conv_bn(k, cin, cout):
        return k * k * cin * cout + 2 * cout

    expected = conv_bn(3, 3, 64)
    cin = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for j in range(blocks):
            expected += conv_bn(3, cin, width) + conv_bn(3, width, width)
            if cin != width:
                expected += conv_bn(1, cin, width)
            cin = width
    expected += 512 * 10 + 10
    assert expected == 21_282_122
    assert _count(params) == expected
    # A running mean and variance for every BN scale and shift (the 1-D params bar the head's).
    bn_params = [x for x in jax.tree.leaves(params) if x.ndim == 1]
    assert _count(state) == _count(bn_params) - 10


def test_resnet34_batchnorm_state_moves_only_in_train_mode(resnet):
    module, has_state, params, state, batch = resnet
    train_loss = jax.jit(cross_entropy_loss_fn(module, has_state))
    losses, new_state = train_loss(params, state, batch)
    assert losses.shape == (2,)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    old_mean = state["batch_stats"]["stem_bn"]["mean"]
    new_mean = new_state["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old_mean, new_mean)
    # Running averages (PyTorch momentum 0.1) move a tenth of the way from their initial
    # zeros to the batch mean of the stem convolution's output.
    stem_out = jax.lax.conv_general_dilated(
        batch["x"], params["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        new_mean, 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )

    eval_loss = cross_entropy_loss_fn(module, has_state, train=False)
    eval_losses, same_state = eval_loss(params, state, batch)
    assert same_state is state
    # Eval mode normalises with the running averages, so its losses differ from train mode's.
    assert not np.allclose(eval_losses, losses)
    _, updates = module.apply(
        {"params": params, **state}, batch["x"], train=False, mutable=["batch_stats"]
    )
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], state["batch_stats"])

    # The frozen loss is the eval-mode loss in pivotal's (params, batch) form.
    np.testing.assert_allclose(
        frozen_loss_fn(module, state)(params, batch), eval_losses, rtol=1e-5, atol=1e-5
    )


def test_stateless_loss_is_per_example_cross_entropy(lenet):
    module, has_state, params = lenet
    x = jax.random.normal(jax.random.key(1), (6, 28, 28, 1))
    y = jnp.array([0, 1, 2, 3, 9, 9])
    loss_fn = cross_entropy_loss_fn(module, has_state)
    losses = jax.jit(loss_fn)(params, {"x": x, "y": y})
    assert losses.shape == (6,)
    logits = predict_fn(module, has_state)(params, None, x)
    manual = -jax.nn.log_softmax(logits)[jnp.arange(6), y]
    np.testing.assert_allclose(losses, manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(frozen_loss_fn(module, None))(params, {"x": x, "y": y}), losses, rtol=1e-6
    )
    # Per-example gradients via vmap(grad) work on the (params, batch) form; the head's
    # equals the RBC outer product h (softmax - onehot).
    grads = jax.jit(
        jax.vmap(jax.grad(lambda p, b: loss_fn(p, b)[0]), in_axes=(None, 0))
    )(params, {"x": x[:, None], "y": y[:, None]})
    h, logits = features_fn(module, has_state)(params, None, x)
    a = jax.nn.softmax(logits) - jax.nn.one_hot(y, 10)
    np.testing.assert_allclose(
        grads["head"]["kernel"], h[:, :, None] * a[:, None, :], rtol=1e-4, atol=1e-6
    )


def test_make_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lenet5.*mlp.*resnet34"):
        make_model("vgg16", 10, (32, 32, 3))
    with pytest.raises(ValueError, match="H, W >= 16"):
        make_model("lenet5", 10, (8, 8, 1))
    with pytest.raises(ValueError, match="num_classes"):
        make_model("mlp", 0, (2,))
    assert set(MODELS) == {"mlp", "lenet5", "resnet34"}


def test_init_is_deterministic_in_the_key():
    module, _ = make_model("mlp", 4, (3,), hidden=(5,))
    a, _ = init_model(module, jax.random.key(0), (3,))
    b, _ = init_model(module, jax.random.key(0), (3,))
    c, _ = init_model(module, jax.random.key(1), (3,))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a["head"]["kernel"], c["head"]["kernel"])


def test_apply_in_chunks_matches_one_call_and_compiles_once():
    module, has_state = make_model("mlp", 3, (4,), hidden=(8,))
    params, state = init_model(module, jax.random.key(0), (4,))
    x = np.asarray(jax.random.normal(jax.random.key(1), (23, 4)))
    traces = []

    @jax.jit
    def fn(xb):
        traces.append(xb.shape)
        return features_fn(module, has_state)(params, state, xb)

    h, logits = apply_in_chunks(fn, x, chunk_size=5)
    assert isinstance(h, np.ndarray) and isinstance(logits, np.ndarray)
    assert h.shape == (23, 8) and logits.shape == (23, 3)
    ref = predict_fn(module, has_state)(params, state, x)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
    # The short last chunk is padded, so the jitted function saw only one shape.
    assert traces == [(5, 4)]

    empty = apply_in_chunks(fn, x[:0], chunk_size=5)
    assert empty[0].shape == (0, 8) and empty[1].shape == (0, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        apply_in_chunks(fn, x, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        apply_in_chunks(fn, x, chunk_size=2.5)


def test_lenet_pooling_equals_flax_max_pool():
    from experiments.models import _max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 24, 24, 6))
    np.testing.assert_array_equal(_max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


class _Linear(nn.Module):
    """logits = W x + b, with the ``train`` keyword the experiment models take."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_margin_distance_is_exact_for_a_linear_model():
    # For z = W x + b the first-order margin is the exact Euclidean distance to the boundary
    # between the top two classes: (z_i - z_j) / ||w_i - w_j||.
    jax.config.update("jax_enable_x64", True)
    try:
        module = _Linear()
        x = jax.random.normal(jax.random.PRNGKey(0), (64, 3, 2), jnp.float64)
        params = module.init(jax.random.PRNGKey(1), x)["params"]
        distance = margin_distance_fn(module, has_state=False)(params, None, x)
        z = module.apply({"params": params}, x)
        order = np.argsort(-np.asarray(z), axis=1)
        i, j = order[:, 0], order[:, 1]
        W = np.asarray(params["Dense_0"]["kernel"])  # (6, 4)
        rows = np.arange(len(x))
        expected = (np.asarray(z)[rows, i] - np.asarray(z)[rows, j]) / np.linalg.norm(
            W[:, i] - W[:, j], axis=0)
        chex.assert_shape(distance, (64,))
        np.testing.assert_allclose(np.asarray(distance), expected, rtol=1e-6)
        assert np.all(np.asarray(distance) >= 0)
        # Moving x by the distance along the normal lands on the boundary.
        k = 5
        normal = (W[:, i[k]] - W[:, j[k]]) / np.linalg.norm(W[:, i[k]] - W[:, j[k]])
        moved = np.asarray(x[k]).reshape(-1) - float(distance[k]) * normal
        zk = module.apply({"params": params}, moved.reshape(1, 3, 2))[0]
        np.testing.assert_allclose(zk[i[k]], zk[j[k]], atol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", False)
