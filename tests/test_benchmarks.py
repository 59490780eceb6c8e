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
from benchmarks.common import clustered_features, time_call, time_side_by_side  # noqa: E402

HEADLINE = ("meta_step_ratio", "gbc_over_rbc", "gbc_vs_loop_speedup", "kmeans_over_faiss",
            "kmeans_over_sklearn")


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
    one = bench._s2_objective(G, a, ref, 3)
    two = bench._s2_objective(G, a, 5.0 * ref, 3)  # centroid scale must not matter
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
    assert on_disk["command"] == "pytest"
    km = on_disk["details"]["kmeans"]
    assert km["iterations_run"]["ours"] <= km["iterations_requested"]
    assert set(km["objectives"]) == {"ours", "faiss", "sklearn"}
    assert on_disk["details"]["features"]["loop"]["relative_diff_vs_ours"] < 1e-3
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# pivotal benchmarks")
    for key in HEADLINE:
        assert f"`{key}`" in table


def test_scaling_worker_reports_time_and_memory():
    row = bench._worker(["--what", "kmeans", "--n", "128", "--repeats", "1", "--iters", "2",
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
