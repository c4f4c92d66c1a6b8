"""Adafactor: second moments factored into row and column statistics.

Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost*, 2018 (Alg. 4/5, §§6-9). For a matrix parameter Adafactor keeps
exponential moving averages of the row sums ``R`` and column sums ``C`` of
``G^2 + eps1`` instead of the full second moment ``V`` and reconstructs
``V_hat = R C / (1^T R)``, the minimiser of the I-divergence ``D(V || R C)``
over rank-1 non-negative ``R C`` (§3; exact when ``V`` has rank 1): ``rows +
cols`` numbers instead of ``rows * cols``. Which two axes are the rows and the
columns is chosen per parameter (``factored_axes``); the other axes are batch
axes, and parameters without a pair keep an unfactored second moment. As
`optax.scale_by_factored_rms`, the state holds row and column *means* (the
same ``V_hat``).

`scale_by_factored_second_moment` is that estimate alone; `scale_by_adafactor`
chains the paper's other pieces (§§6-9) after it as optax transforms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from slimoptax import _tree, layers
from slimoptax import rules as rules_lib

Pair = tuple[int, int]
FactoredAxes = Any  # None | str | Rules | mapping | callable | pytree of (row, col) / None

FACTORED_PRESETS: tuple[str, ...] = ("largest", "last_two", "fan")


class ScaleByAdafactorState(NamedTuple):
  """State of `scale_by_factored_second_moment` (the first state of `scale_by_adafactor`).

  ``v_row``, ``v_col``, ``v`` have the parameters' tree structure, ``None``
  where a parameter has no such statistic.

  Attributes:
    count: number of updates applied (int32 scalar).
    v_row: factored parameters: EMA of the mean of ``g^2 + eps1`` over the
      column axis; the parameter's shape with the column axis removed.
    v_col: ... over the row axis; the parameter's shape with the row axis removed.
    v: unfactored parameters: EMA of ``g^2 + eps1``, the parameter's shape.
  """

  count: chex.Array
  v_row: optax.Updates
  v_col: optax.Updates
  v: optax.Updates


def decay_rate_pow(step: ArrayLike, decay_rate: ArrayLike = 0.8) -> jax.Array:
  """Adafactor's second-moment decay ``beta2_t = 1 - t^(-decay_rate)``, ``t = step + 1`` (§7).

  ``beta2_1 = 0`` (the first step takes ``g^2`` as is), so the estimate needs
  no bias correction.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._adafactor import decay_rate_pow
    >>> [round(float(decay_rate_pow(s)), 4) for s in (0, 1, 9)]
    [0.0, 0.4257, 0.8415]
  """
  t = jnp.asarray(step, jnp.float32) + 1.0
  return 1.0 - t ** (-jnp.asarray(decay_rate, jnp.float32))


def decay_rate_constant(step: ArrayLike, decay_rate: ArrayLike = 0.999) -> jax.Array:
  """A constant second-moment decay ``beta2_t = decay_rate`` (Adam-like, no bias correction)."""
  del step
  return jnp.asarray(decay_rate, jnp.float32)


def _largest_pair(shape: tuple[int, ...]) -> Pair | None:
  """optax's rule: the two largest axes (row = 2nd largest, col = largest)."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)  # stable: ties keep axis order
  return int(order[-2]), int(order[-1])


def _last_two_rules() -> rules_lib.Rules:
  """The ``"last_two"`` preset (PyTorch/fairseq Adafactor): the last two axes of every matrix."""
  return rules_lib.Rules([rules_lib.Rule(r"^", "other", (-2, -1), warn_unused=False, min_ndim=2),
                          rules_lib.Rule(r"^", "other", (), warn_unused=False, max_ndim=1)],
                         name="last_two")


def factored_rules() -> rules_lib.Rules:
  """The ``"fan"`` preset: factor each kernel over (fan_in, fan_out).

  It expects **Flax layouts** (layer types read from paths as in
  `slimoptax.preset`): ``Dense`` kernels ``(fan_in, fan_out)``, attention
  kernels ``(d, heads, head_dim)`` / ``(heads, head_dim, d)``, ``Conv``
  ``(*window, in, out)``, ``Embed`` ``(vocab, d)``. 2-D kernels factor
  ``(fan_in, fan_out)`` (embeddings ``(token, embed)``); 3-D attention kernels
  ``(fan_in, head_dim)`` (query/key/value) or ``(head_dim, fan_out)`` (output),
  heads being a batch axis; higher-rank kernels their last two axes; norms,
  biases and scalars are not factored. A 2-D PyTorch ``(fan_out, fan_in)``
  weight gets the pair swapped: the same ``V_hat`` (symmetric in rows and
  columns); 3-D PyTorch-layout kernels need integer axes.

  Returns:
    A `slimoptax.Rules` whose axes are ``(row, col)`` pairs.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> rules = slimoptax.factored_rules()
    >>> rules.match("params/Dense_0/kernel", (4, 8)).axes, rules.match("params/LayerNorm_0/scale", (8,)).axes
    (('fan_in', 'fan_out'), ())
  """
  rule = functools.partial(rules_lib.Rule, warn_unused=False)
  two_d = {"embedding": ("token", "embed"), "pos_embedding": ("token", "embed"), "conv": (-2, -1)}
  three_d = {"query": ("fan_in", "head_dim"), "key": ("fan_in", "head_dim"),
             "value": ("fan_in", "head_dim"), "attn_out": ("head_dim", "fan_out")}
  out = []
  for pattern, ltype in layers.LAYER_PATTERNS:
    if ltype in ("norm", "bias", "scalar"):
      out.append(rule(pattern, ltype, ()))
      continue
    out.append(rule(pattern, ltype, two_d.get(ltype, ("fan_in", "fan_out")), min_ndim=2, max_ndim=2))
    if ltype in three_d:
      out.append(rule(pattern, ltype, three_d[ltype], min_ndim=3, max_ndim=3))
    out.append(rule(pattern, ltype, (-2, -1), min_ndim=3))
  return rules_lib.Rules([*out, *_last_two_rules().rules], name="fan")


def _check_pair(path: str, shape: tuple[int, ...], pair: Any, what: str) -> Pair | None:
  """Validates one ``(row, col)`` entry (``None`` / ``()``: unfactored); axes made non-negative."""
  if pair is None or (isinstance(pair, (tuple, list)) and len(pair) == 0):
    return None
  ndim = len(shape)
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2
      or not all(isinstance(a, (int, np.integer)) for a in pair)):
    raise ValueError(
        f"{what} for {path!r}: expected a (row_axis, col_axis) pair of ints or None, got {pair!r}")
  for a in pair:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} for {path!r}: axis {a} out of range for shape {shape}")
  row, col = (int(a) % ndim for a in pair)
  if row == col:
    raise ValueError(f"{what} for {path!r}: row and column axes are the same axis {row}")
  return row, col


def _rule_pair(rule: rules_lib.Rule, path: str, shape: tuple[int, ...], what: str) -> Pair | None:
  """A matched rule's ``(row, col)`` entry for one parameter, each semantic name resolved alone."""
  if rule.axes == rules_lib.UNSUPPORTED:
    return rules_lib.rule_axes(rule, path, shape)  # raises, naming the parameter
  axes = tuple(rule.axes)
  if not axes:
    return None
  if len(axes) != 2:
    raise ValueError(
        f"{what}: rule {rule.pattern!r} gives {axes} for parameter {path!r}; factoring needs "
        "exactly two axes (row, col), or () for no factoring")
  out = []
  for a in axes:
    if isinstance(a, str):
      role = rules_lib.rule_axes(dataclasses.replace(rule, axes=(a,)), path, shape)
      if len(role) != 1:
        raise ValueError(
            f"{what}: axis role {a!r} of parameter {path!r} (layer type {rule.label!r}, shape "
            f"{shape}) spans axes {role}; a factored axis must be a single axis: give integer "
            "axes for this parameter")
      a = role[0]
    out.append(a)
  return _check_pair(path, shape, tuple(out), what)


def resolve_factored_axes(
    params: Any,
    factored_axes: FactoredAxes = None,
    *,
    min_dim_size_to_factor: int = 128,
    what: str = "factored_axes",
    warn: bool = True,
) -> list[tuple[str, tuple[int, ...], Pair | None]]:
  """Which (row, col) axes each parameter factors, from any form `slimoptax.rules.resolve_tree` reads.

  Forms: ``None`` or ``"largest"`` (the two largest axes, as
  `optax.scale_by_factored_rms`: row = second largest); ``"last_two"`` (as
  the PyTorch/fairseq Adafactor); ``"fan"`` (`factored_rules`); a
  `slimoptax.Rules` (or flat ``{path: [row, col] | None}`` mapping) whose
  axes are ``(row, col)`` pairs of ints or semantic names (``()``: not
  factored); a callable ``params -> any of these``; or a pytree matching
  ``params`` of ``(row_axis, col_axis)`` / ``None``. Then a parameter is
  factored only if both axes have at least ``min_dim_size_to_factor`` entries.

  Args:
    params: parameters or updates (only paths and shapes are read).
    factored_axes: the spec.
    min_dim_size_to_factor: smallest axis size worth factoring (optax: 128).
    what: the argument's name, for errors.
    warn: warn about user rules that match no parameter.

  Returns:
    ``[(path, shape, (row_axis, col_axis) | None), ...]`` in leaf order, axes
    non-negative.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.zeros((256, 512)), "b": jnp.zeros(512)}
    >>> slimoptax.resolve_factored_axes(params)
    [('b', (512,), None), ('w', (256, 512), (0, 1))]
    >>> slimoptax.resolve_factored_axes(params, {"w": (1, 0), "b": None})[1]
    ('w', (256, 512), (1, 0))
  """
  resolved = rules_lib.resolve_tree(
      params, factored_axes, what=what,
      from_rule=lambda rule, path, shape, _: _rule_pair(rule, path, shape, what),
      check_leaf=lambda path, shape, pair: _check_pair(path, shape, pair, what),
      default=lambda path, shape: _largest_pair(shape),
      named={"largest": None, "last_two": _last_two_rules(), "fan": factored_rules()},
      presets=False, warn=warn)
  return [(p, s, None if pair is None or min(s[pair[0]], s[pair[1]]) < min_dim_size_to_factor
           else pair) for p, s, pair in resolved]


def factored_state_shapes(shape: tuple[int, ...], pair: Pair | None) -> dict[str, tuple[int, ...] | None]:
  """Shapes of ``v_row``, ``v_col``, ``v`` for one parameter (``None`` = absent).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._adafactor import factored_state_shapes
    >>> factored_state_shapes((4, 6, 8), (1, 2))
    {'v_row': (4, 6), 'v_col': (4, 8), 'v': None}
  """
  shape = tuple(shape)
  if pair is None:
    return {"v_row": None, "v_col": None, "v": shape}
  row, col = pair
  return {"v_row": shape[:col] + shape[col + 1:], "v_col": shape[:row] + shape[row + 1:], "v": None}


def second_moment_entries(params: Any, factored_axes: FactoredAxes = None, *,
                          min_dim_size_to_factor: int = 128) -> tuple[int, int]:
  """``(kept, full)``: second-moment entries Adafactor keeps vs Adam's.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._adafactor import second_moment_entries
    >>> second_moment_entries({"w": jnp.zeros((300, 200)), "b": jnp.zeros(200)})
    (700, 60200)
  """
  kept = full = 0
  for _, shape, pair in resolve_factored_axes(params, factored_axes,
                                              min_dim_size_to_factor=min_dim_size_to_factor,
                                              warn=False):
    full += math.prod(shape)
    kept += sum(math.prod(s) for s in factored_state_shapes(shape, pair).values() if s is not None)
  return kept, full


def _ema(beta2: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
  return (beta2 * old + (1 - beta2) * new).astype(old.dtype)


def _factored_leaf(g, v_row, v_col, v, pair, beta2, eps1):
  """One parameter: the new statistics and ``U = G / sqrt(V_hat)`` (Alg. 4, lines 5-8)."""
  g2 = jnp.square(g) + eps1
  if pair is None:
    v = _ema(beta2, v, g2)
    return (g * jax.lax.rsqrt(v)).astype(g.dtype), None, None, v
  r, c = pair
  v_row_prev, v_col_prev = v_row, v_col
  # Means over an axis of size 0 (a zero-size parameter) are 0, not NaN.
  v_row = _ema(beta2, v_row, _tree.safe_mean(g2, c))
  v_col = _ema(beta2, v_col, _tree.safe_mean(g2, r))
  r_in_row = r - 1 if r > c else r  # the row axis of v_row (col axis removed)
  c_in_col = c - 1 if c > r else c  # the col axis of v_col (row axis removed)
  row_mean = _tree.safe_mean(v_row, r_in_row, keepdims=True)
  u = (g * jnp.expand_dims(jax.lax.rsqrt(v_row / row_mean), c)
       * jnp.expand_dims(jax.lax.rsqrt(v_col), r))
  # V_hat couples every entry of a matrix (through mean(R)): a matrix with a
  # non-finite new row or column statistic skips the step (see the docstring).
  row_ok = jnp.all(jnp.isfinite(v_row), axis=r_in_row, keepdims=True)
  col_ok = jnp.all(jnp.isfinite(v_col), axis=c_in_col, keepdims=True)
  ok = jnp.squeeze(jnp.expand_dims(row_ok, c) & jnp.expand_dims(col_ok, r), (r, c))  # per batch
  u = jnp.where(jnp.expand_dims(ok, tuple(sorted((r, c)))), u, 0)
  v_row = jnp.where(jnp.expand_dims(ok, r_in_row), v_row, v_row_prev)
  v_col = jnp.where(jnp.expand_dims(ok, c_in_col), v_col, v_col_prev)
  return u.astype(g.dtype), v_row, v_col, None


def scale_by_factored_second_moment(
    decay_rate: ArrayLike = 0.8,
    *,
    factored_axes: FactoredAxes = None,
    min_dim_size_to_factor: int = 128,
    eps1: ArrayLike = 1e-30,
    decay_rate_fn: Callable[[ArrayLike, ArrayLike], ArrayLike] = decay_rate_pow,
    step_offset: ArrayLike = 0,
) -> optax.GradientTransformation:
  """Rescales updates by Adafactor's factored second moment (Shazeer & Stern 2018, Alg. 4/5).

  For a parameter factored along ``(row, col)``, with ``beta2_t =
  decay_rate_fn(t - 1 - step_offset, decay_rate)`` (default ``1 -
  t^(-decay_rate)``):

  .. math::

    R_t &= \\beta_{2t} R_{t-1} + (1 - \\beta_{2t})\\,\\mathrm{mean}_{col}(G_t^2 + \\epsilon_1),
    \\quad C_t = \\beta_{2t} C_{t-1} + (1 - \\beta_{2t})\\,\\mathrm{mean}_{row}(G_t^2 + \\epsilon_1) \\\\
    \\hat V_t &= R_t C_t / \\mathrm{mean}_{row}(R_t), \\quad U_t = G_t / \\sqrt{\\hat V_t}

  Unfactored parameters use ``V_t = EMA(G^2 + eps1)`` in place of ``V_hat``.
  With ``factored_axes=None`` this is `optax.scale_by_factored_rms`.

  Non-finite statistics: ``R`` and ``C`` are shared by a row / column and
  ``V_hat`` couples a whole matrix (through ``mean(R)``), so one gradient entry
  whose square overflows (``1e30`` in float32) or is NaN would silently zero
  or scramble the matrix's step for good (`optax.apply_if_finite` checks the
  gradients, and ``1e30`` is finite). Instead **a (per-batch) matrix whose
  new ``R`` or ``C`` is not finite skips the step**, as `optax.apply_if_finite`
  would: old ``R`` and ``C`` kept, update 0 this step only. Unfactored parameters keep optax's
  per-entry behaviour. Zero-size parameters get empty updates and finite
  (zero) statistics.

  Args:
    decay_rate: parameter of ``decay_rate_fn``: the exponent 0.8 of the paper's
      ``1 - t^-0.8`` (or ``beta2`` for `decay_rate_constant`).
    factored_axes: which two axes each parameter factors (``None``: the two
      largest, as optax; ``"last_two"``, ``"fan"``, rules, ...): see
      `resolve_factored_axes`.
    min_dim_size_to_factor: factor only if both axes have at least this many
      entries (optax's default 128; 1 factors every pair given).
    eps1: added to ``g^2`` (paper: 1e-30).
    decay_rate_fn: ``(step, decay_rate) -> beta2``, ``step`` counting from 0:
      `decay_rate_pow`, `decay_rate_constant` or any schedule.
    step_offset: subtracted from the step in ``decay_rate_fn`` (fine-tuning).

  Returns:
    A `optax.GradientTransformation` with state `ScaleByAdafactorState`.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._adafactor import scale_by_factored_second_moment
    >>> tx = scale_by_factored_second_moment(factored_axes="last_two", min_dim_size_to_factor=1)
    >>> g = {"w": jnp.outer(jnp.arange(1.0, 4.0), jnp.array([1.0, -2.0]))}  # rank 1
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["w"].round(4).tolist()  # V_hat = g^2 exactly: sign(g)
    [[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]]
    >>> state.v_row["w"].shape, state.v_col["w"].shape
    ((3,), (2,))
  """

  if decay_rate_fn is decay_rate_pow:
    _tree.check_range("decay_rate", decay_rate, 0.0)  # the exponent of 1 - t^-decay_rate
  elif decay_rate_fn is decay_rate_constant:
    _tree.check_range("decay_rate", decay_rate, 0.0, 1.0)  # beta2 itself
  _tree.check_range("eps1", eps1, 0.0)
  _tree.static_int("min_dim_size_to_factor", min_dim_size_to_factor, 0)

  def _pairs(tree, *, warn):
    return [a for _, _, a in resolve_factored_axes(
        tree, factored_axes, min_dim_size_to_factor=min_dim_size_to_factor, warn=warn)]

  def init_fn(params):
    _tree.check_float_params(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [factored_state_shapes(_tree.shape_of(p), a)
              for p, a in zip(leaves, _pairs(params, warn=True))]
    zeros = lambda name: jax.tree_util.tree_unflatten(treedef, [
        None if s[name] is None else jnp.zeros(s[name], p.dtype) for p, s in zip(leaves, shapes)])
    return ScaleByAdafactorState(jnp.zeros([], jnp.int32), zeros("v_row"), zeros("v_col"), zeros("v"))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleByAdafactorState, who="scale_by_factored_second_moment")
    pairs = _pairs(updates, warn=False)
    shapes = [factored_state_shapes(_tree.shape_of(g), a)
              for g, a in zip(jax.tree_util.tree_leaves(updates), pairs)]
    beta2 = decay_rate_fn(state.count - step_offset, decay_rate)
    names = ("v_row", "v_col", "v")
    u, v_row, v_col, v = _tree.map_update(
        lambda path, g, vr, vc, v, pair: _factored_leaf(g, vr, vc, v, pair, beta2, eps1),
        updates, state.v_row, state.v_col, state.v, names=[f"state.{n}" for n in names],
        shapes=[[s[n] for s in shapes] for n in names], num_outputs=4, source="factored_axes",
        extra=[pairs])
    return u, ScaleByAdafactorState(optax.safe_increment(state.count), v_row, v_col, v)

  return optax.GradientTransformation(init_fn, update_fn)


def relative_step_size(count: ArrayLike) -> jax.Array:
  """The relative step size ``rho_t = min(1e-2, 1/sqrt(t))`` (§8), ``t = count + 1``.

  ``count`` counts from 0, as `optax.scale_by_schedule` passes it.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> from slimoptax._adafactor import relative_step_size
    >>> [round(float(relative_step_size(c)), 5) for c in (0, 9999, 39999)]
    [0.01, 0.01, 0.005]
  """
  t = optax.safe_increment(jnp.asarray(count, jnp.int32)).astype(jnp.float32)
  return jnp.minimum(1e-2, jax.lax.rsqrt(t))


def _scale_by_param_rms(eps2: ArrayLike) -> optax.GradientTransformation:
  """`optax.scale_by_param_block_rms`, refusing missing or mismatched ``params`` by name."""
  inner = optax.scale_by_param_block_rms(min_scale=eps2)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_adafactor(multiply_by_parameter_scale=True) needs `params` in "
                       "update(); pass them or set multiply_by_parameter_scale=False")
    _tree.leaves_like(updates, params, what="params")
    return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update_fn)


def scale_by_adafactor(
    decay_rate: ArrayLike = 0.8,
    *,
    factored_axes: FactoredAxes = None,
    min_dim_size_to_factor: int = 128,
    b1: ArrayLike | None = None,
    eps1: ArrayLike = 1e-30,
    eps2: ArrayLike = 1e-3,
    clipping_threshold: ArrayLike | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    relative_step: bool = False,
    decay_rate_fn: Callable[[ArrayLike, ArrayLike], ArrayLike] = decay_rate_pow,
    step_offset: ArrayLike = 0,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Adafactor (Shazeer & Stern 2018, Alg. 4/5 with momentum) as a chain of transforms.

  ``U_t = G_t / sqrt(V_hat_t)`` from `scale_by_factored_second_moment`, then

  .. math::

    \\hat U_t = U_t / \\max(1, \\mathrm{RMS}(U_t) / d), \\quad
    \\alpha_t = \\rho_t \\cdot \\max(\\epsilon_2, \\mathrm{RMS}(X_{t-1})), \\quad
    M_t = \\beta_1 M_{t-1} + (1 - \\beta_1)\\,\\alpha_t \\hat U_t

  (clipping §6, step size §8, momentum §§7, 9); the output is ``M_t``
  (``alpha_t U_hat_t`` without momentum). That is ``optax.chain(core,
  optax.clip_by_block_rms(d), optax.scale_by_schedule(relative_step_size),
  optax.scale_by_param_block_rms(eps2), optax.ema(b1, debias=False))``, each
  extra present only when enabled: ``rho_t = min(1e-2, 1/sqrt(t))`` with
  ``relative_step``, else 1 (chain a learning rate); ``RMS(X)`` only with
  ``multiply_by_parameter_scale``.

  Args:
    decay_rate, factored_axes, min_dim_size_to_factor, eps1, decay_rate_fn,
      step_offset: the factored second moment's, as in
      `scale_by_factored_second_moment`.
    b1: momentum of the update (``None``: no first moment, the paper's
      memory-light Alg. 4; 0.9: "Adafactor v2" of fairseq).
    eps2: floor of the parameter RMS in the parameter scale (paper: 1e-3).
    clipping_threshold: ``d`` of the update clipping (paper: 1.0); ``None``
      disables it.
    multiply_by_parameter_scale: scale the step by ``max(eps2, RMS(X))``
      (needs ``params``).
    relative_step: scale the step by ``rho_t``; then chain ``optax.scale(-1)``
      instead of a learning rate.
    mu_dtype: dtype of the momentum (default: the updates').

  Returns:
    ``optax.chain(core, *extras)``; its state is a tuple: the core's
    `ScaleByAdafactorState` first, then the extras' (``optax.EmptyState``,
    ``optax.ScaleByScheduleState``, ``optax.EmaState`` with the momentum).

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> tx = optax.chain(slimoptax.scale_by_adafactor(b1=0.9, min_dim_size_to_factor=2),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> [type(s).__name__ for s in state[0]]
    ['ScaleByAdafactorState', 'EmptyState', 'EmptyState', 'EmaState']
    >>> round(float(updates["w"][0, 0]), 6), round(float(updates["b"][0]), 9)  # RMS(b) = 0 < eps2
    (-0.001, -1e-06)

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018 (Alg. 4, 5; §§6-9).
  """
  _tree.check_range("b1", b1, 0.0, 1.0)
  _tree.check_range("eps2", eps2, 0.0)
  _tree.check_range("clipping_threshold", clipping_threshold, 0.0, low_open=True, high_open=False)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)
  core = scale_by_factored_second_moment(
      decay_rate, factored_axes=factored_axes, min_dim_size_to_factor=min_dim_size_to_factor,
      eps1=eps1, decay_rate_fn=decay_rate_fn, step_offset=step_offset)
  extras = []
  if clipping_threshold is not None:
    extras.append(optax.clip_by_block_rms(clipping_threshold))
  if relative_step:
    extras.append(optax.scale_by_schedule(relative_step_size))
  if multiply_by_parameter_scale:
    extras.append(_scale_by_param_rms(eps2))
  if b1 is not None:
    extras.append(optax.ema(b1, debias=False, accumulator_dtype=mu_dtype))
  return optax.chain(core, *extras)


__all__ = [
    "FACTORED_PRESETS", "ScaleByAdafactorState", "decay_rate_constant", "decay_rate_pow",
    "factored_rules", "factored_state_shapes", "relative_step_size", "resolve_factored_axes",
    "scale_by_adafactor", "scale_by_factored_second_moment", "second_moment_entries",
]
