"""SOAP: a first-order method run in the eigenbasis of Shampoo's preconditioner.

Vyas et al. (2024): with ``L = Q_L Lambda_L Q_L^T`` and ``R = Q_R Lambda_R
Q_R^T`` Shampoo's statistics, rotate the gradient ``G' = Q_L^T G Q_R``, let a
diagonal method (Adam) precondition it there and rotate back:

.. math::

  M \\leftarrow \\beta_1 M + (1-\\beta_1) G, \\quad
  V \\leftarrow \\beta_2 V + (1-\\beta_2) G'^2, \\quad
  N = Q_L \\frac{Q_L^T M Q_R}{\\sqrt{V} + \\epsilon} Q_R^T

(Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, 2024, Algorithm 3; its Algorithm 2 is
Adafactor in the same basis).
`precondition_in_eigenbasis` is the rotation, wrapping any inner
second-moment rule (`scale_by_soap_adam`, `slimoptax.scale_by_adafactor`,
`slimoptax.scale_by_slim_adam`: "slim SOAP"); `scale_by_soap` / `soap` are the
official SOAP (github.com/nikhilvyas/SOAP, ``soap.py``) step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _kronecker as kron
from slimoptax import _muon, _tree

# State fields holding first moments (in the eigenbasis): rotated when the basis changes.
FIRST_MOMENT_FIELDS = ("mu", "ema", "trace")


class PreconditionInEigenbasisState(NamedTuple):
  """State of `precondition_in_eigenbasis`.

  Per parameter, ``stats`` and ``bases`` are tuples with one entry per axis of
  the parameter's (possibly merged) view, or of its ``(fan_in, fan_out)``
  matrix view under ``dims`` (then each entry has a leading axis, one matrix
  per stacked layer): an array, or ``None`` for an axis left alone.

  Attributes:
    count: calls so far (int32); the first only initializes.
    stats: Shampoo's statistics ``GG_i`` (``L``, ``R``), EMAs from zeros.
    bases: their eigenbases ``Q_i``.
    inner: the inner rule's state (its first moments in the eigenbasis).
  """

  count: chex.Array
  stats: Any
  bases: Any
  inner: Any


class ScaleBySoapAdamState(NamedTuple):
  """State of `scale_by_soap_adam`: ``count``, first moment ``mu``, second moment ``nu``."""

  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_soap_adam(b1: ArrayLike = 0.95, b2: ArrayLike = 0.95,
                       eps: ArrayLike = 1e-8) -> optax.GradientTransformation:
  """Adam's moments without bias correction: ``u = m / (sqrt(v) + eps)``, as the official SOAP forms it.

  The bias correction ``sqrt(1 - b2^t) / (1 - b1^t)`` is applied by
  `scale_by_soap` after the rotation back (so ``eps`` is not bias corrected,
  as in the official code).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._soap import scale_by_soap_adam
    >>> tx = scale_by_soap_adam(0.5, 0.75, eps=0.0)
    >>> u, _ = tx.update({"w": jnp.array([2.0])}, tx.init({"w": jnp.zeros(1)}))
    >>> u["w"].tolist()  # (0.5 * 2) / sqrt(0.25 * 4)
    [1.0]
  """
  _tree.check_range("b1", b1, 0.0, 1.0)
  _tree.check_range("b2", b2, 0.0, 1.0)
  _tree.check_range("eps", eps, 0.0)

  def init_fn(params):
    _tree.check_float_params(params)
    return ScaleBySoapAdamState(jnp.zeros([], jnp.int32), _tree.zeros_like_tree(params),
                                _tree.zeros_like_tree(params))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleBySoapAdamState, who="scale_by_soap_adam")
    mu = _tree.state_leaves(updates, state.mu, name="first moment")
    nu = _tree.state_leaves(updates, state.nu, name="second moment")
    treedef = jax.tree_util.tree_structure(updates)
    g = jax.tree_util.tree_leaves(updates)
    m = [(b1 * a + (1 - b1) * x).astype(a.dtype) for a, x in zip(mu, g)]
    v = [(b2 * a + (1 - b2) * jnp.square(x)).astype(a.dtype) for a, x in zip(nu, g)]
    u = [(a / (jnp.sqrt(b) + eps)).astype(x.dtype) for a, b, x in zip(m, v, g)]
    un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return un(u), ScaleBySoapAdamState(optax.safe_increment(state.count), un(m), un(v))

  return optax.GradientTransformation(init_fn, update_fn)


def _official_plan(shape: tuple[int, ...], max_dim: int, merge_dims: bool,
                   precondition_1d: bool) -> kron.Plan:
  """The official layout: 1-D only with ``precondition_1d``, never merged; merged views always."""
  if len(shape) <= 1:
    return kron.tensor_plan(shape, max_dim, precondition_1d=precondition_1d)
  return kron.tensor_plan(kron.merged_shape(shape, max_dim) if merge_dims else shape, max_dim)


def _plans(tree: Any, dims: Any, max_dim: int, merge_dims: bool, precondition_1d: bool) -> list[kron.Plan]:
  shapes = [_tree.shape_of(x) for x in jax.tree_util.tree_leaves(tree)]
  if dims is None:
    return [_official_plan(s, max_dim, merge_dims, precondition_1d) for s in shapes]
  specs = _muon._leaf_specs(tree, dims, False, None)
  return [kron.Plan(s, None, (False,) * len(s), None) if spec is None else kron.matrix_plan(s, spec, max_dim)
          for s, spec in zip(shapes, specs)]


def _fill(plan: kron.Plan, dtype: Any, fill: Callable[[int, Any], jax.Array]) -> tuple[Any, ...]:
  return tuple(None if not on else (fill(n, dtype) if plan.batch is None else
                                    jnp.broadcast_to(fill(n, dtype), (plan.batch, n, n)))
               for n, on in zip(plan.core, plan.axes))


def _rot(x: jax.Array, qs: tuple[Any, ...], plan: kron.Plan, *, back: bool = False) -> jax.Array:
  if not plan.order:
    return x
  turn = kron.per_core(lambda c, q: kron.rotate(c, q, back=back), plan)
  return kron.from_core(turn(kron.to_core(x, plan), tuple(qs)), plan, x.shape)


def _per_factor(fn: Callable[..., jax.Array], plan: kron.Plan, *factors: tuple[Any, ...]) -> tuple[Any, ...]:
  """``fn`` on each axis's factor(s) of one parameter (per core); ``None`` where the axis has none."""
  return tuple(None if fs[0] is None else kron.per_core(fn, plan)(*fs) for fs in zip(*factors))


def _map_first_moments(state: Any, treedef: Any, fn: Callable[[int, jax.Array], jax.Array]) -> Any:
  """``state`` with ``fn(leaf_index, x)`` applied to every first-moment leaf (`FIRST_MOMENT_FIELDS`)."""
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    out = []
    for name, value in zip(state._fields, state):
      if name in FIRST_MOMENT_FIELDS:
        try:
          leaves = treedef.flatten_up_to(value)
        except (ValueError, TypeError):
          out.append(value)
          continue
        out.append(jax.tree_util.tree_unflatten(treedef, [fn(i, x) for i, x in enumerate(leaves)]))
      else:
        out.append(_map_first_moments(value, treedef, fn))
    return type(state)(*out)
  if isinstance(state, (tuple, list)):
    return type(state)(_map_first_moments(s, treedef, fn) for s in state)
  return state


def precondition_in_eigenbasis(
    inner: optax.GradientTransformation,
    *,
    beta: ArrayLike = 0.95,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    refresh: str = "qr",
    scale_fn: Callable[[jax.Array], jax.Array] | None = None,
    dims: Any = None,
) -> optax.GradientTransformation:
  """Runs ``inner`` in the eigenbasis of Shampoo's statistics (SOAP's rotation).

  Per call ``t`` (``k = t - 1`` moving steps after it), with ``Q_i`` the basis
  of each preconditioned axis:

  .. math::

    G' = G \\times_i Q_i^T, \\quad N' = \\mathrm{inner}(G'), \\quad
    N = N' \\times_i Q_i, \\quad GG_i \\leftarrow \\beta GG_i + (1-\\beta) G_{(i)} G_{(i)}^T

  The first call only folds ``G`` into ``GG_i`` (from zeros), takes ``Q_i``
  from ``eigh`` (descending) and returns zeros: the official SOAP never uses
  a gradient in its own projection. Then every ``precondition_frequency``
  moving steps (after the step, with ``GG`` holding its gradient) ``Q_i`` is
  refreshed by one power iteration ``QR(GG_i Q_i)`` on columns sorted by
  estimated eigenvalue (`slimoptax._kronecker.qr_refresh`; ``refresh="eigh"``:
  exact eigenvectors, the idealized Algorithm 2), the new columns put back in
  the order the inner state is indexed by (the official code re-sorts its
  ``V`` instead: the same steps for any rule equivariant to permuting an axis),
  and the inner rule's first moments (`FIRST_MOMENT_FIELDS`: Adam's ``mu``,
  an `optax.ema`'s ``ema``) are rotated into the new basis, so a first moment
  behaves as if kept in the original space. ``inner`` sees rotated gradients
  of the parameters' shapes (``params`` passed through: only
  rotation-invariant uses of them make sense, such as Adafactor's RMS scale).

  Axes (``dims=None``, the official layout): those of size
  ``<= max_precond_dim``; 1-D parameters only with ``precondition_1d``;
  ``merge_dims`` merges adjacent axes of >= 2-D parameters while the product
  stays ``<= max_precond_dim`` (official ``merge_dims``, ``channels_first``);
  every axis of a DenseGeneral ``(d, H, hd)`` kernel gets its own factor (the
  tensor case), and so would a stacked layer axis. With ``dims`` (a preset
  name, `slimoptax.Rules`, or anything `slimoptax.matrix_dims` takes) each
  matrix is rotated in its ``(fan_in, fan_out)`` view, the one Muon uses: a
  ``(d, H, hd)`` query kernel as ``d x (H hd)``, an output kernel ``(H, hd,
  d)`` as ``(H hd) x d``, and the axes outside the view (stacked layers,
  declared by the rules' ``stacked=``) index separate matrices, each with
  its own ``L``, ``R`` and bases, so no statistic mixes two layers; the
  leaves it calls no matrix (embeddings, norms, biases) are not rotated (the
  inner rule alone, as Muon's and Shampoo's fallback).

  Non-finite inputs: a call whose gradients or new statistics are not all
  finite is skipped as a whole (`optax.apply_if_finite`'s rule): zeros out,
  state (counts included) unchanged.

  Args:
    inner: the rule run in the eigenbasis (e.g. `scale_by_soap_adam`,
      ``slimoptax.scale_by_adafactor(...)``, ``slimoptax.scale_by_slim_adam(
      compress=...)``).
    beta: the statistics' EMA rate (SOAP: its ``shampoo_beta``).
    precondition_frequency: moving steps between refreshes (Python int >= 1).
    max_precond_dim, merge_dims, precondition_1d: which axes, see above.
    normalize_grads: divide ``N`` by ``1e-30 + RMS(N)`` per parameter.
    refresh: ``"qr"`` (SOAP) or ``"eigh"``.
    scale_fn: ``k -> factor`` multiplying ``N`` (after ``normalize_grads``),
      ``k`` the moving steps including this one.
    dims: ``None`` (the official layout) or the matrix views (see above);
      ``merge_dims`` and ``precondition_1d`` then do not apply.

  Returns:
    A `optax.GradientTransformation` with state `PreconditionInEigenbasisState`.
  """
  _tree.check_range("beta", beta, 0.0, 1.0)
  freq = _tree.static_int("precondition_frequency", precondition_frequency, 1)
  if dims is not None and (merge_dims or precondition_1d):
    raise ValueError("merge_dims and precondition_1d choose the official layout's axes; with dims the matrix "
                     "views do (pass dims=None to use them)")
  max_dim = _tree.static_int("max_precond_dim", max_precond_dim, 1)
  if refresh not in ("qr", "eigh"):
    raise ValueError(f"refresh must be 'qr' or 'eigh', got {refresh!r}")

  def plans(tree):
    return _plans(tree, dims, max_dim, merge_dims, precondition_1d)

  def factors(params, ps, fill):
    return [_fill(pl, jnp.promote_types(p.dtype, jnp.float32), fill)
            for p, pl in zip(jax.tree_util.tree_leaves(params), ps)]

  def init_fn(params):
    _tree.check_float_params(params)
    treedef = jax.tree_util.tree_structure(params)
    ps = plans(params)
    un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return PreconditionInEigenbasisState(
        jnp.zeros([], jnp.int32), un(factors(params, ps, lambda n, d: jnp.zeros((n, n), d))),
        un(factors(params, ps, lambda n, d: jnp.eye(n, dtype=d))), inner.init(params))

  def update_fn(updates, state, params=None):
    _tree.check_state(state, PreconditionInEigenbasisState, who="precondition_in_eigenbasis")
    _tree.check_float_params(updates, what="update")
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    ps = plans(updates)
    stats = kron.factor_leaves(updates, state.stats, ps, "statistics")
    bases = kron.factor_leaves(updates, state.bases, ps, "eigenbases")
    un = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    new_stats = [tuple(kron.per_core(lambda c, h: tuple(kron.update_stats(h, c, beta)), pl)(
        kron.to_core(g, pl), tuple(s))) for g, s, pl in zip(leaves, stats, ps)]
    ok = kron.all_finite(leaves) & kron.all_finite([x for s in new_stats for x in s])
    zeros = un([jnp.zeros_like(g) for g in leaves])

    def first(_):
      qs = [_per_factor(kron.eigenbasis, pl, s) for s, pl in zip(new_stats, ps)]
      return zeros, state._replace(count=optax.safe_increment(state.count), stats=un(new_stats),
                                   bases=un(qs))

    def step(_):
      g_rot = un([_rot(g, q, pl) for g, q, pl in zip(leaves, bases, ps)])
      n_rot, inner_state = inner.update(g_rot, state.inner, params)
      n_leaves = jax.tree_util.tree_leaves(n_rot)
      out = [_rot(n, q, pl, back=True) for n, q, pl in zip(n_leaves, bases, ps)]
      if normalize_grads:
        out = [n / (1e-30 + jnp.sqrt(jnp.mean(jnp.square(n)))) for n in out]
      k = state.count  # moving steps including this one (the first call did not move)
      if scale_fn is not None:
        out = [n * scale_fn(k).astype(n.dtype) for n in out]

      def refreshed(inner_state):
        if refresh == "qr":
          new_q = lambda h, q: kron.qr_refresh(h, q, keep_order=True)[0]
        else:
          new_q = kron.eigh_refresh
        qs = [_per_factor(new_q, pl, s, b) for s, b, pl in zip(new_stats, bases, ps)]
        qs = [tuple(b if q is None else jnp.where(jnp.all(jnp.isfinite(q)), q, b)
                    for q, b in zip(qn, bo)) for qn, bo in zip(qs, bases)]

        def turn(i, x):
          if x.shape != leaves[i].shape:
            return x
          return _rot(_rot(x, bases[i], ps[i], back=True), qs[i], ps[i]).astype(x.dtype)

        return qs, _map_first_moments(inner_state, treedef, turn)

      qs, inner_state = jax.lax.cond(k % freq == 0, refreshed, lambda s: (list(bases), s),
                                     inner_state)
      return un([o.astype(g.dtype) for o, g in zip(out, leaves)]), PreconditionInEigenbasisState(
          optax.safe_increment(state.count), un(new_stats), un(qs), inner_state)

    u, new_state = jax.lax.cond(state.count == 0, first, step, None)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(u, zeros), keep(new_state, state)

  return optax.GradientTransformation(init_fn, update_fn)


def soap_bias_correction(b1: ArrayLike, b2: ArrayLike) -> Callable[[jax.Array], jax.Array]:
  """The official step-size factor ``k -> sqrt(1 - b2^k) / (1 - b1^k)``."""
  def fn(k):
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64, as the official Python floats
    k = jnp.asarray(k, dtype)
    return jnp.sqrt(1 - jnp.asarray(b2, dtype) ** k) / (1 - jnp.asarray(b1, dtype) ** k)
  return fn


def scale_by_soap(
    b1: ArrayLike = 0.95,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    *,
    shampoo_beta: ArrayLike | None = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    dims: Any = None,
) -> optax.GradientTransformation:
  """SOAP's direction (Vyas et al. 2024): Adam in Shampoo's eigenbasis, as the official code.

  .. math::

    u_k = \\frac{\\sqrt{1-\\beta_2^k}}{1-\\beta_1^k}\\; Q_L
    \\frac{Q_L^T M Q_R}{\\sqrt{V} + \\epsilon} Q_R^T

  `precondition_in_eigenbasis` around `scale_by_soap_adam`. The first call
  only initializes ``L``, ``R`` and their eigenbases and returns zeros; ``k``
  counts the later calls. With ``normalize_grads`` the rotated-back direction
  is divided by its RMS before the bias factor, as the official code does.

  Args:
    b1, b2, eps: Adam's (``eps`` added to ``sqrt(V)``, not bias corrected).
    shampoo_beta: EMA rate of ``L``, ``R`` (``None``: ``b2``, the official -1).
    precondition_frequency, max_precond_dim, merge_dims, precondition_1d,
      normalize_grads, dims: see `precondition_in_eigenbasis` (``dims=None``:
      the official layout).
    correct_bias: the factor ``sqrt(1 - b2^k) / (1 - b1^k)`` (else 1).

  Returns:
    A `optax.GradientTransformation` with state `PreconditionInEigenbasisState`
    (its ``inner`` a `ScaleBySoapAdamState`).

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> from slimoptax._soap import scale_by_soap
    >>> tx = scale_by_soap(eps=1e-3)
    >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> state = tx.init(g)
    >>> u, state = tx.update(g, state)
    >>> u["w"].tolist(), state.bases["w"][0].shape  # the first call only initializes
    ([[0.0, 0.0], [0.0, 0.0]], (2, 2))
    >>> u, state = tx.update(g, state)
    >>> [round(float(x), 2) for x in jnp.linalg.svd(u["w"], compute_uv=False)]  # G' diagonal: ~ +-1
    [1.0, 0.99]
  """
  _tree.check_range("b1", b1, 0.0, 1.0)
  if shampoo_beta is not None:  # named as the caller spelt it (else precondition_in_eigenbasis's "beta")
    _tree.check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
  return precondition_in_eigenbasis(
      scale_by_soap_adam(b1, b2, eps), beta=b2 if shampoo_beta is None else shampoo_beta,
      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
      merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
      scale_fn=soap_bias_correction(b1, b2) if correct_bias else None, dims=dims)


class SoapStepState(NamedTuple):
  """State of the last transform of `soap`: ``count`` (calls, for the schedule and the first call)."""

  count: chex.Array


def _step_then_decay(learning_rate: optax.ScalarOrSchedule, weight_decay: ArrayLike,
                     mask: Any) -> optax.GradientTransformation:
  """``-lr u - lr wd (p - lr u)``: the official order (decay of the *updated* parameter), none on call 1."""

  def init_fn(params):
    del params
    return SoapStepState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    _tree.check_state(state, SoapStepState, who="soap")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    step = jax.tree.map(lambda u: -lr * u, updates)
    if weight_decay is None or (not callable(weight_decay) and _tree._concrete(weight_decay) == 0):
      return step, SoapStepState(optax.safe_increment(state.count))
    if params is None:
      raise ValueError("soap(weight_decay > 0) needs `params` in update()")
    leaves = _tree.leaves_like(updates, params, what="params")
    m = mask(params) if callable(mask) else mask
    flags = [True] * len(leaves) if m is None else _tree.leaves_like(updates, m, what="mask")
    moved = state.count > 0
    out = [s - jnp.where(moved & f, lr * weight_decay, 0.0).astype(s.dtype) * (p + s)
           for s, p, f in zip(jax.tree_util.tree_leaves(step), leaves, flags)]
    return (jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), out),
            SoapStepState(optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.95,
    b2: ArrayLike = 0.95,
    eps: ArrayLike = 1e-8,
    weight_decay: ArrayLike = 0.01,
    *,
    mask: Any = None,
    shampoo_beta: ArrayLike | None = None,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    dims: Any = None,
) -> optax.GradientTransformation:
  """SOAP (Vyas et al. 2024) with the official code's decoupled weight decay.

  .. math::

    \\theta \\leftarrow (\\theta - \\eta_t u_k)(1 - \\eta_t \\lambda)

  as ``soap.py``: the decay acts on the already-updated parameter, scaled by
  the rate alone (not the bias factor), and not on the first call (which
  only initializes the preconditioners).

  Under `optax.inject_hyperparams` name ``precondition_frequency`` and
  ``max_precond_dim`` in ``static_args`` (Python ints: the refresh schedule
  and which axes get a factor; a traced one is refused by name); the rate,
  ``b1``, ``b2``, ``eps``, ``weight_decay`` and ``shampoo_beta`` can be
  injected.

  Args:
    learning_rate: a float or an optax schedule (of the call count, from 0).
    b1, b2, eps, shampoo_beta, precondition_frequency, max_precond_dim,
      merge_dims, precondition_1d, normalize_grads, correct_bias, dims: see
      `scale_by_soap` (``dims="slimadam"`` for Flax models with stacked layers).
    weight_decay: the official default 0.01, applied to every parameter.
    mask: which parameters are decayed (pytree of bools or callable; default
      all, as the official code).

  Returns:
    A `optax.GradientTransformation` (an `optax.chain`); ``update`` needs ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._soap import soap
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> tx = soap(3e-3)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> u, state = jax.jit(tx.update)(grads, state, params)
    >>> float(abs(u["w"]).max())  # first call: initialization only
    0.0

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 3; github.com/nikhilvyas/SOAP).
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return _tree.checked_chain(
      "soap",
      scale_by_soap(b1, b2, eps, shampoo_beta=shampoo_beta,
                    precondition_frequency=precondition_frequency,
                    max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                    precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                    correct_bias=correct_bias, dims=dims),
      _step_then_decay(learning_rate, weight_decay, mask))


__all__ = [
    "FIRST_MOMENT_FIELDS", "PreconditionInEigenbasisState", "ScaleBySoapAdamState",
    "SoapStepState", "precondition_in_eigenbasis", "scale_by_soap", "scale_by_soap_adam", "soap",
    "soap_bias_correction",
]
