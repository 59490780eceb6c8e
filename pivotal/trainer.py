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

from pivotal._checks import check_int, check_losses, check_real, leading_size, value_range
from pivotal.reweight import DirectWeightsState, Reweighter, lookahead, meta_objective

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
