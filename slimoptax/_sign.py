"""Sign-based updates: SignSGD, Signum, EMASign and mollified Signum.

The sign methods of Orvieto & Gower's ladder between SGD and Adam (Table 1, §2).
With ``EMA_beta[s_k] = beta EMA_beta[s_{k-1}] + (1 - beta) s_k`` (eq. 1, i.e.
momentum with dampening ``1 - beta``):

.. math::

  \\text{SignSGD:}\\; d_k = \\operatorname{sign}(g_k), \\qquad
  \\text{Signum:}\\; d_k = \\operatorname{sign}(\\mathrm{EMA}_\\beta[g_k]), \\qquad
  \\text{EMASign:}\\; d_k = \\mathrm{EMA}_\\beta[\\operatorname{sign}(g_k)],

and the mollified Signum of their Fig. 4 / Fig. 7, ``d_k = m_k / sqrt(m_k^2 +
eps)`` with ``m_k = EMA_beta[g_k]`` (or ``m_k / (|m_k| + eps)``, the mollifier
outside the square root). Adam with ``b1 = b2`` is the *adaptive* mollifier
``m_k / sqrt(m_k^2 + sigma_k^2)`` (see `slimoptax.variance`).

The EMA starts at zero (``init="zero"``, "ZI") or at its first input
(``init="grad"``, "GI": ``EMA[s_1] = s_1``), the two initialisations the seed
ablates (Fig. 4, Table 3). No bias correction: Signum is invariant to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _tree

SIGN_MODES: tuple[str, ...] = ("signsgd", "signum", "emasign", "mollified")
_INITS = ("zero", "grad")


class ScaleBySignState(NamedTuple):
  """State of `scale_by_sign`.

  Attributes:
    count: number of updates applied (int32 scalar); decides the first step of
      ``init="grad"``.
    mu: the EMA (of ``g`` for Signum/mollified, of ``sign(g)`` for EMASign),
      same shapes as the parameters; ``None`` for SignSGD, which keeps no
      state.
  """

  count: chex.Array
  mu: optax.Updates | None


def _is_zero(x: Any) -> bool:
  """Whether a hyperparameter is a concrete zero (tracers are never zero)."""
  try:
    return float(x) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def scale_by_sign(
    *,
    mode: str = "signum",
    beta: ArrayLike = 0.9,
    eps: ArrayLike = 0.0,
    init: str = "zero",
    eps_in_sqrt: bool = True,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Sign-type rescaling: SignSGD, Signum, EMASign or mollified Signum.

  .. math::

    m_k = \\beta m_{k-1} + (1 - \\beta) s_k, \\quad
    d_k = \\begin{cases}
      \\operatorname{sign}(g_k) & \\text{signsgd} \\\\
      \\operatorname{sign}(m_k),\\; s_k = g_k & \\text{signum} \\\\
      m_k,\\; s_k = \\operatorname{sign}(g_k) & \\text{emasign} \\\\
      m_k / \\sqrt{m_k^2 + \\epsilon},\\; s_k = g_k & \\text{mollified}
    \\end{cases}

  with ``m_0 = 0`` (``init="zero"``) or ``m_1 = s_1`` (``init="grad"``).

  Args:
    mode: ``"signsgd"``, ``"signum"``, ``"emasign"`` (momentum on the sign,
      "Momentum on SignSGD" in the seed) or ``"mollified"``.
    beta: EMA decay; the dampening is ``1 - beta``. Unused by ``"signsgd"``.
    eps: the mollifier of ``"mollified"`` (``eps = 0`` gives Signum, with
      ``0/0 := 0``). Must be 0 for the other modes.
    init: ``"zero"`` (ZI) or ``"grad"`` (GI: the EMA is set to its first
      input on the first step). ``"signsgd"`` has no EMA and takes only
      ``"zero"``.
    eps_in_sqrt: ``"mollified"`` only: ``m / sqrt(m^2 + eps)`` if True (seed
      Fig. 4), ``m / (|m| + eps)`` if False (the "outside" variant of Fig. 7).
    mu_dtype: dtype of the EMA (default: the updates').

  Returns:
    A `optax.GradientTransformation` with state `ScaleBySignState`. Chain it
    with `optax.scale_by_learning_rate` (see `slimoptax.ladder` for the full
    optimizers with weight decay and clipping).

  Example:
    >>> tx = optax.chain(slimoptax.scale_by_sign(mode="signum", beta=0.95),
    ...                  optax.add_decayed_weights(0.1),
    ...                  optax.scale_by_learning_rate(1e-3))

  References:
    Bernstein et al., `signSGD: Compressed Optimisation for Non-Convex Problems
    <https://arxiv.org/abs/1802.04434>`_, 2018 (SignSGD, Signum).
    Orvieto & Gower, In Search of Adam's Secret Sauce, 2025 (§2, §3.3, Fig. 4,
    Table 1, App. A.1.1).
  """
  if mode not in SIGN_MODES:
    raise ValueError(f"unknown sign mode {mode!r}; known: {SIGN_MODES}")
  if init not in _INITS:
    raise ValueError(f"unknown init {init!r}; known: {_INITS}")
  if mode != "mollified" and not _is_zero(eps):
    raise ValueError(f"eps={eps!r} is only used by mode='mollified', not mode={mode!r}")
  if mode == "signsgd" and init != "zero":
    raise ValueError("mode='signsgd' keeps no EMA; init must be 'zero'")
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None

  def init_fn(params):
    _tree.check_float_params(params)
    mu = None
    if mode != "signsgd":
      mu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype=mu_dtype or p.dtype), params)
    return ScaleBySignState(count=jnp.zeros([], jnp.int32), mu=mu)

  def _direction(m):
    if mode == "signum":
      return jnp.sign(m)
    if mode == "emasign":
      return m
    # mollified
    denom = jnp.sqrt(jnp.square(m) + eps) if eps_in_sqrt else jnp.abs(m) + eps
    safe = jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return jnp.where(denom > 0, m / safe, jnp.zeros_like(m))

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    if mode == "signsgd":
      return jax.tree.map(jnp.sign, updates), ScaleBySignState(count=count_inc, mu=None)
    mu_leaves = _tree.leaves_like(updates, state.mu, what="state.mu")
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    first = state.count == 0
    new_d, new_mu = [], []
    for (path, _), g, m in zip(_tree.named_leaves(updates), g_leaves, mu_leaves):
      if tuple(jnp.shape(m)) != tuple(jnp.shape(g)):
        raise ValueError(
            f"EMA of {path!r} has shape {tuple(jnp.shape(m))} but the update has "
            f"{tuple(jnp.shape(g))}: the state was created for other parameters")
      mu_prev = m
      s = jnp.sign(g) if mode == "emasign" else g
      m = beta * m + (1 - beta) * s
      if init == "grad":
        m = jnp.where(first, s.astype(m.dtype), m)
      new_d.append(_direction(m).astype(g.dtype))
      # The state keeps its dtype (an array-valued beta must not promote a bf16 EMA).
      new_mu.append(m.astype(mu_dtype or mu_prev.dtype))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(new_d), ScaleBySignState(count=count_inc, mu=unflat(new_mu))

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["SIGN_MODES", "ScaleBySignState", "scale_by_sign"]
