"""The optimizer ladder between SGD and Adam, with the papers' hyperparameters.

One-line constructors for the methods of Orvieto & Gower 2025 ("In Search of
Adam's Secret Sauce"), Table 1 (Adam, Adam with ``b1 = b2``, Signum, RMSprop,
SGD + Cclip, SignSGD / EMASign, SGD + Gclip, SGD) and the low-memory baselines
of the SlimAdam paper (Kalra et al. 2025, "When Can You Get Away with Low Memory
Adam?", App. A: Adafactor with and without momentum, Lion, SM3). Every
constructor takes ``learning_rate`` (a float or an optax schedule) first;
defaults are the papers' settings:

* decoupled weight decay ``0.1`` (multiplied by the learning rate, as PyTorch
  ``AdamW``), except SGD, which Orvieto & Gower ran without weight decay
  (App. A.1.1, B.1). It applies to parameters with ``ndim >= 2`` by default,
  slimoptax's convention (as `slimoptax.slim_adamw`); the papers do not say
  which parameters decay. Pass ``mask=None`` to decay all, as ``optax.adamw``
  does (the default ``mask="ndim>=2"``, `DEFAULT_MASK`, is a string so that
  `optax.inject_hyperparams` does not take it for a schedule);
* global norm clipping of the raw gradient to ``1.0`` (``clip_norm``; ``None``
  turns it off);
* momentum with dampening ``1 - beta``: ``m_k = beta m_{k-1} + (1 - beta)
  g_k``, zero-initialised (``optax.ema(beta, debias=False)``).

Every constructor works with `optax.inject_hyperparams` as it is (the default
``mask`` is the string ``"ndim>=2"``, not a function; the state does not
depend on the value of ``weight_decay``), except for these arguments, which
must be named in ``static_args``: ``min_dim_size_to_factor`` of `adafactor` /
`adafactor_momentum` (it picks shapes), ``b2`` of `sm3` (`optax.scale_by_sm3`
branches on ``b2 == 1`` in Python), and a callable ``mask`` (inject_hyperparams
takes every callable for a schedule)::

    tx = optax.inject_hyperparams(ladder.adafactor,
                                  static_args=("min_dim_size_to_factor",))(1e-3)

`LADDER` maps names to constructors for the experiment scripts::

    tx = LADDER["signum"](1e-3)

Note: PyTorch's ``SGD`` starts its momentum buffer at the first gradient
("GI"); ours start at zero ("ZI"); Orvieto & Gower found no difference for
Signum (Table 3), and the gap decays as ``beta^k``. `signum` and `emasign` take
``init="grad"`` for GI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from experiments._lib import data
from experiments._lib.schedules import warmup_cosine
from experiments._lib.train import sweep_log_fn, train
from slimoptax import scale_by_adafactor, scale_by_sign

Mask = Any  # "ndim>=2" | None | pytree of bools | callable params -> pytree of bools

#: The default weight-decay mask: parameters with ``ndim >= 2`` (the default of
#: `slimoptax.slim_adamw`). A string, not the function, so that
#: `optax.inject_hyperparams` (which takes every callable argument for a
#: schedule) passes it through without ``static_args``.
DEFAULT_MASK = "ndim>=2"


def default_weight_decay_mask(params: Any) -> Any:
  """Decay parameters with ``ndim >= 2`` (matrices, embeddings, kernels)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _mask(mask: Mask) -> Any:
  """The mask `optax.add_decayed_weights` takes: ``"ndim>=2"`` resolved to its function."""
  if isinstance(mask, str):
    if mask != DEFAULT_MASK:
      raise ValueError(f"unknown mask {mask!r}: pass {DEFAULT_MASK!r} (the default), None (decay "
                       "all), a pytree of bools or a callable params -> pytree of bools")
    return default_weight_decay_mask
  return mask


def _gclip(clip_norm: ArrayLike | None) -> list[optax.GradientTransformation]:
  return [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]


def _decay(weight_decay: ArrayLike, mask: Mask) -> list[optax.GradientTransformation]:
  """Decoupled weight decay; its state does not depend on the value of ``weight_decay``.

  A Python 0 skips the arithmetic but keeps the same (empty) state, so an
  injected weight decay (`optax.inject_hyperparams`) gives the state of the
  plain alias.
  """
  tx = optax.add_decayed_weights(weight_decay, _mask(mask))
  if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) \
      and weight_decay == 0:
    return [optax.GradientTransformation(tx.init, lambda updates, state, params=None: (updates,
                                                                                      state))]
  return [tx]


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """Adam with decoupled weight decay and global clipping (Orvieto & Gower's Adam).

  ``u = -lr (m_hat / (sqrt(v_hat) + eps) + wd * w)`` on ``Gclip(g) = min(1,
  clip_norm / ||g||) g``, bias-corrected as PyTorch ``AdamW``.

  Args:
    learning_rate: float or schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added outside the square root.
    weight_decay: decoupled weight decay (scaled by the learning rate).
    clip_norm: global-norm clipping of the raw gradient (``None``: off).
    mask: which parameters decay: ``"ndim>=2"`` (`DEFAULT_MASK`, the default),
      ``None`` (all), a pytree of bools or a callable (a callable must be in
      ``static_args`` of `optax.inject_hyperparams`).

  Returns:
    A `optax.GradientTransformation`.

  References:
    Orvieto & Gower 2025, App. A.1.1; Loshchilov & Hutter 2019.
  """
  return optax.chain(*_gclip(clip_norm), optax.scale_by_adam(b1, b2, eps),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def adam_equal_betas(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """Adam with ``b1 = b2 = beta``, Orvieto & Gower's recommendation (best in its Fig. 2: 0.95).

  See `adamw`. Its Adam step is ``scale_by_adavar(beta, beta, beta, eps,
  bias_correction=True)`` (Orvieto & Gower, Prop. 1).
  """
  return adamw(learning_rate, beta, beta, eps, weight_decay, clip_norm=clip_norm, mask=mask)


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """RMSprop as Orvieto & Gower ran it: PyTorch ``AdamW`` with ``b1 = 0`` (so ``v`` is bias-corrected).

  ``u = -lr (g / (sqrt(v / (1 - b2^k)) + eps) + wd * w)``. Not `optax.rmsprop`
  (no bias correction, ``eps`` inside the root).
  """
  return adamw(learning_rate, 0.0, b2, eps, weight_decay, clip_norm=clip_norm, mask=mask)


def signum(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    init: str = "zero",
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """Signum: ``u = -lr (sign(EMA_beta[Gclip(g)]) + wd * w)`` (Orvieto & Gower's best: beta 0.95, Gclip 1).

  Clipping happens before the EMA, so it changes Signum (App. A.1.1).
  """
  return optax.chain(*_gclip(clip_norm), scale_by_sign(mode="signum", beta=beta, init=init),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def signsgd(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: ArrayLike = 0.1,
    *,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """SignSGD with decoupled weight decay: ``u = -lr (sign(g) + wd * w)`` (clipping has no effect)."""
  return optax.chain(scale_by_sign(mode="signsgd"), *_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def emasign(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.1,
    *,
    init: str = "zero",
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """EMASign ("momentum on SignSGD"): ``u = -lr (EMA_beta[sign(g)] + wd * w)``.

  Global clipping has no effect here (it does not change signs), so there is
  no ``clip_norm``.
  """
  return optax.chain(scale_by_sign(mode="emasign", beta=beta, init=init),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.0,
    *,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """SGD with momentum (dampening ``1 - beta``): ``u = -lr (EMA_beta[g] + wd * w)``.

  No clipping and no weight decay by default, as in Orvieto & Gower (App. A.1.1).
  """
  return optax.chain(optax.ema(beta, debias=False), *_decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def sgd_gclip(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.0,
    *,
    clip_norm: ArrayLike = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """SGD + Gclip: global-norm clipping *before* momentum, ``u = -lr EMA_beta[Gclip(g)]``."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.ema(beta, debias=False),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def sgd_cclip(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.0,
    *,
    clip: ArrayLike = 1.0,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """SGD + Cclip: coordinate clipping *after* momentum, ``u = -lr clip(EMA_beta[Gclip(g)], ±clip)``.

  Orvieto & Gower run it on globally clipped gradients (``clip_norm=1``, App. A.1.1).
  """
  return optax.chain(*_gclip(clip_norm), optax.ema(beta, debias=False), optax.clip(clip),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def adafactor(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike | None = None,
    decay_rate: ArrayLike = 0.8,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    clipping_threshold: ArrayLike | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored_axes: Any = None,
    min_dim_size_to_factor: int = 128,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """Adafactor (`slimoptax.scale_by_adafactor`) with an external learning rate.

  ``u = -lr (AF(Gclip(g)) + wd * w)``; ``b1=None`` is the paper's momentum-free
  Adafactor, ``b1=0.9`` the fairseq "Adafactor v2" of the SlimAdam paper (run
  with ``relative_step=False``, as here). For the relative step size use
  ``scale_by_adafactor(relative_step=True)`` directly.

  Under `optax.inject_hyperparams`, name ``min_dim_size_to_factor`` in
  ``static_args`` (it decides which parameters are factored).
  """
  return optax.chain(
      *_gclip(clip_norm),
      scale_by_adafactor(decay_rate, factored_axes=factored_axes,
                         min_dim_size_to_factor=min_dim_size_to_factor, b1=b1,
                         clipping_threshold=clipping_threshold,
                         multiply_by_parameter_scale=multiply_by_parameter_scale),
      *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def adafactor_momentum(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    decay_rate: ArrayLike = 0.8,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    clipping_threshold: ArrayLike | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored_axes: Any = None,
    min_dim_size_to_factor: int = 128,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """`adafactor` with momentum ``b1 = 0.9`` ("Adafactor v2").

  Arguments as `adafactor` (explicit, so that `optax.inject_hyperparams` can
  bind them); ``min_dim_size_to_factor`` must be in ``static_args`` there.
  """
  return adafactor(learning_rate, b1, decay_rate, weight_decay, clip_norm=clip_norm,
                   clipping_threshold=clipping_threshold,
                   multiply_by_parameter_scale=multiply_by_parameter_scale,
                   factored_axes=factored_axes, min_dim_size_to_factor=min_dim_size_to_factor,
                   mask=mask)


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """`optax.lion` with the SlimAdam paper's settings (b2 = 0.95, wd 0.1, Gclip 1)."""
  return optax.chain(*_gclip(clip_norm),
                     optax.lion(learning_rate, b1, b2, weight_decay=weight_decay,
                                    mask=_mask(mask)))


def sm3(
    learning_rate: optax.ScalarOrSchedule,
    momentum: ArrayLike = 0.9,
    b2: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.1,
    *,
    clip_norm: ArrayLike | None = 1.0,
    mask: Mask = DEFAULT_MASK,
) -> optax.GradientTransformation:
  """SM3 as the SlimAdam paper ran it (momentum 0.9, accumulator EMA ``b2 = 0.95``).

  Built on `optax.scale_by_sm3` (``optax.sm3`` fixes ``b2 = 1``, plain sums,
  and takes no schedule); ``b2=1.0, weight_decay=0, clip_norm=None`` is
  ``optax.sm3``. 0-d parameters (which `optax.scale_by_sm3` cannot take) are
  treated as 1-element vectors, i.e. get their own accumulator.

  Under `optax.inject_hyperparams`, name ``b2`` in ``static_args``
  (`optax.scale_by_sm3` branches on ``b2 == 1`` in Python).
  """
  return optax.chain(*_gclip(clip_norm), _scalars_as_vectors(optax.scale_by_sm3(momentum, b2)),
                     *_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def _scalars_as_vectors(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` with 0-d leaves viewed as shape ``(1,)`` (`optax.scale_by_sm3` fails on 0-d)."""

  def promote(tree):
    return jax.tree.map(lambda x: jnp.reshape(x, (1,)) if jnp.ndim(x) == 0 else x, tree)

  def init_fn(params):
    return inner.init(promote(params))

  def update_fn(updates, state, params=None):
    out, state = inner.update(promote(updates), state, None if params is None else promote(params))
    return jax.tree.map(lambda o, u: jnp.reshape(o, jnp.shape(u)), out, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


LADDER: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": adamw,
    "adam_equal_betas": adam_equal_betas,
    "rmsprop": rmsprop,
    "signum": signum,
    "signsgd": signsgd,
    "emasign": emasign,
    "sgd": sgd,
    "sgd_gclip": sgd_gclip,
    "sgd_cclip": sgd_cclip,
    "adafactor": adafactor,
    "adafactor_momentum": adafactor_momentum,
    "lion": lion,
    "sm3": sm3,
}


__all__ = [
    "DEFAULT_MASK", "LADDER", "adafactor", "adafactor_momentum", "adam_equal_betas", "adamw", "default_weight_decay_mask",
    "emasign", "lion", "rmsprop", "sgd", "sgd_cclip", "sgd_gclip", "signsgd", "signum", "sm3", "sweep_tx", "train_sweep",
]


# -----------------------------------------------------------------------------
# Sweeps: K models of one ladder method, one vmapped step
# -----------------------------------------------------------------------------


def sweep_tx(method: str, fixed: dict, steps: int, warmup: int) -> Callable[[dict], optax.GradientTransformation]:
  """``hparams -> LADDER[method](warmup_cosine(hparams["lr"], steps, warmup), **fixed, **others)``.

  The schedule is Orvieto & Gower's (App. A): linear warm-up over ``warmup``
  steps, cosine to 1e-5; the other hyperparameters (e.g. ``b1``, ``b2``) may be
  traced, one per vmapped model.
  """
  constructor = LADDER[method]

  def make(h):
    extra = {k: v for k, v in h.items() if k != "lr"}
    return constructor(warmup_cosine(h["lr"], steps, warmup), **{**fixed, **extra})

  return make


def train_sweep(model, method: str, fixed: dict, hparams: dict, *, train_tokens, val_tokens, steps: int,
                batch_size: int, warmup: int, seed: int = 0, init_seeds=None, eval_every: int = 50,
                eval_batches: int = 8, final_eval_batches: int | None = None, name: str = "",
                log: Callable[[str], None] = print) -> dict:
  """Trains K models in lock-step, model ``i`` with ``LADDER[method]`` at ``hparams[...][i]``.

  Same initialisation (unless ``init_seeds``) and same batches for all; the
  arithmetic per model is that of K separate runs, only the compilation is
  shared. Intermediate validation losses on the first ``eval_batches``
  contiguous validation batches, the final one on ``final_eval_batches`` (None:
  all). Returns `experiments._lib.train.train`'s result with
  ``final_val_loss`` a list of K floats (NaN for a diverged model).
  """
  seq_len = model.seq_len
  result = train(
      model, sweep_tx(method, fixed, steps, warmup), hparams=hparams, num_models=len(hparams["lr"]),
      init_seeds=init_seeds, train_tokens=train_tokens, steps=steps, batch_size=batch_size, seed=seed,
      val_batches=data.eval_batches(val_tokens, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=eval_batches),
      final_val_batches=data.eval_batches(val_tokens, batch_size=batch_size, seq_len=seq_len,
                                          max_batches=final_eval_batches),
      eval_every=eval_every, log_fn=sweep_log_fn(name, steps, log))
  result["final_val_loss"] = [v if math.isfinite(v) else float("nan") for v in result["final_val_loss"]]
  return result
