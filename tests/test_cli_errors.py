"""Bad input on the command line: one ``error:`` line, exit 2, before any training; one run per
``--out`` (the folder lock); results.jsonl rows checked and counted once; diverging runs."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from experiments import checkpoint, lock, report, results, run

SMOKE = ["--preset", "smoke"]


def _main(argv, capsys):
    start = time.perf_counter()
    code = run.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], time.perf_counter() - start


@pytest.mark.parametrize("argv, match", [
    (["--budget", "100000", "--warmup", "10", "--methods", "random"], "--budget 100000 must be"),
    (["--dataset", "toy", "--model", "lenet5"], "--model lenet5 does not fit --dataset toy"),
    (["--methods", "ta-vaal", "--warmup", "0"], "ta-vaal .* needs a warm-up"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--weight-lr", "inf"], "--weight-lr must be a finite number"),
    (["--weight-lr", "0"], "--weight-lr must be positive"),
    (["--rate", "nan"], "--rate must be a finite number"),
    (["--imbalance", "inf"], "--imbalance must be a finite number"),
    (["--noise", "none", "--rate", "0.6"], "--rate 0.6 needs a noise model"),
    (["--noise", "uniform", "--noise-file", "x.npy"], "--noise-file and --noise-key go with"),
    (["--noise", "file"], "needs noise_file \\(--noise-file\\)"),
    (["--noise", "file", "--noise-file", "/no/such/labels.npy"], "label file not found"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--budget", "0"], "--budget must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--rounds", "0"], "--rounds must be an integer >= 1"),
    (["--methods", "random,random"], "--methods names random more than once"),
    (["--methods", "rbc,gbc,rbc,gbc"], "--methods names gbc, rbc more than once"),
    (["--dataset", "cifar10", "--model", "mlp"], "--dataset cifar10: .*tfds"),
    (["--mesh", "data=99"], "mesh must be in"),
    (["--meta-gradient", "second_order"], "--meta-gradient must be one of \\['exact', "
                                          "'first_order'\\]"),
])
def test_bad_flags_are_one_error_line_before_training(argv, match, capsys, tmp_path):
    out = tmp_path / "out"
    argv = SMOKE + argv + ["--out", str(out), "--data-dir", str(tmp_path / "nodata")]
    code, lines, seconds = _main(argv, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(match, lines[0]), lines[0]
    # Nothing trained, nothing written, the lock released.
    assert not out.exists() or sorted(p.name for p in out.iterdir()) in ([], [".lock.guard"])
    assert seconds < 30


def test_noise_none_without_rate_records_rate_zero(tmp_path):
    args = run.parse_args(SMOKE + ["--noise", "none", "--out", str(tmp_path)])
    cfg, _, _ = run.resolve(args)
    assert cfg.noise == "none" and cfg.rate == 0.0


def test_noise_file_flags_reach_the_config(tmp_path):
    args = run.parse_args(SMOKE + ["--noise", "file", "--noise-file", "labels.npz",
                                   "--noise-key", "worse_label", "--out", str(tmp_path)])
    cfg, _, _ = run.resolve(args)
    assert (cfg.noise_file, cfg.noise_file_key) == ("labels.npz", "worse_label")


def test_meta_gradient_flag_reaches_the_trainer(tmp_path):
    from experiments import training
    args = run.parse_args(SMOKE + ["--meta-gradient", "first_order", "--out", str(tmp_path)])
    cfg, _, _ = run.resolve(args)
    assert cfg.meta_gradient == "first_order"
    exact, _, _ = run.resolve(run.parse_args(SMOKE + ["--out", str(tmp_path)]))
    assert exact.meta_gradient == "exact"

    class _Model:  # what training._trainer reads of a model
        loss_fn = staticmethod(lambda params, batch: (params["w"] * batch["x"]).sum(-1))
        has_state = False
        trainers = {}

    from experiments.config import RULES
    first = training._trainer(_Model, RULES["direct"](cfg), cfg, 4)
    plain = training._trainer(_Model, RULES["direct"](exact), exact, 4)
    assert first is not plain and len(_Model.trainers) == 2


# ----------------------------------------------------------------------------- results rows


def _row(method="random", seed=0, cid="abc", acc=0.5, **extra):
    return {"method": method, "seed": seed, "config_id": cid, "test_accuracy": acc,
            "weight_auc": 0.7, "selection_seconds": 0.0, "train_seconds": 1.0, **extra}


@pytest.mark.parametrize("line, match", [
    (b"[1, 2, 3]", "expected a JSON object .* got a JSON list"),
    (json.dumps({"seed": 0, "config_id": "c", "test_accuracy": 0.5}).encode(), "no 'method'"),
    (json.dumps(_row(acc="oops")).encode(), "'test_accuracy' must be a number"),
    (json.dumps(_row(acc=1.5)).encode(), "'test_accuracy' must be a number in \\[0, 1\\]"),
    (json.dumps(_row(seed="0")).encode(), "'seed' must be an integer"),
    (json.dumps(_row(weight_auc="x")).encode(), "'weight_auc' must be a number or null"),
    (b"\xff\xfe\x00garbage\x81", "not UTF-8"),
    (b"{not json", "malformed JSON"),
])
def test_malformed_result_rows_name_file_and_line(line, match, capsys, tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(json.dumps(_row()).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match=match) as info:
        results.load_rows(path)
    assert str(info.value).startswith(f"{path}:2: ")
    # On the command line: one error line before any training, the file untouched.
    before = path.read_bytes()
    code, lines, _ = _main(SMOKE + ["--out", str(tmp_path)], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}")
    assert path.read_bytes() == before
    assert not (tmp_path / "work").exists()


def test_repeated_rows_count_once(capsys, tmp_path):
    rows = [_row(seed=0, acc=0.5), _row(seed=0, acc=0.5), _row(seed=1, acc=0.9),
            _row(seed=0, cid="other", acc=0.1)]
    for r in rows:
        checkpoint.append_jsonl(tmp_path / "results.jsonl", r)
    kept = results.config_rows(str(tmp_path), "abc")
    assert [(r["seed"], r["test_accuracy"]) for r in kept] == [(0, 0.5), (1, 0.9)]
    assert "dropped 1 repeated row" in capsys.readouterr().err
    table = report.summarise(kept, ["random"])
    assert "| random | 2 | 70.00 ± 20.00 |" in table


# ----------------------------------------------------------------------------- the folder lock


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with lock.FolderLock(tmp_path, flag="--out") as held:
        assert held.owner and (tmp_path / ".lock").exists()
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid()
        with pytest.raises(lock.FolderInUse, match=f"--out .* in use by another run \\(pid "
                                                    f"{os.getpid()} on host"):
            lock.FolderLock(tmp_path, flag="--out").acquire()
    assert not (tmp_path / ".lock").exists()
    with lock.FolderLock(tmp_path):  # free again
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = {"host": lock.socket.gethostname(), "pid": int(dead.stdout), "start_time": "1",
              "started": "earlier", "command": "killed run", "group": None}
    (tmp_path / ".lock").write_text(json.dumps(holder))
    with lock.FolderLock(tmp_path, flag="--out") as held:
        assert held.owner
    assert "locked by a run that is gone" in capsys.readouterr().err
    # A reused pid (alive, but started at another time) is stale too.
    holder.update(pid=os.getpid(), start_time="0")
    (tmp_path / ".lock").write_text(json.dumps(holder))
    with lock.FolderLock(tmp_path) as held:
        assert held.owner


def test_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "group": None}))
    with pytest.raises(lock.FolderInUse, match="host elsewhere"):
        lock.FolderLock(tmp_path).acquire()


def test_processes_of_one_run_share_the_lock(tmp_path):
    group = "jax.distributed 10.0.0.1:1234 x2"
    with lock.FolderLock(tmp_path, group=group) as first:
        fellow = lock.FolderLock(tmp_path, group=group).acquire()
        assert first.owner and not fellow.owner
        fellow.release()  # a fellow never removes the owner's lock
        assert (tmp_path / ".lock").exists()
        with pytest.raises(lock.FolderInUse):
            lock.FolderLock(tmp_path, group="jax.distributed 10.0.0.2:1234 x2").acquire()
    assert not (tmp_path / ".lock").exists()


def test_second_run_on_the_same_out_exits_at_once(tmp_path):
    # A live holder: a process that sleeps while holding the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments import lock; "
         f"l = lock.FolderLock({str(tmp_path)!r}, flag='--out').acquire(); "
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "experiments.run", *SMOKE, "--out",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another run (pid {holder.pid}" in lines[0]
        assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "work").exists()
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_ends_in_one_line_and_writes_no_row(capsys, tmp_path):
    code, lines, _ = _main(SMOKE + ["--lr", "1e6", "--methods", "random", "--out",
                                    str(tmp_path)], capsys)
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: method random, seed 0: warm-up diverged in epoch ")
    assert "smaller --lr" in lines[0]
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / ".lock").exists()


@pytest.mark.slow
def test_snapshot_fallback_warns_once_per_run(recwarn, tmp_path):
    # Smoke: 3 warm-up epochs, 2 snapshots asked: few epochs follow the best one.
    assert run.main(SMOKE + ["--methods", "rbc-k,rbc,gbc", "--out", str(tmp_path)]) == 0
    said = [w for w in recwarn if re.search("snapshots but only|no snapshot after",
                                            str(w.message))]
    rows = results.load_rows(tmp_path / "results.jsonl")
    assert all(len(r["snapshot_epochs"][0]) < 2 for r in rows)  # every method fell back
    assert len(said) == 1, [str(w.message) for w in said]
