"""What a benchmark run measures: the sizes of each mode (:data:`CONFIGS`) and the headline
targets (:data:`TARGETS`), as data. Every section module reads a :class:`Config`."""

from __future__ import annotations

import dataclasses
import sys
import time

# Headline ratio -> (comparison, target). Issue 17's targets; gbc_vs_loop_speedup is the GPU
# figure (on a CPU a jitted per-example loop is compute-bound, see the README).
TARGETS = {
    "meta_step_ratio": ("<=", 2.5),
    "first_order_meta_step_ratio": ("<=", 1.4),
    "gbc_over_rbc": ("<=", 3.5),
    "gbc_vs_loop_speedup": (">=", 50.0),
    "per_example_vs_batched": (">=", 0.7),
    "kmeans_over_faiss": ("<=", 0.6),
    "kmeans_over_sklearn": ("<=", 0.6),
}


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    # 1. meta step (exact, first-order, plain)
    meta_models: tuple[str, ...] = ("lenet5", "mlp")
    meta_batch: int = 256
    meta_set: int = 20
    meta_repeats: int = 20
    # 2-3. features
    feat_n: int = 4000
    feat_snapshots: int = 4
    feat_steps_between: int = 10
    gbc_chunk: int = 16  # fastest measured on XLA:CPU for LeNet-5 (pivotal.features.RECOMMENDED_CHUNK_SIZE)
    gbc_patches_chunk: int = 64  # strategy="patches" (no grouped convolutions: larger chunks pay)
    feat_repeats: int = 5
    feat_warmup_rounds: int = 1
    loop_examples: int = 300
    # 4. k-means: every method runs the iterations our plain Lloyd loop needs at km_tol
    km_n: int = 50_000
    km_dim: int = 640
    km_clusters: int = 50
    km_tol: float = 1e-4  # weighted_spherical_kmeans' default
    km_max_iters: int = 200
    km_repeats: int = 5
    km_large_n: int = 200_000  # reported too (one repeat); 0 = skip
    km_kpp: bool = True  # also time ours with its own k-means++ seeding
    # 5. scaling (subprocesses)
    scale_sizes: tuple[int, ...] = (10_000, 50_000, 200_000)
    scale_km_iters: int = 50
    scale_repeats: int = 2
    scale_gbc_chunk: int = 1024
    scale_dim: int = 640
    # 6. throughput: per_example_grads vs the batched forward + backward of the same batch
    lenet_n: int = 4096
    lenet_chunks: tuple[int, ...] = (1, 4, 8, 16, 32, 128, 512)
    lenet_strategies: tuple[str, ...] = ("vmap", "patches")
    resnet_n: int = 32
    resnet_chunks: tuple[int, ...] = (4, 16)
    thr_repeats: int = 5


CONFIGS = {
    "full": Config(mode="full"),
    "quick": Config(
        mode="quick", meta_repeats=10, feat_snapshots=2, feat_warmup_rounds=0,
        loop_examples=100, km_kpp=False, scale_sizes=(10_000, 50_000),
        scale_km_iters=20, scale_repeats=1, lenet_n=1024, lenet_chunks=(16, 64, 256), resnet_n=2,
        resnet_chunks=(2,),
    ),
    "tiny": Config(
        mode="tiny", meta_models=("mlp",), meta_batch=32, meta_set=4, meta_repeats=2,
        feat_n=64, feat_snapshots=1, feat_steps_between=1, gbc_chunk=32, gbc_patches_chunk=32,
        feat_repeats=1,
        loop_examples=4, km_n=600, km_dim=16, km_clusters=5, km_max_iters=5, km_repeats=1,
        km_large_n=1200, km_kpp=False, scale_sizes=(256, 512), scale_km_iters=3, scale_repeats=1,
        scale_gbc_chunk=64, scale_dim=16, lenet_n=16, lenet_chunks=(8,), resnet_n=0,
        resnet_chunks=(), thr_repeats=1,
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
