"""The experiments pipeline and command line: smoke run of every method, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import pipeline, run
from experiments.presets import PRESETS

SMOKE = PRESETS["smoke"].config


def read_rows(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke"))
    assert run.main(["--preset", "smoke", "--out", out]) == 0
    return out, read_rows(out)


def test_smoke_runs_every_method(smoke_rows):
    out, rows = smoke_rows
    assert [r["method"] for r in rows] == list(pipeline.METHODS)
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        for field in ("seed", "dataset", "noise", "rate", "weight_auc", "meta_indices",
                      "selection_seconds", "train_seconds"):
            assert field in r
        expected = 0 if r["method"] == "base" else SMOKE.budget
        assert len(r["meta_indices"]) == len(set(r["meta_indices"])) == expected
    # Every method shares the warm-up's M0 random examples.
    warm = {tuple(r["meta_indices"][:SMOKE.warmup]) for r in rows if r["method"] != "base"}
    assert len(warm) == 1
    table = open(os.path.join(out, "table.md")).read()
    assert all(f"| {m} |" in table for m in pipeline.METHODS)


def test_rerun_skips_finished_rows(smoke_rows):
    out, rows = smoke_rows
    start = time.perf_counter()
    assert run.main(["--preset", "smoke", "--out", out]) == 0
    assert read_rows(out) == rows
    assert time.perf_counter() - start < 30


def test_cleaning_gives_ground_truth_and_removes_from_pool():
    problem = pipeline.make_problem(SMOKE, seed=0)
    assert 0.5 < problem.noise_rate < 0.7  # 60 % adversarial noise
    noisy_meta = np.flatnonzero(~problem.is_clean)[:5]
    pool, meta = pipeline.split_pool(problem, noisy_meta)
    np.testing.assert_array_equal(meta["y"], problem.y_clean[noisy_meta])
    assert not np.any(meta["y"] == problem.y_noisy[noisy_meta])
    assert np.intersect1d(pool, noisy_meta).size == 0
    assert pool.size + noisy_meta.size == problem.y_noisy.size


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "nope"], "dataset must be one of"),
    (["--methods", "rbc,magic"], "methods must name some of"),
    (["--preset", "nope"], "preset must be one of"),
    (["--rate", "1.2"], "rate must be in"),
    (["--budget", "10", "--warmup", "10"], "warmup must be in"),
    (["--lr", "0"], "lr must be positive"),
])
def test_bad_arguments_fail_before_training(argv, match, capsys, tmp_path):
    assert run.main(argv + ["--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.jsonl")


def test_budget_larger_than_training_set(tmp_path, capsys):
    assert run.main(["--preset", "smoke", "--budget", "100000", "--warmup", "10",
                     "--methods", "random", "--out", str(tmp_path)]) == 2
    assert "error: --budget 100000 must be smaller" in capsys.readouterr().err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert run.main(["--preset", "smoke", "--out", str(blocker / "sub")]) == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_list_presets(capsys):
    assert run.main(["--list-presets"]) == 0
    text = capsys.readouterr().out
    assert "smoke" in text and "default" in text


@pytest.mark.slow  # kills and resumes a real run: ~1 min alone; keeps the default suite under 15 min
def test_resume_after_kill_reproduces_uninterrupted(tmp_path):
    args = ["-m", "experiments.run", "--preset", "smoke", "--methods", "random",
            "--epochs", "25"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    clean_out, killed_out = str(tmp_path / "clean"), str(tmp_path / "killed")
    subprocess.run([sys.executable, *args, "--out", clean_out], check=True, env=env,
                   capture_output=True)

    proc = subprocess.Popen([sys.executable, *args, "--out", killed_out], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    marker = None
    while time.time() < deadline and marker is None:
        for root, dirs, _ in os.walk(killed_out):
            if os.path.basename(root) == "round0" and any(d == "step_3" for d in dirs):
                marker = root
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker is not None, "the run never reached its third checkpoint"
    assert not os.path.exists(os.path.join(killed_out, "results.jsonl"))

    subprocess.run([sys.executable, *args, "--out", killed_out], check=True, env=env,
                   capture_output=True)
    (clean,), (resumed,) = read_rows(clean_out), read_rows(killed_out)
    for key in ("test_accuracy", "best_epoch", "best_val_accuracy", "weight_auc",
                "meta_indices"):
        assert clean[key] == resumed[key], key


@pytest.mark.slow
def test_mesh_run_matches_single_device(tmp_path):
    """``--mesh data=4`` on 4 simulated CPU devices selects and scores like one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    args = [sys.executable, "-m", "experiments.run", "--preset", "smoke", "--methods", "rbc",
            "--epochs", "2"]
    subprocess.run(args + ["--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run(args + ["--mesh", "data=4", "--out", str(tmp_path / "four")], check=True,
                   env=env, capture_output=True)
    (one,), (four,) = read_rows(str(tmp_path / "one")), read_rows(str(tmp_path / "four"))
    assert four["config"]["mesh"] == 4 and one["config"]["mesh"] is None
    assert one["meta_indices"] == four["meta_indices"]
    assert abs(one["test_accuracy"] - four["test_accuracy"]) <= 0.01


@pytest.mark.slow
def test_sweep_shares_the_warmup_and_records_rounds_and_theorems(tmp_path):
    import dataclasses

    out = str(tmp_path)
    cfg = dataclasses.replace(SMOKE, warmup_epochs=2, epochs=2, rounds=2, diagnostics=True)
    configs = run.sweep_configs(cfg, ("num_snapshots", (1, 2)))
    by_label = run.run_all(configs, ("rbc",), 1, out, sweep=("num_snapshots", (1, 2)))
    # The two configs differ only after the warm-up: one warm-up run serves both.
    work = os.listdir(os.path.join(out, "work"))
    assert len([d for d in work if d.startswith("warmup-")]) == 1
    assert len([d for d in work if not d.startswith("warmup-")]) == 2
    for label, k in (("num_snapshots=1", 1), ("num_snapshots=2", 2)):
        (row,) = by_label[label]
        extra = SMOKE.budget - SMOKE.warmup
        assert row["round_meta_count"] == [SMOKE.warmup + extra // 2, SMOKE.budget]
        assert row["round_test_accuracy"][-1] == row["test_accuracy"]
        assert len(row["snapshot_epochs"]) == 2 and len(row["snapshot_epochs"][0]) <= k
        assert 0.0 <= row["weight_auc_boundary"] <= 1.0
        # Label-free RBC rows are softmax (>= 0) outer ReLU features (>= 0): no negative
        # inner product, so Theorem 1's D_j is inf for every example.
        assert row["d_inf_fraction"] == [1.0, 1.0] and row["d_min"] == [float("inf")] * 2
        assert all(d >= 1.0 for d in row["d_aware_min"])
        assert all(0 <= s <= c for s, c in zip(row["stable_count"], row["candidate_count"]))
    table = open(os.path.join(out, "table.md")).read()
    assert "Test accuracy (%) by num_snapshots" in table and "stable examples" in table
    assert "| rbc | 2 meta" not in table and "meta |" in table  # the per-round table


@pytest.mark.slow
def test_without_warmup_selects_the_whole_budget(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(SMOKE, warmup=0, warmup_epochs=2, epochs=2)
    rows = run.run(cfg, ("random", "rbc"), 1, str(tmp_path))
    assert [len(r["meta_indices"]) for r in rows] == [SMOKE.budget, SMOKE.budget]
    assert rows[0]["meta_indices"] != rows[1]["meta_indices"]
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)
    warm = pipeline.warmup_run(problem, model, cfg, 0, pipeline.warmup_dir(str(tmp_path), cfg, 0))
    assert warm[0].size == 0 and warm[1].weights is None  # plain training, nothing cleaned
    with pytest.raises(ValueError, match="ta-vaal .* needs a warm-up"):
        pipeline.run_method("ta-vaal", problem, model, cfg, 0, str(tmp_path / "w"), warm)


@pytest.mark.slow
def test_short_kmeans_selection_is_topped_up_to_the_count(tmp_path, monkeypatch):
    """Empty clusters make select_meta_samples return fewer than asked; select() tops up."""
    import dataclasses

    import jax
    import pivotal

    cfg = dataclasses.replace(SMOKE, warmup_epochs=2)
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)
    meta0, warm = pipeline.warmup_run(problem, model, cfg, 0, str(tmp_path))
    real = pivotal.select_meta_samples
    calls = []

    def one_cluster_only(features, budget, key, *, existing=None, **kwargs):
        full = real(features, budget, key, existing=existing, **kwargs)
        calls.append((budget, np.asarray(existing).copy(), full))
        return full[:1]

    monkeypatch.setattr(pipeline.pivotal, "select_meta_samples", one_cluster_only)
    info = {}
    picked = pipeline.select("rbc", problem, model, warm, meta0, 5, cfg,
                             jax.random.PRNGKey(3), info)
    assert picked.size == len(set(picked.tolist())) == 5
    assert np.intersect1d(picked, meta0).size == 0
    assert info["selection_calls"] == 5 and [c[0] for c in calls] == [5, 4, 3, 2, 1]
    # Each further call treats everything picked so far as existing meta samples.
    for i, (_, existing, _) in enumerate(calls):
        np.testing.assert_array_equal(np.sort(existing), np.sort(np.r_[meta0, picked[:i]]))
    # The first call is the one an unpatched selection makes (same features, same key): runs
    # without empty clusters are unchanged by the top-up.
    monkeypatch.setattr(pipeline.pivotal, "select_meta_samples", real)
    plain = pipeline.select("rbc", problem, model, warm, meta0, 5, cfg, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(plain[:calls[0][2].size], calls[0][2])
    assert picked[0] == plain[0]


@pytest.mark.slow
def test_inspect_collapse_restores_every_finished_run(smoke_rows, capsys):
    from experiments import inspect_collapse

    out, rows = smoke_rows
    argv = ["--out", out, "--preset", "smoke", "--below", "1.01", "--lrs", "0.1", "--seeds", "1"]
    assert inspect_collapse.main(argv) == 0
    table = capsys.readouterr().out
    # Restored from the checkpoints, every run shows the test accuracy its row recorded.
    for r in rows:
        if r["method"] != "finetune":
            line = next(ln for ln in table.splitlines()
                        if ln.startswith(f"| {r['method']} seed 0 (collapsed)"))
            assert line.split(" | ")[1] == f"{100 * r['test_accuracy']:.1f}"
    assert "| 0.1 | " in table
    assert inspect_collapse.main(["--out", out, "--lrs", "0.1,-1"]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err
