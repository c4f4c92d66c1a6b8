"""Adafactor: second moments factored into row and column statistics.

Shazeer & Stern (2018). For a matrix parameter with squared gradient
``G^2`` (plus ``eps1``), Adafactor keeps exponential moving averages of its
row sums ``R`` and column sums ``C`` instead of the full second moment ``V``
and reconstructs

.. math::

  \\hat V = \\frac{R\\, C}{\\mathbf 1^\\top R},

the minimiser of the I-divergence ``D(V || R C) = sum_ij V_ij log(V_ij /
(R C)_ij) - V_ij + (R C)_ij`` over rank-1 non-negative ``R C`` (closed form;
exact when ``V`` has rank 1). The state holds ``rows + cols`` numbers instead
of ``rows * cols``. Which two axes are the rows and the columns is chosen per
parameter (``factored_axes``); the other axes are batch axes, and parameters
without a pair keep an unfactored second moment.

Like `optax.scale_by_factored_rms` (and the reference implementations) we
store row and column *means* rather than sums; ``mean_row mean_col /
mean(mean_row)`` is the same ``V_hat``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
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
  """State of `scale_by_adafactor`.

  Each of ``v_row``, ``v_col``, ``v`` has the parameters' tree structure
  with ``None`` where a parameter has no such statistic.

  Attributes:
    count: number of updates applied (int32 scalar).
    v_row: factored parameters: EMA of the mean of ``g^2 + eps1`` over the
      column axis (one number per row, per batch index); shape = the
      parameter's with the column axis removed.
    v_col: factored parameters: EMA of the mean over the row axis; shape =
      the parameter's with the row axis removed.
    v: unfactored parameters: EMA of ``g^2 + eps1``, the parameter's shape.
    mu: momentum of the (clipped, scaled) update when ``b1`` is set, else
      ``None``.
  """

  count: chex.Array
  v_row: optax.Updates
  v_col: optax.Updates
  v: optax.Updates
  mu: optax.Updates | None


def decay_rate_pow(step: ArrayLike, decay_rate: ArrayLike = 0.8) -> jax.Array:
  """Adafactor's second-moment decay ``beta2_t = 1 - t^(-decay_rate)``, ``t = step + 1``.

  ``beta2_1 = 0`` (the first step takes ``g^2`` as is), so the estimate needs
  no bias correction.
  """
  t = jnp.asarray(step, jnp.float32) + 1.0
  return 1.0 - t ** (-jnp.asarray(decay_rate, jnp.float32))


def decay_rate_constant(step: ArrayLike, decay_rate: ArrayLike = 0.999) -> jax.Array:
  """A constant second-moment decay ``beta2_t = decay_rate`` (Adam-like, no bias correction)."""
  del step
  return jnp.asarray(decay_rate, jnp.float32)


# --------------------------------------------------------------------------
# Factored axes.
# --------------------------------------------------------------------------


def _largest_pair(shape: tuple[int, ...]) -> Pair | None:
  """optax's rule: the two largest axes (row = 2nd largest, col = largest)."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)  # stable: ties keep axis order
  return int(order[-2]), int(order[-1])


def _last_two_pair(shape: tuple[int, ...]) -> Pair | None:
  """PyTorch/fairseq Adafactor: the last two axes."""
  if len(shape) < 2:
    return None
  return len(shape) - 2, len(shape) - 1


def factored_rules() -> rules_lib.Rules:
  """The ``"fan"`` preset: factor each kernel over (fan_in, fan_out).

  Layer types are recognised from paths as in `slimoptax.preset` (Flax
  layouts). 2-D kernels factor ``(fan_in, fan_out)`` (embeddings ``(token,
  embed)``); 3-D ``DenseGeneral`` attention kernels factor ``(fan_in,
  head_dim)`` for query/key/value and ``(head_dim, fan_out)`` for the output
  projection, heads being a batch axis; conv and other higher-rank kernels
  factor their last two axes ``(in, out)``; norms, biases and scalars are
  not factored.

  Returns:
    A `slimoptax.Rules` whose axes are ``(row, col)`` pairs.
  """
  two_d = {
      "embedding": ("token", "embed"), "pos_embedding": ("token", "embed"),
      "head": ("fan_in", "fan_out"), "attn_qkv": ("fan_in", "fan_out"),
      "query": ("fan_in", "fan_out"), "key": ("fan_in", "fan_out"),
      "value": ("fan_in", "fan_out"), "attn_out": ("fan_in", "fan_out"),
      "mlp_up": ("fan_in", "fan_out"), "mlp_gate": ("fan_in", "fan_out"),
      "mlp_down": ("fan_in", "fan_out"), "dense": ("fan_in", "fan_out"),
      "conv": (-2, -1),
  }
  three_d = {"query": ("fan_in", "head_dim"), "key": ("fan_in", "head_dim"),
             "value": ("fan_in", "head_dim"), "attn_out": ("head_dim", "fan_out")}
  out: list[rules_lib.Rule] = []
  for pattern, ltype in layers.LAYER_PATTERNS:
    if ltype in ("norm", "bias", "scalar"):
      out.append(rules_lib.Rule(pattern, ltype, (), warn_unused=False))
      continue
    out.append(rules_lib.Rule(pattern, ltype, two_d[ltype], warn_unused=False,
                                 min_ndim=2, max_ndim=2))
    if ltype in three_d:
      out.append(rules_lib.Rule(pattern, ltype, three_d[ltype], warn_unused=False,
                                   min_ndim=3, max_ndim=3))
    out.append(rules_lib.Rule(pattern, ltype, (-2, -1), warn_unused=False, min_ndim=3))
  out.append(rules_lib.Rule(r"^", "other", (-2, -1), warn_unused=False, min_ndim=2))
  out.append(rules_lib.Rule(r"^", "other", (), warn_unused=False, max_ndim=1))
  return rules_lib.Rules(out, name="fan")


def _check_pair(path: str, shape: tuple[int, ...], pair: Any, what: str) -> Pair | None:
  if pair is None or (isinstance(pair, (tuple, list)) and len(pair) == 0):
    return None
  ndim = len(shape)
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2
      or not all(isinstance(a, (int, np.integer)) for a in pair)):
    raise ValueError(
        f"{what} for {path!r}: expected a (row_axis, col_axis) pair of ints or None, got {pair!r}")
  out = []
  for a in pair:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} for {path!r}: axis {a} out of range for shape {shape}")
    out.append(int(a) % ndim)
  if out[0] == out[1]:
    raise ValueError(f"{what} for {path!r}: row and column axes are the same axis {out[0]}")
  return out[0], out[1]


def _rule_pair(rule: rules_lib.Rule, path: str, shape: tuple[int, ...], what: str) -> Pair | None:
  """Resolves a rule's ``(row, col)`` entry, semantic names included, for one parameter."""
  if rule.axes == rules_lib.UNSUPPORTED:
    raise ValueError(
        f"parameter {path!r} (shape {shape}) is a {rule.label!r} layer, which these rules do not "
        "handle; add a rule with explicit axes for it")
  axes = tuple(rule.axes)
  if not axes:
    return None
  if len(axes) != 2:
    raise ValueError(
        f"{what}: rule {rule.pattern!r} gives {axes} for parameter {path!r}; factoring needs "
        "exactly two axes (row, col), or () for no factoring")
  out = []
  for a in axes:
    if isinstance(a, int):
      out.append(a)
      continue
    if rule.label not in layers.LAYER_TYPES:
      raise ValueError(
          f"{what}: rule {rule.pattern!r} uses semantic axis {a!r} but its label {rule.label!r} is "
          f"not a layer type (parameter {path!r}); known: {sorted(layers.LAYER_TYPES)}")
    _, roles = layers.axis_roles(rule.label, shape, path=path)
    if a not in roles:
      raise ValueError(
          f"{what}: axis role {a!r} is not defined for parameter {path!r} of layer type "
          f"{rule.label!r} with shape {shape}")
    if len(roles[a]) != 1:
      raise ValueError(
          f"{what}: axis role {a!r} of parameter {path!r} (layer type {rule.label!r}, shape "
          f"{shape}) spans axes {roles[a]}; a factored axis must be a single axis: give integer "
          "axes for this parameter")
    out.append(roles[a][0])
  return _check_pair(path, shape, tuple(out), what)


def _resolve_rules(params: Any, rules: rules_lib.Rules, what: str, warn: bool):
  out, used = [], set()
  for path, leaf in _tree.named_leaves(params):
    shape = tuple(int(s) for s in jnp.shape(leaf))
    for i, rule in enumerate(rules.rules):
      if rule.matches(path, len(shape)):
        used.add(i)
        out.append((path, shape, _rule_pair(rule, path, shape, what)))
        break
    else:
      raise ValueError(
          f"{what}: no rule of {rules.name!r} matches parameter {path!r} with shape {shape}; add "
          "a rule for it")
  if warn:
    for i, rule in enumerate(rules.rules):
      if rule.warn_unused and i not in used:
        warnings.warn(f"rule {rule.pattern!r} -> {rule.label!r} of {rules.name!r} matches no "
                      "parameter", stacklevel=4)
  return out


def _is_flat_mapping(spec: Mapping) -> bool:
  """``{exact path: [row, col] | None}`` (or a `Rules.to_dict` dump), not a nested pytree."""
  if spec.get("format") == "slimoptax.rules/v1":
    return True
  return all(v is None or (isinstance(v, (list, tuple))
                           and all(isinstance(a, (int, np.integer, str)) for a in v))
             for v in spec.values())


def resolve_factored_axes(
    params: Any,
    factored_axes: FactoredAxes = None,
    *,
    min_dim_size_to_factor: int = 128,
    what: str = "factored_axes",
    warn: bool = True,
) -> list[tuple[str, tuple[int, ...], Pair | None]]:
  """Reads any accepted form of ``factored_axes``: which (row, col) axes each parameter factors.

  Accepted: ``None`` or ``"largest"`` (the two largest axes, as
  `optax.scale_by_factored_rms`: row = second largest, col = largest);
  ``"last_two"`` (the last two axes, as the PyTorch/fairseq Adafactor);
  ``"fan"`` (`factored_rules`: (fan_in, fan_out) per layer type); a
  `slimoptax.Rules` object whose axes are ``(row, col)`` pairs of ints or
  semantic names resolved per layer by `slimoptax.axis_roles` (``()`` = no
  factoring); a flat mapping ``{exact path: [row, col] | None}``; a callable
  ``params -> any of these``; or a pytree matching ``params`` whose leaves are
  ``(row_axis, col_axis)`` pairs or ``None`` (unfactored).

  A parameter is factored only if both of its axes have at least
  ``min_dim_size_to_factor`` entries (whatever the form of the spec), and
  parameters of rank < 2 never are.

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
    >>> slimoptax.resolve_factored_axes({"w": jnp.zeros((256, 512))})
    [('w', (256, 512), (0, 1))]
  """
  named = _tree.named_leaves(params)
  shapes = [(p, tuple(int(s) for s in jnp.shape(x))) for p, x in named]
  spec = factored_axes
  if callable(spec) and not isinstance(spec, rules_lib.Rules):
    spec = spec(params)
  if spec is None or (isinstance(spec, str) and spec in ("largest", "last_two")):
    fn = _last_two_pair if spec == "last_two" else _largest_pair
    resolved = [(p, s, fn(s)) for p, s in shapes]
  elif isinstance(spec, str):
    if spec != "fan":
      raise ValueError(f"unknown {what} preset {spec!r}; known: {FACTORED_PRESETS}")
    resolved = _resolve_rules(params, factored_rules(), what, warn=False)
  elif isinstance(spec, rules_lib.Rules):
    resolved = _resolve_rules(params, spec, what, warn)
  elif (isinstance(spec, Mapping) and not _tree.is_param_like(spec, params)
        and _is_flat_mapping(spec)):
    resolved = _resolve_rules(params, rules_lib.Rules.from_dict(spec), what, warn)
  elif (isinstance(spec, list) and spec and isinstance(spec[0], (rules_lib.Rule, tuple))
        and not _tree.is_param_like(spec, params)):
    resolved = _resolve_rules(params, rules_lib.Rules(spec), what, warn)
  else:
    per_leaf = _tree.leaves_like(params, spec, what=what)
    resolved = [(p, s, _check_pair(p, s, a, what)) for (p, s), a in zip(shapes, per_leaf)]
  out = []
  for p, s, pair in resolved:
    if pair is not None and min(s[pair[0]], s[pair[1]]) < min_dim_size_to_factor:
      pair = None
    out.append((p, s, pair))
  return out


def _without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + shape[axis + 1:]


def factored_state_shapes(shape: tuple[int, ...], pair: Pair | None) -> dict[str, tuple[int, ...] | None]:
  """Shapes of ``v_row``, ``v_col``, ``v`` for one parameter (``None`` = absent)."""
  if pair is None:
    return {"v_row": None, "v_col": None, "v": tuple(shape)}
  row, col = pair
  return {"v_row": _without(tuple(shape), col), "v_col": _without(tuple(shape), row), "v": None}


def second_moment_entries(params: Any, factored_axes: FactoredAxes = None, *,
                          min_dim_size_to_factor: int = 128) -> tuple[int, int]:
  """``(kept, full)``: second-moment entries Adafactor keeps vs Adam's."""
  kept = full = 0
  for _, shape, pair in resolve_factored_axes(params, factored_axes,
                                              min_dim_size_to_factor=min_dim_size_to_factor,
                                              warn=False):
    full += math.prod(shape)
    kept += sum(math.prod(s) for s in factored_state_shapes(shape, pair).values() if s is not None)
  return kept, full


# --------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


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
  """Rescales updates by Adafactor (Shazeer & Stern 2018, Alg. 4/5 with momentum).

  For a factored parameter with (row, col) axes, ``beta2_t =
  decay_rate_fn(t - 1 - step_offset, decay_rate)`` (default ``1 -
  t^(-decay_rate)``):

  .. math::

    R_t &= \\beta_{2t} R_{t-1} + (1 - \\beta_{2t})\\,\\mathrm{mean}_{col}(G_t^2 + \\epsilon_1),
    \\quad C_t = \\beta_{2t} C_{t-1} + (1 - \\beta_{2t})\\,\\mathrm{mean}_{row}(G_t^2 + \\epsilon_1) \\\\
    \\hat V_t &= R_t C_t / \\mathrm{mean}_{row}(R_t), \\quad U_t = G_t / \\sqrt{\\hat V_t},
    \\quad \\hat U_t = U_t / \\max(1, \\mathrm{RMS}(U_t) / d) \\\\
    \\alpha_t &= \\rho_t \\cdot \\max(\\epsilon_2, \\mathrm{RMS}(X_{t-1})), \\quad
    M_t = \\beta_1 M_{t-1} + (1 - \\beta_1)\\,\\alpha_t \\hat U_t

  and the output is ``M_t`` (``alpha_t U_hat_t`` without momentum). Unfactored
  parameters use ``V_t = EMA(G^2 + eps1)`` in place of ``V_hat``. ``rho_t =
  min(1e-2, 1/sqrt(t))`` with ``relative_step``, else 1 (chain a learning
  rate); the ``RMS(X)`` factor only with ``multiply_by_parameter_scale``.

  Args:
    decay_rate: parameter of ``decay_rate_fn``: the exponent 0.8 of the paper's
      ``1 - t^-0.8`` (or ``beta2`` for `decay_rate_constant`).
    factored_axes: which two axes each parameter factors: ``None`` (the two
      largest, as optax), ``"last_two"``, ``"fan"``, a `slimoptax.Rules`
      with ``(row, col)`` axes (ints or ``"fan_in"``, ``"fan_out"``, ...), a
      callable, or a pytree of ``(row_axis, col_axis)`` / ``None``; see
      `resolve_factored_axes`.
    min_dim_size_to_factor: factor only if both axes have at least this many
      entries (optax's default 128; 1 factors every pair given).
    b1: momentum of the update (``None``: no first moment, the paper's
      memory-light Alg. 4; 0.9: "Adafactor v2" of fairseq).
    eps1: added to ``g^2`` (paper: 1e-30).
    eps2: floor of the parameter RMS in the parameter scale (paper: 1e-3).
    clipping_threshold: ``d`` of the update clipping (paper: 1.0); ``None``
      disables it.
    multiply_by_parameter_scale: scale the step by ``max(eps2, RMS(X))``
      (needs ``params``).
    relative_step: scale the step by ``rho_t = min(1e-2, 1/sqrt(t))``; then
      chain ``optax.scale(-1)`` instead of a learning rate.
    decay_rate_fn: ``(step, decay_rate) -> beta2``, ``step`` counting from 0:
      `decay_rate_pow` (default) or `decay_rate_constant`, or any schedule,
      e.g. one capped at 0.999 (Zhai et al. 2021).
    step_offset: subtracted from the step in ``decay_rate_fn`` (fine-tuning).
    mu_dtype: dtype of the momentum (default: the updates').

  Returns:
    A `optax.GradientTransformation` with state `ScaleByAdafactorState`.

  Example:
    >>> tx = optax.chain(slimoptax.scale_by_adafactor(factored_axes="fan", b1=0.9),
    ...                  optax.scale_by_learning_rate(1e-2))

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018 (Alg. 4, 5; §§6-9).
  """
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None

  def _pairs(tree, *, warn):
    return [a for _, _, a in resolve_factored_axes(
        tree, factored_axes, min_dim_size_to_factor=min_dim_size_to_factor, warn=warn)]

  def init_fn(params):
    _tree.check_float_params(params)
    pairs = _pairs(params, warn=True)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    stats = {"v_row": [], "v_col": [], "v": []}
    for p, pair in zip(leaves, pairs):
      for name, shape in factored_state_shapes(tuple(p.shape), pair).items():
        stats[name].append(None if shape is None else jnp.zeros(shape, p.dtype))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    mu = None
    if b1 is not None:
      mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params)
    return ScaleByAdafactorState(count=jnp.zeros([], jnp.int32), v_row=unflat(stats["v_row"]),
                                 v_col=unflat(stats["v_col"]), v=unflat(stats["v"]), mu=mu)

  def update_fn(updates, state, params=None):
    if multiply_by_parameter_scale and params is None:
      raise ValueError("scale_by_adafactor(multiply_by_parameter_scale=True) needs `params` in "
                       "update(); pass them or set multiply_by_parameter_scale=False")
    pairs = _pairs(updates, warn=False)
    named = _tree.named_leaves(updates)
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    rows = _tree.leaves_like(updates, state.v_row, what="state.v_row")
    cols = _tree.leaves_like(updates, state.v_col, what="state.v_col")
    vs = _tree.leaves_like(updates, state.v, what="state.v")
    mus = (_tree.leaves_like(updates, state.mu, what="state.mu") if b1 is not None
           else [None] * len(g_leaves))
    p_leaves = (_tree.leaves_like(updates, params, what="params") if params is not None
                else [None] * len(g_leaves))
    beta2 = decay_rate_fn(state.count - step_offset, decay_rate)
    count_inc = optax.safe_increment(state.count)
    rho = None
    if relative_step:
      rho = jnp.minimum(1e-2, jax.lax.rsqrt(count_inc.astype(jnp.float32)))
    out = {"u": [], "v_row": [], "v_col": [], "v": [], "mu": []}
    for (path, _), g, vr, vc, v, m, p, pair in zip(named, g_leaves, rows, cols, vs, mus,
                                                    p_leaves, pairs):
      expected = factored_state_shapes(tuple(g.shape), pair)
      got = {"v_row": vr, "v_col": vc, "v": v}
      for name, shape in expected.items():
        have = None if got[name] is None else tuple(got[name].shape)
        if have != shape:
          raise ValueError(
              f"state.{name} of {path!r} has shape {have} but factored_axes gives {shape} "
              f"(pair {pair}): the state was created with other factored axes or parameters")
      g2 = jnp.square(g) + eps1
      if pair is not None:
        r, c = pair
        new_vr = (beta2 * vr + (1 - beta2) * jnp.mean(g2, axis=c)).astype(vr.dtype)
        new_vc = (beta2 * vc + (1 - beta2) * jnp.mean(g2, axis=r)).astype(vc.dtype)
        r_in_row = r - 1 if r > c else r  # the row axis of v_row (col axis removed)
        row_mean = jnp.mean(new_vr, axis=r_in_row, keepdims=True)
        u = (g * jnp.expand_dims(jax.lax.rsqrt(new_vr / row_mean), c)
             * jnp.expand_dims(jax.lax.rsqrt(new_vc), r))
        new_v = None
      else:
        new_v = (beta2 * v + (1 - beta2) * g2).astype(v.dtype)
        u = g * jax.lax.rsqrt(new_v)
        new_vr = new_vc = None
      if clipping_threshold is not None:
        u = u / jnp.maximum(1.0, _rms(u) / clipping_threshold)
      if rho is not None:
        u = u * rho
      if multiply_by_parameter_scale:
        u = u * jnp.maximum(eps2, _rms(p))
      if b1 is not None:
        m = b1 * m + (1 - b1) * u
        u = m
        m = m.astype(mu_dtype or g.dtype)
      out["u"].append(u.astype(g.dtype))
      out["v_row"].append(new_vr)
      out["v_col"].append(new_vc)
      out["v"].append(new_v)
      out["mu"].append(m)
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    new_state = ScaleByAdafactorState(
        count=count_inc, v_row=unflat(out["v_row"]), v_col=unflat(out["v_col"]),
        v=unflat(out["v"]), mu=unflat(out["mu"]) if b1 is not None else None)
    return unflat(out["u"]), new_state

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = [
    "FACTORED_PRESETS", "ScaleByAdafactorState", "decay_rate_constant", "decay_rate_pow",
    "factored_rules", "factored_state_shapes", "resolve_factored_axes", "scale_by_adafactor",
    "second_moment_entries",
]
