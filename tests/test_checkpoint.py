"""Checkpoints and crash-safe result files."""

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoint import (
    Checkpointer,
    all_steps,
    append_jsonl,
    latest_step,
    read_jsonl,
    restore,
    save,
    write_text_atomic,
)


class TrainState(NamedTuple):
    step: jax.Array
    weights: np.ndarray


def _state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "dense": {
                "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
            },
            "layers": [np.asarray(rng.normal(size=(2,)), np.float32)],
        },
        "weights": np.asarray(rng.uniform(size=(7,)), np.float32),
        "order": np.asarray(rng.permutation(7), np.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),  # uint32 (2,)
        "count": np.asarray(seed, np.int32),
        "model_state": None,
        "trainer": TrainState(jnp.asarray(seed, jnp.int32), np.full(3, seed, np.int8)),
        # Host-side bookkeeping keeps 64-bit numpy scalars even with jax_enable_x64 off.
        "track": {"best_val": np.float64(seed / 3), "epoch": np.int64(2**40 + seed)},
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_structure_dtypes_and_metadata(tmp_path):
    state = _state(1)
    meta = {"epoch": 12, "best_val_epoch": 9, "val_acc": [0.5, 0.75], "method": "rbc"}
    path = save(tmp_path / "run", 12, state, meta)
    assert path == (tmp_path / "run" / "step_12").absolute()
    # The rename into place happened: no temporary directory is left over.
    assert sorted(os.listdir(tmp_path / "run")) == ["step_12"]

    # Restoring into a template of other values proves the values come from disk.
    restored, restored_meta = restore(tmp_path / "run", _state(2))
    _assert_same(restored, state)
    assert restored["rng"].dtype == np.uint32
    assert isinstance(restored["trainer"], TrainState)
    assert isinstance(restored["track"]["epoch"], np.int64)
    assert restored_meta == meta
    key = jax.random.wrap_key_data(jnp.asarray(restored["rng"]))
    np.testing.assert_array_equal(
        jax.random.normal(key, (3,)), jax.random.normal(jax.random.key(1), (3,))
    )

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    from_abstract, _ = restore(tmp_path / "run", abstract)
    assert isinstance(from_abstract["params"]["layers"][0], jax.Array)
    assert from_abstract["order"].dtype == jnp.int32
    # A 64-bit value is not squeezed through jax's 32-bit default.
    assert from_abstract["track"]["epoch"] == 2**40 + 1
    assert from_abstract["track"]["epoch"].dtype == np.int64


def test_keeps_only_the_last_k_and_tracks_latest(tmp_path):
    assert latest_step(tmp_path / "missing") is None
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (0, 5, 10, 15):
            ckpt.save(step, _state(step), {"epoch": step})
        assert ckpt.all_steps() == [10, 15]
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(15, _state(0))
        tree = ckpt.restore(10, _state(0))
        assert ckpt.metadata(10) == {"epoch": 10}
        assert ckpt.metadata() == {"epoch": 15}
        _assert_same(tree, _state(10))
    assert all_steps(tmp_path) == [10, 15]
    assert latest_step(tmp_path) == 15
    tree, meta = restore(tmp_path, _state(0))
    assert meta["epoch"] == 15
    _assert_same(tree, _state(15))
    with pytest.raises(FileNotFoundError, match="step 5"):
        restore(tmp_path, _state(0), step=5)


def test_snapshots_are_never_pruned_and_load_lazily(tmp_path):
    params = {"dense": {"kernel": np.ones((2, 3), np.float32)}}
    bn = {"batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}}
    with Checkpointer(tmp_path, keep=1) as ckpt:
        for epoch in range(3):
            ckpt.save_snapshot(epoch, jax.tree.map(lambda x: x * epoch, params), bn)
            ckpt.save(epoch + 1, {"a": np.zeros(1)})
        ckpt.save_snapshot(3, params)
        assert ckpt.all_steps() == [3]
    snaps = Checkpointer(tmp_path).snapshots()
    assert sorted(snaps) == [0, 1, 2, 3]
    p2, s2 = snaps[2]
    np.testing.assert_array_equal(p2["dense"]["kernel"], 2 * np.ones((2, 3)))
    np.testing.assert_array_equal(s2["batch_stats"]["bn"]["mean"], np.zeros(3))
    assert snaps[3][1] is None
    with pytest.raises(KeyError):
        snaps[7]


def test_interrupted_save_is_invisible(tmp_path):
    save(tmp_path, 1, _state(1))
    # What a crash mid-save leaves behind: a temporary directory that never got renamed.
    (tmp_path / "step_2.orbax-checkpoint-tmp-123").mkdir()
    assert latest_step(tmp_path) == 1
    tree, _ = restore(tmp_path, _state(0))
    _assert_same(tree, _state(1))
    # The next writer sweeps the leftover away.
    save(tmp_path, 2, _state(2))
    assert sorted(os.listdir(tmp_path)) == ["step_1", "step_2"]


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="wrap_key_data"):
        save(tmp_path, 0, {"key": jax.random.key(0)})
    with pytest.raises(TypeError, match="metadata"):
        save(tmp_path, 0, {"a": np.zeros(2)}, {"bad": object()})
    with pytest.raises(TypeError, match=r"\['a'\]"):
        save(tmp_path, 0, {"a": "text"})
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        restore(tmp_path, {"a": np.zeros(2)})
    save(tmp_path, 0, {"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        restore(tmp_path, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def test_a_manager_closed_without_saving_leaves_no_cleanup_behind(tmp_path, monkeypatch):
    """The race behind test_bad_inputs_are_refused's rare FileNotFoundError, forced.

    Orbax's cleanup_tmp_directories ran in a thread that only save() waits for: a refused
    save closed its manager with the cleanup still running, and on a busy machine it listed
    the folder while the next manager's save was writing and deleted that save's tmp folder.
    Here the first manager's cleanup looks only once a save is writing, and that save waits
    for it before it commits, so the old code fails every time.
    """
    from orbax.checkpoint._src.path import atomicity, temporary_paths

    real_cleanup = temporary_paths.cleanup_temporary_paths
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    started, done = threading.Event(), threading.Event()

    async def late_cleanup(directory, **kwargs):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            ".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir()
        ):
            await asyncio.sleep(0.001)
        try:
            await real_cleanup(directory, **kwargs)
        finally:
            done.set()

    def cleanup(directory, **kwargs):
        if started.is_set():
            return real_cleanup(directory, **kwargs)
        started.set()
        return late_cleanup(directory, **kwargs)

    async def finalize(self):
        if started.is_set():
            await asyncio.to_thread(done.wait, 5)
        return await real_finalize(self)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", cleanup)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    with pytest.raises(TypeError):
        save(tmp_path, 0, {"a": "text"})
    save(tmp_path, 0, {"a": np.ones(2, np.float32)})
    tree, _ = restore(tmp_path, {"a": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(tree["a"], np.ones(2))


def _big_state(seed):
    # Random values: the array data, not Orbax's metadata, is the largest file.
    big = np.random.default_rng(seed).normal(size=4096).astype(np.float32)
    return {**_state(seed), "big": big}


def _files(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def _truncate_largest(step_dir):
    largest = max(_files(step_dir / "state"), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def _garbage_over_state(step_dir):
    rng = np.random.default_rng(0)
    for path in _files(step_dir / "state"):
        path.write_bytes(rng.bytes(path.stat().st_size))


def _empty_state_files(step_dir):
    for path in _files(step_dir / "state"):
        os.truncate(path, 0)


def _garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_bytes(b"\x00\xff{not json")


DAMAGE = {
    "truncated largest state file": _truncate_largest,
    "garbage over state files": _garbage_over_state,
    "empty state files": _empty_state_files,
    "missing state/": lambda step_dir: shutil.rmtree(step_dir / "state"),
    "missing meta/": lambda step_dir: shutil.rmtree(step_dir / "meta"),
    "garbage meta json": _garbage_meta,
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_latest_step_falls_back_to_the_newest_readable(tmp_path, capsys, damage):
    with Checkpointer(tmp_path) as ckpt:
        for step in (3, 4, 5):
            ckpt.save(step, _big_state(step))
    damage(tmp_path / "step_5")

    with Checkpointer(tmp_path) as ckpt:
        step, tree = ckpt.restore_latest(_big_state(0))
        assert step == 4
        _assert_same(tree, _big_state(4))
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"warning: checkpoint {tmp_path.absolute()}/step_5 is unreadable (")
        assert line.endswith("moved to step_5.damaged-0; resuming from step_4")
        assert ckpt.all_steps() == [3, 4]
        ckpt.save(5, _big_state(5))  # the rerun epoch saves its step again
    assert all_steps(tmp_path) == [3, 4, 5]
    assert (tmp_path / "step_5.damaged-0").is_dir()  # kept for a look, never listed


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_only_step_damaged_starts_over(tmp_path, capsys, damage):
    save(tmp_path, 0, _big_state(0))
    damage(tmp_path / "step_0")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(_big_state(1)) is None
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"warning: checkpoint {tmp_path.absolute()}/step_0 is unreadable (")
        assert line.endswith("; no readable checkpoint, starting this run over")
        assert ckpt.latest_step() is None
        ckpt.save(0, _big_state(2))
    _assert_same(restore(tmp_path, _big_state(1))[0], _big_state(2))


def test_restore_latest_of_intact_steps_and_what_it_refuses(tmp_path, capsys):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(_state(0)) is None  # a new run
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
        step, tree = ckpt.restore_latest(_state(0))
        assert step == 2
        _assert_same(tree, _state(2))
        # A readable step of other shapes: the target is wrong, nothing is moved aside.
        with pytest.raises(ValueError, match="shape"):
            ckpt.restore_latest({**_state(0), "weights": np.zeros(8, np.float32)})
        assert ckpt.all_steps() == [1, 2]
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="writable"):
        Checkpointer(tmp_path, read_only=True).restore_latest(_state(0))


def test_restore_latest_drops_the_snapshots_of_epochs_it_reruns(tmp_path):
    params = {"w": np.ones(3, np.float32)}
    with Checkpointer(tmp_path) as ckpt:
        for epoch in range(3):  # the epoch's snapshot, then the step after it
            ckpt.save_snapshot(epoch, params)
            ckpt.save(epoch + 1, {"a": np.full(2, epoch, np.float32)})
    shutil.rmtree(tmp_path / "step_3" / "state")
    with Checkpointer(tmp_path) as ckpt:
        step, _ = ckpt.restore_latest({"a": np.zeros(2, np.float32)})
        assert step == 2 and sorted(ckpt.snapshots()) == [0, 1]
        ckpt.save_snapshot(2, params)  # epoch 2 runs again
        ckpt.save(3, {"a": np.full(2, 2, np.float32)})
    assert sorted(Checkpointer(tmp_path).snapshots()) == [0, 1, 2]


def test_jsonl_round_trip_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "results" / "rows.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"seed": 0, "acc": np.float32(0.5), "idx": np.arange(3)})
    append_jsonl(path, {"seed": 1, "acc": 0.75})
    # A crash in the middle of a write: the line has no newline yet.
    with open(path, "ab") as f:
        f.write(b'{"seed": 2, "ac')
    assert read_jsonl(path) == [
        {"seed": 0, "acc": 0.5, "idx": [0, 1, 2]},
        {"seed": 1, "acc": 0.75},
    ]
    # The next append cuts the fragment off instead of gluing itself to it.
    append_jsonl(path, {"seed": 2, "acc": 1.0})
    assert [r["seed"] for r in read_jsonl(path)] == [0, 1, 2]
    assert path.read_bytes().endswith(b'{"seed": 2, "acc": 1.0}\n')

    # A fragment-only file (crash during the very first write) reads as empty.
    lone = tmp_path / "lone.jsonl"
    lone.write_bytes(b'{"se')
    assert read_jsonl(lone) == []
    append_jsonl(lone, {"seed": 0})
    assert read_jsonl(lone) == [{"seed": 0}]

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_bytes(b'{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="corrupt.jsonl:2"):
        read_jsonl(corrupt)
    with pytest.raises(TypeError, match="row"):
        append_jsonl(path, [1, 2])


def test_write_text_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "tables" / "table.md"
    write_text_atomic(path, "| a |\n")
    write_text_atomic(path, "| b |\n|---|\n")
    assert path.read_text() == "| b |\n|---|\n"
    assert os.listdir(path.parent) == ["table.md"]

    # A failing write leaves the old file intact and no temporary file behind.
    with pytest.raises(TypeError):
        write_text_atomic(path, 123)
    assert path.read_text() == "| b |\n|---|\n"
    assert os.listdir(path.parent) == ["table.md"]


def test_train_meta_resumes_past_a_damaged_last_epoch(tmp_path, capsys):
    from experiments import pipeline
    from experiments.presets import PRESETS

    cfg = PRESETS["smoke"].config
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)

    def train(folder):
        return pipeline.train_meta(problem, model, cfg, jax.random.PRNGKey(0), meta_indices=None,
                                   epochs=3, ckpt_dir=str(folder), keep_snapshots=True)

    clean = train(tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "damaged")
    _truncate_largest(tmp_path / "damaged" / "step_3")
    capsys.readouterr()
    resumed = train(tmp_path / "damaged")  # reruns epoch 2, and its snapshot
    assert "is unreadable" in capsys.readouterr().err
    assert resumed[:3] == clean[:3]  # best epoch, validation and test accuracy
    _assert_same(resumed.best_params, clean.best_params)
    assert all_steps(tmp_path / "damaged") == [1, 2, 3]
    snapshots = pipeline.load_snapshots(resumed)
    assert sorted(snapshots) == [0, 1, 2]
    _assert_same(snapshots[2], pipeline.load_snapshots(clean)[2])
