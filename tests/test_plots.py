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
