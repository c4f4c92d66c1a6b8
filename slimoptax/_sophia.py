"""Sophia: a clipped diagonal-Newton step on an EMA of curvature estimates.

Its curvature comes from an estimator of ``diag(H)`` (``H`` the Hessian of
the loss), Hutchinson's ``u * (H u)`` (`hutchinson_estimate`) or
Gauss–Newton–Bartlett's ``B * g_hat^2`` (`gnb_estimate`), both in
`slimoptax._curvature`, where their derivations are.

Sophia (`scale_by_hutchinson`, `sophia`) keeps a momentum ``m`` and an EMA
``h`` of the estimate refreshed every ``k`` steps, and steps by

.. math::

  u_t = \\mathrm{clip}\\left(\\frac{m_t}{\\max(\\gamma h_t, \\epsilon)}, \\rho\\right)

clipped per coordinate (``rho = clip_threshold``, 1 in the paper).

References:
  Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
  Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, ICLR 2024
  (Algorithms 1-3).
  Hutchinson, A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines, 1990.
  Bartlett, Approximate confidence intervals, Biometrika 1953.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from slimoptax import _slim_adam as slim_adam
from slimoptax import _tree
from slimoptax._curvature import (
  DISTRIBUTIONS,
  _check_distribution,
  gnb_estimate,
  hutchinson_estimate,
  random_probes,
)
from slimoptax._slim_adam import Compress

ESTIMATORS: tuple[str, ...] = ("hutchinson", "gnb")

# Default gamma of `sophia` per estimator: Sophia-H 0.01 (as optax.contrib.sophia),
# Sophia-G 0.05 (rho of the official GPT-2 Small SophiaG configuration).
DEFAULT_GAMMA: dict[str, float] = {"hutchinson": 0.01, "gnb": 0.05}


# --------------------------------------------------------------------------
# Sophia.
# --------------------------------------------------------------------------


class ScaleByHutchinsonState(NamedTuple):
  """State of `scale_by_hutchinson`.

  Attributes:
    count: number of updates applied (int32 scalar).
    key: PRNG key (``jax.random.PRNGKey`` layout) for the next estimate.
    mu: momentum, same shapes as the parameters.
    h: EMA of the diagonal-curvature estimate, averaged over the compression
      axes (kept as size-1 dims; for a `labels.Reshaped` view, the view's
      shape reduced). Not clamped: it may hold negative values (see
      `scale_by_hutchinson`).
    win_rate: fraction of coordinates whose last update was *not* clipped,
      ``|m / max(gamma h, eps)| < clip_threshold`` (float32 scalar; the paper
      suggests it stays between 0.1 and 0.5); ``None`` unless the
      transformation counts it (``track_win_rate=True``).
  """

  count: chex.Array
  key: chex.Array
  mu: optax.Updates
  h: optax.Updates
  win_rate: chex.Array | None


def sophia_win_rate(opt_state: Any) -> jax.Array:
  """The ``win_rate`` of the (first) `ScaleByHutchinsonState` inside ``opt_state``.

  Works on a bare state, a chain / partition / masked state (e.g. `sophia`'s).
  Raises a `ValueError` if the transformation does not count it (build it with
  ``track_win_rate=True``).

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = slimoptax.sophia(1e-2, track_win_rate=True)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> _, state = tx.update({"w": jnp.array([2.0, -4.0])}, state, params, obj_fn=loss)
    >>> float(slimoptax.sophia_win_rate(state))  # h = 0 on the first step: all clipped
    0.0
  """
  is_state = lambda _, x: isinstance(x, ScaleByHutchinsonState)
  found = optax.tree.get_all_with_path(opt_state, ScaleByHutchinsonState.__name__, is_state)
  if not found:
    raise ValueError("no ScaleByHutchinsonState in this optimizer state")
  win_rate = found[0][1].win_rate
  if win_rate is None:
    raise ValueError("this Sophia state does not count its win rate: build the transformation with "
                     "track_win_rate=True")
  return win_rate


def _curvature_ema(h: jax.Array, estimate: jax.Array, axes: Any, b2: ArrayLike) -> jax.Array:
  """``b2 h + (1 - b2) E_K[estimate]``, in ``h``'s dtype."""
  mean = slim_adam.mean_over(estimate, axes).astype(h.dtype)
  return optax.tree.update_moment(mean, h, b2, 1).astype(h.dtype)


def scale_by_hutchinson(
    b1: ArrayLike = 0.965,
    b2: ArrayLike = 0.99,
    gamma: ArrayLike = 0.01,
    eps: ArrayLike = 1e-12,
    *,
    update_every: int = 10,
    estimator: str | Callable[..., Any] = "hutchinson",
    clip_threshold: ArrayLike = 1.0,
    compress: Compress = None,
    seed: int | chex.PRNGKey = 0,
    num_samples: int = 1,
    distribution: str = "rademacher",
    gnb_batch_size: int | None = None,
    bias_correction: bool = False,
    fresh_estimate: bool = False,
    track_win_rate: bool = False,
    mu_dtype: Any = None,
    h_dtype: Any = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None, torch_layout: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia's clipped diagonal-Newton direction.

  .. math::

    m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
    h_t = \\beta_2 h_{t-k} + (1-\\beta_2)\\,\\mathbb{E}_K[\\hat h_t]
    \\ \\text{every } k \\text{ steps}, \\qquad
    u_t = \\mathrm{clip}\\!\\left(\\frac{m_t}{\\max(\\gamma h_t, \\epsilon)},
    \\rho\\right)

  The estimate ``h_hat`` is refreshed at steps 1, k+1, 2k+1, ... (the paper's
  ``t mod k = 1``). Its objective is passed to ``update`` as a keyword extra
  argument, named as in `optax.contrib.sophia`: ``obj_fn`` (``params ->
  loss``) for ``"hutchinson"``, ``logits_fn`` (``params -> logits``) for
  ``"gnb"``; they are only called on refresh steps (inside `jax.lax.cond`).

  Ordering: by default (``fresh_estimate=False``) step ``t`` uses ``h`` as it
  was before step ``t``'s refresh, like the official SophiaG code (the Hessian
  EMA is updated after ``optimizer.step()``) and `optax.contrib.sophia`;
  the first steps, with ``h = 0``, are clipped sign steps. Algorithm 3 of the
  paper refreshes first and uses the new ``h`` in the same step:
  ``fresh_estimate=True``.

  Negative curvature: Hutchinson estimates of an indefinite Hessian can be
  negative, and so can ``h``. The EMA is kept unclamped (an unbiased running
  average in which noisy negative samples cancel positive ones), and the
  denominator is ``max(gamma h, eps)``, which is positive whenever ``eps >
  0`` (required): a coordinate with ``h <= eps / gamma`` gets ``m / eps``,
  clipped to ``+-clip_threshold`` -- a sign-descent step of the right sign
  and bounded size, never a step uphill or an exploding one. Clipping is
  therefore mandatory (``clip_threshold`` must be a positive number).

  Non-finite curvature: a group whose refreshed averaged ``h`` is inf / NaN
  skips the step (``m``, ``h`` kept, update 0), as in `scale_by_slim_adam`.

  Args:
    b1: momentum decay (0.965 in the official GPT-2 configurations; the paper
      states 0.96).
    b2: EMA decay of ``h`` per refresh (effectively ``1 - (1 - b2)/k`` per
      step).
    gamma: scales ``h`` in the denominator (the official code's ``rho``).
    eps: floor of the denominator (> 0; 1e-12 in the paper).
    update_every: ``k``, steps between curvature refreshes.
    estimator: ``"hutchinson"`` (`hutchinson_estimate`), ``"gnb"``
      (`gnb_estimate`), or a callable ``(params, key, **extra_args) ->
      pytree`` receiving the update's extra arguments.
    clip_threshold: per-coordinate clip ``rho`` (1 in the paper).
    compress: averages ``h`` over axes per parameter, as SlimAdam does for the
      second moment (same forms: ``None``, a preset name such as
      ``"slimadam"``, `slimoptax.Rules`, a callable, or a pytree of int axes
      / `slimoptax.Reshaped`). The estimate is averaged over those axes
      before the EMA; ``h`` is stored with them reduced (`labels.reduced_shape`).
    seed: int seed or PRNG key of the probe / label sampling.
    num_samples: Hutchinson probes per refresh.
    distribution: Hutchinson probe distribution (``"rademacher"`` or
      ``"gaussian"``).
    gnb_batch_size: ``B`` of the GNB estimator (default: number of logits
      rows, see `gnb_estimate`).
    bias_correction: divide ``m`` by ``1 - b1^t`` (as `optax.contrib.sophia`
      does; the paper and the official code do not).
    fresh_estimate: use step ``t``'s refreshed ``h`` in step ``t`` (Algorithm 3)
      instead of from step ``t + 1`` on (official code, optax).
    track_win_rate: count the unclipped coordinates every step into
      ``win_rate`` (`sophia_win_rate`). Off by default, as
      `optax.contrib.sophia` without ``verbose``: the count is a reduction
      over every parameter, which XLA's CPU backend runs as extra passes
      (docs/benchmarks.md, "Sophia's step without a refresh"); ``win_rate``
      is then ``None``.
    mu_dtype: momentum dtype (default: the parameters').
    h_dtype: dtype of ``h`` (default: the parameters').
    num_heads, num_kv_heads, torch_layout: head counts and layout for presets (`slimoptax.scale_by_slim_adam`).

  Returns:
    A `optax.GradientTransformationExtraArgs` with state
    `ScaleByHutchinsonState`; ``update(updates, state, params, obj_fn=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> loss = lambda p: jnp.sum(jnp.array([50.0, 100.0]) * p["w"] ** 2)  # diag(H) = (100, 200)
    >>> tx = optax.chain(slimoptax.scale_by_hutchinson(
    ...     b1=0.0, b2=0.0, gamma=1.0, clip_threshold=10.0, fresh_estimate=True), optax.scale(-1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)
    >>> updates["w"].tolist()  # the Newton step -g / h = -w
    [-1.0, -2.0]

  References:
    Liu et al., Sophia, ICLR 2024 (Algorithm 3).
  """
  if not callable(estimator) and estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}; known: {ESTIMATORS} or a callable")
  _check_distribution(distribution)
  if clip_threshold is None:
    raise ValueError(
        "clip_threshold=None is not supported: the clip is what bounds the step where the "
        "curvature estimate is <= 0; pass a positive threshold (1.0 in the paper)")
  for name, value, low, high in (("b1", b1, 0, 1), ("b2", b2, 0, 1), ("gamma", gamma, 0, None),
                                 ("eps", eps, 0, None), ("clip_threshold", clip_threshold, 0, None),
                                 ("update_every", update_every, 1, None)):
    _tree.check_range(name, value, low, high, low_open=name in ("eps", "clip_threshold"))
  for name, value in (("num_samples", num_samples), ("gnb_batch_size", gnb_batch_size),
                      ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    _tree.static_int(name, value, 1)
  try:
    concrete_every = int(update_every)
  except (TypeError, jax.errors.ConcretizationTypeError):
    concrete_every = None  # traced (optax.inject_hyperparams under jit): used as an array
  if concrete_every is not None:
    if concrete_every != update_every:
      raise ValueError(f"update_every must be an integer, got {update_every}")
    update_every = concrete_every
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)
  h_dtype = _tree.float_dtype("h_dtype", h_dtype)
  layout = dict(num_kv_heads=num_kv_heads, torch_layout=torch_layout)

  def estimate(params, key, extra_args):
    if callable(estimator):
      return estimator(params, key, **extra_args)
    if estimator == "hutchinson":
      obj_fn = extra_args.get("obj_fn")
      if obj_fn is None:
        raise ValueError(
            "scale_by_hutchinson with estimator='hutchinson' needs the objective: "
            "update(updates, state, params, obj_fn=lambda p: loss(p, batch))")
      return hutchinson_estimate(obj_fn, params, key, num_samples=num_samples,
                                 distribution=distribution)
    logits_fn = extra_args.get("logits_fn")
    if logits_fn is None:
      raise ValueError(
          "scale_by_hutchinson with estimator='gnb' needs the model's logits: "
          "update(updates, state, params, logits_fn=lambda p: model_logits(p, batch))")
    return gnb_estimate(logits_fn, params, key, batch_size=gnb_batch_size)

  def init_fn(params):
    _tree.check_float_params(params)
    axes = slim_adam.resolve_axes(params, compress, num_heads, warn=True, **layout)
    # An integer scalar (also an array: optax.inject_hyperparams) is a seed, else a key.
    is_seed = isinstance(seed, (int, np.integer)) or (
        jnp.ndim(seed) == 0 and jnp.issubdtype(jnp.result_type(seed), jnp.integer))
    key = jax.random.PRNGKey(seed) if is_seed else jnp.asarray(seed)
    return ScaleByHutchinsonState(
        count=jnp.zeros([], jnp.int32),
        key=key,
        mu=_tree.zeros_like_tree(params, mu_dtype),
        h=slim_adam.reduced_zeros(params, axes, h_dtype),
        win_rate=jnp.zeros([], jnp.float32) if track_win_rate else None,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("scale_by_hutchinson needs params: update(updates, state, params, ...)")
    _tree.check_state(state, ScaleByHutchinsonState, who="scale_by_hutchinson")
    axes = slim_adam.resolve_axes(updates, compress, num_heads, warn=False, **layout)
    treedef = jax.tree_util.tree_structure(updates)
    # Checked before anything is estimated (path-named errors).
    _tree.state_leaves(updates, state.mu, name="momentum")
    h_leaves = _tree.state_leaves(updates, state.h, name="curvature EMA",
                                  shapes=slim_adam.reduced_shapes(updates, axes),
                                  source="the compression rule")

    def refresh(key, h_leaves):
      key, sub = jax.random.split(key)
      est = _tree.leaves_like(updates, estimate(params, sub, extra_args), what="curvature estimate")
      return key, [_curvature_ema(h, e, a, b2) for h, e, a in zip(h_leaves, est, axes)]

    do_refresh = jnp.equal(state.count % update_every, 0)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    count_inc = optax.safe_increment(state.count)
    mu_hat = mu
    if bias_correction:
      mu_hat = optax.tree.bias_correction(mu, jnp.asarray(b1, jnp.float32), count_inc)
    mu_hat_leaves = jax.tree_util.tree_leaves(mu_hat)

    def direction(_, g, m_hat, h, h_next, a):
      ratio = slim_adam.divide_in_view(m_hat, jnp.maximum(gamma * h, eps), a)
      not_clipped = (jnp.sum(jnp.abs(ratio) < clip_threshold).astype(jnp.float32) if track_win_rate
                     else jnp.zeros([], jnp.float32))
      u = jnp.clip(ratio, -clip_threshold, clip_threshold).astype(g.dtype)
      return slim_adam.skip_nonfinite_groups(h_next, a, u, 0.0), not_clipped  # group skips

    def directions(h_leaves, h_next):
      return _tree.map_update(direction, updates, names=[], num_outputs=2,
                              extra=[mu_hat_leaves, h_leaves, h_next, axes])

    if fresh_estimate:
      # The refresh reads only the state's key and h, and the step reads its result.
      key, new_h = jax.lax.cond(do_refresh, refresh, lambda key, h: (key, h), state.key, h_leaves)
      u, not_clipped = directions(new_h, new_h)
    else:
      # The step reads the h of before the refresh. Read after a conditional that may overwrite h, it
      # would keep two h alive across it, and XLA would copy h and the parameters on every step
      # (benchmarks/sophia_plain_step.py). So the direction is computed first and passed through the
      # conditional (a barrier keeps XLA from hoisting the plain branch's copy of it out): the
      # conditional then refreshes h in place, and the parameters are updated after it.
      raw, not_clipped = directions(h_leaves, h_leaves)
      raw_leaves = jax.tree_util.tree_leaves(raw)

      def with_refresh(key, h_leaves, raw_leaves):
        key, cand = refresh(key, h_leaves)
        return key, cand, [slim_adam.skip_nonfinite_groups(c, a, r, 0.0)
                           for c, a, r in zip(cand, axes, raw_leaves)]

      def without(key, h_leaves, raw_leaves):
        return key, h_leaves, jax.lax.optimization_barrier(raw_leaves)

      key, new_h, u_leaves = jax.lax.cond(do_refresh, with_refresh, without, state.key, h_leaves, raw_leaves)
      u = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(raw), u_leaves)
    skip = lambda new, old: [slim_adam.skip_nonfinite_groups(*x) for x in zip(new_h, axes, new, old)]
    mu = jax.tree_util.tree_unflatten(treedef, skip(jax.tree_util.tree_leaves(mu),
                                                    jax.tree_util.tree_leaves(state.mu)))
    new_h = skip(new_h, h_leaves)  # a group whose refreshed h is not finite keeps m and h
    total = sum(math.prod(_tree.shape_of(g)) for g in jax.tree_util.tree_leaves(updates))
    not_clipped = sum(jax.tree_util.tree_leaves(not_clipped), jnp.zeros([], jnp.float32))
    win_rate = not_clipped / max(total, 1) if track_win_rate else None
    # The state keeps its dtype (an array-valued b1 must not promote a bf16 momentum).
    mu = jax.tree.map(lambda m, prev: m.astype(mu_dtype or prev.dtype), mu, state.mu)
    return u, ScaleByHutchinsonState(
        count=count_inc, key=key, mu=mu, h=jax.tree_util.tree_unflatten(treedef, new_h),
        win_rate=win_rate)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.965,
    b2: ArrayLike = 0.99,
    gamma: ArrayLike | None = None,
    eps: ArrayLike = 1e-12,
    weight_decay: ArrayLike = 0.2,
    *,
    update_every: int = 10,
    estimator: str | Callable[..., Any] = "hutchinson",
    clip_threshold: ArrayLike = 1.0,
    weight_decay_mask: Any = None,
    compress: Compress = None,
    seed: int | chex.PRNGKey = 0,
    num_samples: int = 1,
    distribution: str = "rademacher",
    gnb_batch_size: int | None = None,
    bias_correction: bool = False,
    fresh_estimate: bool = False,
    track_win_rate: bool = False,
    mu_dtype: Any = None,
    h_dtype: Any = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None, torch_layout: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Sophia with decoupled weight decay (Sophia-H by default, Sophia-G with ``estimator="gnb"``).

  .. math::

    \\theta_{t+1} = \\theta_t - \\eta_t \\left(\\mathrm{clip}\\left(
    \\frac{m_t}{\\max(\\gamma h_t, \\epsilon)}, 1\\right) + \\lambda \\theta_t\\right)

  Defaults are the reference GPT-2 settings: ``b1 = 0.965``, ``b2 = 0.99``,
  ``k = update_every = 10``, ``eps = 1e-12``, weight decay 0.2, clip 1,
  ``gamma`` 0.01 for Hutchinson (Sophia-H, as `optax.contrib.sophia`) and 0.05
  for GNB (``rho`` of the official GPT-2 Small SophiaG config), see
  `DEFAULT_GAMMA`. The paper's GPT-2 runs also clip gradients by global norm
  1.0: chain `optax.clip_by_global_norm` in front if you want that. Pass the
  objective to ``update`` (``obj_fn=`` or ``logits_fn=``), see
  `scale_by_hutchinson`.

  Args:
    learning_rate: a float or an optax schedule (the official GPT-2 Small
      SophiaG run peaks at 6e-4 to 7e-4 with cosine decay).
    b1: momentum decay.
    b2: curvature EMA decay (per refresh).
    gamma: ``None`` for `DEFAULT_GAMMA` of the estimator (0.01 for a callable
      estimator), or a value.
    eps: denominator floor (> 0).
    weight_decay: decoupled weight decay, multiplied by the learning rate.
    update_every: ``k``.
    estimator: ``"hutchinson"``, ``"gnb"`` or a callable, see
      `scale_by_hutchinson`.
    clip_threshold: per-coordinate clip.
    weight_decay_mask: which parameters decay: default
      `slimoptax.slim_adam.default_weight_decay_mask` (``ndim >= 2``, as the
      official nanoGPT-based code; `optax.contrib.sophia` decays all).
    compress: compression axes of ``h``, see `scale_by_hutchinson`.
    seed: probe / label seed.
    num_samples: Hutchinson probes per refresh.
    distribution: Hutchinson probe distribution.
    gnb_batch_size: ``B`` of the GNB estimator.
    bias_correction: bias-correct ``m`` (as optax).
    fresh_estimate: Algorithm 3's ordering, see `scale_by_hutchinson`.
    track_win_rate: count the unclipped coordinates (off by default), see `scale_by_hutchinson`.
    mu_dtype: momentum dtype.
    h_dtype: curvature EMA dtype.
    num_heads, num_kv_heads, torch_layout: head counts and layout for presets (`slimoptax.scale_by_slim_adam`).

  Returns:
    A `optax.GradientTransformationExtraArgs`.

  Under `optax.inject_hyperparams`, name ``num_samples`` in ``static_args``
  (a Python loop count), as well as a callable ``estimator`` or
  ``weight_decay_mask`` (inject_hyperparams takes callables for schedules);
  ``update_every`` and ``seed`` may be injected::

    tx = optax.inject_hyperparams(slimoptax.sophia, static_args=("num_samples",))(6e-4)

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.array([2.0, -1.0, 0.5])}
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 4.0, 0.25]) * p["w"] ** 2)
    >>> tx = slimoptax.sophia(1.0, gamma=1.0, weight_decay=0.0, update_every=2, track_win_rate=True)
    >>> state, start = tx.init(params), loss(params)
    >>> step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, obj_fn=loss))
    >>> for _ in range(30):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.05 * start), float(slimoptax.sophia_win_rate(state))
    (True, 1.0)

  References:
    Liu et al., Sophia, ICLR 2024; official code
    <https://github.com/Liuhong99/Sophia> (GPT-2 Small config).
  """
  if gamma is None:
    gamma = DEFAULT_GAMMA.get(estimator, 0.01) if isinstance(estimator, str) else 0.01
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return _tree.checked_chain(
      "sophia",
      scale_by_hutchinson(
          b1, b2, gamma, eps, update_every=update_every, estimator=estimator,
          clip_threshold=clip_threshold, compress=compress, seed=seed, num_samples=num_samples,
          distribution=distribution, gnb_batch_size=gnb_batch_size,
          bias_correction=bias_correction, fresh_estimate=fresh_estimate,
          track_win_rate=track_win_rate, mu_dtype=mu_dtype,
          h_dtype=h_dtype, num_heads=num_heads, num_kv_heads=num_kv_heads, torch_layout=torch_layout),
      optax.add_decayed_weights(
          weight_decay,
          slim_adam.default_weight_decay_mask if weight_decay_mask is None else weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


__all__ = [
    "DEFAULT_GAMMA", "DISTRIBUTIONS", "ESTIMATORS", "ScaleByHutchinsonState", "gnb_estimate",
    "hutchinson_estimate", "random_probes", "scale_by_hutchinson", "sophia", "sophia_win_rate",
]
