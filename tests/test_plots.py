"""Figures: method bars and the paper's Figure 1 written as PNG files; the fig1 preset."""

import os

import jax
import numpy as np
import pytest

from experiments import pipeline, plots, run
from experiments.presets import PRESETS, get_preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def fake_rows():
    rows = []
    for seed, accs in enumerate([(0.6, 0.9, 0.92), (0.55, 0.88, 0.91)]):
        for method, acc in zip(("random", "rbc", "gbc"), accs):
            rows.append({"method": method, "seed": seed, "test_accuracy": acc,
                         "meta_indices": [0, 1, 2 + seed, 5, 7, 9]})
    rows.append({"method": "base", "seed": 0, "test_accuracy": 0.4, "meta_indices": []})
    return rows


def toy_problem(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 1] > 0).astype(np.int32)
    noisy = np.where(rng.random(n) < 0.3, 1 - y, y).astype(np.int32)
    return pipeline.Problem("toy", x, noisy, y, x[:10], y[:10], x[10:20], y[10:20], 2, (2,),
                            float(np.mean(noisy != y)))


def test_method_bars_png(tmp_path):
    path = str(tmp_path / "sub" / "methods.png")
    assert plots.plot_method_bars(fake_rows(), path) == path
    assert is_png(path)
    # One seed only (no error bars) also works; no temporary files are left behind.
    plots.plot_method_bars(fake_rows()[:3], path)
    assert is_png(path)
    assert os.listdir(tmp_path / "sub") == ["methods.png"]
    with pytest.raises(ValueError):
        plots.plot_method_bars([], path)


def test_fig1_png_from_rows_and_params(tmp_path):
    problem = toy_problem()
    predict = plots.mlp_predict(hidden=(8, 8))
    from experiments import models

    module, _ = models.make_model("mlp", 2, (2,), hidden=(8, 8))
    params, state = models.init_model(module, jax.random.PRNGKey(0), (2,))
    rows = fake_rows()
    results = [rows[0], dict(rows[1], params=params), dict(rows[2], params=params)]
    path = str(tmp_path / "fig1.png")
    plots.plot_fig1(problem, results, path, predict=predict, clean=(params, state),
                    resolution=30)
    assert is_png(path)
    assert os.listdir(tmp_path) == ["fig1.png"]
    with pytest.raises(ValueError, match="2-D"):
        bad = problem._replace(input_shape=(3,))
        plots.plot_fig1(bad, results, path, predict=predict)


def test_fig1_preset_validates():
    preset = get_preset("fig1")
    cfg = preset.config
    cfg.validate()
    assert (cfg.dataset, cfg.noise, cfg.rate, cfg.model) == ("toy", "uniform", 0.6, "mlp")
    assert cfg.budget == 6 and 0 < cfg.warmup < cfg.budget
    assert preset.methods == ("random", "rbc", "gbc") and preset.seeds == 5
    assert preset.plot == "fig1" and 0 < preset.minutes <= 30
    # The default MLP has two hidden layers, as in the paper's toy experiment.
    assert len(pipeline.build_model(cfg, pipeline.make_problem(cfg, 0)).module.hidden) == 2
    assert PRESETS["default"].plot is None and PRESETS["smoke"].plot is None


@pytest.mark.slow
def test_fig1_quick_run_writes_figures(tmp_path):
    out = str(tmp_path)
    argv = ["--preset", "fig1", "--seeds", "1", "--epochs", "2", "--methods", "random,rbc"]
    assert run.main(argv + ["--out", out]) == 0
    assert is_png(os.path.join(out, "fig1.png")) and is_png(os.path.join(out, "methods.png"))


@pytest.mark.slow
def test_fig1_run_writes_figures(tmp_path):
    out = str(tmp_path)
    assert run.main(["--preset", "fig1", "--seeds", "1", "--epochs", "3", "--out", out]) == 0
    for name in ("fig1.png", "methods.png", "table.md", "results.jsonl"):
        assert os.path.exists(os.path.join(out, name)), name
    assert is_png(os.path.join(out, "fig1.png")) and is_png(os.path.join(out, "methods.png"))
    # A rerun resumes (nothing to train) and redraws fig1 from the checkpoints.
    os.remove(os.path.join(out, "fig1.png"))
    assert run.main(["--preset", "fig1", "--seeds", "1", "--epochs", "3", "--out", out]) == 0
    assert is_png(os.path.join(out, "fig1.png"))


# ----------------------------------------------------------------------------- Figure 3


def noise_rows():
    rows = []
    for seed in range(3):
        for rate in (0.2, 0.4, 0.6):
            for method, base in (("rbc", 0.9), ("random", 0.8)):
                rows.append({"method": method, "seed": seed, "rate": rate,
                             "test_accuracy": base - 0.5 * rate + 0.01 * seed})
    return rows


def test_noise_curve_png(tmp_path):
    path = str(tmp_path / "sub" / "noise.png")
    assert plots.plot_noise_curve(noise_rows(), path, title="uniform noise") == path
    assert is_png(path)
    # One seed (zero-width bands), one x value, another x key: all fine; nothing else left.
    one = [dict(r, budget=0.1) for r in noise_rows() if r["seed"] == 0 and r["rate"] == 0.4]
    assert plots.plot_noise_curve(one, path, x="budget") == path
    assert is_png(path)
    assert os.listdir(tmp_path / "sub") == ["noise.png"]


def test_noise_curve_bad_input(tmp_path):
    path = str(tmp_path / "noise.png")
    with pytest.raises(ValueError, match="rows"):
        plots.plot_noise_curve([], path)
    with pytest.raises(ValueError, match="rows"):
        plots.plot_noise_curve({"method": "rbc"}, path)
    with pytest.raises(ValueError, match="rows\\[1\\].*test_accuracy"):
        plots.plot_noise_curve([noise_rows()[0], {"method": "rbc", "seed": 0, "rate": 0.2}],
                               path)
    with pytest.raises(ValueError, match="'budget'"):
        plots.plot_noise_curve(noise_rows(), path, x="budget")
    with pytest.raises(ValueError, match="x must"):
        plots.plot_noise_curve(noise_rows(), path, x=None)
    with pytest.raises(ValueError, match="test_accuracy"):
        plots.plot_noise_curve([dict(noise_rows()[0], test_accuracy=None)], path)
    with pytest.raises(ValueError, match="rate"):
        plots.plot_noise_curve([dict(noise_rows()[0], rate="high")], path)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- Table 6


def round_rows():
    rows = []
    for seed in range(2):
        for method, base in (("rbc", 0.7), ("gbc", 0.75)):
            counts = [10, 20, 30, 40]
            accs = [base + 0.03 * k + 0.01 * seed for k in range(len(counts))]
            rows.append({"method": method, "seed": seed, "round_meta_count": counts,
                         "round_test_accuracy": accs})
    return rows


def test_rounds_png(tmp_path):
    path = str(tmp_path / "rounds.png")
    assert plots.plot_rounds(round_rows(), path, title="budget 40") == path
    assert is_png(path)
    # Seeds that stopped at different rounds still plot (each size averages its own seeds).
    rows = round_rows()
    rows[0] = dict(rows[0], round_meta_count=[10, 20], round_test_accuracy=[0.6, 0.65])
    plots.plot_rounds(rows, path)
    assert is_png(path)
    assert os.listdir(tmp_path) == ["rounds.png"]


def test_rounds_bad_input(tmp_path):
    path = str(tmp_path / "rounds.png")
    good = round_rows()[0]
    with pytest.raises(ValueError, match="rows"):
        plots.plot_rounds([], path)
    with pytest.raises(ValueError, match="round_test_accuracy"):
        plots.plot_rounds([{k: v for k, v in good.items() if k != "round_test_accuracy"}],
                          path)
    with pytest.raises(ValueError, match="round_meta_count.*round_test_accuracy"):
        plots.plot_rounds([dict(good, round_test_accuracy=[0.5])], path)
    with pytest.raises(ValueError, match="round_meta_count"):
        plots.plot_rounds([dict(good, round_meta_count=[], round_test_accuracy=[])], path)
    with pytest.raises(ValueError, match="round_meta_count"):
        plots.plot_rounds([dict(good, round_meta_count=[10, 20.5, 30, 40])], path)
    with pytest.raises(ValueError, match="round_test_accuracy"):
        plots.plot_rounds([dict(good, round_test_accuracy=[0.5, None, 0.6, 0.7])], path)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- Figure 4


def planted_clusters(n=200, d=8, k=3, seed=0):
    """``n`` rows near ``k`` random directions, each with a random sign; plus those directions."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(k, d))
    labels = rng.integers(0, k, size=n)
    signs = rng.choice([-1.0, 1.0], size=(n, 1))
    scales = rng.uniform(0.5, 2.0, size=(n, 1))
    features = signs * scales * (directions[labels] + 0.1 * rng.normal(size=(n, d)))
    return features.astype(np.float32), directions, labels


def test_abs_cosine_distance_sign_invariant():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4))
    both = np.concatenate([a, -3.0 * a, np.zeros((1, 4))])
    dist = plots.abs_cosine_distance(both)
    assert dist.shape == (11, 11)
    assert np.allclose(dist, dist.T) and np.all(dist >= 0) and np.all(dist <= 1)
    assert np.all(np.diag(dist) == 0)
    # A row and its (scaled) negation are at distance 0; a zero row is at distance 1.
    assert np.allclose(np.diag(dist[:5, 5:10]), 0.0, atol=1e-12)
    assert np.allclose(dist[10, :10], 1.0) and np.allclose(dist[:10, 10], 1.0)
    # Orthogonal rows: distance 1; against another matrix it matches 1 - |cos|.
    assert plots.abs_cosine_distance(np.eye(2))[0, 1] == pytest.approx(1.0)
    b = rng.normal(size=(3, 4))
    cos = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    assert np.allclose(plots.abs_cosine_distance(a, b), 1 - np.abs(cos))
    with pytest.raises(ValueError, match="columns"):
        plots.abs_cosine_distance(a, np.ones((2, 3)))


def test_tsne_perplexity_below_points():
    assert plots.tsne_perplexity(2001) == 30.0
    for n_points in (2, 3, 10, 91, 92, 500):
        assert 0 < plots.tsne_perplexity(n_points) < n_points


def test_tsne_png_small(tmp_path):
    features, directions, labels = planted_clusters()
    path = str(tmp_path / "tsne.png")
    out = plots.plot_tsne(features, directions, path, labels=labels, selected=[0, 5, 17],
                          title="planted")
    assert out == path and is_png(path)
    assert os.listdir(tmp_path) == ["tsne.png"]


def test_tsne_subsamples_and_keeps_selected(tmp_path, monkeypatch):
    features, directions, _ = planted_clusters(n=300)
    seen = {}
    real = plots.abs_cosine_distance

    def spy(a, b=None):
        seen["points"] = np.asarray(a)
        return real(a, b)

    monkeypatch.setattr(plots, "abs_cosine_distance", spy)
    selected = [1, 250, 299]
    path = str(tmp_path / "tsne.png")
    plots.plot_tsne(features, directions, path, selected=selected, max_points=60, seed=3)
    assert is_png(path)
    points = seen["points"]
    assert points.shape == (60 + 3, features.shape[1])  # the subset plus every centroid
    for i in selected:
        assert np.any(np.all(points[:60] == features[i].astype(np.float64), axis=1))
    assert np.allclose(points[60:], directions)


def test_tsne_bad_input(tmp_path):
    features, directions, labels = planted_clusters(n=20)
    path = str(tmp_path / "tsne.png")
    with pytest.raises(ValueError, match="features"):
        plots.plot_tsne(features[0], directions, path)
    with pytest.raises(ValueError, match="features"):
        plots.plot_tsne(np.zeros((0, 8)), directions, path)
    with pytest.raises(ValueError, match="features"):
        plots.plot_tsne(np.where(features > 1, np.nan, features), directions, path)
    with pytest.raises(ValueError, match="centroids"):
        plots.plot_tsne(features, directions[:, :5], path)
    with pytest.raises(ValueError, match="centroids"):
        plots.plot_tsne(features, np.zeros((0, 8)), path)
    with pytest.raises(ValueError, match="labels"):
        plots.plot_tsne(features, directions, path, labels=labels[:-1])
    with pytest.raises(ValueError, match="labels"):
        plots.plot_tsne(features, directions, path, labels=labels + 0.5)
    with pytest.raises(ValueError, match="selected"):
        plots.plot_tsne(features, directions, path, selected=[0, 20])
    with pytest.raises(ValueError, match="selected"):
        plots.plot_tsne(features, directions, path, selected=[0.5])
    with pytest.raises(ValueError, match="max_points"):
        plots.plot_tsne(features, directions, path, max_points=0)
    assert os.listdir(tmp_path) == []
