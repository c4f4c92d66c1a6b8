"""Shampoo: Kronecker-factored preconditioning of matrices and tensors.

Gupta, Koren & Singer (2018), Algorithms 1 and 2. For a matrix gradient
``G`` (``m x n``), starting from ``L_0 = eps I_m``, ``R_0 = eps I_n``:

.. math::

  L_t = L_{t-1} + G_t G_t^T, \\quad R_t = R_{t-1} + G_t^T G_t, \\quad
  U_t = L_t^{-1/4} G_t R_t^{-1/4};

for an order-``k`` tensor one statistic per axis, ``H^i_t = H^i_{t-1} +
G_{(i)} G_{(i)}^T`` (mode-``i`` unfolding), and ``U_t = G_t \\times_1
(H^1_t)^{-1/2k} \\cdots \\times_k (H^k_t)^{-1/2k}``. ``beta`` makes the sums
EMAs (``H = beta H + (1 - beta) G G^T``, as the slides' second form). The
statistics and their machinery are `slimoptax._kronecker`'s, shared with SOAP.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _kronecker as kron
from slimoptax import _muon, _tree

GRAFTS = ("adam", None)


class ScaleByShampooState(NamedTuple):
  """State of `scale_by_shampoo`.

  Per parameter, ``stats`` and ``roots`` are tuples with one entry per axis of
  the parameter's core (the parameter itself, or its ``(rows, cols)`` matrix
  view under ``dims``; then each entry has a leading batch axis): an array
  for a preconditioned axis, ``None`` for one left alone.

  Attributes:
    count: number of updates applied (int32 scalar).
    stats: the statistics ``H_i`` (``eps I`` at init).
    roots: ``H_i^{-1/(2k)}`` as of the last refresh (identity at init).
    mu: the Adam graft's first moment (``None`` without a graft).
    nu: the Adam graft's second moment (``None`` without a graft).
  """

  count: chex.Array
  stats: Any
  roots: Any
  mu: optax.Updates
  nu: optax.Updates


def _plan(shape: tuple[int, ...], spec: Any, max_precond_dim: int, precondition_1d: bool,
          per_axis: bool) -> kron.Plan:
  if per_axis:
    return kron.tensor_plan(shape, max_precond_dim, precondition_1d=precondition_1d)
  if spec is None:  # `dims` says: not a matrix (embedding, norm, bias)
    return kron.Plan(shape, None, (False,) * len(shape), None)
  return kron.matrix_plan(shape, spec, max_precond_dim)


def _stat_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _init_factors(plan: kron.Plan, dtype: Any, scale: Any) -> tuple[Any, ...]:
  out = []
  for n, on in zip(plan.core, plan.axes):
    if not on:
      out.append(None)
      continue
    eye = scale * jnp.eye(n, dtype=dtype)
    out.append(eye if plan.batch is None else jnp.broadcast_to(eye, (plan.batch, n, n)))
  return tuple(out)


def _roots_of(stats: tuple[Any, ...], plan: kron.Plan, old: tuple[Any, ...]) -> tuple[Any, ...]:
  """``H_i^{-1/(2k)}`` per factored axis; a non-finite root keeps the old one."""
  p = 2 * plan.order
  root = kron.per_core(lambda h: kron.inverse_root(h, p), plan)
  out = []
  for h, r in zip(stats, old):
    if h is None:
      out.append(None)
      continue
    new = root(h)
    out.append(jnp.where(jnp.all(jnp.isfinite(new)), new, r))
  return tuple(out)


def _safe_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(_stat_dtype(x.dtype)))))


def scale_by_shampoo(
    *,
    beta: ArrayLike | None = None,
    eps: ArrayLike = 1e-6,
    precondition_frequency: int = 1,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    graft: str | None = "adam",
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    graft_eps: ArrayLike = 1e-8,
    dims: Any = None,
) -> optax.GradientTransformation:
  """Rescales updates by Shampoo's Kronecker-factored preconditioner (Gupta et al. 2018).

  .. math::

    H^i_t = H^i_{t-1} + G_{(i)} G_{(i)}^T \\ (\\text{or } \\beta H^i_{t-1} +
    (1-\\beta) G_{(i)} G_{(i)}^T), \\qquad
    U_t = G_t \\times_1 (H^1)^{-1/2k} \\cdots \\times_k (H^k)^{-1/2k}

  with ``k`` the number of preconditioned axes (a matrix: ``L^{-1/4} G
  R^{-1/4}``). With ``graft="adam"`` the step keeps Shampoo's direction and
  takes Adam's Frobenius norm, per tensor, as Distributed Shampoo's layer-wise
  grafting (Agarwal et al., 2020): ``U_t ||A_t|| / ||U_t||``, ``A_t =
  m_hat / (sqrt(v_hat) + graft_eps)``.

  Which axes are preconditioned: with ``dims=None`` every axis of size
  ``<= max_precond_dim`` of every parameter (the tensor case, Algorithm 2: a
  DenseGeneral ``(d, H, hd)`` kernel gets three factors, ``k = 3``); 1-D
  parameters only with ``precondition_1d`` (full-matrix AdaGrad). With
  ``dims`` (anything `slimoptax.matrix_dims` takes: a preset name, rules,
  `slimoptax.MuonDimensionNumbers` / `slimoptax.ReshapedDims` specs) each
  parameter is viewed as Muon views it: a batch of ``(fan_in, fan_out)``
  matrices, one ``L`` and ``R`` per batch entry (heads with ``per_head``
  specs, stacked layers: never preconditioned across), and parameters that
  are not matrices (embeddings, norms, biases) get no factor. A parameter
  with no factor at all steps by the graft's direction (without a graft:
  the gradient as it is). A parameter with a factor only on some axes uses
  ``k`` = that number (a matrix with one huge axis: ``L^{-1/2} G``).

  The roots are recomputed (``eigh``, eigenvalues clamped at
  ``lambda_max * machine_eps``) on the steps ``t`` with ``t %
  precondition_frequency == 0`` (``t`` from 0, so the first step has fresh
  roots) under `jax.lax.cond`; in between the stale ones are reused.

  Non-finite inputs: a parameter whose gradient or new statistics are not
  finite (a NaN / inf gradient, an overflowing ``G G^T``) skips the step: its
  statistics, roots and graft moments are kept and its update is 0 this step
  only, so the state never holds a non-finite value and the parameters stay
  finite. A refreshed root that is not finite keeps the old one.

  Args:
    beta: ``None``: summed statistics (Algorithms 1, 2); a float in [0, 1):
      EMA.
    eps: the statistics start at ``eps I``.
    precondition_frequency: roots refreshed every this many steps (Python int >= 1).
    max_precond_dim: axes longer than this get no factor.
    precondition_1d: give 1-D parameters a factor (with ``dims=None``).
    graft: ``"adam"`` or ``None``.
    b1, b2, graft_eps: the Adam graft's decay rates and epsilon.
    dims: the matrix views (see above; ``None``: every axis, the tensor case).

  Returns:
    A `optax.GradientTransformation` with state `ScaleByShampooState`.

  Raises:
    ValueError: naming the argument (``beta``, ``b1``, ``b2`` outside [0, 1),
      negative ``eps``, ``graft_eps``, a non-int ``precondition_frequency`` /
      ``max_precond_dim``, an unknown ``graft``); at ``update``, a state of
      another optimizer or for other parameters (naming the path).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._shampoo import scale_by_shampoo
    >>> tx = scale_by_shampoo(eps=0.0, graft=None)
    >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 0.5]])}  # L = R = diag(4, 1/4)
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["w"].round(6).tolist()  # L^{-1/4} G R^{-1/4} = I
    [[1.0, 0.0], [0.0, 1.0]]

  References:
    Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, 2018 (Algorithms 1, 2);
    Agarwal et al., Disentangling Adaptive Gradient Methods from Learning
    Rates, 2020 (grafting); Anil et al., Scalable Second Order Optimization
    for Deep Learning, 2020 (Distributed Shampoo).
  """
  if beta is not None:
    _tree.check_range("beta", beta, 0.0, 1.0)
  _tree.check_range("eps", eps, 0.0)
  _tree.check_range("b1", b1, 0.0, 1.0)
  _tree.check_range("b2", b2, 0.0, 1.0)
  _tree.check_range("graft_eps", graft_eps, 0.0)
  freq = _tree.static_int("precondition_frequency", precondition_frequency, 1)
  max_dim = _tree.static_int("max_precond_dim", max_precond_dim, 1)
  if graft not in GRAFTS:
    raise ValueError(f"unknown graft {graft!r}; known: {GRAFTS}")
  per_axis = dims is None

  def plans(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    specs = [None] * len(leaves) if per_axis else _muon._leaf_specs(tree, dims, False, None)
    return [_plan(_tree.shape_of(x), s, max_dim, precondition_1d, per_axis)
            for x, s in zip(leaves, specs)]

  def init_fn(params):
    _tree.check_float_params(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    ps = plans(params)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    stats = [_init_factors(pl, _stat_dtype(p.dtype), eps) for p, pl in zip(leaves, ps)]
    roots = [_init_factors(pl, _stat_dtype(p.dtype), 1.0) for p, pl in zip(leaves, ps)]
    moments = (_tree.zeros_like_tree(params), _tree.zeros_like_tree(params)) if graft else (None, None)
    return ScaleByShampooState(jnp.zeros([], jnp.int32), unflat(stats), unflat(roots), *moments)

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleByShampooState, who="scale_by_shampoo")
    _tree.check_float_params(updates, what="update")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    ps = plans(updates)
    stats = kron.factor_leaves(updates, state.stats, ps, "statistics")
    roots = kron.factor_leaves(updates, state.roots, ps, "roots")
    if graft:
      mu = _tree.state_leaves(updates, state.mu, name="graft first moment")
      nu = _tree.state_leaves(updates, state.nu, name="graft second moment")

    new_stats, oks = [], []
    for g, st, pl in zip(leaves, stats, ps):
      core = kron.to_core(g, pl)
      cand = tuple(kron.per_core(lambda c, s: tuple(kron.update_stats(s, c, beta)), pl)(core, tuple(st)))
      ok = jnp.all(jnp.isfinite(g)) & kron.all_finite(cand)
      new_stats.append(tuple(None if s is None else jnp.where(ok, c, s) for s, c in zip(st, cand)))
      oks.append(ok)

    refresh = state.count % freq == 0
    new_roots = jax.lax.cond(
        refresh, lambda s, r: [_roots_of(si, pl, ri) for si, pl, ri in zip(s, ps, r)],
        lambda s, r: list(r), new_stats, roots)

    count_inc = optax.safe_increment(state.count)
    outs, mus, nus = [], [], []
    for i, (g, pl, r, ok) in enumerate(zip(leaves, ps, new_roots, oks)):
      g_safe = jnp.where(ok, g, 0)
      if pl.order:
        d = kron.from_core(kron.per_core(lambda c, *rs: kron.precondition(c, rs), pl)(
            kron.to_core(g_safe, pl), *r), pl, g.shape)
      else:
        d = g_safe
      if graft:
        m = jnp.where(ok, b1 * mu[i] + (1 - b1) * g_safe, mu[i]).astype(mu[i].dtype)
        v = jnp.where(ok, b2 * nu[i] + (1 - b2) * jnp.square(g_safe), nu[i]).astype(nu[i].dtype)
        m_hat = optax.tree.bias_correction(m, b1, count_inc)
        v_hat = optax.tree.bias_correction(v, b2, count_inc)
        a = m_hat / (jnp.sqrt(v_hat) + graft_eps)
        if pl.order:
          dn = _safe_norm(d)
          d = jnp.where(dn > 0, d * (_safe_norm(a) / jnp.where(dn > 0, dn, 1)).astype(d.dtype), 0)
        else:
          d = a
        mus.append(m)
        nus.append(v)
      outs.append(jnp.where(ok, d, 0).astype(g.dtype))

    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(outs), ScaleByShampooState(
        count_inc, unflat(new_stats), unflat(list(new_roots)),
        unflat(mus) if graft else None, unflat(nus) if graft else None)

  return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: ArrayLike = 0.0,
    *,
    mask: Any = None,
    beta: ArrayLike | None = None,
    eps: ArrayLike = 1e-6,
    precondition_frequency: int = 1,
    max_precond_dim: int = 10000,
    precondition_1d: bool = False,
    graft: str | None = "adam",
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    graft_eps: ArrayLike = 1e-8,
    dims: Any = None,
) -> optax.GradientTransformation:
  """Shampoo with decoupled weight decay: `scale_by_shampoo`, weight decay, the rate.

  .. math::

    \\theta_{t+1} = \\theta_t - \\eta_t (U_t + \\lambda \\theta_t)

  Under `optax.inject_hyperparams` name ``precondition_frequency`` and
  ``max_precond_dim`` in ``static_args`` (Python ints: the refresh schedule
  and which axes get a factor; a traced one is refused by name); the rate,
  ``weight_decay``, ``beta``, ``eps``, ``b1``, ``b2`` and ``graft_eps`` can
  be injected.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay (>= 0), times the rate.
    mask: which parameters are decayed (pytree of bools or callable; default all).
    beta, eps, precondition_frequency, max_precond_dim, precondition_1d,
      graft, b1, b2, graft_eps, dims: see `scale_by_shampoo`.

  Returns:
    A `optax.GradientTransformation` (an `optax.chain`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._shampoo import shampoo
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> tx = shampoo(1e-2)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    >>> round(float(jnp.linalg.norm(u["w"])), 6)  # grafted: Adam's first-step norm, lr * sqrt(6)
    0.024495
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return _tree.checked_chain(
      "shampoo",
      scale_by_shampoo(beta=beta, eps=eps, precondition_frequency=precondition_frequency,
                       max_precond_dim=max_precond_dim, precondition_1d=precondition_1d,
                       graft=graft, b1=b1, b2=b2, graft_eps=graft_eps, dims=dims),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def shampoo_state_entries(params: Any, **kwargs: Any) -> int:
  """Entries of `scale_by_shampoo`'s statistics and roots for ``params`` (kwargs: its arguments)."""
  state = jax.eval_shape(scale_by_shampoo(**kwargs).init, params)
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves((state.stats, state.roots)))


__all__ = ["GRAFTS", "ScaleByShampooState", "scale_by_shampoo", "shampoo", "shampoo_state_entries"]
