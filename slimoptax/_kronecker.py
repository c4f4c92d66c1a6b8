"""Kronecker-factored statistics: the machinery shared by Shampoo and SOAP.

A tensor gradient ``G`` of order ``k`` gets one statistic per preconditioned
axis ``i``, the Gram matrix of its mode-``i`` unfolding ``G_(i)`` (axis ``i``
as rows, every other axis flattened into the columns):

.. math::

  H_i \\leftarrow H_i + G_{(i)} G_{(i)}^T \\ (\\beta = \\text{None}), \\qquad
  H_i \\leftarrow \\beta H_i + (1 - \\beta) G_{(i)} G_{(i)}^T .

For a matrix these are Shampoo's ``L = G G^T`` and ``R = G^T G``. The
preconditioners act by mode-``i`` products ``G \\times_i A`` (multiply axis
``i`` by ``A``): Shampoo applies ``H_i^{-1/(2k)}`` on every axis
(`inverse_root`); SOAP rotates ``G`` into the eigenbasis ``Q_i`` of each
``H_i`` (`rotate`: ``Q_L^T G Q_R`` for a matrix), runs a first-order method
there and rotates back. The eigenbasis comes from ``eigh`` once
(`eigenbasis`) and is then refreshed by one power iteration and a QR
decomposition (`qr_refresh`), as the official SOAP does.

References:
  Gupta, Koren, Singer, `Shampoo: Preconditioned Stochastic Tensor
  Optimization <https://arxiv.org/abs/1802.09568>`_, 2018 (Algorithms 1, 2).
  Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
  <https://arxiv.org/abs/2409.11321>`_, 2024.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import _muon as contrib_muon

from slimoptax import _muon, _tree


def precond_axes(shape: Sequence[int], max_precond_dim: int, *,
                 precondition_1d: bool = True) -> tuple[bool, ...]:
  """Which axes of ``shape`` get a Kronecker factor: those of size ``<= max_precond_dim``.

  A 1-D shape is preconditioned only with ``precondition_1d`` (the official
  SOAP's flag; for Shampoo a 1-D factor is full-matrix AdaGrad); a scalar has
  no axis. Axes of size 0 get none (nothing to precondition).

  Example:
    >>> from slimoptax._kronecker import precond_axes
    >>> precond_axes((12, 3), 8), precond_axes((4,), 8, precondition_1d=False)
    ((False, True), (False,))
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) == 1 and not precondition_1d:
    return (False,)
  return tuple(0 < s <= max_precond_dim for s in shape)


def merged_shape(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
  """Adjacent axes merged while their product stays ``<= max_precond_dim`` (official SOAP's ``merge_dims``).

  Example:
    >>> from slimoptax._kronecker import merged_shape
    >>> merged_shape((5, 3, 2), 16), merged_shape((5, 3, 2), 10000), merged_shape((12, 3), 8)
    ((15, 2), (30,), (12, 3))
  """
  out, cur = [], 1
  for s in (int(s) for s in shape):
    if cur * s > max_precond_dim:
      if cur > 1:
        out.append(cur)
        cur = s
      else:
        out.append(s)
        cur = 1
    else:
      cur *= s
  if cur > 1 or not out:
    out.append(cur)
  return tuple(out)


def axis_gram(g: jax.Array, axis: int) -> jax.Array:
  """``G_(i) G_(i)^T``: the contraction of ``g`` with itself over every axis but ``axis``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._kronecker import axis_gram
    >>> g = jnp.array([[1., 2.], [3., 4.]])
    >>> axis_gram(g, 0).tolist(), axis_gram(g, 1).tolist()  # G G^T, G^T G
    ([[5.0, 11.0], [11.0, 25.0]], [[10.0, 14.0], [14.0, 20.0]])
  """
  others = [a for a in range(g.ndim) if a != axis]
  return jnp.tensordot(g, g, axes=(others, others))


def update_stats(stats: Sequence[Any], g: jax.Array, beta: Any = None) -> list[Any]:
  """Each axis's statistic updated with ``g``: summed (``beta=None``) or an EMA.

  ``stats[i]`` is ``None`` for an axis without a factor. The EMA is the
  official SOAP's ``lerp``: ``H + (1 - beta) (G G^T - H)``.
  """
  out = []
  for axis, h in enumerate(stats):
    if h is None:
      out.append(None)
      continue
    gg = axis_gram(g, axis).astype(h.dtype)
    out.append(h + gg if beta is None else h + (1 - beta) * (gg - h))
  return out


def mode_product(x: jax.Array, a: jax.Array, axis: int, *, transpose: bool = False) -> jax.Array:
  """``x \\times_i A``: axis ``axis`` of ``x`` multiplied by ``A`` (``A^T`` with ``transpose``).

  ``y[.., j, ..] = sum_k A[j, k] x[.., k, ..]``; for a matrix ``x`` along axis
  0 that is ``A x``, along axis 1 ``x A^T``.
  """
  y = jnp.tensordot(x, a, axes=([axis], [0 if transpose else 1]))
  return jnp.moveaxis(y, -1, axis)


def rotate(x: jax.Array, qs: Sequence[Any], *, back: bool = False) -> jax.Array:
  """Into the eigenbasis, ``x \\times_i Q_i^T`` on each axis (``Q_L^T X Q_R``), or ``back``.

  ``qs[i]`` is ``None`` for an axis left alone. ``back`` undoes it
  (``Q_L X Q_R^T``): the official SOAP's ``project`` / ``project_back``.
  """
  for axis, q in enumerate(qs):
    if q is not None:
      x = mode_product(x, q.astype(x.dtype), axis, transpose=not back)
  return x


def precondition(x: jax.Array, mats: Sequence[Any]) -> jax.Array:
  """``x \\times_i A_i`` on each axis with a matrix (Shampoo's ``L^{-1/4} G R^{-1/4}`` for symmetric ``A_i``)."""
  for axis, a in enumerate(mats):
    if a is not None:
      x = mode_product(x, a.astype(x.dtype), axis)
  return x


def _sym(m: jax.Array) -> jax.Array:
  return 0.5 * (m + m.T)


def _linalg_dtype(m: jax.Array) -> Any:
  """float64 for float64 statistics, else float32 (eigh has no bf16 / f16 kernels)."""
  return jnp.float64 if m.dtype == jnp.float64 else jnp.float32


def inverse_root(m: jax.Array, p: Any, *, floor: Any = 0.0) -> jax.Array:
  """``M^{-1/p}`` of a symmetric PSD ``M`` by ``eigh``, eigenvalues clamped from below.

  ``M`` is symmetrized first (``(M + M^T) / 2``: rounding makes Gram matrices
  slightly asymmetric); eigenvalues are clamped to ``max(floor, lambda_max *
  machine_eps)`` (eigh's own error level), so a rank-deficient statistic never
  gives an infinite root. Computed in float32, or float64 for float64
  statistics; returned in ``M``'s dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._kronecker import inverse_root
    >>> inverse_root(jnp.diag(jnp.array([16., 1.])), 4).round(4).tolist()
    [[0.5, 0.0], [0.0, 1.0]]
  """
  dtype = _linalg_dtype(m)
  w, v = jnp.linalg.eigh(_sym(m.astype(dtype)))
  lo = jnp.maximum(jnp.asarray(floor, dtype), jnp.max(w) * jnp.finfo(dtype).eps)
  w = jnp.maximum(w, jnp.maximum(lo, jnp.finfo(dtype).tiny))
  return ((v * w ** (-1.0 / p)) @ v.T).astype(m.dtype)


def eigenbasis(m: jax.Array) -> jax.Array:
  """The eigenvectors of the symmetric ``M``, by decreasing eigenvalue (the official SOAP's first basis).

  As the official code: ``eigh(M + 1e-30 I)``, columns flipped to descending
  order; float32 (float64 for float64 statistics), returned in ``M``'s dtype.
  """
  dtype = _linalg_dtype(m)
  mm = m.astype(dtype)
  _, q = jnp.linalg.eigh(mm + 1e-30 * jnp.eye(m.shape[0], dtype=dtype), symmetrize_input=False)
  return jnp.flip(q, axis=1).astype(m.dtype)


def qr_refresh(m: jax.Array, q: jax.Array, companion: jax.Array | None = None, axis: int = 0, *,
               keep_order: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """One power iteration ``QR(M Q)`` of the basis ``Q``, its columns first sorted by ``diag(Q^T M Q)``.

  As the official SOAP's ``get_orthogonal_matrix_QR``: the columns of ``Q``
  are sorted by decreasing estimated eigenvalue, ``companion`` (the second
  moment living in the eigenbasis) is re-sorted along ``axis`` to follow them,
  and ``Q <- QR(M Q_sorted).Q``. With ``keep_order`` the new columns are put
  back in ``Q``'s old order instead and ``companion`` is left as it is: the
  same basis up to a relabelling of its columns, so any rule that is
  equivariant to permutations of an axis (Adam, Adafactor, SlimAdam) takes
  exactly the same steps without its state being touched.

  Returns:
    ``(new_q, companion)``, in ``Q``'s dtype (computed in float32 / float64).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._kronecker import qr_refresh
    >>> m = jnp.diag(jnp.array([1., 3.]))
    >>> q, v = qr_refresh(m, jnp.eye(2), jnp.array([10., 30.]))
    >>> abs(q).tolist(), v.tolist()  # the larger eigenvalue's column first, v follows
    ([[0.0, 1.0], [1.0, 0.0]], [30.0, 10.0])
  """
  dtype = _linalg_dtype(m)
  mm, qq = m.astype(dtype), q.astype(dtype)
  est = jnp.diag(qq.T @ mm @ qq)
  idx = jnp.argsort(-est, stable=True)
  new, _ = jnp.linalg.qr(mm @ qq[:, idx])
  if keep_order:
    return new[:, jnp.argsort(idx)].astype(q.dtype), companion
  if companion is not None:
    companion = jnp.take(companion, idx, axis=axis)
  return new.astype(q.dtype), companion


def eigh_refresh(m: jax.Array, q: jax.Array) -> jax.Array:
  """Exact eigenvectors of ``M``, placed in ``Q``'s column order (ranked by ``diag(Q^T M Q)``).

  The idealized refresh (``Q <- Eigenvectors(M)``), ordered like `qr_refresh`
  with ``keep_order``: the column of ``Q`` whose estimated eigenvalue ranks
  ``r``-th gets the ``r``-th largest eigenvector.
  """
  dtype = _linalg_dtype(m)
  mm, qq = m.astype(dtype), q.astype(dtype)
  idx = jnp.argsort(-jnp.diag(qq.T @ mm @ qq), stable=True)
  return eigenbasis(mm)[:, jnp.argsort(idx)].astype(q.dtype)


def all_finite(xs: Sequence[Any]) -> jax.Array:
  """Whether every array of ``xs`` (``None`` skipped) is finite: a scalar bool."""
  oks = [jnp.all(jnp.isfinite(x)) for x in xs if x is not None]
  return jnp.all(jnp.stack(oks)) if oks else jnp.asarray(True)


class Plan(NamedTuple):
  """How one parameter is preconditioned: the core its statistics are taken of.

  Attributes:
    core: the shape of one core: the parameter itself (or its merged view) for
      ``spec=None``, else its ``(fan_in, fan_out)`` matrix view.
    batch: the number of cores (stacked layers, and heads kept apart by the
      view) for a matrix view, each with its own factors; ``None``: one core.
    axes: which core axes have a factor.
    spec: the matrix view (`slimoptax.matrix_dims`'s spec; ``None``: reshape).
  """

  core: tuple[int, ...]
  batch: int | None
  axes: tuple[bool, ...]
  spec: Any

  @property
  def order(self) -> int:
    return sum(self.axes)

  def factor_shapes(self) -> tuple[Any, ...]:
    """Per core axis, the factor's shape (``None``: no factor)."""
    return tuple(None if not on else ((n, n) if self.batch is None else (self.batch, n, n))
                 for n, on in zip(self.core, self.axes))


def tensor_plan(core: Sequence[int], max_precond_dim: int, *, precondition_1d: bool = True) -> Plan:
  """One core of shape ``core`` (the parameter or its merged view): every short axis gets a factor."""
  core = tuple(int(s) for s in core)
  return Plan(core, None, precond_axes(core, max_precond_dim, precondition_1d=precondition_1d), None)


def matrix_plan(shape: Sequence[int], spec: Any, max_precond_dim: int) -> Plan:
  """The ``(batch, fan_in, fan_out)`` view of ``shape`` by ``spec`` (Muon's, `slimoptax.matrix_dims`).

  Axes outside the view's reduction and output axes (stacked layers, heads
  kept apart) index separate cores, so no statistic mixes them.
  """
  batch, rows, cols = _muon.matrix_shape(shape, spec)
  return Plan((rows, cols), batch, precond_axes((rows, cols), max_precond_dim), spec)


def to_core(x: jax.Array, plan: Plan) -> jax.Array:
  """``x`` as its core(s): ``plan.core``, or ``(batch, *plan.core)`` for a matrix view."""
  if plan.spec is None:
    return x.reshape(plan.core)
  view, d = _muon._view(x.shape, plan.spec)
  to_matrices, _ = contrib_muon._compute_muon_reshape(x.reshape(view), d)
  return to_matrices(x.reshape(view))


def from_core(y: jax.Array, plan: Plan, shape: Sequence[int]) -> jax.Array:
  """The inverse of `to_core`: back to the parameter's ``shape``."""
  if plan.spec is None:
    return y.reshape(shape)
  view, d = _muon._view(shape, plan.spec)
  _, back = contrib_muon._compute_muon_reshape(jnp.zeros(view, y.dtype), d)
  return back(y).reshape(shape)


def per_core(fn: Any, plan: Plan) -> Any:
  """``fn`` on one core, mapped over the cores of a matrix view (`jax.vmap`)."""
  return fn if plan.batch is None else jax.vmap(fn)


def factor_leaves(updates: Any, tree: Any, plans: Sequence[Plan], name: str) -> list[Any]:
  """The per-parameter factor tuples of the state ``tree``, checked against ``plans`` (path-named errors)."""
  got = _tree.leaves_like(updates, tree, what=f"state ({name})")
  for (path, _), g, plan in zip(_tree.named_leaves(updates), got, plans):
    have = tuple(None if a is None else _tree.shape_of(a) for a in g) if isinstance(g, tuple) else g
    want = plan.factor_shapes()
    if have != want:
      raise ValueError(f"{name} of {path!r} have shapes {have} but the update needs {want}: the "
                       "state was created for other parameters (or other dims / max_precond_dim)")
  return list(got)


__all__ = [
    "Plan", "all_finite", "factor_leaves", "from_core", "matrix_plan", "per_core", "tensor_plan",
    "to_core", "axis_gram", "eigenbasis", "eigh_refresh", "inverse_root", "merged_shape",
    "mode_product", "precond_axes", "precondition", "qr_refresh", "rotate", "update_stats",
]
