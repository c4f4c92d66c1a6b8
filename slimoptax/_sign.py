"""Sign-based updates: SignSGD, Signum, EMASign and mollified Signum.

The sign methods of the ladder between SGD and Adam in Orvieto & Gower, In
Search of Adam's Secret Sauce, 2025 (Table 1, §2); SignSGD and Signum are
Bernstein et al., signSGD: Compressed Optimisation for Non-Convex Problems, 2018.
With ``EMA_beta[s_k] = beta EMA_beta[s_{k-1}] + (1 - beta) s_k`` (eq. 1, i.e.
momentum with dampening ``1 - beta``):

.. math::

  \\text{SignSGD:}\\; d_k = \\operatorname{sign}(g_k), \\qquad
  \\text{Signum:}\\; d_k = \\operatorname{sign}(\\mathrm{EMA}_\\beta[g_k]), \\qquad
  \\text{EMASign:}\\; d_k = \\mathrm{EMA}_\\beta[\\operatorname{sign}(g_k)],

and the mollified Signum of Orvieto & Gower's Fig. 4 / Fig. 7, ``d_k = m_k / sqrt(m_k^2 +
eps)`` with ``m_k = EMA_beta[g_k]`` (or ``m_k / (|m_k| + eps)``, the mollifier
outside the square root). Adam with ``b1 = b2`` is the *adaptive* mollifier
``m_k / sqrt(m_k^2 + sigma_k^2)`` (see `slimoptax.scale_by_adavar`).

The EMA starts at zero (``init="zero"``, "ZI") or at its first input
(``init="grad"``, "GI": ``EMA[s_1] = s_1``), the two initialisations
Orvieto & Gower ablate (Fig. 4, Table 3). No bias correction: Signum is
invariant to it. The EMA is `optax.tree.update_moment` (order 1).
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


def _is_nonzero(x: Any) -> bool:
  """Whether a hyperparameter is a concrete nonzero number (a traced one cannot be told)."""
  try:
    return float(x) != 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def safe_divide(num: jax.Array, denom: jax.Array) -> jax.Array:
  """``num / denom`` where ``denom > 0``, else 0 (``0/0 := 0``)."""
  safe = jnp.where(denom > 0, denom, jnp.ones_like(denom))
  return jnp.where(denom > 0, num / safe, jnp.zeros_like(num))


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
      "Momentum on SignSGD" in Orvieto & Gower) or ``"mollified"``.
    beta: EMA decay in [0, 1); the dampening is ``1 - beta``. Unused by ``"signsgd"``.
    eps: the mollifier of ``"mollified"`` (``eps = 0`` gives Signum, with
      ``0/0 := 0``). Must be 0 for the other modes.
    init: ``"zero"`` (ZI) or ``"grad"`` (GI: the EMA is set to its first
      input on the first step). ``"signsgd"`` has no EMA and takes only
      ``"zero"``.
    eps_in_sqrt: ``"mollified"`` only: ``m / sqrt(m^2 + eps)`` if True
      (Orvieto & Gower, Fig. 4), ``m / (|m| + eps)`` if False (the "outside" variant of Fig. 7).
    mu_dtype: dtype of the EMA (default: the updates').

  Returns:
    A `optax.GradientTransformation` with state `ScaleBySignState`. Chain it
    with `optax.scale_by_learning_rate` (`experiments/_lib/ladder.py` builds the full
    optimizers with weight decay and clipping).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.array([1.0, -2.0, 0.5])}
    >>> tx = optax.chain(slimoptax.scale_by_sign(mode="signum", beta=0.95),
    ...                  optax.add_decayed_weights(0.1),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.3, -0.1, 0.0])}, state, params)
    >>> [round(x, 6) for x in updates["w"].tolist()]  # -lr * (sign(m) + 0.1 w)
    [-0.0011, 0.0012, -5e-05]

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
  if mode != "mollified" and _is_nonzero(eps):
    raise ValueError(f"eps={eps!r} is only used by mode='mollified', not mode={mode!r}")
  if mode == "signsgd" and init != "zero":
    raise ValueError("mode='signsgd' keeps no EMA; init must be 'zero'")
  _tree.check_range("beta", beta, 0.0, 1.0)
  _tree.check_range("eps", eps, 0.0)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)

  def init_fn(params):
    _tree.check_float_params(params)
    mu = None if mode == "signsgd" else _tree.zeros_like_tree(params, mu_dtype)
    return ScaleBySignState(count=jnp.zeros([], jnp.int32), mu=mu)

  def _direction(m):
    if mode == "signum":
      return jnp.sign(m)
    if mode == "emasign":
      return m
    # mollified
    return safe_divide(m, jnp.sqrt(jnp.square(m) + eps) if eps_in_sqrt else jnp.abs(m) + eps)

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleBySignState, who="scale_by_sign")
    count_inc = optax.safe_increment(state.count)
    if mode == "signsgd":
      return jax.tree.map(jnp.sign, updates), ScaleBySignState(count=count_inc, mu=None)
    first = state.count == 0

    def leaf(path, g, m_prev):
      del path
      s = jnp.sign(g) if mode == "emasign" else g
      m = optax.tree.update_moment(s, m_prev, beta, 1)
      if init == "grad":
        m = jnp.where(first, s.astype(m.dtype), m)
      # The state keeps its dtype (an array-valued beta must not promote a bf16 EMA).
      return _direction(m).astype(g.dtype), m.astype(mu_dtype or m_prev.dtype)

    d, mu = _tree.map_update(leaf, updates, state.mu, names=["EMA"], num_outputs=2)
    return d, ScaleBySignState(count=count_inc, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["SIGN_MODES", "ScaleBySignState", "scale_by_sign"]
