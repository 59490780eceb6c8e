"""experiments.resources: the process tree's RSS from /proc, phases and recorders, the rows' keys."""

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest

from experiments import pipeline, resources
from experiments.presets import PRESETS

LINUX = os.path.isdir("/proc/self")
# A child that holds ~300 MB resident (bytes written, so the pages are touched) for a while.
HOLD = "import sys, time; x = b'x' * 300_000_000; sys.stdout.write('ready\\n'); " \
       "sys.stdout.flush(); time.sleep(30)"


@pytest.mark.skipif(not LINUX, reason="needs /proc")
def test_tree_rss_counts_the_children():
    alone = resources.tree_rss_bytes()
    assert alone is not None and alone > 10e6  # a Python with numpy and JAX imported
    child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        with_child = resources.tree_rss_bytes()
        assert resources.tree_rss_bytes(child.pid) > 300e6
        assert with_child > alone + 280e6
    finally:
        child.kill()
        child.wait()
    assert resources.tree_rss_bytes(child.pid) is None  # gone: no /proc entry


@pytest.mark.skipif(not LINUX, reason="needs /proc")
def test_sampler_catches_a_peak_that_is_gone_at_the_end():
    with resources.TreeSampler(interval=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(0.3)
        child.kill()
        child.wait()
    assert sampler.peak > resources.tree_rss_bytes() + 250e6


def test_recorder_adds_seconds_and_keeps_the_largest_peak():
    rec = resources.Recorder()
    rec.add("a", 1.0, 2e9)
    rec.add("b", 0.5, None)
    rec.add("a", 2.0, 1e9)
    other = resources.Recorder()
    other.add("b", 1.0, 3e9)
    other.add("c", 0.25, 5e8)
    rec.merge(other)
    assert rec.row() == {"phase_seconds": {"a": 3.0, "b": 1.5, "c": 0.25},
                         "phase_peak_rss_gb": {"a": 2.0, "b": 3.0, "c": 0.5}}


def test_phase_outside_recording_records_and_samples_nothing():
    before = threading.active_count()
    with resources.phase("x"):
        assert threading.active_count() == before
    with resources.recording() as rec:
        pass
    assert rec.row() == {"phase_seconds": {}, "phase_peak_rss_gb": {}}


def test_phases_nest_and_record_on_error():
    with resources.recording() as rec:
        with resources.phase("outer", interval=0.05):
            with resources.phase("inner", interval=0.05):
                time.sleep(0.12)
        with pytest.raises(RuntimeError):
            with resources.phase("failing", interval=0.05):
                time.sleep(0.06)
                raise RuntimeError("boom")
    assert list(rec.seconds) == ["inner", "outer", "failing"]
    assert rec.seconds["outer"] >= rec.seconds["inner"] >= 0.12
    assert rec.seconds["failing"] >= 0.06
    if LINUX:
        assert all(b > 10e6 for b in rec.peak_bytes.values())
    with resources.recording() as inner_rec:  # a nested recording takes the phases
        with resources.phase("y"):
            pass
    assert "y" in inner_rec.seconds and "y" not in rec.seconds


@pytest.mark.parametrize("interval", [0, -1.0])
def test_sampler_refuses_a_bad_interval(interval):
    with pytest.raises(ValueError, match="interval must be > 0"):
        resources.TreeSampler(interval=interval)


def test_rows_carry_phase_seconds_and_peaks(tmp_path):
    cfg = dataclasses.replace(PRESETS["smoke"].config, warmup_epochs=1, epochs=1,
                              finetune_epochs=1, num_snapshots=1)
    rows = {r["method"]: r for r in pipeline.run(cfg, ("base", "random", "rbc"), 1,
                                                 str(tmp_path))}
    assert set(rows["base"]["phase_seconds"]) == {"final_training"}
    assert set(rows["random"]["phase_seconds"]) == {"warmup", "selection", "final_training"}
    rbc = rows["rbc"]
    assert set(rbc["phase_seconds"]) == {"warmup", "selection", "features", "kmeans",
                                         "final_training"}
    # The warm-up ran once; both rows carry its numbers. Features and K-means are inside
    # the selection, and the selection is the row's selection_seconds.
    assert rbc["phase_seconds"]["warmup"] == rows["random"]["phase_seconds"]["warmup"] > 0
    seconds = rbc["phase_seconds"]
    assert seconds["features"] + seconds["kmeans"] <= seconds["selection"]
    assert seconds["selection"] == pytest.approx(rbc["selection_seconds"], abs=0.05)
    assert seconds["final_training"] <= rbc["wall_seconds"]
    if LINUX:
        assert all(0.01 < gb < 100 for gb in rbc["phase_peak_rss_gb"].values())


@pytest.mark.skipif(not LINUX, reason="needs /proc")
def test_command_line_measures_a_child_tree_and_passes_its_exit_code(tmp_path):
    # The child's child holds ~300 MB: the tree's peak must include the grandchild.
    grandchild = "import time; x = b'x' * 300_000_000; time.sleep(0.6)"
    child = (f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}]); "
             "sys.exit(3)")
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.resources", "--interval", "0.05",
                           "--json", str(out), "--", sys.executable, "-c", child],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    record = __import__("json").loads(out.read_text())
    assert record["exit_code"] == 3 and record["peak_rss_gb"] > 0.28
    assert record["wall_seconds"] >= 0.6
    assert "peak RSS of the process tree" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [(["--"], "a COMMAND is required"),
                                           (["--interval", "0", "--", "true"], "--interval")])
def test_command_line_refuses_bad_input(argv, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.resources", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
