"""What crosses devices and what each device holds when the example axis is sharded.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.sharding_memory

Compile-only (``jit(...).lower(...).compile()``, no data is allocated), so the numbers do not
depend on the machine's load: for one chunk step of ``per_example_grads`` and for one whole run of
``weighted_spherical_kmeans``, the per-device memory XLA plans for the arguments (inputs and the
donated output buffer) and for scratch (``temp_size_in_bytes``), and the collectives in the
compiled program, single device versus example-sharded over all devices. Prints a Markdown table.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from pivotal import grads as F
from pivotal import kmeans as K
from pivotal import sharding as S

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> str:
    counts = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES}
    return ", ".join(f"{n} {op}" for op, n in counts.items() if n) or "none"


def row(compiled) -> str:
    """``arguments | scratch | collectives`` of a compiled program (sizes per device)."""
    memory = compiled.memory_analysis()
    return (f"{memory.argument_size_in_bytes / 2**20:.1f} MiB | {memory.temp_size_in_bytes / 2**20:.2f} MiB | "
            f"{collectives(compiled.as_text())}")


def mlp_params(dims=(784, 256, 10)):
    return {f"l{i}": {"kernel": jax.ShapeDtypeStruct((a, b), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((b,), jnp.float32)}
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}


def mlp_loss(p, b):
    h = b["x"]
    for i in range(len(p)):
        h = h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        h = jnp.tanh(h) if i < len(p) - 1 else h
    return jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, b["y"][:, None], 1)[:, 0]


def grads_step(n: int, chunk: int, mesh, per_shard: bool):
    """Compiled chunk step of per_example_grads for N examples (MLP 784-256-10, 203k parameters).

    ``mesh``: None for one device, else the batch is example-sharded over it and the step runs
    per shard (``per_shard``, what ``per_example_grads`` does now) or as one program over the
    sharded batch (what it did before: XLA gathers the rows of the chunk).
    """
    rows = None if mesh is None else S.example_sharding(mesh)
    whole = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=whole), mlp_params())
    batch = {"x": jax.ShapeDtypeStruct((n, 784), jnp.float32, sharding=rows),
             "y": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows)}
    out = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct((n,) + s.shape, s.dtype, sharding=rows), params)
    placement = (mesh, "data") if mesh is not None and per_shard else None
    return F._grads_step.lower(out, np.int32(0), params, batch, mlp_loss, chunk, "vmap", placement).compile()


def kmeans_run(n: int, dim: int, m: int, placement):
    shards = 1 if placement is None else S.num_shards(placement)
    sharding = None if placement is None else S.example_sharding(*placement)
    G = jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=sharding)
    static = K._static_config(n, m, True, K.DEFAULT_BLOCK_SIZE, shard_rows=None if placement is None else n // shards)
    return K._kmeans_single.lower(G, jax.random.key(0), jnp.int32(m), jnp.int32(200), jnp.float32(1e-4),
                                  placement=placement, **static).compile()


def main() -> None:
    mesh = S.data_mesh()
    devices = mesh.size
    sharded = (mesh, "data")
    print(f"{devices} devices ({jax.devices()[0].platform})\n")
    print("| computation | N | layout | arguments per device | scratch per device | collectives |")
    print("|---|---|---|---|---|---|")
    chunk = 64
    for n in (4096, 65536):
        for label, step_mesh, per_shard in (("1 device", None, False),
                                            (f"{devices} devices, chunk loop per shard", mesh, True),
                                            (f"{devices} devices, one program (before)", mesh, False)):
            compiled = grads_step(n, chunk, step_mesh, per_shard)
            print(f"| per_example_grads step (chunk {chunk}, MLP 203k params) | {n} | {label} | {row(compiled)} |")
    for n in (65536, 262144):
        for label, placement in (("1 device", None), (f"{devices} devices", sharded)):
            compiled = kmeans_run(n, 256, 50, placement)
            print(f"| weighted_spherical_kmeans (D 256, M 50) | {n} | {label} | {row(compiled)} |")


if __name__ == "__main__":
    main()
