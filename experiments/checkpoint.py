"""Resumable runs: Orbax checkpoints of array pytrees + JSON metadata, and crash-safe files.

Layout written by :class:`Checkpointer` (Orbax ``CheckpointManager`` underneath)::

    directory/
      step_3/        state/ (the pytree: OCDBT + tensorstore)   meta/ (JSON metadata)
      step_4/        ...                       the last ``keep`` steps only
      snapshots/
        step_0/      snapshot/ ({"params", "model_state"})      every epoch, never pruned

Each ``step_N`` is written under a temporary name (``step_N.orbax-checkpoint-tmp-...``)
and renamed once complete, so a crash leaves either the whole checkpoint or no
``step_N`` at all; :func:`latest_step` lists only complete ones. A complete step whose
files were damaged later is found by :meth:`Checkpointer.restore_latest`, which resumes
from the newest readable one and renames the others ``step_N.damaged-K``.

Leaves must be arrays (jax or numpy) or scalars. Dtypes round-trip exactly, integers and
float64 numpy scalars included. Typed PRNG keys (``jax.random.key``) are refused: store
``jax.random.key_data(key)`` (a uint32 array) and rebuild the key with
``jax.random.wrap_key_data(data)`` after restoring. Legacy ``jax.random.PRNGKey`` keys
already are uint32 arrays.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
_STEP_PREFIX = "step"
_STEP_DIR = re.compile(rf"^{_STEP_PREFIX}_(\d+)$")
_SNAPSHOT_DIR = "snapshots"
_HOST_SCALARS = (np.generic, int, float, bool)
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a save still being written


class _ShapeMismatch(ValueError):
    """The checkpoint is readable but ``target_like`` has other shapes: the caller's error."""


def _to_host_array(path, leaf):
    if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"tree leaf {jax.tree_util.keystr(path)} is a typed PRNG key; save "
            "jax.random.key_data(key) and restore with jax.random.wrap_key_data"
        )
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    if isinstance(leaf, _HOST_SCALARS):
        # Orbax accepts arrays only; scalars are saved as 0-d arrays.
        return np.asarray(leaf)
    raise TypeError(
        f"tree leaf {jax.tree_util.keystr(path)} must be an array or a scalar; "
        f"got {type(leaf).__name__}"
    )


def _abstract(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        leaf = _to_host_array(path, leaf)
    # No sharding: restore onto the default device whatever device the target lives on.
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)


def _check_metadata(metadata):
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict; got {type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from None


def _steps(directory) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = (_STEP_DIR.match(p.name) for p in directory.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def all_steps(directory) -> list[int]:
    """Steps of the complete checkpoints under ``directory``, ascending ([] if none)."""
    return _steps(directory)


def latest_step(directory) -> int | None:
    """The newest complete checkpoint's step, or ``None`` when there is none."""
    steps = _steps(directory)
    return steps[-1] if steps else None


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's warnings that a directory opened read-only is read-only (we asked)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("read only" in message or "read_only=True" in message)


logging.getLogger("absl").addFilter(_ReadOnlyNotice())


def _remove_unfinished_saves(directory: Path) -> None:
    """Deletes the temporary folders that crashed saves left under ``directory``."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if _TMP_SUFFIX in path.name and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _manager(directory: Path, items, keep, read_only) -> ocp.CheckpointManager:
    if not read_only:
        # Leftovers of a crashed save would otherwise sit beside the real steps forever (a
        # reader leaves them: they may be a live writer's). Not Orbax's
        # cleanup_tmp_directories: it runs in a thread that only save() waits for, close()
        # does not, so a manager closed without saving (a refused save, a run already
        # finished) leaves it running, and it deletes the next manager's save in progress.
        # Here it is over before any save starts.
        _remove_unfinished_saves(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        step_prefix=_STEP_PREFIX,
        # A checkpoint must be on disk before the run moves on: a crash right after save()
        # must not lose it, and our saves are small next to an epoch.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=items)


def _match_target(target_like, restored):
    """Checks shapes and gives each leaf the kind of the target's leaf."""
    abstract = jax.tree_util.tree_map_with_path(_abstract, target_like)

    def match(path, want, got, like):
        # Orbax casts dtypes to the target's but does not check shapes.
        if np.shape(got) != want.shape:
            raise _ShapeMismatch(
                f"checkpoint leaf {jax.tree_util.keystr(path)} has shape {np.shape(got)}, "
                f"target_like has {want.shape}"
            )
        if isinstance(like, _HOST_SCALARS):
            return np.asarray(got, dtype=want.dtype)[()]  # a numpy scalar
        # 64-bit values stay on the host when jax_enable_x64 is off rather than be truncated.
        if isinstance(like, np.ndarray) or jax.dtypes.canonicalize_dtype(want.dtype) != want.dtype:
            return np.asarray(got, dtype=want.dtype)
        return jax.numpy.asarray(got, dtype=want.dtype)

    return jax.tree_util.tree_map_with_path(match, abstract, restored, target_like)


class Checkpointer:
    """Checkpoints of one run: ``directory/step_N`` (the last ``keep``) + parameter snapshots.

    Synchronous: :meth:`save` returns once the checkpoint is renamed into place.
    ``read_only=True`` opens a run for reading: nothing is created or removed.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, directory, *, keep: int | None = 3, read_only: bool = False):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None; got {keep!r}")
        self.directory = Path(directory).absolute()
        self._read_only = read_only
        self._manager = _manager(self.directory, ("state", "meta"), keep, read_only)
        self._snapshot_manager = None

    def save(self, step: int, tree: PyTree, metadata: Mapping[str, Any] | None = None) -> Path:
        """Writes ``tree`` and ``metadata`` to ``directory/step_{step}``, then drops the
        oldest steps beyond ``keep``; returns the new path. An existing step raises
        ``ValueError`` (nothing is overwritten)."""
        step = _check_step(step)
        metadata = {} if metadata is None else metadata
        _check_metadata(metadata)
        if step in self._manager.all_steps():
            raise ValueError(f"step {step} already exists under {self.directory}")
        tree = jax.tree_util.tree_map_with_path(_to_host_array, tree)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(dict(metadata))
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return self.directory / f"{_STEP_PREFIX}_{step}"

    def restore(self, step: int | None, target_like: PyTree) -> PyTree:
        """The tree saved at ``step`` (``None``: the latest), shaped like ``target_like``.

        ``target_like`` gives structure, shapes and dtypes (arrays, scalars or
        ``jax.ShapeDtypeStruct``s; NamedTuples stay NamedTuples). numpy arrays come back as
        numpy arrays, scalars as numpy scalars, the rest as jax arrays (numpy arrays for
        64-bit dtypes while ``jax_enable_x64`` is off). A shape that differs from the saved
        one raises ``ValueError``.
        """
        step = self._existing_step(step)
        abstract = jax.tree_util.tree_map_with_path(_abstract, target_like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return _match_target(target_like, restored["state"])

    def restore_latest(self, target_like: PyTree) -> tuple[int, PyTree] | None:
        """``(step, tree)`` of the newest readable step, or ``None`` when no step is readable
        (start the run over); see :meth:`restore` for ``target_like``.

        Steps that fail to read (truncated or garbage files, a missing ``state/`` or
        ``meta/``) are renamed ``step_N.damaged-K`` beside the others, so they are no longer
        listed and the run can save those steps again; one line on stderr says so. Snapshots
        of the epochs from the resumed step on are deleted: resuming reruns those epochs,
        which save them again. A shape that differs from a readable checkpoint's still raises
        ``ValueError``: then ``target_like`` is wrong, not the checkpoint.
        """
        if self._read_only:
            raise ValueError("restore_latest moves damaged steps aside; open the run writable")
        abstract = jax.tree_util.tree_map_with_path(_abstract, target_like)
        damaged, found = [], None
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                # meta/ too: a step whose metadata cannot be read is damaged as well.
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                found = step, _match_target(target_like, restored["state"])
                break
            except _ShapeMismatch:
                raise
            except Exception as e:  # whatever Orbax, tensorstore or json make of bad bytes
                damaged.append((step, e))
        if damaged:
            moved = [self._move_aside(step) for step, _ in damaged]
            self._manager.reload()
            names = ", ".join(f"{_STEP_PREFIX}_{s}" for s, _ in damaged)
            then = (f"resuming from {_STEP_PREFIX}_{found[0]}" if found is not None
                    else "no readable checkpoint, starting this run over")
            one = len(damaged) == 1
            print(f"warning: checkpoint{'' if one else 's'} {self.directory}/{names} "
                  f"{'is' if one else 'are'} unreadable "
                  f"({_short_reason(damaged[0][1])}), moved to "
                  f"{', '.join(moved)}; {then}", file=sys.stderr)
        self._drop_snapshots_from(0 if found is None else found[0])
        return found

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata saved with ``step`` (``None``: the latest)."""
        step = self._existing_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored["meta"] or {})

    def save_snapshot(self, epoch: int, params: PyTree, model_state: PyTree = None) -> Path:
        """Keeps ``(params, model_state)`` of ``epoch`` under ``directory/snapshots`` for
        good (selection draws snapshots from the epochs after the best-validation one)."""
        epoch = _check_step(epoch, "epoch")
        manager = self._snapshots_manager()
        if epoch in manager.all_steps():
            raise ValueError(f"snapshot {epoch} already exists under {self.directory}")
        tree = {"params": params, "model_state": model_state}
        tree = jax.tree_util.tree_map_with_path(_to_host_array, tree)
        manager.save(epoch, args=ocp.args.Composite(snapshot=ocp.args.StandardSave(tree)),
                     force=True)
        manager.wait_until_finished()
        return self.directory / _SNAPSHOT_DIR / f"{_STEP_PREFIX}_{epoch}"

    def snapshots(self) -> Mapping[int, tuple[PyTree, PyTree]]:
        """``{epoch: (params, model_state)}``; each entry is read from disk when accessed."""
        return _Snapshots(self.directory / _SNAPSHOT_DIR)

    def drop_snapshots(self, epochs) -> None:
        """Deletes the snapshots of ``epochs`` (those not on disk are ignored): a run that
        keeps a rolling set (:func:`pivotal.history.snapshots_to_keep`) drops the rest."""
        gone = sorted(set(int(e) for e in epochs) & set(_steps(self.directory / _SNAPSHOT_DIR)))
        if gone:
            manager = self._snapshots_manager()
            manager.reload()
            for e in gone:
                manager.delete(e)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def close(self) -> None:
        self._manager.close()
        if self._snapshot_manager is not None:
            self._snapshot_manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _existing_step(self, step):
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint under {self.directory}")
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory}")
        return step

    def _move_aside(self, step: int) -> str:
        path = self.directory / f"{_STEP_PREFIX}_{step}"
        k = 0
        while path.with_name(f"{path.name}.damaged-{k}").exists():
            k += 1
        target = path.with_name(f"{path.name}.damaged-{k}")
        path.rename(target)
        return target.name

    def _drop_snapshots_from(self, epoch: int) -> None:
        later = [e for e in _steps(self.directory / _SNAPSHOT_DIR) if e >= epoch]
        if later:
            manager = self._snapshots_manager()
            manager.reload()
            for e in later:
                manager.delete(e)

    def _snapshots_manager(self):
        if self._snapshot_manager is None:
            self._snapshot_manager = _manager(
                self.directory / _SNAPSHOT_DIR, ("snapshot",), None, self._read_only
            )
        return self._snapshot_manager


def _short_reason(error: Exception) -> str:
    # Tensorstore's messages run over many lines; the first one names the file and the fault.
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def _check_step(step, name="step") -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"{name} must be a non-negative int; got {step!r}")
    return int(step)


class _Snapshots(Mapping):
    """Read-only, lazy ``{epoch: (params, model_state)}`` over a snapshot directory."""

    def __init__(self, directory: Path):
        self._directory = directory
        self._epochs = _steps(directory)

    def __getitem__(self, epoch):
        if epoch not in self._epochs:
            raise KeyError(epoch)
        # No target: params are plain nested dicts, which is how Orbax restores them.
        with _manager(self._directory, ("snapshot",), None, read_only=True) as manager:
            tree = manager.restore(
                epoch, args=ocp.args.Composite(snapshot=ocp.args.StandardRestore())
            )["snapshot"]
        return tree["params"], tree["model_state"]

    def __iter__(self) -> Iterator[int]:
        return iter(self._epochs)

    def __len__(self) -> int:
        return len(self._epochs)


def save(directory, step: int, tree: PyTree, metadata=None, *, keep: int | None = 3) -> Path:
    """One-shot :meth:`Checkpointer.save`: writes ``directory/step_{step}``, keeps the last
    ``keep`` steps."""
    with Checkpointer(directory, keep=keep) as ckpt:
        return ckpt.save(step, tree, metadata)


def restore(directory, target_like: PyTree, *, step: int | None = None):
    """``(tree, metadata)`` of ``step`` (default: the latest) under ``directory``; see
    :meth:`Checkpointer.restore` for how ``target_like`` shapes the tree."""
    if latest_step(directory) is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    # Opening a run to read it must never delete anything.
    with Checkpointer(directory, keep=None, read_only=True) as ckpt:
        return ckpt.restore(step, target_like), ckpt.metadata(step)


def _json_default(obj):
    # Results rows often carry numpy / jax scalars and small arrays.
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"row value of type {type(obj).__name__} is not JSON-serialisable")


def append_jsonl(path, row: Mapping[str, Any]) -> None:
    """Appends ``row`` as one JSON line, durable on return.

    The line (newline included) goes out in a single ``write`` on an ``O_APPEND``
    descriptor and is ``fsync``-ed, so a crash leaves at most one partial last line. A
    partial last line left by an earlier crash is cut off first, so the rows before it
    and the new row stay readable. Meant for one writer per file.
    """
    if not isinstance(row, Mapping):
        raise TypeError(f"row must be a dict; got {type(row).__name__}")
    line = (json.dumps(row, default=_json_default) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, _end_of_last_line(fd, size))
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_of_last_line(fd: int, size: int, block: int = 1 << 16) -> int:
    """Offset just past the last newline of the file (0 when it has none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def read_jsonl(path, *, line_numbers: bool = False) -> list:
    """All complete rows of a JSON-lines file ([] when it does not exist).

    A last line without its newline is an interrupted :func:`append_jsonl` and is skipped;
    a malformed complete line (bad JSON, bytes that are not UTF-8) is corruption and raises
    ``ValueError`` naming the file and line. ``line_numbers=True``: ``(line, row)`` pairs.
    """
    path = Path(path)
    if not path.exists():
        return []
    *lines, _partial = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8 text (damaged?)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: malformed JSON line: {e}") from None
        rows.append((number, row) if line_numbers else row)
    return rows


def write_text_atomic(path, text: str) -> None:
    """Replaces ``path`` by ``text`` (UTF-8) atomically; see :func:`write_bytes_atomic`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, data: bytes) -> None:
    """Replaces ``path`` by ``data`` atomically: readers see the old or the new file whole.

    Writes a temporary file in the same directory (``os.replace`` is atomic only within
    one file system), fsyncs it, renames it over ``path``, then fsyncs the directory so
    the rename itself survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
