"""Meta re-weighting (paper Eq. 2-4): the weight gradient and three reweighting rules.

Notation (paper, "Background"): a training batch of B examples with per-example losses
``f_j(theta)``, a meta batch with losses ``f_meta,i``, per-example weights ``w_j``.

* Lookahead (Eq. 2): ``theta_hat(w) = theta - alpha * grad_theta sum_j c_j(w) f_j(theta)``,
  where the loss coefficients are ``c_j = w_j / B`` (the paper's ``(1/N) sum_j w_j f_j`` on a
  batch). With an optax optimizer the lookahead is one differentiable step of that optimizer
  (see :func:`lookahead`).
* Weight gradient (Eq. 3): ``d/dw_j mean_i f_meta,i(theta_hat(w))``; for plain SGD this is
  Eq. S4, ``-(alpha/B) <grad f_meta(theta_hat), grad f_j(theta)>``.
* Update (Eq. 4): ``theta <- theta - alpha * grad_theta sum_j c_j(w_new) f_j(theta)``.

Optimizers follow one convention throughout: ``optimizer`` is an optax transformation with
*unit* learning rate (e.g. ``optax.sgd(1.0, momentum=0.8)``, or
``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(1.0, momentum=0.8))``, or
``optax.adam(1.0)``) and the learning rate ``alpha`` is supplied separately (a float or an optax
schedule). Both the lookahead and the real update are ``theta + alpha * updates``, so the
lookahead is exactly the step the trainer would take with uniform weights ``w``.

A rule maps the batch's losses and a *meta objective* ``c -> mean meta loss at theta_hat(c)``
to new loss coefficients. Rules are :class:`Reweighter` pairs of pure functions, in the style
of optax's ``GradientTransformation``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pivotal._checks import check_int, check_key, check_losses, check_real, leading_size

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, PyTree], Array]

WEIGHT_MIN = 1e-7
WEIGHT_MAX = 1.0


# --------------------------------------------------------------------------- lookahead


def lookahead(
    params: PyTree,
    grads: PyTree,
    learning_rate: Array,
    optimizer: Optional[optax.GradientTransformation] = None,
    opt_state: Optional[optax.OptState] = None,
) -> tuple[PyTree, Optional[optax.OptState]]:
    """One (differentiable) optimizer step: ``theta + alpha * u``.

    ``u = -grads`` when ``optimizer is None`` (Eq. 2), else ``optimizer.update(grads,
    opt_state, params)`` of a unit-learning-rate optax transformation. Returns the new
    parameters and the optimizer state after the step.
    """
    if optimizer is None:
        return jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads), opt_state
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = jax.tree_util.tree_map(
        lambda p, u: p + learning_rate * u.astype(p.dtype), params, updates
    )
    return new_params, new_state


def meta_objective(
    loss_fn: LossFn,
    params: PyTree,
    vjp_fn: Callable,
    meta_batch: PyTree,
    learning_rate: Array,
    optimizer: Optional[optax.GradientTransformation] = None,
    opt_state: Optional[optax.OptState] = None,
) -> Callable[[Array], Array]:
    """``c (B,) -> mean_i f_meta,i(theta_hat(c))`` with ``theta_hat`` from a stored VJP.

    ``vjp_fn`` is the pullback of ``theta -> (f_1..f_B)(theta)`` at ``theta``: applying it to
    the coefficients ``c`` gives ``grad_theta sum_j c_j f_j``, so the one forward pass that
    produced it serves the lookahead, the weight gradient and the final update.
    """

    def objective(coeffs: Array) -> Array:
        (grads,) = vjp_fn(coeffs)
        theta_hat, _ = lookahead(params, grads, learning_rate, optimizer, opt_state)
        return jnp.mean(loss_fn(theta_hat, meta_batch))

    return objective


def weight_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    weights: Array,
    meta_batch: PyTree,
    *,
    inner_lr: float,
    optimizer: Optional[optax.GradientTransformation] = None,
    opt_state: Optional[optax.OptState] = None,
) -> Array:
    """Gradient of the mean meta loss at the lookahead parameters w.r.t. the weights (Eq. 3).

    Args:
      loss_fn: ``(params, batch) -> (B,)`` per-example losses.
      params: model parameters ``theta``.
      batch: training batch, a pytree whose leaves have leading axis ``B``.
      weights: ``(B,)`` per-example weights ``w``.
      meta_batch: meta batch, leaves with leading axis ``M >= 1``.
      inner_lr: scalar learning rate ``alpha > 0`` of the lookahead (a finite number; checked
        at call time unless it is a traced value inside ``jax.jit``).
      optimizer: optional unit-learning-rate optax transformation; the lookahead is then
        ``theta + alpha * optimizer.update(g, opt_state, theta)[0]`` (momentum, Nesterov,
        weight decay, Adam ... all differentiate through).
      opt_state: the optimizer's current state; ``optimizer.init(params)`` when omitted.

    Returns:
      ``(B,)`` array ``d mean_i f_meta,i(theta_hat(w)) / d w_j``. With ``optimizer=None`` this
      equals Eq. S4: ``-(alpha/B) <grad f_meta(theta_hat), grad f_j(theta)>``.
    """
    batch_size = leading_size(batch, "batch")
    leading_size(meta_batch, "meta_batch")
    if callable(inner_lr):
        raise TypeError("inner_lr must be a scalar here; schedules belong to make_meta_step")
    check_real(inner_lr, "inner_lr")
    if np.shape(weights) != (batch_size,):
        raise ValueError(
            f"weights must have shape ({batch_size},) to match the batch; got {np.shape(weights)}"
        )
    if optimizer is not None and opt_state is None:
        opt_state = optimizer.init(params)
    return _weight_gradient(loss_fn, optimizer, params, batch, jnp.asarray(weights),
                            meta_batch, jnp.asarray(inner_lr), opt_state)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weight_gradient(loss_fn, optimizer, params, batch, weights, meta_batch, inner_lr, opt_state):
    losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
    check_losses(losses, weights.shape[0])
    objective = meta_objective(loss_fn, params, vjp_fn, meta_batch, inner_lr, optimizer, opt_state)
    batch_size = weights.shape[0]
    return jax.grad(lambda w: objective(w.astype(losses.dtype) / batch_size))(weights)


# --------------------------------------------------------------------------- rules


class RuleOutput(NamedTuple):
    """What a rule returns for one batch.

    coeffs: ``(B,)`` loss coefficients of the real update, ``theta <- theta - alpha grad sum c_j f_j``.
    weights: ``(B,)`` the examples' weights on the ``w`` scale (for metrics and AUC).
    meta_loss: scalar meta loss evaluated by the rule.
    """

    coeffs: Array
    weights: Array
    meta_loss: Array


class Reweighter(NamedTuple):
    """A reweighting rule: a pair of pure functions, like an optax transformation.

    init(key, num_examples) -> state
    update(state, indices (B,), losses (B,), objective) -> (RuleOutput, new_state)
      where ``objective(c)`` is the mean meta loss after a lookahead with coefficients ``c``.
    """

    init: Callable[..., PyTree]
    update: Callable[..., tuple[RuleOutput, PyTree]]
    name: str = "rule"


class DirectWeightsState(NamedTuple):
    weights: Array  # (N,) one weight per training example


def direct_weights(*, weight_lr: float, init: Union[str, float] = "uniform") -> Reweighter:
    """One persistent weight per training example (paper Eq. 2-4).

    ``w_j <- clip(w_j - weight_lr * d meta_loss / d w_j, 1e-7, 1)`` for the examples of the
    batch, with loss coefficients ``c_j = w_j / B``. Initial weights are ``U[0, 1)`` (clipped
    to ``[1e-7, 1]``) for ``init="uniform"``, or the constant ``init``.

    Because Eq. S4 carries a factor ``alpha / B``, useful ``weight_lr`` values are large
    (of order ``B / alpha``). ``weight_lr`` must be a positive finite number (checked here unless
    it is a traced value).
    """
    check_real(weight_lr, "weight_lr")
    if not (isinstance(init, str) and init == "uniform"):
        if isinstance(init, str) or not (WEIGHT_MIN <= float(init) <= WEIGHT_MAX):
            raise ValueError(f"init must be 'uniform' or a number in [1e-7, 1]; got {init!r}")

    def init_fn(key: Array, num_examples: int) -> DirectWeightsState:
        num_examples = check_int(num_examples, "num_examples")
        if init == "uniform":
            check_key(key)
            w = jax.random.uniform(key, (num_examples,))
        else:
            w = jnp.full((num_examples,), float(init))
        return DirectWeightsState(jnp.clip(w, WEIGHT_MIN, WEIGHT_MAX))

    def update_fn(state, indices, losses, objective):
        batch_size = losses.shape[0]
        w = state.weights[indices]
        meta_loss, grad_w = jax.value_and_grad(
            lambda v: objective(v.astype(losses.dtype) / batch_size))(w)
        w_new = jnp.clip(w - weight_lr * grad_w, WEIGHT_MIN, WEIGHT_MAX)
        new_state = DirectWeightsState(state.weights.at[indices].set(w_new))
        coeffs = w_new.astype(losses.dtype) / batch_size
        return RuleOutput(coeffs, w_new, meta_loss), new_state

    return Reweighter(init_fn, update_fn, "direct")


def l2rw() -> Reweighter:
    """Learning to Reweight (Ren et al. 2018; paper Eq. S9-S12).

    ``w_hat_j = max(-d meta_loss / d w_j |_{w=0}, 0)``, normalised to sum to one over the
    batch; when every ``w_hat_j`` is zero the weights are uniform. The update uses
    ``theta <- theta - alpha grad sum_j w_j f_j`` (a weighted mean: uniform weights give the
    ordinary mean loss). Reported weights are ``B * w_j`` so that uniform is 1.
    """

    def init_fn(key: Array, num_examples: int) -> tuple:
        del key, num_examples
        return ()

    def update_fn(state, indices, losses, objective):
        del indices
        batch_size = losses.shape[0]
        eps = jnp.zeros_like(losses)
        meta_loss, grad_eps = jax.value_and_grad(lambda e: objective(e / batch_size))(eps)
        w_hat = jnp.maximum(-grad_eps, 0.0)
        total = jnp.sum(w_hat)
        coeffs = jnp.where(total > 0, w_hat / jnp.where(total > 0, total, 1.0),
                           jnp.full_like(w_hat, 1.0 / batch_size))
        return RuleOutput(coeffs, coeffs * batch_size, meta_loss), state

    return Reweighter(init_fn, update_fn, "l2rw")


class MetaWeightNetState(NamedTuple):
    params: PyTree
    opt_state: optax.OptState


def weight_net_apply(net_params: PyTree, losses: Array) -> Array:
    """The Meta-Weight-Net MLP ``1 -> hidden -> 1``: ``sigmoid(W2 relu(W1 l + b1) + b2)``, ``(B,)``."""
    hidden = jax.nn.relu(losses[:, None] * net_params["w1"] + net_params["b1"])
    return jax.nn.sigmoid(hidden @ net_params["w2"] + net_params["b2"])


def meta_weight_net(
    *,
    hidden: int = 100,
    optimizer: Optional[optax.GradientTransformation] = None,
) -> Reweighter:
    """Meta-Weight-Net (Shu et al. 2019): an MLP ``1-hidden-1`` with sigmoid maps each example's
    (stop-gradient) loss to its weight; the MLP's parameters ``phi`` are meta-learned.

    ``phi <- optimizer step on d meta_loss(theta_hat(c(phi))) / d phi``, ``c_j = V(l_j; phi)/B``,
    then the real update uses the new weights. The default optimizer is Adam(1e-3) with L2
    weight decay 1e-4 (as PyTorch's ``Adam(weight_decay=1e-4)``, the official setting).
    Weights of the net start ``N(0, 1/fan_in)`` with zero biases.
    """
    hidden = check_int(hidden, "hidden")
    net_opt = optimizer if optimizer is not None else optax.chain(
        optax.add_decayed_weights(1e-4), optax.adam(1e-3))

    def init_fn(key: Array, num_examples: int) -> MetaWeightNetState:
        del num_examples
        check_key(key)
        k1, k2 = jax.random.split(key)
        params = {
            "w1": jax.random.normal(k1, (1, hidden)),
            "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden,)) / jnp.sqrt(hidden),
            "b2": jnp.zeros(()),
        }
        return MetaWeightNetState(params, net_opt.init(params))

    def update_fn(state, indices, losses, objective):
        del indices
        batch_size = losses.shape[0]
        inputs = jax.lax.stop_gradient(losses)

        def meta_of_phi(phi):
            w = weight_net_apply(phi, inputs.astype(phi["w1"].dtype))
            return objective(w.astype(losses.dtype) / batch_size)

        meta_loss, grad_phi = jax.value_and_grad(meta_of_phi)(state.params)
        updates, opt_state = net_opt.update(grad_phi, state.opt_state, state.params)
        phi = optax.apply_updates(state.params, updates)
        w_new = weight_net_apply(phi, inputs.astype(phi["w1"].dtype)).astype(losses.dtype)
        return RuleOutput(w_new / batch_size, w_new, meta_loss), MetaWeightNetState(phi, opt_state)

    return Reweighter(init_fn, update_fn, "meta_weight_net")
