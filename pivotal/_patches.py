"""Per-example gradients with convolution kernels' gradients as patch x output-gradient products.

Under ``vmap(grad(f))`` a convolution kernel's per-example gradient becomes a grouped
convolution (one group per example), which some backends run slowly (on XLA:CPU with jax
0.10.2 the two paths measure level for LeNet-5: README, "Benchmarks"). For a kernel ``W`` used by one
convolution ``y = conv(x, W)`` (one feature group), example ``j``'s gradient is

    dL_j/dW[o, i, s] = sum_p  dL_j/dy[o, p] * patch(x_j)[i, s, p],

the products of the input's patches (strided slices of the padded input) and the output
gradient, summed over the output positions ``p``. So :func:`per_example_leaf_grads` traces
the one-example loss to a jaxpr, leaves such kernels out of the differentiated arguments,
adds a zero *probe* to each of their convolutions' outputs (its gradient is ``dL_j/dy``) and
records the convolutions' inputs; ``vmap(grad)`` then forms every other leaf's per-example
gradient and the probes' in one batched forward and backward pass without grouped
convolutions, and one batched contraction per kernel gives the kernels' gradients. A kernel
used anywhere else, or by a grouped or batch-grouped convolution, keeps ``vmap(grad)``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal

PyTree = Any


class _Conv(NamedTuple):
    eqn_index: int  # the convolution's equation in the jaxpr
    leaf: int  # the kernel's position among the leaves
    params: dict  # the equation's parameters


def _patched_convs(jaxpr, num_leaves: int) -> list[_Conv]:
    """The kernels among the first ``num_leaves`` invars used once, as an ungrouped conv's rhs."""
    uses: dict = {}
    for k, eqn in enumerate(jaxpr.eqns):
        for slot, var in enumerate(eqn.invars):
            if not isinstance(var, Literal):
                uses.setdefault(var, []).append((k, slot))
    outs = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    convs = []
    for leaf, var in enumerate(jaxpr.invars[:num_leaves]):
        if var in outs or len(uses.get(var, ())) != 1:
            continue
        k, slot = uses[var][0]
        eqn = jaxpr.eqns[k]
        if eqn.primitive is not lax.conv_general_dilated_p or slot != 1:
            continue
        p = eqn.params
        lhs_spec = p["dimension_numbers"].lhs_spec
        if (p["feature_group_count"] != 1 or p["batch_group_count"] != 1
                or eqn.invars[0].aval.shape[lhs_spec[0]] != 1):
            continue
        convs.append(_Conv(k, leaf, p))
    return convs


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _probed_eval(jaxpr, consts, args, convs: list[_Conv], probes):
    """The jaxpr's outputs with ``probes[c]`` added to conv ``c``'s output, and those convs'
    inputs."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    probe_of = {c.eqn_index: (c, probe) for c, probe in zip(convs, probes)}
    inputs = []
    for k, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outvals = _bind(eqn, invals)
        if k in probe_of:
            inputs.append(invals[0])
            outvals = [outvals[0] + probe_of[k][1]]
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars], inputs


def _unbatched_canonical(x, spec):
    """``(B, *one)`` (the vmapped axis, then one example's array with its size-1 batch axis at
    ``spec[0]``) -> ``(B, features, *spatial)``, the axes ``spec[1:]``."""
    x = jnp.take(x, 0, axis=1 + spec[0])
    rest = lambda a: a - (a > spec[0])
    return jnp.transpose(x, (0,) + tuple(1 + rest(a) for a in spec[1:]))


def _patches(x, conv: _Conv, filter_shape, out_spatial):
    """``(B, I * prod(filter), prod(out_spatial))``: the input's patches, ``(i, s)`` C-major, as
    strided slices of the padded input (no convolution: moving the data is all it takes)."""
    p = conv.params
    if any(d != 1 for d in p["lhs_dilation"]):  # transposed convolutions: XLA's patches
        patches = lax.conv_general_dilated_patches(
            x, filter_shape, p["window_strides"], p["padding"], p["lhs_dilation"],
            p["rhs_dilation"], precision=p["precision"])
        return patches.reshape(patches.shape[:2] + (-1,))
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(x, zero, ((0, 0, 0), (0, 0, 0)) + tuple((lo, hi, 0) for lo, hi in p["padding"]))
    slices = []
    for offset in np.ndindex(*filter_shape):
        start = [0, 0] + [s * d for s, d in zip(offset, p["rhs_dilation"])]
        limit = x.shape[:2] + tuple(st + (n - 1) * w + 1 for st, n, w in
                                    zip(start[2:], out_spatial, p["window_strides"]))
        slices.append(lax.slice(x, start, limit, (1, 1) + tuple(p["window_strides"])))
    b, i = x.shape[:2]
    return jnp.stack(slices, axis=2).reshape(b, i * len(slices), -1)


def _kernel_grads(conv: _Conv, kernel_shape, x, g):
    """``(B, *kernel_shape)``: ``sum_p dL_j/dy[o, p] patch(x_j)[i, s, p]`` in the kernel's
    layout, from the conv's per-example inputs ``x`` and output gradients ``g``."""
    dn = conv.params["dimension_numbers"]
    x = _unbatched_canonical(x, dn.lhs_spec)  # (B, I, *spatial_in)
    g = _unbatched_canonical(g, dn.out_spec)  # (B, O, *spatial_out)
    filter_shape = tuple(kernel_shape[a] for a in dn.rhs_spec[2:])
    patches = _patches(x, conv, filter_shape, g.shape[2:])
    b, o = g.shape[:2]
    grads = jnp.einsum("bkp,bop->bok", patches, g.reshape(b, o, -1),
                       precision=conv.params["precision"])
    grads = grads.reshape((b, o, x.shape[1]) + filter_shape)  # canonical O, I, spatial
    return jnp.transpose(grads, (0,) + tuple(1 + int(a) for a in np.argsort(dn.rhs_spec)))


def per_example_leaf_grads(loss_one: Callable, leaves: tuple, chunk: PyTree) -> tuple:
    """``vmap(grad(loss_one), in_axes=(None, 0))(leaves, chunk)``, the kernels of ungrouped
    convolutions as patch x output-gradient products (module docstring): the same gradients up
    to float rounding. ``loss_one(leaves, example) -> scalar``; ``leaves`` a tuple of arrays."""
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), chunk)
    closed = jax.make_jaxpr(loss_one)(leaves, example)
    convs = _patched_convs(closed.jaxpr, len(leaves))
    if not convs:
        return jax.vmap(jax.grad(loss_one), in_axes=(None, 0))(leaves, chunk)
    patched = {c.leaf for c in convs}
    others = tuple(i for i in range(len(leaves)) if i not in patched)

    def probed(other, probes, example):
        args = list(leaves)
        for i, value in zip(others, other):
            args[i] = value
        outs, inputs = _probed_eval(closed.jaxpr, closed.consts,
                                    args + jax.tree_util.tree_leaves(example), convs, probes)
        return outs[0], inputs

    b = jax.tree_util.tree_leaves(chunk)[0].shape[0]
    probes = [jnp.zeros((b,) + closed.jaxpr.eqns[c.eqn_index].outvars[0].aval.shape,
                        closed.jaxpr.eqns[c.eqn_index].outvars[0].aval.dtype) for c in convs]
    (g_other, g_probes), inputs = jax.vmap(jax.grad(probed, argnums=(0, 1), has_aux=True),
                                           in_axes=(None, 0, 0))(
        tuple(leaves[i] for i in others), probes, chunk)
    grads = dict(zip(others, g_other))
    for c, x, g in zip(convs, inputs, g_probes):
        grads[c.leaf] = _kernel_grads(c, leaves[c.leaf].shape, x, g).astype(leaves[c.leaf].dtype)
    return tuple(grads[i] for i in range(len(leaves)))
