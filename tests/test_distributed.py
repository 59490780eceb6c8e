"""The multi-process flags of ``experiments.distributed`` (no process is started here: every case
either does nothing or fails validation before contacting a coordinator; the real two-process run
is ``tests/test_sharding.py::test_two_processes_match_one``)."""

import argparse

import pytest

from experiments import distributed


def parse(argv, monkeypatch=None, env=None):
    if monkeypatch is not None:
        for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
    return distributed.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_no_flags_is_a_single_process_run(monkeypatch):
    args = parse([], monkeypatch)
    assert (args.coordinator, args.num_processes, args.process_id) == (None, None, None)
    assert distributed.initialize_from_args(args) is False
    assert distributed.initialize_from_args(argparse.Namespace()) is False  # a parser without the flags


def test_defaults_come_from_the_environment(monkeypatch):
    args = parse([], monkeypatch, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                   "JAX_PROCESS_ID": "3"})
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", "4", "3")
    args = parse(["--process-id", "1"], monkeypatch, {"JAX_PROCESS_ID": "3"})
    assert args.process_id == "1"  # a flag beats its variable


@pytest.mark.parametrize("argv, match", [
    (["--coordinator", "localhost:1234"], "missing --num-processes, --process-id"),
    (["--num-processes", "2", "--process-id", "0"], "missing --coordinator"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", ":1234", "--num-processes", "2", "--process-id", "0"], "must name a host"),
    (["--coordinator", "localhost:0", "--num-processes", "2", "--process-id", "0"], r"port .* \[1, 65535\]"),
    (["--coordinator", "localhost:http", "--num-processes", "2", "--process-id", "0"], "port"),
    (["--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0"], "--num-processes must be"),
    (["--coordinator", "localhost:1234", "--num-processes", "two", "--process-id", "0"], "--num-processes must be"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "-1"], "--process-id must be"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], r"\[0, --num-processes=2\)"),
    (["--coordinator", "auto", "--num-processes", "2", "--process-id", "5"], r"\[0, --num-processes=2\)"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "0", "--init-timeout", "0"],
     "--init-timeout"),
])
def test_bad_values_raise_before_contacting_anyone(monkeypatch, argv, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize_from_args(parse(argv, monkeypatch))


def test_parse_coordinator():
    assert distributed.parse_coordinator("10.0.0.1:1234") == ("10.0.0.1", 1234)
    assert distributed.parse_coordinator("[::1]:8476") == ("[::1]", 8476)
    with pytest.raises(ValueError, match="must name a host"):
        distributed.parse_coordinator("[::1:8476")


def test_valid_flags_call_jax_distributed_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    argv = ["--coordinator", "127.0.0.1:5000", "--num-processes", "2", "--process-id", "1", "--init-timeout", "30"]
    assert distributed.initialize_from_args(parse(argv, monkeypatch)) is True
    assert calls == [dict(coordinator_address="127.0.0.1:5000", num_processes=2, process_id=1,
                          initialization_timeout=30)]
    calls.clear()
    assert distributed.initialize_from_args(parse(["--coordinator", "auto"], monkeypatch)) is True
    assert calls == [dict(num_processes=None, process_id=None, initialization_timeout=300)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_experiments_run_two_processes_match_one(tmp_path):
    # `python -m experiments.run` over 2 processes x 2 CPU devices (mesh data=4, one shared
    # --out: every process trains and checkpoints, process 0 writes the rows) gives the rows of
    # one process with 4 devices.
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    common = [sys.executable, "-m", "experiments.run", "--preset", "smoke", "--methods",
              "random,rbc", "--epochs", "1", "--seeds", "1", "--mesh", "data=4"]
    port = _free_port()
    procs = [subprocess.Popen(common + ["--out", str(tmp_path / "multi"), "--coordinator",
                                        f"localhost:{port}", "--num-processes", "2",
                                        "--process-id", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    single_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    subprocess.run(common + ["--out", str(tmp_path / "single")], env=single_env, check=True,
                   capture_output=True, timeout=900)

    def rows(name):
        with open(tmp_path / name / "results.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]

    multi, single = rows("multi"), rows("single")
    assert [r["method"] for r in multi] == [r["method"] for r in single] == ["random", "rbc"]
    for a, b in zip(multi, single):
        assert a["meta_indices"] == b["meta_indices"]
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        assert a["weight_auc"] == pytest.approx(b["weight_auc"], rel=1e-5)
