"""Column max descent: steepest descent under a per-column l1 budget (Liu, Wang, Zhang, Algorithm 2).

For a matrix ``W`` in the paper's convention ``W in R^{m x n}`` (``m`` outputs,
``n`` inputs, PyTorch's ``(fan_out, fan_in)`` weight), with momentum ``M_t``:

.. math::

  M_t = \\beta M_{t-1} + (1 - \\beta) G_t, \\qquad
  [U_t]_{ij} = \\begin{cases} \\operatorname{sign}([M_t]_{ij}) \\, R / k_j &
  |[M_t]_{ij}| = \\max_l |[M_t]_{lj}| \\\\ 0 & \\text{otherwise} \\end{cases}

where ``k_j`` is the number of entries of column ``j`` that reach the column's
maximum, and ``W_{t+1} = W_t - eta_t U_t``.

Derivation (the review of Liu, Wang, Zhang prints Algorithm 2 only up to ``R / k_j``). Steepest descent for a
linear model of the loss, ``max <M, U>`` subject to ``||U_{:, j}||_1 <= R``
for every column ``j`` (the induced norm ``||U||_{1 -> 1} <= R``), separates
over columns: ``sum_i M_ij U_ij <= ||U_{:, j}||_1 max_i |M_ij|``, with
equality exactly when the budget sits on entries of maximal ``|M_ij|`` with
their signs. Spending all of ``R`` on them attains the bound ``R sum_j
max_i |M_ij|``; when ``k_j`` entries tie, every split of ``R`` among them is
optimal and the even split ``R / k_j`` is the symmetric one. A column of
zeros gets no update (every ``U`` is optimal there, zero is the one that
moves nothing).

Layouts. The paper's columns are its inputs: in a Flax kernel ``(fan_in,
fan_out)`` one "column" is one fan_in index and the maximum runs over the
fan_out axes. The fan_in / fan_out axes come from the same label machinery as
Muon's matrix views (`slimoptax.matrix_dims`: Dense ``(in, out)``,
``DenseGeneral`` attention kernels ``(d, H, hd)`` and ``(H, hd, d)``, convs
``(*window, in, out)``, any ``dims`` you declare); axes in neither (a batch of
heads with ``per_head``) are kept apart. Embeddings, output heads, norms and
biases are not hidden linear maps: `column_max_descent` sends them to AdamW,
as `slimoptax.muon` does.

Reference: Liu, Wang, Zhang, "Optimizer-Model Consistency: Full Finetuning
with the Same Optimizer as Pretraining Forgets Less" (Algorithm 2, Column
Max Descent).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from slimoptax import _muon as muon_lib
from slimoptax import _slim_adam as slim_adam
from slimoptax import _tree


class ScaleByColumnMaxState(NamedTuple):
  """State of `scale_by_column_max`.

  Attributes:
    count: number of updates applied (int32 scalar).
    mu: the momentum ``M_t``, same shapes as the parameters.
  """

  count: chex.Array
  mu: optax.Updates


def _max_and_count(mag: jax.Array, axes: Any) -> tuple[jax.Array, jax.Array]:
  """``max`` of ``mag`` over ``axes`` and how many entries equal it, in one two-output reduction.

  The reduction merges ``(max, count)`` pairs: the larger maximum keeps its
  count, equal maxima add theirs (a NaN maximum propagates, with count 0). One
  pass over ``mag`` instead of a maximum and then a count of the entries at it;
  both keep the reduced axes (size 1), in ``mag``'s dtype.
  """
  axes = tuple(a % mag.ndim for a in (axes if isinstance(axes, (tuple, list)) else (axes,)))

  def merge(a, b):
    top = jnp.maximum(a[0], b[0])
    return top, jnp.where(a[0] == top, a[1], 0) + jnp.where(b[0] == top, b[1], 0)

  init = (jnp.array(-jnp.inf, mag.dtype), jnp.array(0, jnp.int32))
  top, count = jax.lax.reduce((mag, jnp.ones(mag.shape, jnp.int32)), init, merge, axes)
  keep = tuple(1 if i in axes else n for i, n in enumerate(mag.shape))
  return top.reshape(keep), count.reshape(keep).astype(mag.dtype)


def column_max_direction(m: jax.Array, spec: Any, radius: ArrayLike = 1.0) -> jax.Array:
  """``U`` of Algorithm 2 for one matrix ``m`` viewed by ``spec`` (a `slimoptax.matrix_dims` entry).

  The maximum runs over ``spec.output_axis`` (fan_out in Flax layouts), once per
  index of the other axes. A column whose maximum is NaN gives NaN (a corrupt
  momentum is not hidden); one of zeros gives zeros.

  Args:
    m: the momentum of one parameter.
    spec: its `optax.contrib.MuonDimensionNumbers` or `slimoptax.ReshapedDims`.
    radius: the l1 budget ``R`` of each column.

  Returns:
    ``U``, with ``m``'s shape and dtype.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> m = jnp.array([[1.0, -3.0, 3.0], [0.5, 0.2, -0.1]])  # Flax (fan_in, fan_out): rows are columns
    >>> slimoptax.column_max_direction(m, optax.contrib.MuonDimensionNumbers(0, 1), 2.0)
    Array([[ 0., -1.,  1.],
           [ 2.,  0.,  0.]], dtype=float32)
  """
  view, dims = muon_lib._view(m.shape, spec)
  x = m.reshape(view)
  mag = jnp.abs(x)
  top, k = _max_and_count(mag, dims.output_axis)
  hit = (mag == top) & (top > 0)
  u = jnp.where(hit, jnp.sign(x) * (radius / jnp.maximum(k, 1)), jnp.zeros_like(x))
  u = jnp.where(jnp.isnan(top), jnp.nan, u)
  return u.reshape(m.shape).astype(m.dtype)


def _not_matrix_error(path: str, shape: tuple[int, ...]) -> ValueError:
  return ValueError(
      f"scale_by_column_max: parameter {path!r} with shape {shape} is not a hidden matrix (an embedding, "
      "head, norm, bias or vector: no columns to take the max over); use column_max_descent, which sends "
      "such parameters to AdamW, or optax.partition, or give `dims` for it")


def scale_by_column_max(beta: ArrayLike = 0.9, *, radius: ArrayLike = 1.0, dims: Any = None,
                        per_head: bool = False, num_heads: int | None = None,
                        mu_dtype: Any = None) -> optax.GradientTransformation:
  """Column max descent's direction: momentum, then the per-column maximum (Algorithm 2).

  .. math::

    M_t = \\beta M_{t-1} + (1 - \\beta) G_t, \\qquad
    U_t = R \\cdot \\operatorname{sign}(M_t) \\odot \\mathbb{1}[|M_t| = \\text{column max}] / k_j

  Every leaf must be a matrix under ``dims`` (masked leaves of
  `optax.partition` are skipped); `column_max_descent` partitions a model
  for you. The minus sign and the rate are the chain's (`optax.scale_by_learning_rate`).

  Args:
    beta: momentum decay (``M_t`` is an EMA with dampening ``1 - beta``).
    radius: the l1 budget ``R`` of each column.
    dims, per_head, num_heads: the matrix views (Flax layouts), see `slimoptax.matrix_dims`.
    mu_dtype: momentum dtype (default: the parameters').

  Returns:
    An `optax.GradientTransformation` with state `ScaleByColumnMaxState`.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.zeros((2, 3))}}}
    >>> tx = slimoptax.scale_by_column_max(0.0, radius=1.0)
    >>> g = {"mlp": {"up": {"kernel": jnp.array([[1.0, -4.0, 2.0], [3.0, 3.0, 0.0]])}}}
    >>> u, _ = tx.update(g, tx.init(params))
    >>> u["mlp"]["up"]["kernel"]
    Array([[ 0. , -1. ,  0. ],
           [ 0.5,  0.5,  0. ]], dtype=float32)

  References:
    Liu, Wang, Zhang, Optimizer-Model Consistency: Full Finetuning with the
    Same Optimizer as Pretraining Forgets Less (Algorithm 2).
  """
  _tree.check_range("beta", beta, 0.0, 1.0)
  _tree.check_range("radius", radius, 0.0, None)
  _tree.static_int("num_heads", num_heads, 1)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)

  def specs(tree):
    out = muon_lib._leaf_specs(tree, dims, per_head, num_heads)
    for (path, x), spec in zip(_tree.named_leaves(tree), out):  # masked nodes hold no leaves
      if spec is None:
        raise _not_matrix_error(path, _tree.shape_of(x))
    return out

  def init_fn(params):
    _tree.check_float_params(params)
    specs(params)  # fail early, naming the parameter
    return ScaleByColumnMaxState(jnp.zeros([], jnp.int32), _tree.zeros_like_tree(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleByColumnMaxState, who="scale_by_column_max")
    _tree.check_float_params(updates, what="update")
    muon_lib._check_masks(updates, state.mu)

    def leaf(path, g, m, spec):
      m = optax.tree.update_moment(g, m, beta, 1).astype(mu_dtype or m.dtype)
      u = column_max_direction(m, spec, radius) if m.size else m
      return u.astype(g.dtype), m

    direction, mu = _tree.map_update(leaf, updates, state.mu, names=["momentum"], num_outputs=2,
                                     extra=[specs(updates)])
    return direction, ScaleByColumnMaxState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def column_max_labels(params: Any, dims: Any = None, *, per_head: bool = False,
                      num_heads: int | None = None) -> Any:
  """``"column_max"`` for hidden matrices, ``"adam"`` otherwise (`optax.partition` labels).

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> slimoptax.column_max_labels({"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}})
    {'ln': {'scale': 'adam'}, 'mlp': {'up': {'kernel': 'column_max'}}}
  """
  labels = muon_lib.muon_labels(params, dims, per_head=per_head, num_heads=num_heads)
  return jax.tree.map(lambda label: "column_max" if label == "muon" else label, labels)


def column_max_descent(learning_rate: optax.ScalarOrSchedule, momentum: ArrayLike = 0.9, *,
                       radius: ArrayLike = 1.0, weight_decay: ArrayLike = 0.0,
                       weight_decay_mask: Any = None, dims: Any = None, per_head: bool = False,
                       num_heads: int | None = None, mu_dtype: Any = None,
                       adam_learning_rate: optax.ScalarOrSchedule | None = None,
                       adam_b1: ArrayLike = 0.9, adam_b2: ArrayLike = 0.95, adam_eps: ArrayLike = 1e-8,
                       adam_weight_decay: ArrayLike | None = None,
                       adam_compress: Any = None) -> optax.GradientTransformation:
  """Column max descent for hidden matrices, (Slim)AdamW for everything else.

  .. math::

    W \\leftarrow W - \\eta_t (U_t + \\lambda W)

  for the matrices (`column_max_labels`), with `scale_by_column_max`'s
  ``U_t``; embeddings, heads, norms and biases go to `slimoptax.slim_adamw`
  (`optax.partition`), as `slimoptax.muon` does.

  Args:
    learning_rate: the matrices' rate ``eta`` (float or schedule); each
      column then moves by ``eta R`` in l1.
    momentum: ``beta`` of the momentum.
    radius: the l1 budget ``R`` per column.
    weight_decay, weight_decay_mask: decoupled weight decay of the matrices.
    dims, per_head, num_heads, mu_dtype: see `scale_by_column_max`.
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay,
      adam_compress: the fallback's (rate and decay default to the matrices').

  Returns:
    An `optax.GradientTransformationExtraArgs` (an `optax.partition`).

  Example:
    >>> import jax, jax.numpy as jnp, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "wte": {"embedding": jnp.ones((16, 4))}}
    >>> tx = slimoptax.column_max_descent(0.01, adam_learning_rate=3e-4)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> # each fan_in row of the kernel: 8 tied entries share R = 1, times the rate; AdamW's first step: -lr
    >>> round(float(updates["mlp"]["up"]["kernel"][0, 0]), 6), round(float(updates["wte"]["embedding"][0, 0]), 6)
    (-0.00125, -0.0003)

  References:
    Liu, Wang, Zhang, Optimizer-Model Consistency: Full Finetuning with the
    Same Optimizer as Pretraining Forgets Less (Algorithm 2).
  """
  for name, value, high in (("weight_decay", weight_decay, None), ("adam_b1", adam_b1, 1.0),
                            ("adam_b2", adam_b2, 1.0), ("adam_eps", adam_eps, None),
                            ("adam_weight_decay", adam_weight_decay, None)):
    _tree.check_range(name, value, 0.0, high)
  matrices = optax.chain(
      scale_by_column_max(momentum, radius=radius, dims=dims, per_head=per_head, num_heads=num_heads,
                          mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))
  rest = slim_adam.slim_adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate, adam_b1, adam_b2, adam_eps,
      weight_decay if adam_weight_decay is None else adam_weight_decay, compress=adam_compress,
      num_heads=num_heads)
  return muon_lib.partition_checked(
      "column_max_descent", {"column_max": matrices, "adam": rest},
      lambda tree: column_max_labels(tree, dims, per_head=per_head, num_heads=num_heads))


__all__ = ["ScaleByColumnMaxState", "column_max_descent", "column_max_direction", "column_max_labels",
           "scale_by_column_max"]
