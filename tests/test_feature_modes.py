"""Memory-bounded selection features (issue 15, item 2): the mode rule, GBC's width known before
its features (pivotal.gbc.gbc_layer_draw), the three modes in the pipeline's selection, and
CRAIG / TA-VAAL without any N x N array."""

import dataclasses
import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pivotal
from pivotal.gbc import gbc_block_widths, gbc_layer_draw, leaf_sketch_widths
from pivotal.history import snapshot_key
from experiments import pipeline, selection
from experiments.presets import PRESETS


# --------------------------------------------------------------------------- the mode rule

def _three_leaves(exact):
    """A width function: three leaves, each min(k, its size); exact = their sizes summed."""
    return lambda k: exact if k is None else min(exact, 3 * k)


MODE_CASES = [
    # (N, exact width, budget bytes) -> (mode, sketch_dim)
    ((100, 1000, 100 * 1000 * 4), ("in_memory", None)),  # exactly fits
    ((100, 10 ** 6, 1000 * 3 * 4096 * 4 // 10), ("sketch", 4096)),  # 4096 fits, 8192 does not
    ((100, 10 ** 6, 10 ** 8), ("sketch", 65536)),  # the widest sketch that fits
    ((100, 10 ** 6, 100 * 3 * 256 * 4 - 1), ("out_of_core", 256)),  # not even the floor fits
    ((10 ** 7, 200, 10 ** 6), ("out_of_core", None)),  # no sketch is narrower than exact
    ((10 ** 7, 700, 10 ** 6), ("out_of_core", None)),  # 3 * 256 > 700: the floor is not narrower
]


@pytest.mark.parametrize("args, expected", MODE_CASES)
def test_choose_feature_mode_table(args, expected):
    n, exact, budget = args
    assert selection.choose_feature_mode(n, _three_leaves(exact), budget) == expected


def test_sketch_dims_widest_first_with_a_floor():
    dims = selection.SKETCH_DIMS
    assert list(dims) == sorted(dims, reverse=True) and dims[-1] == 256


# --------------------------------------------------------------------------- GBC's width, drawn first

class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(5)(x)


@pytest.fixture(scope="module")
def net():
    module = _Net()
    x = jax.random.normal(jax.random.PRNGKey(0), (37, 6, 6, 1))
    batch = {"x": x, "y": jnp.arange(37) % 5}
    params = module.init(jax.random.PRNGKey(1), x[:1])["params"]

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, b["x"]), b["y"])

    return loss_fn, params, batch


@pytest.mark.parametrize("seed, sketch_dim, merge", [(0, None, True), (2, 64, False), (3, (3, 8), True)])
def test_gbc_layer_draw_is_what_gbc_features_draws(net, seed, sketch_dim, merge):
    loss_fn, params, batch = net
    key = jax.random.PRNGKey(seed)
    options = dict(num_layers=3, chunk_size=8, merge_repeats=merge, sketch_dim=sketch_dim)
    features, info = pivotal.gbc_features(loss_fn, params, batch, key, return_info=True, **options)
    drawn = gbc_layer_draw(loss_fn, params, batch, key, **options)
    for field in info._fields:
        np.testing.assert_array_equal(np.asarray(getattr(drawn, field)), np.asarray(getattr(info, field)))
    assert features.shape == (37, int(drawn.block_sizes.sum()))
    # The widths under a sketch from the exact draw: what gbc_features(sketch_dim=) makes.
    exact = gbc_layer_draw(loss_fn, params, batch, key, **{**options, "sketch_dim": None})
    np.testing.assert_array_equal(gbc_block_widths(params, exact.blocks, sketch_dim=sketch_dim),
                                  drawn.block_sizes)


def test_block_widths_and_leaf_widths(net):
    _, params, _ = net
    names = ("Conv_0", "Dense_0", "Dense_1")
    np.testing.assert_array_equal(gbc_block_widths(params, names), [3 * 3 * 4 + 4, 144 * 16 + 16, 16 * 5 + 5])
    np.testing.assert_array_equal(gbc_block_widths(params, names, sketch_dim=16), [16 + 4, 16 + 16, 16 + 5])
    assert leaf_sketch_widths((784, 256), 256) == (16, 16)
    assert leaf_sketch_widths((84, 10), None) == (84, 10)
    with pytest.raises(ValueError, match="blocks must name layers"):
        gbc_block_widths(params, ("Dense_9",))


def test_snapshot_key_is_the_key_history_features_gives():
    seen = {}

    def feature_fn(params, key):
        seen[params] = key
        return jnp.zeros((2, 1))

    key = jax.random.PRNGKey(7)
    pivotal.history_features(feature_fn, {3: 3, 5: 5, 8: 8}, key, best_epoch=2, num_snapshots=2)
    assert seen and all(np.array_equal(k, snapshot_key(key, e)) for e, k in seen.items())


# --------------------------------------------------------------------------- the pipeline's modes

@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    cfg = dataclasses.replace(PRESETS["smoke"].config, warmup_epochs=3, num_snapshots=2)
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)
    meta0, run = pipeline.warmup_run(problem, model, cfg, 0, str(tmp_path_factory.mktemp("warm")))
    return cfg, problem, model, meta0, run


def _select(warm, method, gb, count=4):
    cfg, problem, model, meta0, run = warm
    cfg = dataclasses.replace(cfg, feature_memory_gb=gb)
    info = {}
    picked = pipeline.select(method, problem, model, run, meta0, count, cfg, jax.random.PRNGKey(5), info)
    assert picked.size == len(set(picked.tolist())) == count
    assert np.intersect1d(picked, meta0).size == 0
    return picked, info


@pytest.mark.parametrize("widths", [(3,), (3, 5, 2)])
def test_write_blocks_is_the_concatenation(widths, tmp_path):
    """In memory (one donated output, or the single block itself) and out of core, the blocks
    of history_features side by side, bit for bit."""
    n, key = 7, jax.random.PRNGKey(1)
    epochs = np.array([2, 4, 5][:len(widths)])
    snapshots = {int(t): w for t, w in zip(epochs, widths)}
    feature_fn = lambda w, k: jax.random.normal(k, (n, w))
    want = pivotal.history_features(feature_fn, snapshots, key, epochs=epochs)
    for mode in ("in_memory", "sketch", "out_of_core"):
        plan = selection.FeaturePlan(mode, None, epochs, tuple(widths))
        got = selection._write_blocks(feature_fn, snapshots, key, plan, n, str(tmp_path))
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="its plan said"):
        plan = selection.FeaturePlan("in_memory", None, epochs, tuple(w + 1 for w in widths))
        selection._write_blocks(feature_fn, snapshots, key, plan, n, None)


@pytest.mark.slow  # this and the next three share a warm-up: about 6 min on 2 busy cores
@pytest.mark.parametrize("method", ["rbc", "gbc"])
def test_in_memory_is_the_selection_as_before(warm, method):
    """Default budget: exact features, the same picks as history_features + select_meta_samples."""
    cfg, problem, model, meta0, run = warm
    picked, info = _select(warm, method, 4.0)
    assert (info["feature_mode"], info["sketch_dim"]) == ("in_memory", None)
    k_feat, k_sel = jax.random.split(jax.random.PRNGKey(5))

    def feature_fn(snapshot, k):
        params, state = snapshot
        if method == "gbc":
            return selection._gbc_block(model, problem, params, state, k, cfg)
        return selection._rbc_block(model, problem, params, state, cfg.label_aware, cfg.chunk_size)

    old, epochs = pivotal.history_features(feature_fn, pipeline.load_snapshots(run), k_feat,
                                           best_epoch=run.best_epoch, num_snapshots=cfg.num_snapshots,
                                           return_epochs=True)
    assert info["feature_dim"] == old.shape[1] and info["snapshot_epochs"] == epochs.tolist()
    expected = pivotal.select_meta_samples(old, 4, k_sel, existing=meta0, exclude_fraction=cfg.exclude_fraction,
                                           max_iters=cfg.kmeans_iters)
    np.testing.assert_array_equal(picked[:expected.size], expected)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rbc", "gbc"])
def test_sketch_when_the_exact_features_do_not_fit(warm, method):
    _, problem, _, _, _ = warm
    _, exact = _select(warm, method, 4.0)
    n = len(problem.y_noisy)
    gb = 0.6 * n * exact["feature_dim"] * 4 / 1e9
    _, info = _select(warm, method, gb)
    assert info["feature_mode"] == "sketch" and info["sketch_dim"] in selection.SKETCH_DIMS
    assert info["feature_dim"] < exact["feature_dim"] and n * info["feature_dim"] * 4 <= gb * 1e9
    assert info["snapshot_epochs"] == exact["snapshot_epochs"]


@pytest.mark.slow
def test_out_of_core_when_not_even_the_floor_sketch_fits(warm):
    cfg, problem, _, _, run = warm
    n = len(problem.y_noisy)
    _, floor = _select(warm, "gbc", 1.01 * n * 4 * 256 * 4 / 1e9)  # room for ~256 columns a snapshot
    gb = 0.5 * n * floor["feature_dim"] * 4 / 1e9
    _, info = _select(warm, "gbc", gb)
    assert (info["feature_mode"], info["sketch_dim"]) == ("out_of_core", 256)
    assert n * info["feature_dim"] * 4 > gb * 1e9
    # The memmap went with its folder.
    assert not glob.glob(os.path.join(os.path.dirname(run.snapshot_dir), "features-*"))


@pytest.mark.slow  # compiles both K-means: about a minute on 2 busy cores
def test_out_of_core_selection_matches_the_in_memory_one():
    """Algorithm 2 over a memmap: the picks of select_meta_samples on planted clusters."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32)) * 5
    G = (centres[rng.integers(0, 6, 900)] + rng.normal(size=(900, 32))).astype(np.float32)
    G[17] = 0  # an all-zero row is dropped, with a warning
    existing = np.array([3, 400, 801])
    cfg = dataclasses.replace(pipeline.ExperimentConfig(), feature_memory_gb=2e-4)  # 200 kB blocks
    key = jax.random.PRNGKey(2)
    with pytest.warns(UserWarning, match="1 all-zero candidate rows"):
        expected = pivotal.select_meta_samples(G, 6, key, existing=existing, max_iters=cfg.kmeans_iters)
    with pytest.warns(UserWarning, match="1 all-zero candidate rows"):
        got = selection._select_out_of_core(G, 6, key, existing, cfg, weighted=True)
    assert sorted(got.tolist()) == sorted(expected.tolist())


def test_feature_memory_flag_is_checked():
    with pytest.raises(ValueError, match="--feature-memory-gb must be positive"):
        pipeline.ExperimentConfig(feature_memory_gb=0.0).validate({"feature_memory_gb": "--feature-memory-gb"})
    with pytest.raises(ValueError, match="feature_memory_gb must be a finite number"):
        pipeline.ExperimentConfig(feature_memory_gb=float("inf")).validate()


# --------------------------------------------------------------------------- no N x N anywhere

def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation of ``jaxpr`` (or its sub-jaxprs) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


@pytest.mark.parametrize("stochastic", [False, True])
def test_craig_greedy_never_forms_n_by_n(stochastic):
    """The facility-location greedy of one class of 60,000 examples (Fashion-MNIST's whole
    training set in one predicted class), traced, not run: no array near N x N = 3.6e9."""
    from pivotal.baselines import _facility_location_greedy

    n, d = 60_000, 840
    closed = jax.make_jaxpr(lambda f, m, a, k: _facility_location_greedy(
        f, m, a, k, budget=10, num_candidates=27_632 if stochastic else None, block_size=256))(
        jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.bool_), jax.random.PRNGKey(0))
    largest = _largest_intermediate(closed.jaxpr)
    # The features (N x D) themselves, or a block of 256 candidates x N; N x N is 3.6e9.
    assert largest <= max(n * d, 256 * n) < n * n // 50


@pytest.mark.slow  # 300,000 rows: a minute or two
def test_craig_and_ta_vaal_run_where_n_by_n_would_not_fit():
    """N = 300,000: an N x N float32 array would take 360 GB."""
    from experiments.ta_vaal import ta_vaal_selection

    n = 300_000
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    classes = np.arange(n) % 100  # 3,000 a class
    picked = pivotal.craig_selection(feats, 10, existing=np.arange(5), classes=classes,
                                     key=jax.random.PRNGKey(0))
    assert picked.size == np.unique(picked).size == 10 and picked.min() >= 5
    chosen = ta_vaal_selection(feats[:, :2], feats[:, 2:], None, np.arange(10), 5, jax.random.PRNGKey(1),
                               labelled_losses=rng.random(10).astype(np.float32), steps=2, ranker_steps=2)
    assert chosen.size == np.unique(chosen).size == 5 and chosen.min() >= 10
