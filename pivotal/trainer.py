"""A jit-compiled meta re-weighting trainer (paper Eq. 2-4) for any :class:`Reweighter`.

``make_meta_step`` returns pure ``init``/``step`` functions (and a ``plain_step`` without
re-weighting, for baselines and benchmarks). One forward pass per step: the VJP of the
training losses is built once; its pullback gives the lookahead gradient for the weight
update *and* the gradient of the final update, only the cotangent (the loss coefficients)
differs.

Models with mutable state (BatchNorm) pass ``has_state=True``; the loss function then is
``loss_fn(params, model_state, batch) -> (losses (B,), new_model_state)``; the state returned
by the training forward pass is kept, the one from the lookahead's meta forward is dropped.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pivotal._checks import check_choice, check_int, check_losses, check_real, leading_size, value_range
from pivotal.grads import layer_groups_of
from pivotal.reweight import DirectWeightsState, Reweighter, lookahead, meta_objective

#: ``make_meta_step(meta_gradient=...)``: the exact Eq. 3 / S4 gradient, or its first-order
#: approximation (see :func:`first_order_forward`).
META_GRADIENTS = ("exact", "first_order")

PyTree = Any


class MetaTrainState(NamedTuple):
    """Everything a step reads and writes; a pytree, so it checkpoints as is."""

    params: PyTree
    opt_state: optax.OptState
    model_state: PyTree
    rule_state: PyTree
    step: jax.Array


class MetaTrainer(NamedTuple):
    """``init(params, key, *, num_examples, model_state=None) -> MetaTrainState``;
    ``step(state, batch, meta_set, key) -> (state, metrics)``;
    ``plain_step(state, batch) -> (state, metrics)`` (uniform weights, no meta set)."""

    init: Callable[..., MetaTrainState]
    step: Callable[..., tuple[MetaTrainState, dict]]
    plain_step: Callable[..., tuple[MetaTrainState, dict]]


def make_meta_step(
    loss_fn: Callable,
    rule: Reweighter,
    *,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: Any = 0.1,
    meta_batch_size: Optional[int] = None,
    has_state: bool = False,
    jit: bool = True,
    check_index: bool = True,
    meta_gradient: str = "exact",
    meta_layer: Optional[str] = None,
) -> MetaTrainer:
    """Build the meta re-weighting trainer.

    Args:
      loss_fn: ``(params, batch) -> (B,)`` per-example losses, or with ``has_state``
        ``(params, model_state, batch) -> ((B,), new_model_state)``. ``batch`` is a mapping
        that also carries ``"index"``, the ``(B,)`` integer positions of its examples in the
        training set (direct weights are gathered and scattered there).
      rule: a :class:`Reweighter` (``direct_weights``, ``l2rw``, ``meta_weight_net``).
      optimizer: a unit-learning-rate optax transformation (default ``optax.sgd(1.0)``); the
        step is ``theta + lr * updates`` for the lookahead and for the real update alike.
      learning_rate: a positive finite float, or an optax schedule ``step -> lr`` (a schedule's
        values are not checked).
      meta_batch_size: the meta batch is drawn with replacement from the meta set each step;
        its size defaults to the meta set's size ``M``.
      has_state: whether the model threads a mutable state (see above).
      jit: compile ``step``/``plain_step`` with ``jax.jit`` (one trace per input shape).
      check_index: check ``batch["index"]`` on the host before each ``step`` (see below);
        ``False`` skips it (for a caller that has validated its indices, or for timing it).
      meta_gradient: ``"exact"`` (default): the weight gradient of Eq. 3 through the lookahead
        (second order). ``"first_order"``: the approximation of :func:`first_order_forward`
        (the meta gradient at ``theta`` instead of ``theta_hat``, inner products restricted to
        the layer ``meta_layer``), about one plain step's cost; the real update is unchanged.
      meta_layer: with ``"first_order"``, the layer (a name of :func:`pivotal.grads.layer_groups_of`,
        e.g. ``"head"``) whose gradients enter the inner products; None = the last layer
        in ``layer_groups_of(params)`` order (for Flax modules, alphabetical: name it).

    ``step`` checks, before it runs, that ``batch["index"]`` lies in ``[0, num_examples)`` when
    the rule keeps per-example weights (``ValueError`` naming ``batch['index']``; host indices
    cost microseconds, device indices one tiny reduction; skipped when the index is traced).

    Metrics of ``step``: ``meta_loss`` (at ``theta`` after the rule's lookahead, as the rule
    evaluates it), ``train_loss`` (unweighted mean), ``mean_weight``, ``lr`` and ``finite``.
    When any loss, weight or new parameter is NaN/inf the step leaves the state unchanged and
    reports ``finite=False``; call :func:`check_finite` on the host to raise.
    """
    if not isinstance(rule, Reweighter):
        raise TypeError(f"rule must be a Reweighter (direct_weights(), l2rw(), ...); got {type(rule)}")
    if not callable(learning_rate):
        check_real(learning_rate, "learning_rate")
    meta_batch_size = check_int(meta_batch_size, "meta_batch_size", allow_none=True)
    check_choice(meta_gradient, "meta_gradient", META_GRADIENTS)
    if meta_layer is not None and not isinstance(meta_layer, str):
        raise TypeError(f"meta_layer must be a layer name (str) or None; got {type(meta_layer)}")
    opt = optimizer if optimizer is not None else optax.sgd(1.0)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def forward(params, model_state, batch):
        """Losses, their pullback and the new model state, from one forward pass."""
        if has_state:
            losses, vjp_fn, new_model_state = jax.vjp(
                lambda p: loss_fn(p, model_state, batch), params, has_aux=True)
        else:
            losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
            new_model_state = model_state
        return losses, vjp_fn, new_model_state

    def meta_losses_fn(model_state):
        if has_state:
            return lambda p, b: loss_fn(p, model_state, b)[0]
        return loss_fn

    def init(params, key, *, num_examples: int, model_state=None) -> MetaTrainState:
        if has_state and model_state is None:
            raise ValueError("model_state is required when has_state=True")
        return MetaTrainState(
            params=params,
            opt_state=opt.init(params),
            model_state=model_state,
            rule_state=rule.init(key, num_examples),
            step=jnp.zeros((), jnp.int32),
        )

    def step(state: MetaTrainState, batch, meta_set, key):
        batch_size = _check_batch(batch)
        meta_size = leading_size(meta_set, "meta_set")
        draws = meta_size if meta_batch_size is None else int(meta_batch_size)
        picks = jax.random.randint(key, (draws,), 0, meta_size)
        meta_batch = jax.tree_util.tree_map(lambda a: a[picks], meta_set)

        lr = jnp.asarray(schedule(state.step))
        if meta_gradient == "first_order":
            losses, vjp_fn, new_model_state, objective = first_order_forward(
                loss_fn, state.params, state.model_state, batch, meta_batch, lr,
                has_state=has_state, meta_layer=meta_layer)
            check_losses(losses, batch_size)
        else:
            losses, vjp_fn, new_model_state = forward(state.params, state.model_state, batch)
            check_losses(losses, batch_size)
            objective = meta_objective(meta_losses_fn(state.model_state), state.params, vjp_fn,
                                       meta_batch, lr, opt, state.opt_state)
        out, rule_state = rule.update(state.rule_state, batch["index"], losses, objective)
        (grads,) = vjp_fn(out.coeffs.astype(losses.dtype))
        params, opt_state = lookahead(state.params, grads, lr, opt, state.opt_state)

        new_state = MetaTrainState(params, opt_state, new_model_state, rule_state, state.step + 1)
        finite = _all_finite((losses, out.meta_loss, out.weights, params))
        metrics = {
            "meta_loss": out.meta_loss,
            "train_loss": jnp.mean(losses),
            "mean_weight": jnp.mean(out.weights),
            "lr": lr,
            "finite": finite,
        }
        return _keep_if(finite, new_state, state), metrics

    def plain_step(state: MetaTrainState, batch):
        batch_size = _check_batch(batch)
        lr = jnp.asarray(schedule(state.step))
        losses, vjp_fn, new_model_state = forward(state.params, state.model_state, batch)
        check_losses(losses, batch_size)
        (grads,) = vjp_fn(jnp.full_like(losses, 1.0 / batch_size))
        params, opt_state = lookahead(state.params, grads, lr, opt, state.opt_state)
        new_state = state._replace(params=params, opt_state=opt_state,
                                   model_state=new_model_state, step=state.step + 1)
        finite = _all_finite((losses, params))
        metrics = {"train_loss": jnp.mean(losses), "lr": lr, "finite": finite}
        return _keep_if(finite, new_state, state), metrics

    if jit:
        step = jax.jit(step)
        plain_step = jax.jit(plain_step)
    if not check_index:
        return MetaTrainer(init, step, plain_step)
    compiled_step = step

    def checked_step(state: MetaTrainState, batch, meta_set, key):
        # Outside the compiled step, before it is dispatched: see _check_index.
        if isinstance(batch, Mapping) and "index" in batch:
            _check_index(batch["index"], state.rule_state)
        return compiled_step(state, batch, meta_set, key)

    return MetaTrainer(init, checked_step, plain_step)


def _layer_leaves(params, meta_layer: Optional[str]) -> list[int]:
    groups = layer_groups_of(params)
    if meta_layer is None:
        return groups[list(groups)[-1]]
    if meta_layer not in groups:
        raise ValueError(f"meta_layer must name a layer of params ({sorted(groups)}); got {meta_layer!r}")
    return groups[meta_layer]


def first_order_forward(loss_fn, params, model_state, batch, meta_batch, learning_rate, *,
                        has_state=False, meta_layer=None):
    r"""One forward pass giving the losses, their pullback and a first-order meta objective.

    An approximation of Eq. 3 / S4. The exact SGD weight gradient is
    ``d meta / d w_j = -(alpha/B) <grad f_meta(theta_hat), grad f_j(theta)>``; here the meta
    gradient is taken at ``theta`` instead of the lookahead ``theta_hat`` (first order in
    ``alpha``, as SAMA, NeurIPS 2023, drops the second-order term) and both gradients are
    restricted to one layer ``L`` (``meta_layer``, by default the last, as FaMUS's layer-wise
    approximation, CVPR 2021, and RBC's last-layer features):

    .. math::
        \mathrm{objective}(c) = \bar f_{meta}(\theta) - \alpha \sum_j c_j\, d_j,\qquad
        d_j = \langle \nabla_L \bar f_{meta}(\theta), \nabla_L f_j(\theta) \rangle

    so ``d objective / d w_j = -(alpha/B) d_j`` for ``c_j = w_j / B``. The value is the
    linearised meta loss at the SGD lookahead. The step's optimizer (momentum, Adam) is
    ignored inside the weight gradient (the plain SGD form of Eq. S4); the real update
    still uses it. ``d_j`` for every ``j`` is a forward-mode derivative in the direction of
    the meta gradient that starts at layer ``L`` (``jax.jvp`` w.r.t. ``L``'s leaves only),
    riding on the training forward pass; ``nabla_L f_meta`` costs a forward of the meta
    batch and a backward down to ``L``. No second-order pass, no lookahead forward.

    Returns ``(losses (B,), vjp_fn, new_model_state, objective)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    picked = _layer_leaves(params, meta_layer)

    def with_layer(tree_leaves, layer):
        merged = list(tree_leaves)
        for i, leaf in zip(picked, layer):
            merged[i] = leaf
        return treedef.unflatten(merged)

    def losses_of(p, b):
        return loss_fn(p, model_state, b)[0] if has_state else loss_fn(p, b)

    layer = [leaves[i] for i in picked]
    meta_value, meta_grad = jax.value_and_grad(
        lambda lay: jnp.mean(losses_of(with_layer(leaves, lay), meta_batch)))(layer)

    def train(p):
        p_leaves = treedef.flatten_up_to(p)
        if has_state:
            (losses, new_state), (tangent, _) = jax.jvp(
                lambda lay: loss_fn(with_layer(p_leaves, lay), model_state, batch),
                ([p_leaves[i] for i in picked],), (meta_grad,))
        else:
            losses, tangent = jax.jvp(lambda lay: loss_fn(with_layer(p_leaves, lay), batch),
                                      ([p_leaves[i] for i in picked],), (meta_grad,))
            new_state = model_state
        return losses, (jax.lax.stop_gradient(tangent), new_state)

    losses, vjp_fn, (inner, new_model_state) = jax.vjp(train, params, has_aux=True)

    def objective(coeffs):
        return meta_value - learning_rate * jnp.dot(coeffs, inner.astype(coeffs.dtype))

    return losses, vjp_fn, new_model_state, objective


def _check_batch(batch) -> int:
    if not isinstance(batch, Mapping) or "index" not in batch:
        raise ValueError("batch must be a mapping with an 'index' entry: the (B,) positions of "
                         "its examples in the training set")
    size = leading_size(batch, "batch")
    if np.ndim(batch["index"]) != 1:
        raise ValueError(f"batch['index'] must have shape (B,); got {np.shape(batch['index'])}")
    if not jnp.issubdtype(jnp.result_type(batch["index"]), jnp.integer):
        raise TypeError(f"batch['index'] must hold integers; got dtype {jnp.result_type(batch['index'])}")
    return size


def _check_index(index, rule_state) -> None:
    """``batch['index']`` must lie in ``[0, N)`` where the rule keeps per-example state.

    Inside the compiled step an out-of-range index is not an error: the gather clamps, negative
    indices wrap (``-1`` is example ``N - 1``) and the scatter drops or wraps, so the wrong
    example's weight would change silently. Checked here, on the host, before the step runs:

    * numpy (or other host) indices: ``np.min``/``np.max``, microseconds;
    * a concrete ``jax.Array``: one small jitted min/max reduction where the indices live, two
      scalars copied back. It waits for the indices to be ready (not for the previous step);
      measured by ``benchmarks/index_check.py``;
    * a traced index (the step called inside the caller's own ``jit``/``scan``): no value to
      check, skipped.

    Only rules with per-example state read the index: :func:`direct_weights`
    (``N = len(state.rule_state.weights)``). ``l2rw`` and ``meta_weight_net`` ignore it.
    """
    if not isinstance(rule_state, DirectWeightsState):
        return
    bounds = value_range(index)
    if bounds is None:
        return
    num_examples = int(np.shape(rule_state.weights)[0])
    low, high = bounds
    if low < 0 or high >= num_examples:
        raise ValueError(
            f"batch['index'] must hold positions in [0, {num_examples}) (num_examples of the "
            f"trainer's init); got values in [{low}, {high}]")


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _keep_if(ok, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def check_finite(metrics: Mapping[str, Any]) -> None:
    """Raise ``FloatingPointError`` on the host when a step reported non-finite values."""
    if not bool(np.asarray(metrics["finite"])):
        shown = {k: float(np.asarray(v)) for k, v in metrics.items() if k != "finite"}
        raise FloatingPointError(
            "non-finite loss, weight or parameter in a meta re-weighting step; the step was "
            f"skipped and the state left unchanged (metrics: {shown}). Lower the learning rate "
            "or check the inputs.")


def example_weights(state: MetaTrainState) -> Optional[jax.Array]:
    """The ``(N,)`` per-example weights of a ``direct_weights`` rule, else ``None``."""
    if isinstance(state.rule_state, DirectWeightsState):
        return state.rule_state.weights
    return None
