"""Flax Linen models used in the paper's experiments, and the glue the pipeline needs.

Every model follows one convention:

* ``module.apply(variables, x, train=False)`` returns logits ``(B, C)``;
* ``module.apply(variables, x, train=False, return_features=True)`` returns
  ``(h, logits)`` where ``h`` ``(B, D)`` is the input of the last linear layer;
* that last linear layer is the top-level submodule ``head``, so its kernel is
  ``params["head"]["kernel"]`` with shape ``(D, C)`` and ``logits = h @ kernel + bias``.
  RBC features (``pivotal.rbc_features``) rely on this.

Stateful models (ResNet-34, BatchNorm) keep their running statistics in a separate
``model_state`` dict, ``{"batch_stats": ...}``, never inside ``params``. The caller threads it
explicitly::

    loss_fn = cross_entropy_loss_fn(module, has_state=True)      # train mode
    losses, model_state = loss_fn(params, model_state, batch)    # new running statistics

In meta re-weighting, keep the ``new_model_state`` of the forward pass on the weighted
training batch and discard the one of the look-ahead / meta-batch pass, so the running
statistics see training data only. Library functions that see a model only as
``loss_fn(params, batch)`` (per-example gradients, GBC) should get
:func:`frozen_loss_fn`, which runs in eval mode with the state closed over: a train-mode
BatchNorm under ``vmap`` would normalise each example by its own statistics.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

Array = jax.Array
PyTree = Any

# PyTorch's defaults, so the ResNet matches the paper's code: its BN momentum 0.1 is an
# exponential-average factor of 0.9 in Flax's convention.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# He initialisation keeps activation variance steady through 30+ ReLU layers.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _as_float(x: Array) -> Array:
    # Datasets may hand over uint8 pixels; the models always compute in float32.
    return jnp.asarray(x, jnp.float32)


class MLP(nn.Module):
    """Fully connected ReLU network.

    Input ``(B, ...)`` is flattened to ``(B, F)``; ``h`` is the last hidden activation
    ``(B, hidden[-1])`` (or the flattened input when ``hidden`` is empty).
    """

    hidden: Sequence[int] = (100, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        del train  # no dropout or normalisation: train and eval modes agree
        h = _as_float(x).reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense{i}")(h))
        logits = nn.Dense(self.num_classes, name="head")(h)
        return (h, logits) if return_features else logits


def _band(kernel_width: int, width: int, dtype) -> np.ndarray:
    """``(kw, W, W - kw + 1)`` zeros with ``band[j, u + j, u] = 1``: kernel column ``j`` of
    output column ``u`` reads input column ``u + j``."""
    out_width = width - kernel_width + 1
    band = np.zeros((kernel_width, width, out_width), dtype)
    for j in range(kernel_width):
        band[j, np.arange(out_width) + j, np.arange(out_width)] = 1
    return band


def toeplitz_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    r"""``lax.conv_general_dilated`` for 2-D stride-1 convolutions, as one matrix product.

    A drop-in for ``nn.Conv(..., conv_general_dilated=toeplitz_conv)`` (same parameters,
    same function). With a VALID ``kh x kw`` kernel ``K`` (HWIO) and NHWC input ``x``, output
    row ``h`` is a sum over the kernel's rows of an input row times a banded (Toeplitz)
    matrix built from that kernel row:

    .. math::
        y[b, h, u, o] = \sum_{i, v, c} x[b, h + i, v, c]\, T[i, v, c, u, o],\qquad
        T[i, v, c, u, o] = K[i, v - u, c, o]\ (0 \le v - u < k_w;\ 0 \text{ otherwise})

    so the ``kh`` shifted row blocks of ``x``, side by side, times ``T`` reshaped to
    ``(kh W C, W' O)`` is the whole convolution. It does ``W / k_w`` times the multiply-adds
    of a direct convolution, but as one well-shaped GEMM whose gradients are GEMMs too; on
    XLA:CPU (jax 0.10) that trains LeNet-5 about 2.3x faster than ``lax`` convolutions, whose
    small-channel kernels and kernel gradients run far below the machine's matmul rate
    (``python3 -m benchmarks.run --only meta_step``). ``T`` is built from ``K`` with exact
    arithmetic (products with 0/1 at HIGHEST precision), so the result equals the direct
    convolution up to float summation order.

    Cases other than 2-D, unit strides and dilations, one feature group and NHWC/HWIO
    (Flax's layout) go to ``lax.conv_general_dilated`` unchanged.
    """
    args = (lhs, rhs, window_strides, padding)
    options = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                   precision=precision, **kwargs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    unit = lambda d: d is None or all(int(v) == 1 for v in d)
    if (lhs.ndim != 4 or kwargs or feature_group_count != 1 or not unit(window_strides)
            or not unit(lhs_dilation) or not unit(rhs_dilation)
            or tuple(dn) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))):
        return lax.conv_general_dilated(*args, **options)
    kh, kw, c, o = rhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (1, 1), padding)
    x = jnp.pad(lhs, ((0, 0), *[tuple(p) for p in padding], (0, 0)))
    b, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    t = jnp.einsum("jvu,ijco->ivcuo", _band(kw, w, rhs.dtype), rhs,
                   precision=lax.Precision.HIGHEST)
    rows = jnp.stack([x[:, i:i + oh] for i in range(kh)], axis=2)  # (B, H', kh, W, C)
    y = jnp.dot(rows.reshape(b * oh, kh * w * c), t.reshape(kh * w * c, ow * o),
                precision=precision)
    return y.reshape(b, oh, ow, o)


def _max_pool_2x2(x: Array) -> Array:
    """2x2/2 max-pooling of ``(B, H, W, C)`` (H, W even) as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, but its gradient is several
    times cheaper on XLA:CPU than the reduce-window backward (measured in the benchmarks).
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class LeNet5(nn.Module):
    """LeNet-5 as in the paper: conv 6@5x5, pool, conv 16@5x5, pool, fc 256-120-84-C.

    Input ``(B, 28, 28, 1)`` (or ``(B, 28, 28)``). VALID convolutions and 2x2 max-pooling
    give 28 -> 24 -> 12 -> 8 -> 4, hence the paper's 16 * 4 * 4 = 256 inputs of the first
    fully connected layer. ``h`` is ``(B, 84)``. The convolutions are Flax's ``nn.Conv``
    (its parameters and initialisation) computed by :func:`toeplitz_conv`.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        del train
        x = _as_float(x)
        if x.ndim == 3:
            x = x[..., None]
        conv = functools.partial(nn.Conv, padding="VALID", conv_general_dilated=toeplitz_conv)
        x = conv(6, (5, 5), name="conv1")(x)
        x = _max_pool_2x2(nn.relu(x))
        x = conv(16, (5, 5), name="conv2")(x)
        x = _max_pool_2x2(nn.relu(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        h = nn.relu(nn.Dense(84, name="fc2")(x))
        logits = nn.Dense(self.num_classes, name="head")(h)
        return (h, logits) if return_features else logits


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus a shortcut: ``(B, H, W, Cin) -> (B, H/s, W/s, filters)``."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=_BN_MOMENTUM,
            epsilon=_BN_EPSILON,
        )
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init)
        s = (self.strides, self.strides)
        y = conv(self.filters, (3, 3), s, padding=((1, 1), (1, 1)))(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
        y = norm()(y)
        if x.shape[-1] != self.filters or self.strides != 1:
            # Projection shortcut only where the shape changes (option B of He et al.).
            x = conv(self.filters, (1, 1), s, name="proj_conv")(x)
            x = norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, four stages of BasicBlocks.

    Input ``(B, H, W, 3)`` (32x32 for CIFAR); stage widths 64/128/256/512 with strides
    1/2/2/2; global average pooling gives ``h`` ``(B, 512)``.
    """

    stage_sizes: Sequence[int]
    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        x = nn.Conv(
            self.widths[0], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
            kernel_init=_conv_init, name="stem_conv",
        )(_as_float(x))
        x = nn.BatchNorm(
            use_running_average=not train, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(width, strides, name=f"stage{i + 1}_block{j + 1}")(x, train)
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="head")(h)
        return (h, logits) if return_features else logits


ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))


class ModelSpec(NamedTuple):
    """A registry entry: how to build the module and whether it carries ``model_state``."""

    factory: Callable[..., nn.Module]
    has_state: bool
    min_spatial: int  # smallest H (= W) the architecture accepts; 0 for flattening models


MODELS: Mapping[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, has_state=False, min_spatial=0),
    # 16 is the smallest side that survives conv5 -> pool2 -> conv5 -> pool2.
    "lenet5": ModelSpec(LeNet5, has_state=False, min_spatial=16),
    "resnet34": ModelSpec(ResNet34, has_state=True, min_spatial=1),
}


def make_model(name: str, num_classes: int, input_shape: Sequence[int], **kwargs):
    """Builds a registered model.

    Args:
      name: one of ``MODELS`` ('mlp', 'lenet5', 'resnet34').
      num_classes: C, the number of logits.
      input_shape: the shape of ONE example, without the batch axis, e.g. ``(28, 28, 1)``.
      **kwargs: extra module fields, e.g. ``hidden=(64, 64)`` for the MLP.

    Returns:
      ``(module, has_state)``; ``has_state`` says whether the loss and prediction
      functions take and return a ``model_state`` (BatchNorm statistics).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {sorted(MODELS)}; got {name!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
    input_shape = tuple(int(d) for d in input_shape)
    spec = MODELS[name]
    if spec.min_spatial:
        if len(input_shape) not in (2, 3):
            raise ValueError(
                f"input_shape for {name!r} must be (H, W) or (H, W, C); got {input_shape}"
            )
        if min(input_shape[:2]) < spec.min_spatial:
            raise ValueError(
                f"input_shape for {name!r} needs H, W >= {spec.min_spatial}; got {input_shape}"
            )
    return spec.factory(num_classes=int(num_classes), **kwargs), spec.has_state


def init_model(module: nn.Module, key: Array, input_shape: Sequence[int]):
    """Initialises ``module`` for examples of shape ``input_shape`` (no batch axis).

    Returns:
      ``(params, model_state)``; ``model_state`` is the dict of the non-parameter
      collections (``{"batch_stats": ...}`` for ResNet) or ``None`` when there are none.
    """
    dummy = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
    # Jitting the init traces the model once instead of dispatching ~100 ops eagerly.
    variables = jax.jit(functools.partial(module.init, train=False))(key, dummy)
    variables = dict(variables)
    params = variables.pop("params")
    return params, (variables or None)


def _variables(params: PyTree, model_state: Mapping[str, PyTree] | None) -> dict:
    return {"params": params, **(model_state or {})}


def cross_entropy_loss_fn(module: nn.Module, has_state: bool, *, train: bool = True):
    """Per-example cross-entropy for batches ``{"x": (B, ...), "y": (B,) int}``.

    Returns:
      stateless: ``loss_fn(params, batch) -> (B,)``;
      stateful: ``loss_fn(params, model_state, batch) -> ((B,), new_model_state)``, with
      batch statistics and updated running averages when ``train`` (the default) and the
      running averages, unchanged, otherwise.
    """
    if not has_state:

        def loss_fn(params, batch):
            logits = module.apply({"params": params}, batch["x"], train=train)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

        return loss_fn

    def stateful_loss_fn(params, model_state, batch):
        if not model_state:
            raise TypeError("model_state must be the dict init_model returned, e.g. batch_stats")
        variables = _variables(params, model_state)
        if train:
            logits, updates = module.apply(
                variables, batch["x"], train=True, mutable=list(model_state)
            )
            new_state = {**model_state, **updates}
        else:
            logits = module.apply(variables, batch["x"], train=False)
            new_state = model_state
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return losses, new_state

    return stateful_loss_fn


def frozen_loss_fn(module: nn.Module, model_state: Mapping[str, PyTree] | None):
    """Eval-mode ``loss_fn(params, batch) -> (B,)`` with ``model_state`` closed over.

    The form ``pivotal`` expects for per-example gradients and GBC features; valid for
    stateless models too (pass ``model_state=None``).
    """

    def loss_fn(params, batch):
        logits = module.apply(_variables(params, model_state), batch["x"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn


def predict_fn(module: nn.Module, has_state: bool):
    """Jitted ``(params, model_state, x (B, ...)) -> logits (B, C)`` in eval mode.

    ``model_state`` is ignored (pass ``None``) for stateless models; ``has_state`` is kept
    for symmetry with :func:`cross_entropy_loss_fn`.
    """
    del has_state  # eval mode reads the running averages and never writes them

    @jax.jit
    def predict(params, model_state, x):
        return module.apply(_variables(params, model_state), x, train=False)

    return predict


def features_fn(module: nn.Module, has_state: bool):
    """Jitted ``(params, model_state, x) -> (h (B, D), logits (B, C))`` in eval mode."""
    del has_state

    @jax.jit
    def features(params, model_state, x):
        return module.apply(
            _variables(params, model_state), x, train=False, return_features=True
        )

    return features


def margin_distance_fn(module: nn.Module, has_state: bool):
    """Jitted ``(params, model_state, x (B, ...)) -> (B,)`` distances to the decision boundary.

    The first-order margin of Elsayed et al. (2018): with ``i`` the predicted class and ``j``
    the runner-up, ``d = (z_i - z_j) / ||grad_x (z_i - z_j)||_2``, the distance from ``x`` to
    the linearised boundary between the two classes. (The paper's Table 3 ranks training
    examples by it.) Eval mode.
    """
    del has_state

    def gap(params, model_state, x, i, j):
        z = module.apply(_variables(params, model_state), x[None], train=False)[0]
        return z[i] - z[j]

    @jax.jit
    def distance(params, model_state, x):
        logits = module.apply(_variables(params, model_state), x, train=False)
        top2 = jnp.argsort(logits, axis=-1)[:, ::-1][:, :2]
        margin, grads = jax.vmap(jax.value_and_grad(gap, argnums=2),
                                 in_axes=(None, None, 0, 0, 0))(
            params, model_state, x, top2[:, 0], top2[:, 1])
        norms = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1))
        return margin / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny)

    return distance


def apply_in_chunks(fn: Callable[[Array], PyTree], x, chunk_size: int) -> PyTree:
    """Applies ``fn`` to ``x`` ``(N, ...)`` in chunks of ``chunk_size`` rows.

    Device memory holds one chunk at a time; outputs are copied to host and concatenated
    along axis 0 as numpy arrays (same pytree structure as ``fn``'s output). The last chunk
    is zero-padded to ``chunk_size`` so a jitted ``fn`` compiles once.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be an int; got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading example axis; got shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), out)
    pieces = []
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size]
        rows = chunk.shape[0]
        if rows < chunk_size and n > chunk_size:
            pad = np.zeros((chunk_size - rows, *x.shape[1:]), x.dtype)
            chunk = np.concatenate([chunk, pad])
        out = jax.device_get(fn(chunk))
        pieces.append(jax.tree.map(lambda a, r=rows: np.asarray(a)[:r], out))
    return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *pieces)
