"""Muon: momentum orthogonalized by Newton–Schulz, with label-derived matrix views.

Orthogonalization replaces a matrix update ``G = U S V^T`` by (about) its polar
factor ``U V^T``, iterating an odd polynomial on ``X_0 = G / (||G||_F + eps)``:

.. math::

  A_k = X_k X_k^T, \\qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k ,

mapping each singular value by ``s -> a s + b s^3 + c s^5``. Five steps of
``QUINTIC_COEFFS`` (Keller Jordan's) send normalized singular values in [0.01,
1] to about [0.68, 1.13]; ``CUBIC_COEFFS`` (``X <- 1.5 X - 0.5 X X^T X``)
converges to exactly ``U V^T``, in about ``log_1.5(1/s_min) + 5`` steps.
Matrix views (rows = fan_in, columns = fan_out, in **Flax layouts**) come
from layer types (`default_dims`) or ``dims`` (`matrix_dims`).

References:
  Jordan et al., `Muon: An optimizer for hidden layers in neural networks
  <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  Liu et al., `Muon is Scalable for LLM Training
  <https://arxiv.org/abs/2502.16982>`_, 2025 (Moonlight; RMS-matching scale).
  Bernstein & Newhouse, `Old Optimizer, New Norm: An Anthology
  <https://arxiv.org/abs/2409.20325>`_, 2024.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike
from optax.contrib import MuonDimensionNumbers
from optax.contrib import _muon as contrib_muon

from slimoptax import _slim_adam as slim_adam
from slimoptax import _tree, layouts, presets
from slimoptax import rules as rules_lib
from slimoptax._newton_schulz import (
  CUBIC_COEFFS,
  NS_COEFFS,
  QUINTIC_COEFFS,
  _coeff_schedule,
  muon_flop_overhead,
  newton_schulz,
  newton_schulz_flops,
)

# Not hidden linear maps: never orthogonalized by default (Muon's authors use AdamW).
EXCLUDED_LAYER_TYPES = ("embedding", "pos_embedding", "head", "norm", "bias", "scalar")
RMS_SCALES = ("jordan", "moonlight", "none")


class ReshapedDims(NamedTuple):
  """Orthogonalize a parameter viewed with ``shape`` by the spec ``dims``.

  E.g. per head, a 2-D ``(d, H*hd)`` (fan_in, fan_out) query kernel:
  ``ReshapedDims((d, H, hd), MuonDimensionNumbers(0, 2))`` (heads = batch).
  """

  shape: tuple[int, ...]
  dims: MuonDimensionNumbers


Spec = Union[MuonDimensionNumbers, ReshapedDims, None]
Dims = Any  # None | one Spec | pytree of Spec | Rules / preset name | callable params -> any


def _normalize_spec(path: str, shape: tuple[int, ...], spec: Any) -> Spec:
  """Checks a spec against a shape; returns it with sorted non-negative int tuples."""
  if spec is None or isinstance(spec, optax.MaskedNode):
    return None
  if isinstance(spec, ReshapedDims):
    view = tuple(int(s) for s in spec.shape)
    if math.prod(view) != math.prod(shape):
      raise ValueError(f"dims for {path!r}: view {view} has {math.prod(view)} entries, the "
                       f"parameter {shape} has {math.prod(shape)}")
    return ReshapedDims(view, _normalize_spec(path, view, spec.dims))
  if not isinstance(spec, MuonDimensionNumbers):
    raise TypeError(
        f"dims for {path!r}: expected MuonDimensionNumbers, ReshapedDims or None, got {spec!r}")
  ndim, out = len(shape), []
  for what, axes in (("reduction_axis", spec.reduction_axis), ("output_axis", spec.output_axis)):
    axes = (int(axes),) if hasattr(axes, "__index__") else tuple(int(a) for a in axes)
    if not axes:
      raise ValueError(f"dims for {path!r}: empty {what}")
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f"dims for {path!r}: {what} {a} out of range for shape {shape}")
    out.append(tuple(sorted(a % ndim for a in axes)))
    if len(set(out[-1])) != len(axes):
      raise ValueError(f"dims for {path!r}: repeated axes in {what} {axes}")
  if set(out[0]) & set(out[1]):
    raise ValueError(f"dims for {path!r}: reduction axes {out[0]} and output axes {out[1]} overlap")
  return MuonDimensionNumbers(reduction_axis=out[0], output_axis=out[1])


def _layer_dims(ltype: str, path: str, shape: Sequence[int], per_head: bool,
                layout: layouts.Layout | int | None) -> Spec:
  """Rows = fan_in, columns = fan_out axes of `slimoptax.layouts.layout_roles` (heads, stacked: batch)."""
  shape = tuple(int(s) for s in shape)
  layout = layouts.as_layout(layout)
  if len(shape) - len(layout.stacked) < 2 or ltype in EXCLUDED_LAYER_TYPES:
    return None
  if layout.fused is not None:
    raise ValueError(f"dims for {path!r}: a fused parameter has no one matrix view; give `dims` for it "
                     "explicitly (e.g. ReshapedDims splitting the parts into a batch axis)")
  heads = per_head and ltype in ("query", "key", "value", "attn_out")
  if not heads:
    layout = layout._replace(num_heads=None, num_kv_heads=None)
  view, roles = layouts.layout_roles(ltype, shape, layout, path=path)
  if heads and "heads" not in roles:
    raise ValueError(f"per_head=True: cannot find the heads axis of {ltype} kernel {path!r} with "
                     f"shape {shape}; pass num_heads= for 2-D (d, H*hd) kernels")
  drop = set(roles["heads"]) if heads else set()
  spec = MuonDimensionNumbers(tuple(a for a in roles["fan_in"] if a not in drop),
                              tuple(a for a in roles["fan_out"] if a not in drop))
  return spec if view == shape else ReshapedDims(view, spec)


def default_dims(path: str, shape: Sequence[int], *, per_head: bool = False,
                 num_heads: int | None = None) -> Spec:
  """The view of one parameter from its path's layer type: rows fan_in, columns fan_out.

  Flax layouts: Dense ``(in, out)``; attention ``(d, H, hd)`` -> ``(d, H*hd)``,
  ``(H, hd, d)`` -> ``(H*hd, d)``; Conv ``(h, w, in, out)`` -> ``(h*w*in, out)``.

  Args:
    path, shape: the parameter's ``"/"``-joined path and shape.
    per_head: attention kernels per head (the heads axis becomes a batch axis).
    num_heads: head count for ``per_head`` on 2-D ``(d, H*hd)`` attention kernels.

  Returns:
    ``None`` for `EXCLUDED_LAYER_TYPES` (embeddings, output heads, norms,
    biases, scalars) and rank < 2, else a `MuonDimensionNumbers` or `ReshapedDims`.
  """
  if len(tuple(shape)) < 2:
    return None
  try:
    ltype = presets.layer_type(path, shape)
  except ValueError as err:
    raise ValueError(f"{err}; or give `dims` for it explicitly") from None
  return _layer_dims(ltype, path, shape, per_head, num_heads)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _masked_like(tree: Any, dims: Any) -> Any:
  """A pytree ``dims`` with `optax.MaskedNode` wherever ``tree`` has one (`optax.partition`)."""
  try:
    return jax.tree.map(lambda x, d: optax.MaskedNode() if _is_masked(x) else d, tree, dims,
                        is_leaf=_is_masked)
  except (ValueError, TypeError):
    return dims  # rules in another form, or a mismatch that resolve_tree names


def _leaf_specs(tree: Any, dims: Dims, per_head: bool, num_heads: int | None, *,
                warn: bool = False) -> list[Spec]:
  """One normalized spec per (unmasked) leaf of ``tree``, in leaf order."""
  if callable(dims) and not isinstance(dims, rules_lib.Rules):
    dims = dims(tree)
  if isinstance(dims, (MuonDimensionNumbers, ReshapedDims)):  # one spec for all of rank >= 2
    one = dims
    dims = jax.tree.map(lambda x: one if len(_tree.shape_of(x)) >= 2 else None, tree)
  elif dims is not None and not isinstance(dims, (str, rules_lib.Rules)):
    dims = _masked_like(tree, dims)
  resolved = rules_lib.resolve_tree(
      tree, dims, what="dims", num_heads=num_heads, warn=warn, check_leaf=_normalize_spec,
      default=lambda p, s: default_dims(p, s, per_head=per_head, num_heads=num_heads),
      from_rule=lambda rule, p, s, nh: _layer_dims(rule.label, p, s, per_head, nh))
  return [spec for _, _, spec in resolved]


def matrix_dims(params: Any, dims: Dims = None, *, per_head: bool = False,
                num_heads: int | None = None) -> Any:
  """Resolves ``dims`` to a pytree like ``params`` of normalized specs.

  Args:
    params: parameters (arrays or `jax.ShapeDtypeStruct`) in Flax layouts.
    dims: ``None`` (`default_dims`); one `MuonDimensionNumbers` for all leaves
      of rank >= 2; `slimoptax.Rules` or a preset name, whose labels (layer
      types) classify the parameters; a pytree like ``params`` of
      `MuonDimensionNumbers` / `ReshapedDims` / ``None``; or a callable
      ``params -> any of these``. Masked leaves (`optax.MaskedNode`) are skipped.
    per_head, num_heads: see `default_dims`.

  Returns:
    A pytree like ``params``; ``None`` for leaves that are not matrices.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"my_proj": jnp.zeros((4, 8)), "ln": {"scale": jnp.ones(4)}}
    >>> rules = slimoptax.Rules([(r"my_proj$", "mlp_up", ())]) + slimoptax.preset("slimadam")
    >>> slimoptax.matrix_dims(params, rules)
    {'ln': {'scale': None}, 'my_proj': MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))}
  """
  specs = _leaf_specs(params, dims, per_head, num_heads, warn=True)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), specs)


def muon_labels(params: Any, dims: Dims = None, *, per_head: bool = False,
                num_heads: int | None = None) -> Any:
  """``"muon"`` for leaves with a matrix spec, ``"adam"`` otherwise (for `optax.partition`)."""
  specs = _leaf_specs(params, dims, per_head, num_heads, warn=True)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                      ["adam" if s is None else "muon" for s in specs])


def _view(shape: Sequence[int], spec: Spec) -> tuple[tuple[int, ...], MuonDimensionNumbers]:
  spec = _normalize_spec("<param>", tuple(int(s) for s in shape), spec)
  return (spec.shape, spec.dims) if isinstance(spec, ReshapedDims) else (tuple(shape), spec)


def matrix_shape(shape: Sequence[int], spec: Spec) -> tuple[int, int, int]:
  """``(batch, rows, cols)`` = (batch, fan_in, fan_out) of ``shape`` viewed by ``spec``."""
  view, dims = _view(shape, spec)
  rows, cols = contrib_muon._get_shape_products(jax.ShapeDtypeStruct(view, jnp.float32), dims)
  batch = math.prod(s for i, s in enumerate(view) if i not in (*dims.reduction_axis, *dims.output_axis))
  return batch, rows, cols


def _per_matrix(leaf_fn, dims, per_head, num_heads, who) -> optax.GradientTransformation:
  """A stateless transform applying ``leaf_fn(update, spec)`` to every leaf.

  A zero-size leaf (a dimension 0) has nothing to orthogonalize or scale: it
  comes back as it is (empty).
  """
  _tree.static_int("num_heads", num_heads, 1)

  def init_fn(params):
    # Integer / complex parameters (a momentum in front may hide them from update_fn's check).
    _tree.check_float_params(params)
    _leaf_specs(params, dims, per_head, num_heads)  # fail early
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, optax.EmptyState, who=who)
    # Integer updates would come back as zeros, complex ones without their imaginary part.
    _tree.check_float_params(updates, what="update")
    (out,) = _tree.map_update(lambda path, u, spec: (leaf_fn(u, spec) if u.size else u,), updates,
                              names=[], num_outputs=1,
                              extra=[_leaf_specs(updates, dims, per_head, num_heads)])
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonalize(ns_steps: int = 5, ns_coeffs: Any = QUINTIC_COEFFS, *, eps: ArrayLike = 1e-7,
                  dims: Dims = None, per_head: bool = False, num_heads: int | None = None,
                  dtype: Any = None, precision: Any = None) -> optax.GradientTransformation:
  """Replaces each matrix update by its Newton–Schulz orthogonalization.

  .. math::

    U \\mapsto \\mathrm{NS}_T(U) \\approx U_G V_G^T \\quad (U = U_G S V_G^T)

  per leaf, on the view of ``dims`` (rows = fan_in, columns = fan_out axes of
  Flax layouts; optax.contrib's reshape); leaves that are not matrices come
  back as the same array. Jit-safe (only static shapes are read); integer /
  complex leaves are refused by path.

  Args:
    ns_steps, ns_coeffs, eps, dtype, precision: see `newton_schulz`
      (``CUBIC_COEFFS``: the exact polar factor in ~20-30 steps).
    dims, per_head, num_heads: the matrix views, see `matrix_dims`.

  Returns:
    A stateless `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> grads = {"mlp": {"up": {"kernel": 3.0 * jnp.eye(4, 8)}}, "ln": {"scale": jnp.ones(4)}}
    >>> u, _ = slimoptax.orthogonalize().update(grads, optax.EmptyState())
    >>> print(jnp.linalg.svd(u["mlp"]["up"]["kernel"], compute_uv=False)[0] > 0.7, u["ln"]["scale"])
    True [1. 1. 1. 1.]

  References:
    Jordan et al., Muon, 2024; Bernstein & Newhouse, 2024.
  """
  _coeff_schedule(ns_steps, ns_coeffs)  # validate early
  _tree.check_range("eps", eps, 0.0)
  dtype = _tree.float_dtype("dtype", dtype)

  def leaf(x, spec):
    if spec is None:
      return x
    view, d = _view(x.shape, spec)
    to_matrices, back = contrib_muon._compute_muon_reshape(x.reshape(view), d)
    out = newton_schulz(to_matrices(x.reshape(view)), ns_steps, ns_coeffs, eps=eps, dtype=dtype,
                        precision=precision)
    return back(out).reshape(x.shape)

  return _per_matrix(leaf, dims, per_head, num_heads, "orthogonalize")


def rms_scale_factor(rows: int, cols: int, rms_scale: str = "jordan", rms: float = 0.2) -> float:
  """The factor of an orthogonalized ``rows x cols`` (fan_in x fan_out) update.

  ``"jordan"``: ``sqrt(max(1, fan_out / fan_in))`` (Jordan et al.). ``"moonlight"``:
  ``rms * sqrt(max(fan_in, fan_out))`` (Liu et al.), making the RMS of an
  orthogonal update ``rms`` (0.2: AdamW's, so both share a learning rate).
  """
  if rms_scale == "jordan":
    return math.sqrt(max(1.0, cols / rows))
  if rms_scale == "moonlight":
    return float(rms) * math.sqrt(max(rows, cols))
  if rms_scale in ("none", None):
    return 1.0
  raise ValueError(f"unknown rms_scale {rms_scale!r}; known: {RMS_SCALES}")


def scale_by_matrix_shape(rms_scale: str = "jordan", *, rms: ArrayLike = 0.2, dims: Dims = None,
                          per_head: bool = False,
                          num_heads: int | None = None) -> optax.GradientTransformation:
  """Multiplies each matrix update by `rms_scale_factor` of its (per-batch) matrix view.

  .. math::

    u \\mapsto s(\\text{fan\\_in}, \\text{fan\\_out})\\, u

  with the scales of optax.contrib's ``scale_by_shape`` on the view of
  ``dims`` (`ReshapedDims` too); the update keeps its dtype.

  Args:
    rms_scale: ``"jordan"``, ``"moonlight"`` or ``"none"``.
    rms: target update RMS of ``"moonlight"``.
    dims, per_head, num_heads: the matrix views, see `matrix_dims`.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  if rms_scale not in RMS_SCALES and rms_scale is not None:
    raise ValueError(f"unknown rms_scale {rms_scale!r}; known: {RMS_SCALES}")
  _tree.check_range("rms", rms, 0.0)

  def scale(u, spec):
    if spec is None or rms_scale in ("none", None):
      return u
    view, d = _view(u.shape, spec)
    if rms_scale == "moonlight":
      out = contrib_muon._scale_update_for_consistent_rms(u.reshape(view), d, rms)
    else:
      out = contrib_muon._scale_update_for_width_transfer(u.reshape(view), d)
    return out.reshape(u.shape).astype(u.dtype)

  return _per_matrix(scale, dims, per_head, num_heads, "scale_by_matrix_shape")


class ScaleByMuonState(NamedTuple):
  """State of `scale_by_muon_momentum` (the first transform of `scale_by_muon`).

  Attributes:
    count: number of updates applied (int32 scalar).
    mu: momentum (EMA of gradients), same shapes as the parameters.
  """

  count: chex.Array
  mu: optax.Updates


_MASKED = "<masked>"  # an optax.MaskedNode's placeholder when checking the state's tree


def _check_masks(updates: Any, mu: Any) -> None:
  """Names a parameter masked out (`optax.partition`) in only one of ``updates`` / ``mu``."""
  marked = lambda t: jax.tree.map(lambda x: _MASKED if _is_masked(x) else x, t, is_leaf=_is_masked)
  marked_updates = marked(updates)
  state = _tree.leaves_like(marked_updates, marked(mu), what="state (momentum)")
  for (path, g), m in zip(_tree.named_leaves(marked_updates), state):
    if (g is _MASKED) != (m is _MASKED):
      raise ValueError(
          f"{path!r} is {'masked out' if g is _MASKED else 'a matrix'} in the update but not "
          "in the momentum: the state was created for other parameters (or other dims)")


def scale_by_muon_momentum(beta: ArrayLike = 0.95, *, nesterov: bool = True,
                           bias_correction: bool = False,
                           mu_dtype: Any = None) -> optax.GradientTransformation:
  """Muon's momentum: an EMA of gradients, optionally Nesterov and bias-corrected.

  .. math::

    m_t = \\beta m_{t-1} + (1-\\beta) g_t, \\quad
    u_t = \\beta m_t + (1-\\beta) g_t \\ (\\text{Nesterov}) \\text{ or } m_t

  Args:
    beta: momentum decay.
    nesterov: Nesterov momentum (Keller Jordan's default).
    bias_correction: divide ``m_t`` by ``1 - beta^t`` (Nesterov: ``beta m_t /
      (1 - beta^{t+1}) + (1 - beta) g_t / (1 - beta^t)``) as optax.contrib's Muon.
    mu_dtype: momentum dtype (default: the parameters'; ``u_t``: the gradient's).

  Returns:
    A `optax.GradientTransformation` with state `ScaleByMuonState`.
  """
  _tree.check_range("beta", beta, 0.0, 1.0)
  mu_dtype = _tree.float_dtype("mu_dtype", mu_dtype)

  def init_fn(params):
    _tree.check_float_params(params)
    return ScaleByMuonState(jnp.zeros([], jnp.int32), _tree.zeros_like_tree(params, mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    _tree.check_state(state, ScaleByMuonState, who="scale_by_muon_momentum")
    count_inc = optax.safe_increment(state.count)
    correct = optax.tree.bias_correction

    def leaf(path, g, m):
      # The state keeps its dtype (an array-valued beta must not promote a bf16 momentum).
      m = optax.tree.update_moment(g, m, beta, 1).astype(mu_dtype or m.dtype)
      m_hat, g_hat = (correct(m, beta, optax.safe_increment(count_inc) if nesterov else count_inc),
                      correct(g, beta, count_inc)) if bias_correction else (m, g)
      return (beta * m_hat + (1 - beta) * g_hat if nesterov else m_hat).astype(g.dtype), m

    _check_masks(updates, state.mu)
    direction, mu = _tree.map_update(leaf, updates, state.mu, names=["momentum"], num_outputs=2)
    return direction, ScaleByMuonState(count=count_inc, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def _muon_direction(beta, nesterov, bias_correction, ns_steps, ns_coeffs, eps, dims, per_head,
                    num_heads, rms_scale, rms, mu_dtype, dtype, precision):
  views = dict(dims=dims, per_head=per_head, num_heads=num_heads)
  return (scale_by_muon_momentum(beta, nesterov=nesterov, bias_correction=bias_correction,
                                 mu_dtype=mu_dtype),
          orthogonalize(ns_steps, ns_coeffs, eps=eps, dtype=dtype, precision=precision, **views),
          scale_by_matrix_shape(rms_scale, rms=rms, **views))


def scale_by_muon(beta: ArrayLike = 0.95, *, nesterov: bool = True, bias_correction: bool = False,
                  ns_steps: int = 5, ns_coeffs: Any = QUINTIC_COEFFS, eps: ArrayLike = 1e-7,
                  dims: Dims = None, per_head: bool = False, num_heads: int | None = None,
                  rms_scale: str = "jordan", rms: ArrayLike = 0.2, mu_dtype: Any = None,
                  dtype: Any = None, precision: Any = None) -> optax.GradientTransformation:
  """Muon's direction: momentum, Newton–Schulz orthogonalization, shape scale.

  .. math::

    u_t = s(\\text{fan\\_in}, \\text{fan\\_out}) \\cdot \\mathrm{NS}_T(\\tilde m_t)

  The chain of `scale_by_muon_momentum` (``\\tilde m_t``), `orthogonalize`
  and `scale_by_matrix_shape`; leaves that are not matrices get the momentum
  only (`muon` sends them to AdamW).

  Args:
    beta, nesterov, bias_correction, mu_dtype: see `scale_by_muon_momentum`
      (no bias correction by default, as the reference Muon: the
      normalization removes the scale, only Nesterov's weights differ).
    ns_steps, ns_coeffs, eps, dtype, precision: see `newton_schulz`.
    dims, per_head, num_heads: the matrix views (Flax layouts), see `matrix_dims`.
    rms_scale, rms: see `scale_by_matrix_shape`.

  Returns:
    An `optax.chain`, state ``(ScaleByMuonState, EmptyState, EmptyState)``.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> tx = slimoptax.scale_by_muon(ns_steps=30, ns_coeffs="cubic", rms_scale="moonlight",
    ...                              dims=optax.contrib.MuonDimensionNumbers())
    >>> u, _ = tx.update({"w": jnp.eye(4, 16) + 0.1}, tx.init({"w": jnp.zeros((4, 16))}))
    >>> round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 3)  # Moonlight: update RMS 0.2
    0.2

  References:
    Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM Training, 2025.
  """
  return optax.chain(*_muon_direction(beta, nesterov, bias_correction, ns_steps, ns_coeffs, eps,
                                      dims, per_head, num_heads, rms_scale, rms, mu_dtype, dtype,
                                      precision))


def muon(learning_rate: optax.ScalarOrSchedule, beta: ArrayLike = 0.95,
         weight_decay: ArrayLike = 0.0, *, nesterov: bool = True, bias_correction: bool = False,
         ns_steps: int = 5, ns_coeffs: Any = QUINTIC_COEFFS, eps: ArrayLike = 1e-7,
         dims: Dims = None, per_head: bool = False, num_heads: int | None = None,
         rms_scale: str = "jordan", rms: ArrayLike = 0.2, weight_decay_mask: Any = None,
         mu_dtype: Any = None, dtype: Any = None, precision: Any = None,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: ArrayLike = 0.9,
         adam_b2: ArrayLike = 0.95, adam_eps: ArrayLike = 1e-8,
         adam_weight_decay: ArrayLike | None = None, adam_weight_decay_mask: Any = None,
         adam_nesterov: bool = False, adam_compress: Any = None, adam_mu_dtype: Any = None,
         adam_nu_dtype: Any = None) -> optax.GradientTransformation:
  """Muon for hidden matrices, (Slim)AdamW for everything else.

  .. math::

    \\theta \\leftarrow \\theta - \\eta_t \\left( s \\cdot \\mathrm{NS}_T(\\tilde m_t)
    + \\lambda \\theta \\right)

  for the matrices (`muon_labels`: Dense / attention / MLP / conv kernels in
  Flax layouts): `scale_by_muon`'s transforms, weight decay and the rate in one
  `optax.chain`; the rest goes to `slimoptax.slim_adamw` (`optax.partition`).
  ``bias_correction=True, eps=1e-8, adam_b2=0.999, adam_weight_decay=0``: as
  `optax.contrib.muon`.

  Args:
    learning_rate: Muon's rate (float or schedule): ~0.02 with ``"jordan"``;
      with ``"moonlight"`` an AdamW-sized rate shared with the fallback.
    beta: momentum decay.
    weight_decay: decoupled weight decay of the matrices (times the rate);
      ``weight_decay_mask`` its mask (default: all).
    nesterov, bias_correction, ns_steps, ns_coeffs, eps, dims, per_head,
      num_heads, rms_scale, rms, mu_dtype, dtype, precision: see
      `scale_by_muon`; leaves whose ``dims`` are ``None`` go to AdamW.
    adam_learning_rate, adam_weight_decay: the fallback's (default: Muon's).
    adam_b1, adam_b2, adam_eps, adam_nesterov, adam_mu_dtype, adam_nu_dtype,
      adam_weight_decay_mask (default: ``ndim >= 2``), adam_compress (``None``,
      a preset, `slimoptax.Rules`...): the fallback's, see `slimoptax.slim_adamw`.

  Returns:
    An `optax.partition` (its state an `optax.PartitionState`, checked by
    ``update``). Under `optax.inject_hyperparams`, name ``ns_steps`` (and
    ``num_heads``, if given) and callable decay masks in ``static_args``
    (callables read as schedules). Zero-size matrices get empty updates.

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}},
    ...           "wte": {"embedding": jnp.ones((16, 4))}}
    >>> slimoptax.muon_labels(params)
    {'mlp': {'up': {'kernel': 'muon'}}, 'wte': {'embedding': 'adam'}}
    >>> tx = slimoptax.muon(0.02, adam_learning_rate=3e-4, adam_compress="slimadam")
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> round(float(updates["wte"]["embedding"][0, 0]), 6)  # AdamW's first step: -lr
    -0.0003

  References:
    Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM Training,
    2025; Kalra et al., When Can You Get Away with Low Memory Adam?, 2025.
  """
  for name, value, high in (("weight_decay", weight_decay, None), ("adam_b1", adam_b1, 1.0),
                            ("adam_b2", adam_b2, 1.0), ("adam_eps", adam_eps, None),
                            ("adam_weight_decay", adam_weight_decay, None)):
    _tree.check_range(name, value, 0.0, high)  # the fallback's, under the names given here
  direction = _muon_direction(beta, nesterov, bias_correction, ns_steps, ns_coeffs, eps, dims,
                              per_head, num_heads, rms_scale, rms, mu_dtype, dtype, precision)
  matrices = optax.chain(*direction, optax.add_decayed_weights(weight_decay, weight_decay_mask),
                         optax.scale_by_learning_rate(learning_rate))
  rest = slim_adam.slim_adamw(
      learning_rate if adam_learning_rate is None else adam_learning_rate, adam_b1, adam_b2,
      adam_eps, weight_decay if adam_weight_decay is None else adam_weight_decay,
      compress=adam_compress, mask=adam_weight_decay_mask, mu_dtype=adam_mu_dtype,
      nu_dtype=adam_nu_dtype, nesterov=adam_nesterov, num_heads=num_heads)
  return partition_checked("muon", {"muon": matrices, "adam": rest},
                           lambda tree: muon_labels(tree, dims, per_head=per_head, num_heads=num_heads))


def partition_checked(who: str, transforms: dict[str, optax.GradientTransformation],
                      labels: Any) -> optax.GradientTransformationExtraArgs:
  """`optax.partition` whose ``update`` first checks it was given an `optax.PartitionState` (errors name ``who``).

  The matrices-plus-AdamW-fallback optimizers (`muon`, `slimoptax.column_max_descent`) are built on it.
  """
  inner = optax.partition(transforms, labels)

  def update_fn(updates, state, params=None, **extra_args):
    _tree.check_state(state, optax.PartitionState, who=who)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


__all__ = [
    "CUBIC_COEFFS", "EXCLUDED_LAYER_TYPES", "MuonDimensionNumbers", "NS_COEFFS", "QUINTIC_COEFFS",
    "RMS_SCALES", "ReshapedDims", "ScaleByMuonState", "default_dims", "matrix_dims",
    "matrix_shape", "muon", "muon_flop_overhead", "muon_labels", "newton_schulz",
    "newton_schulz_flops", "orthogonalize", "rms_scale_factor", "scale_by_matrix_shape",
    "scale_by_muon", "scale_by_muon_momentum",
]
