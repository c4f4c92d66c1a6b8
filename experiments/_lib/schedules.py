"""The learning-rate schedules of the experiments: linear warm-up, then cosine decay.

Two members of one family:

* `warmup_cosine` -- Orvieto & Gower 2025 ("In Search of Adam's Secret Sauce"),
  App. A: step ``count`` (0-based) uses ``lr (count + 1) / warmup`` during the
  warm-up, so no step is wasted at rate 0, then a cosine from ``lr`` to
  ``end_value`` at ``steps``. Every argument may be a traced scalar (one per
  vmapped model in a sweep, or an argument of the jitted step), so a sweep over
  rates or run lengths compiles once. Not equal to
  ``optax.warmup_cosine_decay_schedule``, whose warm-up starts at 0.
* `lm_warmup_cosine` -- ``optax.warmup_cosine_decay_schedule`` from 0 to ``lr``
  over ``warmup`` steps, then a cosine to ``lr * final_lr_fraction`` at
  ``steps`` (the SlimAdam experiments' schedule, Kalra et al. 2025, App. B).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["lm_warmup_cosine", "warmup_cosine"]


def warmup_cosine(lr, steps, warmup, end_value: float = 1e-5,
                  dtype=jnp.float32) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to ``min(end_value, lr)``.

  Args:
    lr: peak rate; a float or a traced scalar.
    steps: total steps (the cosine reaches its end at ``steps``); may be traced.
    warmup: warm-up steps (at least 1 is used); may be traced.
    end_value: the final rate (capped at ``lr``); 0 decays to zero.
    dtype: dtype of the step count (float64 for the float64 quadratics).

  Returns:
    ``schedule(count)``, with ``schedule(count) = lr (count + 1) / warmup`` for
    ``count < warmup``.
  """
  end = jnp.minimum(jnp.asarray(end_value, dtype), lr)

  def schedule(count):
    count = jnp.asarray(count, dtype)
    warm = lr * (count + 1) / jnp.maximum(warmup, 1)
    progress = jnp.clip((count - warmup) / jnp.maximum(steps - warmup, 1), 0.0, 1.0)
    return jnp.where(count < warmup, warm, end + (lr - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))

  return schedule


def lm_warmup_cosine(lr: float, steps: int, warmup: int, final_lr_fraction: float = 0.1) -> optax.Schedule:
  """``optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr * final_lr_fraction)``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=steps,
      end_value=lr * final_lr_fraction)
