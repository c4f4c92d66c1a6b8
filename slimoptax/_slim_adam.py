"""SlimAdam: Adam with second moments averaged along per-layer axes.

The family of Kalra et al., When Can You Get Away with Low Memory Adam?, 2025
(eq. 2): for each parameter with gradient ``g`` and averaging axes ``K``

.. math::

  m_{t+1} = \\beta_1 m_t + (1 - \\beta_1) g_t, \\qquad
  v_{t+1} = \\beta_2 v_t + (1 - \\beta_2) \\mathbb{E}_K[g_t^2], \\qquad
  u_{t+1} = \\frac{\\hat m_{t+1}}{\\sqrt{\\hat v_{t+1}} + \\epsilon},

with bias-corrected moments ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 -
b2^t)``. ``v`` is stored with the axes ``K`` reduced (kept as size-1 dims),
so it holds ``size / prod(shape[K])`` entries. With ``K = ()`` everywhere this
is exactly `optax.scale_by_adam`; with every axis in ``K`` it is AdaLayer
(Zhao et al., Deconstructing What Makes a Good Optimizer for Language Models,
2024); with the ``"adam-mini"`` preset and ``mask=weight_decay_mask("adam-mini")``
it is Adam-mini 1.1.1 as its authors ship it (Zhang et al., Adam-mini: Use Fewer
Learning Rates To Gain More, 2024); with the
``"slimadam"`` preset (Kalra et al., Table 3) or rules derived from an SNR
analysis (`slimoptax.derive_rules`) it is SlimAdam.

The first moment and the bias corrections are optax's
(`optax.tree.update_moment`, `optax.tree.bias_correction`); only the averaged
second moment ``E_K[g^2]`` (`mean_square`) is ours.

Note Kalra et al.'s eq. 1 writes ``sqrt(v_hat + eps)``; like optax (and the
authors' code) we add ``eps`` outside the square root.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
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


# --------------------------------------------------------------------------
# Per-leaf pieces, shared with `slimoptax.scale_by_hutchinson`.
# --------------------------------------------------------------------------


def resolve_axes(tree: Any, compress: Compress, num_heads: int | None, *, warn: bool,
                 num_kv_heads: int | None = None, torch_layout: Any = None) -> list[Any]:
  """The compression axes of each leaf of ``tree``, in leaf order (model-wide layout keywords for rules)."""
  declarations = {k: v for k, v in (("num_kv_heads", num_kv_heads), ("torch_layout", torch_layout))
                  if v is not None}
  return [a for _, _, a in rules_lib.resolve_tree(
      tree, compress, what="compress", num_heads=num_heads, warn=warn, declarations=declarations)]


def reduced_shapes(tree: Any, axes: list[Any]) -> list[tuple[int, ...]]:
  """The shape of each leaf's statistic averaged over its axes (size-1 dims kept)."""
  return [rules_lib.reduced_shape(_tree.shape_of(x), a)
          for x, a in zip(jax.tree_util.tree_leaves(tree), axes)]


def reduced_zeros(params: Any, axes: list[Any], dtype: Any = None) -> Any:
  """Zeros of each parameter's reduced shape, in ``dtype`` (default: the parameter's)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.zeros(s, dtype or p.dtype) for p, s in zip(leaves, reduced_shapes(params, axes))])


def _parts(x: jax.Array, split: layers.Split) -> list[jax.Array]:
  """The parts of a fused parameter (`slimoptax.Split`), each of the part's shape."""
  xv = x.reshape(split.view)
  return [jnp.take(xv, i, axis=split.axis) for i in range(len(split.parts))]


def _unflatten_parts(stat: jax.Array, split: layers.Split) -> list[jax.Array]:
  """A `slimoptax.Split` statistic (flat) cut back into its parts' reduced shapes."""
  shape = split.part_shape
  sizes = [layers.kept_entries(shape, p) for p in split.parts]
  bounds = np.cumsum([0] + sizes)
  return [stat[a:b].reshape(layers.reduced_shape(shape, p)) for a, b, p in zip(bounds[:-1], bounds[1:], split.parts)]


def _averaged(axes: layers.Axes | layers.Reshaped) -> bool:
  return bool(axes.axes if isinstance(axes, layers.Reshaped) else axes)


def expand(stat: jax.Array, axes: layers.Axes | layers.Reshaped | layers.Split, shape: tuple[int, ...]) -> jax.Array:
  """A reduced statistic broadcast back to the parameter's ``shape``."""
  if isinstance(axes, layers.Split):
    pieces = [expand(p, a, axes.part_shape) for p, a in zip(_unflatten_parts(stat, axes), axes.parts)]
    return jnp.stack(pieces, axis=axes.axis).reshape(shape)
  if isinstance(axes, layers.Reshaped):
    return jnp.broadcast_to(stat, axes.shape).reshape(shape)
  return jnp.broadcast_to(stat, shape)


def mean_over(x: jax.Array, axes: layers.Axes | layers.Reshaped | layers.Split) -> jax.Array:
  """``E_K[x]`` with the averaged axes kept as size-1 dims (in ``x``'s view; a `slimoptax.Split`'s: flat)."""
  if isinstance(axes, layers.Split):
    return jnp.concatenate([mean_over(p, a).ravel() for p, a in zip(_parts(x, axes), axes.parts)])
  if isinstance(axes, layers.Reshaped):
    x = x.reshape(axes.shape)
    axes = axes.axes
  if not axes:
    return x
  return _tree.safe_mean(x, axes, keepdims=True)  # 0 over an empty group (zero-size parameter)


def mean_square(g: jax.Array, axes: layers.Axes | layers.Reshaped) -> jax.Array:
  """``E_K[g^2]`` with the averaged axes kept as size-1 dims (in ``g``'s view).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._slim_adam import mean_square
    >>> mean_square(jnp.array([[1., 3.], [2., 2.]]), (1,)).tolist()
    [[5.0], [4.0]]
  """
  return mean_over(jnp.square(g), axes)


def divide_in_view(x: jax.Array, den: jax.Array, axes: layers.Axes | layers.Reshaped) -> jax.Array:
  """``x / den`` with ``den`` reduced over ``axes`` (broadcast in ``x``'s view)."""
  if isinstance(axes, layers.Split):
    return x / expand(den, axes, x.shape)
  if isinstance(axes, layers.Reshaped):
    return (x.reshape(axes.shape) / den).reshape(x.shape)
  return x / den


def skip_nonfinite_groups(stat: jax.Array, axes: layers.Axes | layers.Reshaped, new: jax.Array,
                          old: Any) -> jax.Array:
  """``new``, but ``old`` in every group whose new averaged statistic ``stat`` is not finite.

  ``new`` has the parameter's shape or ``stat``'s; ``old`` likewise (or a
  scalar). Only averaged statistics (``axes`` non-empty) are touched: a
  per-entry one keeps optax's per-entry behaviour. See `scale_by_slim_adam`
  ("Non-finite second moments").

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._slim_adam import skip_nonfinite_groups
    >>> skip_nonfinite_groups(jnp.array([[jnp.inf], [1.0]]), (1,), jnp.ones((2, 2)), 0.0).tolist()
    [[0.0, 0.0], [1.0, 1.0]]
  """
  if isinstance(axes, layers.Split):
    # Per part: only averaged parts skip (a per-entry part keeps optax's per-entry behaviour).
    ok = jnp.concatenate([(jnp.isfinite(p) | (not _averaged(a))).ravel()
                          for p, a in zip(_unflatten_parts(stat, axes), axes.parts)])
    old = jnp.asarray(old, new.dtype)
    return jnp.where(ok if new.shape == stat.shape else expand(ok, axes, new.shape), new, old)
  view_axes = axes.axes if isinstance(axes, layers.Reshaped) else axes
  if not view_axes:
    return new
  reshape = isinstance(axes, layers.Reshaped) and new.shape != stat.shape
  view = new.reshape(axes.shape) if reshape else new
  old = jnp.asarray(old, new.dtype)
  old = old.reshape(axes.shape) if reshape and old.ndim else old
  return jnp.where(jnp.isfinite(stat), view, old).reshape(new.shape)


def check_adam_hyperparams(b1: Any, b2: Any, eps: Any, num_heads: Any) -> None:
  """``b1``, ``b2`` in [0, 1), ``eps >= 0``, ``num_heads`` a Python int >= 1 (or None)."""
  _tree.check_range("b1", b1, 0.0, 1.0)
  _tree.check_range("b2", b2, 0.0, 1.0)
  _tree.check_range("eps", eps, 0.0)
  _tree.static_int("num_heads", num_heads, 1)


# --------------------------------------------------------------------------
# SlimAdam.
# --------------------------------------------------------------------------


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
    num_kv_heads: int | None = None,
    torch_layout: Any = None,
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
    num_kv_heads, torch_layout: model-wide layout declarations for a preset
      or rules (grouped-query key/value heads; ``True`` or pattern(s) of
      kernels stored ``(fan_out, fan_in)``), as `slimoptax.preset` takes them;
      the others (``stacked``, ``einsum``, ``fused``) go to `slimoptax.preset`.

  Returns:
    A `optax.GradientTransformation` with state `ScaleBySlimAdamState`.

  Raises:
    ValueError: at construction, naming the argument: ``b1`` or ``b2`` outside
      [0, 1), ``eps < 0``, a ``mu_dtype`` / ``nu_dtype`` that is not floating,
      ``num_heads`` not a Python int >= 1 (under `optax.inject_hyperparams`:
      name it in ``static_args``); at ``update``, a state made by another
      optimizer (naming its type).

  Non-finite second moments: an averaged ``v`` is shared by its group, so one
  gradient entry whose square overflows (``1e30`` in float32) or is NaN would
  make the whole group's ``v`` inf / NaN, and Adam's step ``m / (sqrt(v) +
  eps)`` a silent 0 for the group from then on (``optax.adamw`` freezes only
  the one entry, for good). `optax.apply_if_finite` cannot help: it checks the
  incoming gradients, and ``1e30`` is finite. Instead **a group whose new
  ``v`` is not finite skips the step**, as `optax.apply_if_finite` would: its
  old ``m`` and ``v`` are kept and its update is 0 for this step only; the
  next finite gradient moves it again. The state never holds a non-finite
  averaged ``v``. (A NaN gradient is seen by `optax.apply_if_finite`, which
  skips the whole step; without it the group skips as above.) Uncompressed
  leaves (``K = ()``, ``compress=None``) keep optax's per-entry behaviour
  exactly.

  Zero-size parameters (a dimension 0) are supported: empty updates, finite
  zero statistics (an empty group averages to 0).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}}}
    >>> tx = optax.chain(slimoptax.scale_by_slim_adam(compress="slimadam"),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> state[0].nu["mlp"]["up"]["kernel"].shape  # averaged over fan_out
    (4, 1)
    >>> grads = {"mlp": {"up": {"kernel": jnp.full((4, 8), 0.5), "bias": jnp.ones(8)}}}
    >>> updates, state = tx.update(grads, state)
    >>> print(f'{float(updates["mlp"]["up"]["kernel"][0, 0]):.6f}')  # -lr * sign(g)
    -0.001000

  References:
    Kalra et al., `When Can You Get Away with Low Memory Adam?
    <https://arxiv.org/abs/2503.01843>`_, 2025 (eq. 2, Table 3).
  """
  check_adam_hyperparams(b1, b2, eps, num_heads)
  _tree.static_int("num_kv_heads", num_kv_heads, 1)
  layout = dict(num_kv_heads=num_kv_heads, torch_layout=torch_layout)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)
  nu_dtype = _tree.float_dtype("nu_dtype", nu_dtype)

  def init_fn(params):
    _tree.check_float_params(params)
    axes = resolve_axes(params, compress, num_heads, warn=True, **layout)
    return ScaleBySlimAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=_tree.zeros_like_tree(params, mu_dtype),
        nu=reduced_zeros(params, axes, nu_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleBySlimAdamState, who="scale_by_slim_adam")
    axes = resolve_axes(updates, compress, num_heads, warn=False, **layout)
    _tree.state_leaves(updates, state.mu, name="first moment")
    nu_prev = _tree.state_leaves(updates, state.nu, name="second moment",
                                 shapes=reduced_shapes(updates, axes),
                                 source="the compression rule")
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    (nu,) = _tree.map_update(lambda _, g, v, a: ((1 - b2) * mean_square(g, a) + b2 * v,),
                             updates, names=[], num_outputs=1, extra=[nu_prev, axes])
    nu_new = jax.tree_util.tree_leaves(nu)  # the new statistics decide which groups skip
    # A group whose new nu is not finite skips the step: its old mu and nu are kept.
    mu, nu = _tree.map_update(
        lambda _, g, m, m_prev, v, v_prev, a: (skip_nonfinite_groups(v, a, m, m_prev),
                                               skip_nonfinite_groups(v, a, v, v_prev)),
        updates, names=[], num_outputs=2,
        extra=[jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(state.mu), nu_new,
               nu_prev, axes])
    count_inc = optax.safe_increment(state.count)
    # Bias corrections in the default float precision (float64 under jax_enable_x64, as optax's
    # Python-float betas give), then cast to each moment's dtype.
    bc_dtype = jnp.result_type(float)
    b1_c, b2_c = jnp.asarray(b1, bc_dtype), jnp.asarray(b2, bc_dtype)
    if nesterov:
      c1, c1_next = 1 - b1_c ** count_inc, 1 - b1_c ** optax.safe_increment(count_inc)
      mu_hat = jax.tree.map(lambda m, g: b1 * m / c1_next.astype(m.dtype)
                            + (1 - b1) * g / c1.astype(g.dtype), mu, updates)
    else:
      mu_hat = optax.tree.bias_correction(mu, b1_c, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2_c, count_inc)
    (u,) = _tree.map_update(
        lambda _, g, m, v, v_new, a: (skip_nonfinite_groups(
            v_new, a, divide_in_view(m, jnp.sqrt(v) + eps, a).astype(g.dtype), 0.0),),
        updates, names=[], num_outputs=1,
        extra=[jax.tree_util.tree_leaves(mu_hat), jax.tree_util.tree_leaves(nu_hat), nu_new, axes])
    # The state keeps its dtype (array-valued betas must not promote a bf16 state).
    mu = jax.tree.map(lambda m, prev: m.astype(mu_dtype or prev.dtype), mu, state.mu)
    nu = jax.tree.map(lambda v, prev: v.astype(nu_dtype or prev.dtype), nu, state.nu)
    return u, ScaleBySlimAdamState(count=count_inc, mu=mu, nu=nu)

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
    num_kv_heads: int | None = None,
    torch_layout: Any = None,
) -> optax.GradientTransformation:
  """SlimAdam with decoupled weight decay: a drop-in for `optax.adamw`.

  .. math::

    \\theta_{t+1} = \\theta_t - \\eta_t \\left(\\frac{\\hat m}{\\sqrt{\\hat v} + \\epsilon}
    + \\lambda \\theta_t\\right), \\quad v \\text{ averaged over } K \\text{ (see
    `scale_by_slim_adam`)}

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay rate of the first moment.
    b2: decay rate of the second moment (0.95 as in Kalra et al.).
    eps: added outside the square root.
    weight_decay: decoupled weight-decay strength (>= 0).
    compress: see `scale_by_slim_adam` (``None``: plain AdamW; a preset name
      such as ``"slimadam"``; rules; a pytree of axes; a callable).
    mask: which parameters are decayed: a pytree of bools or a callable;
      default `default_weight_decay_mask` (``ndim >= 2``);
      `slimoptax.weight_decay_mask` gives the presets' own (Adam-mini: not
      names with norm / ln / bias). Note `optax.adamw` decays everything by default.
    mu_dtype: first-moment dtype.
    nu_dtype: second-moment dtype.
    nesterov: Nesterov momentum.
    num_heads: attention head count for head-wise presets on 2-D kernels.
    num_kv_heads, torch_layout: layout declarations, see `scale_by_slim_adam`.

  Returns:
    A `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"wte": {"embedding": jnp.ones((16, 4))}, "ln": {"scale": jnp.ones(4)}}
    >>> tx = slimoptax.slim_adamw(3e-4, compress="slimadam")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(slimoptax.memory_report(state, params).entries)  # 16 + 4 of Adam's 68
    20

  References:
    Kalra et al., When Can You Get Away with Low Memory Adam?, 2025;
    Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2019.
  """
  _tree.check_range("weight_decay", weight_decay, 0.0)
  return _tree.checked_chain(
      "slim_adamw",
      scale_by_slim_adam(b1, b2, eps, compress=compress, mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                         nesterov=nesterov, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         torch_layout=torch_layout),
      optax.add_decayed_weights(weight_decay, default_weight_decay_mask if mask is None else mask),
      optax.scale_by_learning_rate(learning_rate),
  )


__all__ = [
    "ScaleBySlimAdamState", "check_adam_hyperparams", "default_weight_decay_mask", "mean_square",
    "skip_nonfinite_groups", "scale_by_slim_adam", "slim_adamw",
]
