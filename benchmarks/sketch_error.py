"""How much GBC's per-layer sketch distorts the inner products K-means clusters on, at the widths
the pipeline's feature budget picks: ``python3 -m benchmarks.sketch_error [--n 4000] [--out F]``.

LeNet-5 on MNIST-5k after 40 plain SGD steps (the benchmark's last snapshot), one GBC
layer draw (5 layers), the exact features ``G`` and the sketched ones ``S`` from the same draw
for each ``sketch_dim``; over random pairs of examples it reports the mean and 95th percentile
of ``|<S_i, S_j> - <G_i, G_j>| / (|G_i| |G_j|)`` (over 3 sketch keys) and of the cosine error
``|cos(S_i, S_j) - cos(G_i, G_j)|``, and each example's nearest neighbour by ``|cos|`` (the
K-means similarity) kept under the sketch, on a subsample.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import init_model
from benchmarks.config import CONFIGS, log
from benchmarks.features import _snapshots

SKETCH_DIMS = (256, 512, 1024, 4096)  # 512: the fashion preset's width (3 GB budget)


def _normalised(X):
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(n > 0, n, 1)


def measure(n: int, pairs: int = 20000, neighbours: int = 1000, seed: int = 0, sketch_keys: int = 3) -> dict:
    from experiments.datasets import load_dataset
    from pivotal import gbc_features, label_free_loss

    ds = load_dataset("mnist5k")
    module, _, params0, _ = init_model("lenet5", ds.input_shape)
    params = _snapshots(CONFIGS["full"], ds, module, params0)[-1]
    batch = {"x": jnp.asarray(ds.x_train[:n])}
    loss = lambda p, b: label_free_loss(module.apply({"params": p}, b["x"]))
    key = jax.random.key(seed)
    G = np.asarray(gbc_features(loss, params, batch, key, num_layers=5, chunk_size=16), np.float64)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    norms = np.linalg.norm(G, axis=1)
    exact_ip = np.einsum("pd,pd->p", G[i], G[j])
    exact_cos = exact_ip / np.maximum(norms[i] * norms[j], 1e-30)
    sub = rng.choice(n, min(neighbours, n), replace=False)
    Gn = _normalised(G[sub])
    exact_nn = np.argmax(np.abs(Gn @ Gn.T) - 2 * np.eye(sub.size), axis=1)
    rows = []
    for k in SKETCH_DIMS:
        ip_err, cos_err, kept = [], [], []
        for s in range(sketch_keys):  # the projections' draw varies the error: average a few
            S = np.asarray(gbc_features(loss, params, batch, key, num_layers=5, chunk_size=16, sketch_dim=k,
                                        sketch_key=jax.random.key(100 + s)), np.float64)
            s_norms = np.linalg.norm(S, axis=1)
            ip = np.einsum("pd,pd->p", S[i], S[j])
            ip_err.append(np.abs(ip - exact_ip) / np.maximum(norms[i] * norms[j], 1e-30))
            cos_err.append(np.abs(ip / np.maximum(s_norms[i] * s_norms[j], 1e-30) - exact_cos))
            Sn = _normalised(S[sub])
            kept.append(np.mean(np.argmax(np.abs(Sn @ Sn.T) - 2 * np.eye(sub.size), axis=1) == exact_nn))
        ip_err, cos_err = np.concatenate(ip_err), np.concatenate(cos_err)
        rows.append({"sketch_dim": k, "columns": int(S.shape[1]),
                     "ip_error_mean": float(ip_err.mean()), "ip_error_p95": float(np.quantile(ip_err, 0.95)),
                     "cos_error_mean": float(cos_err.mean()), "cos_error_p95": float(np.quantile(cos_err, 0.95)),
                     "nearest_neighbour_kept": float(np.mean(kept))})
        log(f"sketch_dim {k}: {rows[-1]}")
    return {"n": n, "exact_columns": int(G.shape[1]), "pairs": int(i.size), "neighbour_sample": int(sub.size),
            "sketch_keys": sketch_keys, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.sketch_error", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="examples of MNIST-5k's training split")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if not 2 <= args.n <= 4000:
        p.error(f"--n must be between 2 and 4000 (MNIST-5k's training split); got {args.n}")
    result = measure(args.n)
    print(f"GBC sketch on LeNet-5, N={result['n']}, exact {result['exact_columns']} columns:")
    print("| sketch_dim | columns | inner-product error mean / p95 | cosine error mean / p95 | "
          "nearest neighbour kept |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['sketch_dim']} | {r['columns']} | {r['ip_error_mean']:.4f} / {r['ip_error_p95']:.4f} | "
              f"{r['cos_error_mean']:.4f} / {r['cos_error_p95']:.4f} | {r['nearest_neighbour_kept']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
