"""Adam as an online mean/variance estimator: AdaVar and Thm 4.1.

Orvieto & Gower, In Search of Adam's Secret Sauce, 2025, §4. With ``b1 = b2 =
beta``, no bias correction and ``eps = 0``, Adam's direction ``m_k /
sqrt(v_k)`` equals (Prop. 1)

.. math::

  d_k = \\frac{m_k}{\\sqrt{m_k^2 + \\sigma_k^2}}, \\qquad
  m_k = \\beta m_{k-1} + (1 - \\beta) g_k, \\qquad
  \\sigma_k^2 = \\beta \\sigma_{k-1}^2 + \\beta (1 - \\beta) (m_{k-1} - g_k)^2,

so ``sigma_k^2 = v_k - m_k^2 = beta EMA_beta[(m_{k-1} - g_k)^2]``: the online
variational estimate of the gradient variance of Thm 4.1 (eq. 7, 8). AdaVar
(eq. 12, App. C.4) decouples the three roles of ``beta``:
``sigma_k^2 = gamma EMA_tau[(m_{k-1} - g_k)^2]``. The mean and the bias
corrections are optax's (`optax.tree.update_moment`,
`optax.tree.bias_correction`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _tree
from slimoptax._sign import safe_divide
from slimoptax._slim_adam import ScaleBySlimAdamState


class ScaleByAdaVarState(NamedTuple):
  """State of `scale_by_adavar`.

  Attributes:
    count: number of updates applied (int32 scalar).
    mu: mean estimate ``m_k = EMA_beta[g_k]``, same shapes as the parameters.
    sigma2: variance estimate ``sigma_k^2 = gamma EMA_tau[(m_{k-1} - g_k)^2]``
      (``gamma`` included), same shapes as the parameters.
  """

  count: chex.Array
  mu: optax.Updates
  sigma2: optax.Updates


def scale_by_adavar(
    beta: ArrayLike = 0.95,
    gamma: ArrayLike | None = None,
    tau: ArrayLike | None = None,
    eps: ArrayLike = 1e-8,
    *,
    bias_correction: bool = False,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Rescales updates by AdaVar, Orvieto & Gower's generalised Adam (eq. 12).

  .. math::

    m_k &= \\beta m_{k-1} + (1 - \\beta) g_k, \\quad
    \\sigma_k^2 = \\tau \\sigma_{k-1}^2 + \\gamma (1 - \\tau) (m_{k-1} - g_k)^2, \\quad
    m_0 = \\sigma_0^2 = 0, \\\\
    d_k &= \\frac{m_k}{\\sqrt{m_k^2 + \\sigma_k^2} + \\epsilon}
    \\qquad (\\sigma_k^2 = \\gamma\\,\\mathrm{EMA}_\\tau[(m_{k-1} - g_k)^2]).

  The deviation uses the *previous* mean ``m_{k-1}`` (Prop. 1, Thm 4.1).
  With ``gamma = tau = beta`` this is Adam with ``b1 = b2 = beta`` exactly
  (Prop. 1: ``m_k^2 + sigma_k^2 = v_k``); for any other choice it is not an
  Adam update (Prop. 2).

  Bias correction (``bias_correction=True``) debiases as Adam does, through
  the second moment AdaVar implies, ``v_k = m_k^2 + sigma_k^2``:
  ``d_k = m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m_k / (1 - beta^k)`` and
  ``v_hat = v_k / (1 - tau^k)``. With ``gamma = tau = beta`` this is
  `optax.scale_by_adam` ``(b1 = b2 = beta)`` exactly. (Orvieto & Gower do not say
  how their AdaVar runs debiased; this is our choice.)

  Args:
    beta: decay of the mean estimate ``m``, in [0, 1).
    gamma: multiplier of the variance term, >= 0 (``None``: ``beta``).
    tau: decay of the squared-deviation EMA, in [0, 1) (``None``: ``beta``).
    eps: added to the denominator outside the square root, as in Adam (0
      gives Orvieto & Gower's eq. 12 exactly, with ``0/0 := 0``).
    bias_correction: debias as described above.
    mu_dtype: dtype of ``m`` (default: the updates').

  Returns:
    A `optax.GradientTransformation` with state `ScaleByAdaVarState`.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> tx = optax.chain(slimoptax.scale_by_adavar(0.95, gamma=0.95, tau=0.95,
    ...                                                  bias_correction=True),
    ...                  optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(8e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.2, -0.4])}, state, params)
    >>> [round(x, 5) for x in updates["w"].tolist()]  # Adam's first step: sign(g)
    [-0.0088, 0.0088]

  References:
    Orvieto & Gower, In Search of Adam's Secret Sauce, 2025 (Prop. 1, eq. 12,
    App. C.2, C.4).
  """
  gamma = beta if gamma is None else gamma
  tau = beta if tau is None else tau
  for name, value in (("beta", beta), ("tau", tau)):
    _tree.check_range(name, value, 0.0, 1.0)
  for name, value in (("gamma", gamma), ("eps", eps)):
    _tree.check_range(name, value, 0.0)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)

  def init_fn(params):
    _tree.check_float_params(params)
    return ScaleByAdaVarState(count=jnp.zeros([], jnp.int32),
                              mu=_tree.zeros_like_tree(params, mu_dtype),
                              sigma2=_tree.zeros_like_tree(params))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleByAdaVarState, who="scale_by_adavar")
    def moments(_, g, m, s):
      s = tau * s + gamma * (1 - tau) * jnp.square(m - g)
      m = optax.tree.update_moment(g, m, beta, 1)
      # The variance reads the previous mean. Adding min(s, 0), an exact zero (s >= 0), makes the new
      # mean depend on it, so XLA computes the variance first and updates the donated mean in place;
      # without it, it keeps the previous mean in a parameter-sized copy on every step
      # (benchmarks/bench_all.py, group "other").
      return m + jnp.minimum(s, 0).astype(m.dtype), s

    mu, sigma2 = _tree.map_update(moments, updates, state.mu, state.sigma2,
                                  names=["first moment", "variance"], num_outputs=2)
    count_inc = optax.safe_increment(state.count)
    num, v = mu, jax.tree.map(lambda m, s: jnp.square(m) + s, mu, sigma2)
    if bias_correction:
      num = optax.tree.bias_correction(mu, jnp.asarray(beta, jnp.float32), count_inc)
      v = optax.tree.bias_correction(v, jnp.asarray(tau, jnp.float32), count_inc)
    d = jax.tree.map(lambda g, n, v: safe_divide(n, jnp.sqrt(v) + eps).astype(g.dtype),
                     updates, num, v)
    # The state keeps its dtypes (array-valued betas must not promote a bf16 state).
    mu = jax.tree.map(lambda m, prev: m.astype(mu_dtype or prev.dtype), mu, state.mu)
    sigma2 = jax.tree.map(lambda s, prev: s.astype(prev.dtype), sigma2, state.sigma2)
    return d, ScaleByAdaVarState(count=count_inc, mu=mu, sigma2=sigma2)

  return optax.GradientTransformation(init_fn, update_fn)


_ADAM_STATES = (optax.ScaleByAdamState, ScaleBySlimAdamState)


def _find_adam_states(state: Any) -> list[Any]:
  """Every Adam state inside ``state`` (found by type name, wherever it sits)."""
  is_adam = lambda _, x: isinstance(x, _ADAM_STATES)
  return [found for cls in _ADAM_STATES
          for _, found in optax.tree.get_all_with_path(state, cls.__name__, is_adam)]


def mean_variance_from_adam(state: Any, *, beta: ArrayLike | None = None) -> tuple[Any, Any]:
  """The gradient mean and variance estimates held in an Adam state with ``b1 = b2``.

  For Adam with ``b1 = b2 = beta``, ``m_k`` and ``sigma_k^2 = v_k - m_k^2`` are
  exactly the online variational estimates of Thm 4.1 (eq. 7, 8):
  ``sigma_k^2 = beta sigma_{k-1}^2 + beta (1 - beta) (m_{k-1} - g_k)^2``.
  With ``b1 != b2`` the difference ``v - m^2`` has no such meaning (Prop. 2);
  the state does not record the betas, so this is not checked.

  Args:
    state: a `optax.ScaleByAdamState`, a `slimoptax.ScaleBySlimAdamState`
      (uncompressed: ``nu`` must have ``mu``'s shape), or an optimizer state
      containing exactly one of them (e.g. the state of ``optax.adamw``).
    beta: if given, return the bias-corrected estimates ``m_hat = m / (1 -
      beta^k)`` and ``v_hat - m_hat^2`` with ``v_hat = v / (1 - beta^k)``, the
      exponentially weighted mean and variance of the gradients seen (weights
      summing to one).

  Returns:
    ``(mean, variance)``: pytrees like the parameters; the variance is
    clipped at 0 against rounding.

  Raises:
    ValueError: if no (or several) Adam states are found, or a second moment
      is compressed (the path is named).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.adam(1e-3, b1=0.5, b2=0.5)
    >>> opt_state = tx.init(params)
    >>> for g in ([1.0, 2.0], [3.0, 2.0]):
    ...   _, opt_state = tx.update({"w": jnp.array(g)}, opt_state)
    >>> mean, var = slimoptax.mean_variance_from_adam(opt_state, beta=0.5)
    >>> [f"{x:.4f}" for x in [*mean["w"].tolist(), *var["w"].tolist()]]  # weights 1/3, 2/3
    ['2.3333', '2.0000', '0.8889', '0.0000']
  """
  found = _find_adam_states(state)
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one Adam state (optax.ScaleByAdamState or ScaleBySlimAdamState) in "
        f"`state`, found {len(found)}")
  adam = found[0]
  mu_named = _tree.named_leaves(adam.mu)
  nu_leaves = _tree.leaves_like(adam.mu, adam.nu, what="state.nu")
  for (path, m), v in zip(mu_named, nu_leaves):
    if jnp.shape(m) != jnp.shape(v):
      raise ValueError(
          f"second moment of {path!r} has shape {jnp.shape(v)}, the first moment "
          f"{jnp.shape(m)}: a compressed (SlimAdam) second moment holds no per-parameter "
          "variance")
  mean, second = adam.mu, adam.nu
  if beta is not None:
    c = 1 - jnp.asarray(beta, jnp.float32) ** adam.count
    safe_c = jnp.where(c > 0, c, 1.0)
    mean = jax.tree.map(lambda m: m / safe_c.astype(m.dtype), mean)
    second = jax.tree.map(lambda v: v / safe_c.astype(v.dtype), second)
  var = jax.tree.map(lambda m, v: jnp.maximum(v.astype(m.dtype) - jnp.square(m), 0), mean, second)
  return mean, var


__all__ = ["ScaleByAdaVarState", "mean_variance_from_adam", "scale_by_adavar"]
