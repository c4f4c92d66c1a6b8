"""SlimAdam: Adam with second moments averaged along per-layer axes.

The family of Kalra et al. (2025), eq. 2: for each parameter with gradient
``g`` and averaging axes ``K``

.. math::

  m_{t+1} = \\beta_1 m_t + (1 - \\beta_1) g_t, \\qquad
  v_{t+1} = \\beta_2 v_t + (1 - \\beta_2) \\mathbb{E}_K[g_t^2], \\qquad
  u_{t+1} = \\frac{\\hat m_{t+1}}{\\sqrt{\\hat v_{t+1}} + \\epsilon},

with bias-corrected moments ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 -
b2^t)``. ``v`` is stored with the axes ``K`` reduced (kept as size-1 dims),
so it holds ``size / prod(shape[K])`` entries. With ``K = ()`` everywhere this
is exactly `optax.scale_by_adam`; with every axis in ``K`` it is AdaLayer
(Zhao et al. 2024); with the ``"adam-mini"`` preset it is Adam-mini v1.1
(Zhang et al. 2024); with the ``"slimadam"`` preset (Table 3) or rules derived
from an SNR analysis (`slimoptax.derive_rules`) it is SlimAdam.

Note the paper's eq. 1 writes ``sqrt(v_hat + eps)``; like optax (and the
authors' code) we add ``eps`` outside the square root.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _tree, layers
from slimoptax import rules as rules_lib

Compress = Any  # None | str | Rules | mapping | callable | pytree of axes


class ScaleBySlimAdamState(NamedTuple):
  """State of `scale_by_slim_adam`.

  Attributes:
    count: number of updates applied (int32 scalar).
    mu: first moment, same shapes as the parameters.
    nu: second moment averaged over the compression axes, which are kept as
      size-1 dims (for a `labels.Reshaped` view: the view's shape, reduced).
  """

  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def _resolve(tree: Any, compress: Compress, num_heads: int | None, *, warn: bool):
  return [a for _, _, a in rules_lib.resolve_tree(
      tree, compress, what="compress", num_heads=num_heads, warn=warn)]


def mean_square(g: jax.Array, axes: layers.Axes | layers.Reshaped) -> jax.Array:
  """``E_K[g^2]`` with the averaged axes kept as size-1 dims (in ``g``'s view)."""
  if isinstance(axes, layers.Reshaped):
    g = g.reshape(axes.shape)
    axes = axes.axes
  sq = jnp.square(g)
  if not axes:
    return sq
  return jnp.mean(sq, axis=axes, keepdims=True)


def _precondition(m_hat: jax.Array, v_hat: jax.Array, axes, eps) -> jax.Array:
  if isinstance(axes, layers.Reshaped):
    shape = m_hat.shape
    return (m_hat.reshape(axes.shape) / (jnp.sqrt(v_hat) + eps)).reshape(shape)
  return m_hat / (jnp.sqrt(v_hat) + eps)


def scale_by_slim_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    *,
    compress: Compress = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    num_heads: int | None = None,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with second moments averaged over axes ``K``.

  .. math::

    v_{t+1} = \\beta_2 v_t + (1-\\beta_2)\\,\\mathbb{E}_K[g_t^2], \\qquad
    u = \\hat m / (\\sqrt{\\hat v} + \\epsilon)

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the square root of the bias-corrected second moment.
    compress: which axes each parameter's second moment is averaged over:
      ``None`` (none: exactly `optax.scale_by_adam`); a preset name
      (``"adam"``, ``"slimadam"``, ``"adalayer"``, ``"adalayer+ln+tn"``,
      ``"adam-mini"``); a `slimoptax.Rules` object; a callable ``params ->
      pytree``; or a pytree matching the parameters whose leaves are tuples
      of int axes (``()`` = none) or `slimoptax.Reshaped` views. Rules and
      presets read Flax layouts (``Dense`` kernels are ``(fan_in,
      fan_out)``); integer axes are taken as given.
    mu_dtype: dtype of the first moment (default: the parameters').
    nu_dtype: dtype of the second moment (default: the parameters').
    nesterov: use Nesterov momentum, as in `optax.scale_by_adam`.
    num_heads: attention head count for presets that need it on 2-D
      ``(d, H*hd)`` attention kernels (``"adam-mini"``).

  Returns:
    A `optax.GradientTransformation` with state `ScaleBySlimAdamState`.

  Example:
    >>> tx = optax.chain(slimoptax.scale_by_slim_adam(compress="slimadam"),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)

  References:
    Kalra et al., `When Can You Get Away with Low Memory Adam?
    <https://arxiv.org/abs/2503.01843>`_, 2025 (eq. 2, Table 3).
  """
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None
  nu_dtype = jax.dtypes.canonicalize_dtype(nu_dtype) if nu_dtype is not None else None

  def init_fn(params):
    _tree.check_float_params(params)
    axes = _resolve(params, compress, num_heads, warn=True)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    mu = [jnp.zeros(p.shape, dtype=mu_dtype or p.dtype) for p in leaves]
    nu = [jnp.zeros(rules_lib.reduced_shape(p.shape, a), dtype=nu_dtype or p.dtype)
          for p, a in zip(leaves, axes)]
    return ScaleBySlimAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree_util.tree_unflatten(treedef, mu),
        nu=jax.tree_util.tree_unflatten(treedef, nu),
    )

  def update_fn(updates, state, params=None):
    del params
    axes = _resolve(updates, compress, num_heads, warn=False)
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    mu_leaves = _tree.leaves_like(updates, state.mu, what="state.mu")
    nu_leaves = _tree.leaves_like(updates, state.nu, what="state.nu")
    count_inc = optax.safe_increment(state.count)
    c1 = 1 - jnp.asarray(b1, jnp.float32) ** count_inc
    c2 = 1 - jnp.asarray(b2, jnp.float32) ** count_inc
    new_u, new_mu, new_nu = [], [], []
    for (path, _), g, m, v, a in zip(_tree.named_leaves(updates), g_leaves, mu_leaves,
                                     nu_leaves, axes):
      mu_prev, nu_prev = m, v
      if tuple(m.shape) != tuple(g.shape):
        raise ValueError(
            f"first moment of {path!r} has shape {tuple(m.shape)} but the update has "
            f"{tuple(g.shape)}: the state was created for other parameters")
      expected = rules_lib.reduced_shape(g.shape, a)
      if tuple(v.shape) != expected:
        raise ValueError(
            f"second moment of {path!r} has shape {tuple(v.shape)} but the compression rules give "
            f"{expected}: the state was created with other rules (or for other parameters)"
        )
      m = (1 - b1) * g + b1 * m
      v = (1 - b2) * mean_square(g, a) + b2 * v
      if nesterov:
        m_hat = (b1 * m / (1 - jnp.asarray(b1, jnp.float32) ** optax.safe_increment(count_inc))
                 + (1 - b1) * g / c1)
      else:
        m_hat = m / c1.astype(m.dtype)
      v_hat = v / c2.astype(v.dtype)
      new_u.append(_precondition(m_hat, v_hat, a, eps).astype(g.dtype))
      # The state keeps its dtype (array-valued betas must not promote a bf16 state).
      new_mu.append(m.astype(mu_dtype or mu_prev.dtype))
      new_nu.append(v.astype(nu_dtype or nu_prev.dtype))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(new_u), ScaleBySlimAdamState(count=count_inc, mu=unflat(new_mu), nu=unflat(new_nu))

  return optax.GradientTransformation(init_fn, update_fn)


def default_weight_decay_mask(params: Any) -> Any:
  """Decay parameters with ``ndim >= 2`` (matrices, embeddings, kernels)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def slim_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.1,
    *,
    compress: Compress = None,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    nesterov: bool = False,
    num_heads: int | None = None,
) -> optax.GradientTransformation:
  """SlimAdam with decoupled weight decay: a drop-in for `optax.adamw`.

  .. math::

    \\theta_{t+1} = \\theta_t - \\eta_t \\left(\\frac{\\hat m}{\\sqrt{\\hat v} + \\epsilon}
    + \\lambda \\theta_t\\right), \\quad v \\text{ averaged over } K \\text{ (see
    `scale_by_slim_adam`)}

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment (0.95 as in the SlimAdam paper).
    eps: added outside the square root.
    weight_decay: decoupled weight-decay strength.
    compress: see `scale_by_slim_adam` (``None``: plain AdamW; a preset name
      such as ``"slimadam"``; rules; a pytree of axes; a callable).
    mask: which parameters are decayed: a pytree of bools or a callable;
      default `default_weight_decay_mask` (``ndim >= 2``). Note `optax.adamw`
      decays everything by default.
    mu_dtype: first-moment dtype.
    nu_dtype: second-moment dtype.
    nesterov: Nesterov momentum.
    num_heads: attention head count for head-wise presets on 2-D kernels.

  Returns:
    A `optax.GradientTransformation`.

  Example:
    >>> tx = slimoptax.slim_adamw(3e-4, compress="slimadam")
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  References:
    Kalra et al., 2025; Loshchilov & Hutter, Decoupled Weight Decay
    Regularization, 2019.
  """
  return optax.chain(
      scale_by_slim_adam(b1, b2, eps, compress=compress, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                         nesterov=nesterov, num_heads=num_heads),
      optax.add_decayed_weights(weight_decay, default_weight_decay_mask if mask is None else mask),
      optax.scale_by_learning_rate(learning_rate),
  )


__all__ = [
    "ScaleBySlimAdamState", "default_weight_decay_mask", "mean_square", "scale_by_slim_adam",
    "slim_adamw",
]
