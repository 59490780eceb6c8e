"""TA-VAAL baseline (Kim et al., CVPR 2021) for meta-sample selection.

Task-Aware Variational Adversarial Active Learning has three learned parts:

1. a **loss predictor** (Learning Loss, Yoo & Kweon 2019) on the task model's
   intermediate features, trained with a pairwise *ranking* loss on per-example task
   losses;
2. a **VAE** over the inputs whose decoder is conditioned on the normalised rank ``r`` of
   the predicted loss (the "ranking-conditional" generator);
3. a **discriminator** on ``[mu(x), r]`` that tells labelled from unlabelled examples,
   while the VAE is trained to fool it (VAAL, Sinha et al. 2019).

Selection picks the unlabelled examples the discriminator finds least likely to be
labelled. Here *labelled* = the current meta set (``existing``) and *unlabelled* = the
noisy training pool (every other index).

Entry point (what ``experiments/selection.py`` calls)::

    idx = ta_vaal_selection(
        x,                    # (N, ...) inputs, e.g. problem.x_train (uint8 or float)
        features_h,           # (N, D) penultimate features h of the warm-up model
        task_losses,          # (N,) per-example CE w.r.t. the pool's labels, or None
        existing,             # (M,) int indices of the meta set (labelled)
        budget,               # how many to select
        key,                  # jax.random key
        labelled_losses=...,  # (M,) per-example CE of the meta set w.r.t. its CLEAN labels
    )

It returns ``(budget,)`` unique ``int64`` indices into ``[0, N)``, none in ``existing``,
most preferred first. Which losses to pass (see "Decisions" below): under label noise
pass ``labelled_losses`` and ``task_losses=None``; when the pool's labels are trusted
(pure class imbalance, ``noise == "none"``) pass both.

Decisions and simplifications (documented departures from the official code):

- **Frozen task model.** TA-VAAL trains the loss module jointly with the task model.
  The pipeline's task model is already trained (warm-up), so the loss predictor is
  trained afterwards on its frozen penultimate features ``h``, as the official code does
  after its ``epoch_loss`` cut-off where the features are detached. The official code
  also trains the VAE/discriminator only after the task learner, with the ranker frozen,
  so the order ranker -> (VAE, discriminator) is the paper's.
- **Which losses train the ranker.** The loss module learns from examples whose labels
  the task model is trained on. The meta set's clean-label losses are the quantity the
  method means (how hard an example is for the task). The pool's losses w.r.t. *noisy*
  labels mostly measure whether a label was corrupted, which ``h`` alone cannot see
  (for a confident example, high loss = flipped label), so training on them would turn
  the ranker into a noise detector. Hence: clean meta-set losses by default; pool
  losses only when the pool's labels are trusted. When both are given, pairs are drawn
  within each group, never across (the two targets measure different things).
- **Ranking loss.** Default ``"bce"``: ``BCE(sigmoid(p_i - p_j), [l_i > l_j])``, the
  relaxation the TA-VAAL code uses; ``"margin"``: Learning Loss's
  ``max(0, margin - sign(l_i - l_j) (p_i - p_j))``. Tied targets carry no ranking
  information and are masked out.
- **Rank conditioning.** The paper embeds the *normalised rank* of the predicted loss;
  the code feeds ``sigmoid(pred)`` to the decoder but the raw ``pred`` to the
  discriminator. We use one quantity for both: the rank of the predicted loss among the
  labelled + candidate examples, scaled to ``[0, 1]`` (scale-free, so a ranker trained
  on ten examples cannot saturate it).
- **Sizes.** Latent dim 32 and the 512-512 discriminator as in VAAL. The VAE is an MLP
  (flattened input -> 512 -> 256 -> 2 x latent; decoder mirrored) without BatchNorm
  instead of VAAL's 128-1024-channel conv net: on a 2-core CPU even a 32-64-channel conv
  VAE cost ~0.2-1 s per step (transposed-conv gradients), the MLP ~10 ms, and the VAE
  only has to give the discriminator a latent code of the data distribution.
- **VAE loss scale.** The per-example negative ELBO (``0.5 ||x - x_hat||^2`` summed over
  features + KL summed over latents, averaged over the batch; inputs standardised), plus
  adversary weight 1 x the fooling BCE, as in the VAAL paper's objective. The TA-VAAL
  code's pixel-mean MSE + latent-mean KL makes that weight-1 BCE dominate: with ten
  labelled MNIST examples we measured the ELBO rising during training, the
  discriminator's BCE ending above chance and selections that differed wildly per seed;
  with the per-example ELBO the VAE learns (ELBO 1,200 -> 190 in 400 steps) and the
  discriminator separates the sets.
- **Optimisation.** Adam for VAE and discriminator (lr 1e-3 rather than the code's 5e-4:
  our default run is 400 iterations instead of thousands), one VAE step then one
  discriminator step per iteration (the code's ``num_vae_steps = num_adv_steps = 1``),
  ``batch_size`` labelled (drawn with replacement: the meta set is tiny) + ``batch_size``
  unlabelled examples per step. Candidates are ranked by the discriminator's logit, not
  its probability, which saturates to exact 0 in float32.
- **Sub-pool.** As in the official code, only a random sub-pool of the unlabelled pool
  (``subpool`` examples) is scored and used as the unlabelled data.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "VAE",
    "Discriminator",
    "LossPredictor",
    "discriminator_scores",
    "normalised_rank",
    "ranking_loss",
    "ta_vaal_selection",
    "train_ranker",
    "train_vaal",
    "vae_loss",
]

Array = jax.Array


# ----------------------------------------------------------------------------- modules


class LossPredictor(nn.Module):
    """Learning Loss head on one feature level: ``h (B, D) -> predicted loss (B,)``.

    The original pools each of several feature maps and maps it to ``hidden`` units; we
    have one level (the penultimate features), so it is a 2-layer MLP.
    """

    hidden: int = 128

    @nn.compact
    def __call__(self, h: Array) -> Array:
        h = nn.relu(nn.Dense(self.hidden, name="fc")(h))
        return nn.Dense(1, name="out")(h)[:, 0]


class Encoder(nn.Module):
    """``x (B, *shape) -> (mu (B, L), logvar (B, L))``; the input is flattened."""

    latent_dim: int = 32
    hidden: tuple[int, ...] = (512, 256)

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i}")(x))
        mu = nn.Dense(self.latent_dim, name="mu")(x)
        logvar = nn.Dense(self.latent_dim, name="logvar")(x)
        return mu, logvar


class Decoder(nn.Module):
    """``[z, r] (B, L + 1) -> reconstruction (B, *shape)``; mirrors :class:`Encoder`."""

    shape: tuple[int, ...]
    hidden: tuple[int, ...] = (256, 512)

    @nn.compact
    def __call__(self, zr: Array) -> Array:
        x = zr
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i}")(x))
        x = nn.Dense(int(np.prod(self.shape)), name="out")(x)
        return x.reshape((zr.shape[0], *self.shape))


class VAE(nn.Module):
    """Rank-conditional VAE: ``(x (B, *shape), r (B,), eps (B, L)) -> (recon, mu, logvar)``.

    The noise ``eps ~ N(0, I)`` is passed in so the caller's key decides it.
    """

    shape: tuple[int, ...]
    latent_dim: int = 32

    def setup(self):
        self.encoder = Encoder(self.latent_dim)
        self.decoder = Decoder(self.shape)

    def encode(self, x: Array) -> tuple[Array, Array]:
        return self.encoder(x)

    def __call__(self, x: Array, r: Array, eps: Array):
        mu, logvar = self.encoder(x)
        z = mu + jnp.exp(0.5 * logvar) * eps
        recon = self.decoder(jnp.concatenate([z, r[:, None]], axis=-1))
        return recon, mu, logvar


class Discriminator(nn.Module):
    """VAAL's adversary: ``[z, r] -> logit (B,)`` of "this example is labelled"."""

    hidden: int = 512

    @nn.compact
    def __call__(self, z: Array, r: Array) -> Array:
        x = jnp.concatenate([z, r[:, None]], axis=-1)
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(1, name="out")(x)[:, 0]


# ----------------------------------------------------------------------------- losses


def ranking_loss(pred_i: Array, pred_j: Array, target_i: Array, target_j: Array, *,
                 kind: str = "bce", margin: float = 1.0) -> Array:
    """Mean pairwise ranking loss over pairs ``(i, j)``; all arguments ``(P,)``.

    ``"bce"`` (TA-VAAL): ``BCE(sigmoid(p_i - p_j), [l_i > l_j])``. ``"margin"`` (Learning
    Loss): ``max(0, margin - sign(l_i - l_j) (p_i - p_j))``. Pairs with equal targets are
    ignored; returns 0 when every pair is tied.
    """
    diff = pred_i - pred_j
    sign = jnp.sign(jax.lax.stop_gradient(target_i - target_j))
    valid = (sign != 0).astype(diff.dtype)
    if kind == "bce":
        per_pair = optax.sigmoid_binary_cross_entropy(diff, (sign > 0).astype(diff.dtype))
    elif kind == "margin":
        per_pair = jnp.maximum(0.0, margin - sign * diff)
    else:
        raise ValueError(f"`kind` must be 'bce' or 'margin'; got {kind!r}.")
    return jnp.sum(per_pair * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def vae_loss(x: Array, recon: Array, mu: Array, logvar: Array, beta: float = 1.0) -> Array:
    """Scalar negative ELBO per example, averaged over the batch.

    ``0.5 ||x - recon||^2`` (unit-variance Gaussian likelihood, summed over features) +
    ``beta`` x KL(q(z|x) || N(0, I)) (summed over latents).
    """
    sq = jnp.sum(jnp.square(recon - x).reshape((x.shape[0], -1)), axis=-1)
    kl = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=-1)
    return jnp.mean(0.5 * sq + beta * kl)


def _bce(logits: Array, label: float) -> Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, label)))


def normalised_rank(values) -> np.ndarray:
    """``(n,)`` rank of each value scaled to ``[0, 1]`` (0 = smallest); ties by position."""
    values = np.asarray(values)
    ranks = np.empty(values.shape[0], np.float32)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.shape[0], dtype=np.float32)
    return ranks / max(values.shape[0] - 1, 1)


# ----------------------------------------------------------------------------- ranker


@functools.lru_cache(maxsize=16)
def _ranker_trainer(dim: int, batch_size: int, kind: str, margin: float):
    """Jitted ``init(key)`` and ``run(state, keys, groups, hparams)``, cached per config.

    ``run`` scans one step per key; learning rate and weight decay are traced.
    """
    module = LossPredictor()
    adam = optax.scale_by_adam()

    def loss_fn(params, groups, key):
        losses = []
        for k, (h, t) in zip(jax.random.split(key, len(groups)), groups):
            # Pairs with replacement: a meta set of ten gives only 45 distinct pairs.
            i, j = jax.random.randint(k, (2, batch_size), 0, h.shape[0])
            p = module.apply(params, jnp.concatenate([h[i], h[j]]))
            losses.append(ranking_loss(p[:batch_size], p[batch_size:], t[i], t[j],
                                       kind=kind, margin=margin))
        return sum(losses) / len(losses)

    @jax.jit
    def init(key):
        params = module.init(key, jnp.zeros((1, dim), jnp.float32))
        return params, adam.init(params)

    @jax.jit
    def run(state, keys, groups, hparams):
        lr, weight_decay = hparams

        def step(state, k):
            params, opt_state = state
            loss, grads = jax.value_and_grad(loss_fn)(params, groups, k)
            updates, opt_state = adam.update(grads, opt_state, params)
            # Decoupled weight decay (AdamW), as Learning Loss regularises its module.
            updates = jax.tree.map(lambda u, w: -lr * (u + weight_decay * w), updates, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, state, keys)

    return module, init, run


def train_ranker(groups: Sequence[tuple[np.ndarray, np.ndarray]], key: Array, *,
                 steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
                 weight_decay: float = 5e-4, kind: str = "bce", margin: float = 1.0):
    """Trains a :class:`LossPredictor` with the pairwise ranking loss.

    Args:
      groups: sequence of ``(h (n_g, D), losses (n_g,))``; pairs are drawn within a group
        (``batch_size`` per group per step) and the group losses averaged.
      key: PRNG key (initialisation and pair sampling).

    Returns:
      ``(predict, losses)``: ``predict(h (n, D)) -> (n,)`` predicted losses, and the
      ``(steps,)`` ranking loss of each step.
    """
    groups = tuple((jnp.asarray(h, jnp.float32), jnp.asarray(t, jnp.float32)) for h, t in groups)
    module, init, run = _ranker_trainer(int(groups[0][0].shape[1]), int(batch_size), kind,
                                        float(margin))
    k_init, k_steps = jax.random.split(key)
    hparams = tuple(jnp.asarray([lr, weight_decay], jnp.float32))
    (params, _), losses = run(init(k_init), jax.random.split(k_steps, steps), groups, hparams)
    predict = jax.jit(lambda h: module.apply(params, h))
    return predict, np.asarray(losses)


# ----------------------------------------------------------------------------- VAE + discriminator


class VAALParams(NamedTuple):
    """Trained parameters of the VAE and the discriminator."""

    vae: Mapping
    discriminator: Mapping


@functools.lru_cache(maxsize=16)
def _vaal_trainer(shape: tuple[int, ...], latent_dim: int, batch_size: int):
    """Jitted ``init(key, x1, r1)`` and ``run(state, keys, data, hparams)``, cached per shape.

    ``run`` scans one iteration per key. The loss weights and learning rate are traced
    (``hparams``), so changing them does not recompile.
    """
    vae = VAE(shape, latent_dim)
    disc = Discriminator()
    # Adam with a traced learning rate: the scale is applied outside the optax chain.
    adam = optax.scale_by_adam()

    def vae_objective(vae_params, disc_params, xl, rl, xu, ru, k, beta, adversary_weight):
        k_l, k_u = jax.random.split(k)
        recon_l, mu_l, logvar_l = vae.apply(vae_params, xl, rl,
                                            jax.random.normal(k_l, (xl.shape[0], latent_dim)))
        recon_u, mu_u, logvar_u = vae.apply(vae_params, xu, ru,
                                            jax.random.normal(k_u, (xu.shape[0], latent_dim)))
        elbo = vae_loss(xl, recon_l, mu_l, logvar_l, beta) + vae_loss(xu, recon_u, mu_u,
                                                                       logvar_u, beta)
        # The VAE wins when the discriminator calls every example labelled.
        fool = (_bce(disc.apply(disc_params, mu_l, rl), 1.0)
                + _bce(disc.apply(disc_params, mu_u, ru), 1.0))
        return elbo + adversary_weight * fool, (elbo, fool)

    def disc_objective(disc_params, mu_l, rl, mu_u, ru):
        return (_bce(disc.apply(disc_params, mu_l, rl), 1.0)
                + _bce(disc.apply(disc_params, mu_u, ru), 0.0))

    def sgd_step(params, opt_state, grads, lr):
        updates, opt_state = adam.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def init(key, x1, r1):
        # One example only, so this compiles once per input shape, not per data size.
        k_vae, k_disc = jax.random.split(key)
        vae_params = vae.init(k_vae, x1, r1, jnp.zeros((1, latent_dim)))
        disc_params = disc.init(k_disc, jnp.zeros((1, latent_dim)), r1)
        return (vae_params, disc_params, adam.init(vae_params), adam.init(disc_params))

    def step(state, k, data, hparams):
        vae_params, disc_params, vae_opt, disc_opt = state
        xl, rl, xu, ru = data
        lr, beta, adversary_weight = hparams
        k_l, k_u, k_eps = jax.random.split(k, 3)
        il = jax.random.randint(k_l, (batch_size,), 0, xl.shape[0])
        iu = jax.random.randint(k_u, (batch_size,), 0, xu.shape[0])
        bl, brl, bu, bru = xl[il], rl[il], xu[iu], ru[iu]

        (_, (elbo, fool)), grads = jax.value_and_grad(vae_objective, has_aux=True)(
            vae_params, disc_params, bl, brl, bu, bru, k_eps, beta, adversary_weight)
        vae_params, vae_opt = sgd_step(vae_params, vae_opt, grads, lr)

        # The discriminator sees the posterior means of the updated encoder, as in VAAL.
        mu_l, _ = vae.apply(vae_params, bl, method=VAE.encode)
        mu_u, _ = vae.apply(vae_params, bu, method=VAE.encode)
        d_loss, grads = jax.value_and_grad(disc_objective)(disc_params, mu_l, brl, mu_u, bru)
        disc_params, disc_opt = sgd_step(disc_params, disc_opt, grads, lr)
        return (vae_params, disc_params, vae_opt, disc_opt), (elbo, fool, d_loss)

    @jax.jit
    def run(state, keys, data, hparams):
        return jax.lax.scan(lambda st, k: step(st, k, data, hparams), state, keys)

    return vae, disc, init, run


def train_vaal(x_labelled, r_labelled, x_unlabelled, r_unlabelled, key: Array, *,
               steps: int = 400, batch_size: int = 64, latent_dim: int = 32,
               lr: float = 1e-3, beta: float = 1.0, adversary_weight: float = 1.0):
    """Trains the rank-conditional VAE and the discriminator together (VAAL's min-max).

    Args:
      x_labelled: ``(M, *shape)`` float inputs of the labelled set; ``r_labelled (M,)``
        their normalised predicted-loss ranks.
      x_unlabelled, r_unlabelled: the same for the unlabelled (candidate) set.
      key: PRNG key (initialisation, minibatches, reparameterisation noise).
      steps: iterations, each one VAE step and one discriminator step on ``batch_size``
        labelled (drawn with replacement) + ``batch_size`` unlabelled examples.

    Returns:
      ``(score, params, history)``: ``score(x (n, *shape), r (n,)) -> (n,)`` discriminator
      logits of "labelled"; :class:`VAALParams`; ``history`` of ``(steps,)`` arrays
      ``"vae"`` (labelled + unlabelled negative ELBO, :func:`vae_loss`),
      ``"adversarial"`` (the VAE's fooling BCE) and ``"discriminator"`` (its BCE).
    """
    xl = jnp.asarray(x_labelled, jnp.float32)
    xu = jnp.asarray(x_unlabelled, jnp.float32)
    rl = jnp.asarray(r_labelled, jnp.float32)
    ru = jnp.asarray(r_unlabelled, jnp.float32)
    vae, disc, init, run = _vaal_trainer(tuple(int(s) for s in xl.shape[1:]), int(latent_dim),
                                         int(batch_size))
    k_init, k_steps = jax.random.split(key)
    hparams = jnp.asarray([lr, beta, adversary_weight], jnp.float32)
    state, (elbo, fool, d_loss) = run(init(k_init, xl[:1], rl[:1]),
                                      jax.random.split(k_steps, steps), (xl, rl, xu, ru),
                                      tuple(hparams))
    params = VAALParams(state[0], state[1])
    history = {"vae": elbo, "adversarial": fool, "discriminator": d_loss}

    @jax.jit
    def score(x, r):
        # Logits, not probabilities: a confident discriminator saturates float32 sigmoids
        # to exact 0 and would leave the ranking to tie-breaking.
        mu, _ = vae.apply(params.vae, x, method=VAE.encode)
        return disc.apply(params.discriminator, mu, r)

    return score, params, {k: np.asarray(v) for k, v in history.items()}


def discriminator_scores(score, x, r, *, chunk_size: int = 1024) -> np.ndarray:
    """``(n,)`` ``score`` (logits of "labelled") computed ``chunk_size`` rows at a time."""
    n = x.shape[0]
    out = []
    for start in range(0, n, chunk_size):
        xb, rb = x[start:start + chunk_size], r[start:start + chunk_size]
        rows = xb.shape[0]
        if rows < chunk_size and n > chunk_size:
            # Pad the last chunk so the jitted scorer compiles once.
            xb = np.concatenate([xb, np.zeros((chunk_size - rows, *xb.shape[1:]), xb.dtype)])
            rb = np.concatenate([rb, np.zeros(chunk_size - rows, rb.dtype)])
        out.append(np.asarray(score(xb, rb))[:rows])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- selection


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    return int(value)


def _finite(name: str, values: np.ndarray) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` contains NaN or inf values.")


def _check_inputs(x, features_h, task_losses, existing, budget, labelled_losses, subpool):
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"`x` must have shape (N, ...) with N >= 2 and features; got {x.shape}.")
    n = x.shape[0]
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"`x` must be numeric; got dtype {x.dtype}.")
    if np.issubdtype(x.dtype, np.inexact):
        _finite("x", x)
    h = np.asarray(features_h, np.float32)
    if h.ndim != 2 or h.shape[0] != n:
        raise ValueError(f"`features_h` must have shape ({n}, D); got {h.shape}.")
    _finite("features_h", h)
    if task_losses is not None:
        task_losses = np.asarray(task_losses, np.float32)
        if task_losses.shape != (n,):
            raise ValueError(f"`task_losses` must have shape ({n},); got {task_losses.shape}.")
        _finite("task_losses", task_losses)
    existing = np.asarray(existing)
    if existing.ndim != 1 or existing.size == 0:
        raise ValueError("`existing` must be a non-empty 1-D array of indices: TA-VAAL's "
                         f"discriminator needs labelled examples; got shape {existing.shape}.")
    if not np.issubdtype(existing.dtype, np.integer):
        raise TypeError(f"`existing` must hold integer indices; got dtype {existing.dtype}.")
    if existing.min() < 0 or existing.max() >= n:
        raise ValueError(f"`existing` indices must lie in [0, {n}); got values in "
                         f"[{existing.min()}, {existing.max()}].")
    if np.unique(existing).size != existing.size:
        raise ValueError("`existing` must not contain duplicate indices.")
    pool_size = n - existing.size
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"`budget` must be an int; got {budget!r}.")
    if budget < 1 or budget > pool_size:
        raise ValueError(f"`budget` must lie in [1, {pool_size}] (the pool outside `existing`); "
                         f"got {budget}.")
    subpool = _positive_int("subpool", subpool)
    if subpool < budget:
        raise ValueError(f"`subpool` ({subpool}) must be at least `budget` ({budget}).")
    if labelled_losses is not None:
        labelled_losses = np.asarray(labelled_losses, np.float32)
        if labelled_losses.shape != existing.shape:
            raise ValueError(f"`labelled_losses` must have shape {existing.shape} (one per "
                             f"`existing` index); got {labelled_losses.shape}.")
        _finite("labelled_losses", labelled_losses)
    usable_meta = labelled_losses is not None and existing.size >= 2
    if not usable_meta and task_losses is None:
        raise ValueError("the loss predictor needs targets: pass `labelled_losses` (with at "
                         "least 2 `existing` examples) and/or `task_losses`.")
    return x, h, task_losses, existing.astype(np.int64), int(budget), labelled_losses, subpool


def _standardise(x: np.ndarray, rows: np.ndarray, axis) -> np.ndarray:
    # Statistics from the rows in play only, so the result does not depend on the rest.
    ref = x[rows].astype(np.float32)
    mean = ref.mean(axis=axis, keepdims=True)
    std = ref.std(axis=axis, keepdims=True)
    return (x[rows].astype(np.float32) - mean) / np.maximum(std, 1e-6)


def ta_vaal_selection(x, features_h, task_losses, existing, budget: int, key: Array, *,
                      labelled_losses=None, steps: int = 400, ranker_steps: int = 300,
                      subpool: int = 10000, batch_size: int = 64, latent_dim: int = 32,
                      ranking: str = "bce", beta: float = 1.0,
                      adversary_weight: float = 1.0) -> np.ndarray:
    """Selects ``budget`` pool examples with TA-VAAL.

    Args:
      x: ``(N, ...)`` inputs of every training example (flattened for the MLP VAE;
        standardised internally with one mean/std over the rows in play).
      features_h: ``(N, D)`` the task model's penultimate features (standardised per
        column internally).
      task_losses: ``(N,)`` per-example task losses w.r.t. the labels the pool carries, or
        ``None``. Pool rows (not in ``existing``) become a ranker training group. Pass
        them only when those labels are trusted (see the module docstring).
      existing: ``(M,)`` indices of the labelled (meta) set, ``M >= 1``.
      budget: number of examples to select, ``1 <= budget <= N - M``.
      key: PRNG key; the result is a deterministic function of it and the inputs.
      labelled_losses: ``(M,)`` task losses of ``existing`` w.r.t. their clean labels,
        aligned with ``existing``; the ranker's default training group.
      steps: VAE/discriminator iterations. ranker_steps: loss-predictor iterations.
      subpool: size of the random sub-pool of unlabelled candidates (whole pool if smaller).
      batch_size: labelled and unlabelled minibatch size (and ranker pairs per group).
      latent_dim: VAE latent size. ranking: ``"bce"`` or ``"margin"``, see
        :func:`ranking_loss`. beta, adversary_weight: VAE loss weights.

    Returns:
      ``(budget,)`` unique int64 indices into ``[0, N)``, none in ``existing``, lowest
      discriminator logit of "labelled" first.

    Raises:
      ValueError / TypeError naming the argument, before any computation.
    """
    x, h, task_losses, existing, budget, labelled_losses, subpool = _check_inputs(
        x, features_h, task_losses, existing, budget, labelled_losses, subpool)
    for name, value in (("steps", steps), ("ranker_steps", ranker_steps),
                        ("batch_size", batch_size), ("latent_dim", latent_dim)):
        _positive_int(name, value)
    if ranking not in ("bce", "margin"):
        raise ValueError(f"`ranking` must be 'bce' or 'margin'; got {ranking!r}.")

    n = x.shape[0]
    k_sub, k_rank, k_vaal = jax.random.split(key, 3)
    in_existing = np.zeros(n, bool)
    in_existing[existing] = True
    pool = np.flatnonzero(~in_existing)
    if pool.size > subpool:
        pick = np.asarray(jax.random.choice(k_sub, pool.size, (subpool,), replace=False))
        candidates = pool[np.sort(pick)]
    else:
        candidates = pool

    # 1. Loss predictor on frozen features.
    h_std = _standardise(h, np.arange(n), axis=0)
    groups = []
    if labelled_losses is not None and existing.size >= 2:
        groups.append((h_std[existing], labelled_losses))
    if task_losses is not None:
        groups.append((h_std[pool], task_losses[pool]))
    predict, _ = train_ranker(groups, k_rank, steps=ranker_steps, batch_size=batch_size,
                              kind=ranking)
    rows = np.concatenate([existing, candidates])
    pred = np.asarray(predict(jnp.asarray(h_std[rows])))
    r = normalised_rank(pred)
    r_l, r_u = r[: existing.size], r[existing.size:]

    # 2. VAE + discriminator conditioned on the rank.
    x_rows = _standardise(x.reshape((n, -1)), rows, axis=None)
    x_l, x_u = x_rows[: existing.size], x_rows[existing.size:]
    score, _, _ = train_vaal(x_l, r_l, x_u, r_u, k_vaal, steps=steps, batch_size=batch_size,
                             latent_dim=latent_dim, beta=beta,
                             adversary_weight=adversary_weight)

    # 3. The candidates the discriminator finds least "labelled".
    logit_labelled = discriminator_scores(score, x_u, r_u)
    order = np.argsort(logit_labelled, kind="stable")[:budget]
    return candidates[order].astype(np.int64)
