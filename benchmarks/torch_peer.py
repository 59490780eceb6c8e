"""Peer comparison against PyTorch on one device: LeNet-5 per-sample gradients and a meta step.

    python -m benchmarks.torch_peer --out DIR [--batch 256] [--repeats 20]

Same model (the paper's LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, fc 256-120-84-10), same
batch, random 28x28 inputs (timings do not depend on the pixel values), on the default JAX
device and on ``cuda`` when PyTorch sees one (else its CPU). PyTorch's side:

* per-sample gradients: ``torch.func.vmap(torch.func.grad(loss_of_one))`` over the batch;
* the meta step in the official code's style (Learning-to-Reweight / the paper's repository):
  per-example weights ``eps = 0`` with ``requires_grad``, the weighted loss's gradient with
  ``create_graph=True``, the SGD lookahead parameters, the meta loss on the meta batch through
  ``torch.func.functional_call``, ``d meta / d eps``, clamped and normalised weights, then the
  real weighted step; and the plain step (mean loss, backward, SGD).

Ours: ``pivotal.per_example_grads`` (one chunk of the whole batch) and ``make_meta_step``'s
``step`` / ``plain_step``. Writes ``DIR/torch_peer.json``; PyTorch absent: its entries are null.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.common import init_model, time_call


def _torch_timer(torch, device):
    def timed(fn, repeats):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {"median_s": statistics.median(times), "times_s": times}
    return timed


def _torch_lenet(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84),
        nn.ReLU(), nn.Linear(84, 10))


def torch_side(batch: int, meta: int, repeats: int) -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    from torch.func import functional_call, grad, vmap

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _torch_lenet(torch).to(device)
    F = torch.nn.functional
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    xm, ym = x[:meta].clone(), y[:meta].clone()
    params = {k: v.detach() for k, v in model.named_parameters()}
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def meta_step():
        eps = torch.zeros(batch, device=device, requires_grad=True)
        live = dict(model.named_parameters())
        losses = F.cross_entropy(functional_call(model, live, (x,)), y, reduction="none")
        grads = torch.autograd.grad((eps * losses).sum(), list(live.values()), create_graph=True)
        fast = {k: v - lr * g for (k, v), g in zip(live.items(), grads)}
        meta_loss = F.cross_entropy(functional_call(model, fast, (xm,)), ym)
        (grad_eps,) = torch.autograd.grad(meta_loss, eps)
        w = torch.clamp(-grad_eps, min=0)
        w = w / torch.clamp(w.sum(), min=1e-12)
        opt.zero_grad()
        (w.detach() * F.cross_entropy(model(x), y, reduction="none")).sum().backward()
        opt.step()

    def plain_step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    timed = _torch_timer(torch, device)
    return {"device": str(device), "torch_version": torch.__version__,
            "per_sample_grads": timed(lambda: per_sample(params, x, y), repeats),
            "meta_step": timed(meta_step, repeats), "plain_step": timed(plain_step, repeats)}


def jax_side(batch: int, meta: int, repeats: int) -> dict:
    from experiments.models import cross_entropy_loss_fn, frozen_loss_fn
    from pivotal import direct_weights, make_meta_step, per_example_grads

    module, _, params, _ = init_model("lenet5", (28, 28, 1))
    k1, k2 = jax.random.split(jax.random.key(0))
    data = {"x": jax.random.normal(k1, (batch, 28, 28, 1)),
            "y": jax.random.randint(k2, (batch,), 0, 10), "index": jnp.arange(batch)}
    meta_set = {"x": data["x"][:meta], "y": data["y"][:meta]}
    loss = frozen_loss_fn(module, None)
    trainer = make_meta_step(cross_entropy_loss_fn(module, False),
                             direct_weights(weight_lr=batch / 0.1), learning_rate=0.1)
    state = trainer.init(params, jax.random.key(1), num_examples=batch)
    key = jax.random.key(2)
    return {"device": str(jax.devices()[0]), "jax_version": jax.__version__,
            "per_sample_grads": time_call(lambda: per_example_grads(
                loss, params, {"x": data["x"], "y": data["y"]}, chunk_size=batch), repeats=repeats),
            "meta_step": time_call(lambda: trainer.step(state, data, meta_set, key), repeats=repeats),
            "plain_step": time_call(lambda: trainer.plain_step(state, data), repeats=repeats)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--meta", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    ours = jax_side(args.batch, args.meta, args.repeats)
    peer = torch_side(args.batch, args.meta, args.repeats)
    out = {"batch": args.batch, "meta_set": args.meta, "ours": ours, "torch": peer,
           "torch_over_ours": None if peer is None else {
               k: peer[k]["median_s"] / ours[k]["median_s"]
               for k in ("per_sample_grads", "meta_step", "plain_step")}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "torch_peer.json").write_text(json.dumps(out, indent=2, default=float))
    for k, v in (out["torch_over_ours"] or {}).items():
        print(f"{k}: torch / ours = {v:.2f}")
    if peer is None:
        print("PyTorch is not installed here: only our side was timed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
