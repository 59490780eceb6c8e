"""experiments.scaling: the report from measurements, its checks, resuming; a slow end-to-end run
on tiny IDX files (each size in a child process)."""

import json
import os

import pytest

from experiments import scaling
from test_idx import write_set


def _record(size, per_n=1e-3, peak=0.5):
    phases = {"warmup": 5 * per_n * size, "selection": 2 * per_n * size,
              "features": per_n * size, "kmeans": 0.5 * per_n * size,
              "final_training": 4 * per_n * size}
    peaks = {k: peak + size / 1e5 for k in phases}
    rows = [{"method": m, "test_accuracy": 0.5, "phase_seconds": phases,
             "phase_peak_rss_gb": peaks, "feature_mode": "in_memory", "wall_seconds": 1.0}
            for m in ("rbc", "gbc")]
    return {"size": size, "exit_code": 0, "wall_seconds": 20 * per_n * size,
            "peak_rss_gb": 1.0 + size / 1e5, "load_average_before": (1.0, 1.0, 1.0),
            "load_average_after": (1.0, 1.0, 1.0), "cpu_count": 2, "interval": 1.0, "command": [],
            "rows": rows}


def test_table_has_the_warmup_once_and_each_methods_phases():
    rows = scaling.table_rows([_record(1000), _record(4000)])
    labels = [r[0] for r in rows if r[1] == 1000]
    assert labels.count("warm-up training") == 1
    for method in ("rbc", "gbc"):
        for name in ("features", "K-means", "selection (all)", "final training"):
            assert f"{method} {name}" in labels
    assert ("rbc features", 4000, 4.0, 0.54) in rows


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_exponent_recovers_the_power(power):
    points = [(n, 3.0 * n ** power) for n in (1000, 5000, 60000)]
    assert scaling.exponent(points) == pytest.approx(power)
    assert scaling.exponent(points[:1]) is None
    assert scaling.exponent([(1000, None), (2000, 1.0)]) is None


def test_report_lists_every_size_and_linear_exponents():
    text = scaling.report([_record(n) for n in (1000, 2000, 8000)], "t")
    assert "| rbc features | 8000 | 8.0 | 0.58 |" in text
    assert "| gbc final training | 1.00 |" in text  # seconds proportional to N


@pytest.mark.parametrize("argv, words", [
    (["--sizes", "5,5"], "more than once"), (["--sizes", "a,3"], "comma-separated integers"),
    (["--sizes", "0"], "positive integers"), (["--methods", "rbc,foo"], "--methods"),
    (["--seeds", "2"], "--seeds is set by the runner"), (["--preset", "nope"], "preset"),
    (["--interval", "0"], "--interval")])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, argv, words):
    assert scaling.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "n5")


def test_finished_sizes_are_reused_and_reported(tmp_path):
    for size in (100, 300):
        folder = tmp_path / f"n{size}"
        folder.mkdir()
        (folder / scaling.RUN_FILE).write_text(json.dumps(_record(size)))
    assert scaling.main(["--sizes", "300,100", "--methods", "rbc,gbc", "--out",
                         str(tmp_path)]) == 0  # nothing to run: both measured
    stored = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["size"] for r in stored] == [100, 300]
    assert "| whole run (outside) | 300 |" in (tmp_path / "scaling.md").read_text()
    assert (tmp_path / "scaling.png").stat().st_size > 1000


@pytest.mark.slow
def test_runner_end_to_end_on_tiny_idx_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_set(data, n_train=120, n_test=20, size=(28, 28))
    out = tmp_path / "out"
    code = scaling.main(["--sizes", "40,80", "--methods", "rbc", "--interval", "0.2",
                         "--out", str(out), "--data-dir", str(data), "--epochs", "1"])
    assert code == 0
    stored = json.loads((out / "scaling.json").read_text())
    assert [r["size"] for r in stored] == [40, 80]
    for rec in stored:
        assert rec["exit_code"] == 0 and rec["peak_rss_gb"] > 0.1
        (row,) = rec["rows"]
        assert set(row["phase_seconds"]) == {"warmup", "selection", "features", "kmeans",
                                             "final_training"}
        # The child's own peaks cannot exceed the tree's, sampled from outside (5% slack for
        # the sampling instants).
        assert max(row["phase_peak_rss_gb"].values()) <= 1.05 * rec["peak_rss_gb"]
    text = (out / "scaling.md").read_text()
    for label in ("warm-up training", "rbc features", "rbc K-means", "rbc final training"):
        assert f"| {label} | 40 |" in text and f"| {label} | 80 |" in text
    assert (out / "scaling.png").stat().st_size > 1000
    # A second call reuses both measurements.
    assert scaling.main(["--sizes", "40,80", "--methods", "rbc", "--out", str(out),
                         "--data-dir", str(data), "--epochs", "1"]) == 0
    assert json.loads((out / "scaling.json").read_text()) == stored


@pytest.mark.slow
def test_runner_stops_at_a_size_larger_than_the_split(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_set(data, n_train=30, n_test=10, size=(28, 28))
    code = scaling.main(["--sizes", "31", "--methods", "rbc", "--out", str(tmp_path / "o"),
                         "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "N = 31" in err and "must be at most the 30 examples" in err
