"""Muon: momentum orthogonalized by Newton–Schulz, with label-derived matrix views.

For a matrix update ``G`` with SVD ``G = U S V^T``, orthogonalization replaces
``G`` by (an approximation of) its polar factor ``U V^T``: every singular value
is set to about 1, which boosts the rare directions of the (typically nearly
low-rank) momentum. The polar factor is approximated by an odd matrix
polynomial iterated ``T`` times on the Frobenius-normalized ``X_0 = G /
(||G||_F + eps)``:

.. math::

  A_k = X_k X_k^T, \\qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k ,

which maps each singular value by ``s -> a s + b s^3 + c s^5`` and leaves the
singular vectors alone.

* ``QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)`` (Keller Jordan's Muon): a large
  slope at 0 so 5 steps suffice; normalized singular values in [0.01, 1] end up
  in about [0.68, 1.13] (those in [0.002, 0.01] up to 1.20; tinier ones stay
  small), not exactly 1, which does not hurt training.
* ``CUBIC_COEFFS = (1.5, -0.5, 0)``: the classical Newton–Schulz iteration
  ``X <- 1.5 X - 0.5 X X^T X``; it converges (quadratically, once singular
  values are near 1) to exactly ``U V^T`` for singular values in ``(0,
  sqrt(3))``, but needs more steps (about ``log_1.5(1/s_min) + 5``).

Tall matrices are transposed so that ``A`` is the smaller Gram matrix. One
iteration on an ``n x m`` matrix (``m <= n``) costs ``2 m^2 n`` (``X X^T``) +
``2 m^3`` (``A^2``) + ``2 m^2 n`` (``B X``) = ``2 (2 n m^2 + m^3)`` matmul FLOPs
(`newton_schulz_flops`); against the ``6 n m B`` FLOPs of a forward+backward
pass over ``B`` tokens the overhead of ``T`` steps is at most ``T m / B``
(`muon_flop_overhead`).

Which parameters are matrices, and how an n-D parameter is viewed as one, is a
per-leaf `optax.contrib.MuonDimensionNumbers` (``reduction_axis`` = rows =
fan_in, ``output_axis`` = columns = fan_out, every other axis a batch axis
orthogonalized independently) or ``None`` (not orthogonalized). The default
(`matrix_dims`) reads the layer type of each parameter from its path
(`slimoptax.layer_type`) and its fan_in / fan_out axes from
`slimoptax.axis_roles` (Flax layouts): Dense ``(in, out)``, DenseGeneral
attention ``(d, H, hd)`` -> ``(d, H*hd)`` and ``(H, hd, d)`` -> ``(H*hd, d)``,
Conv ``(h, w, in, out)`` -> ``(h*w*in, out)``; token/position embeddings,
output heads (LM head, classifier), norms, biases and scalars are excluded.
With ``per_head=True`` attention kernels are orthogonalized per head (heads
become a batch axis).

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
import numpy as np
import optax
from jax.typing import ArrayLike
from optax.contrib import MuonDimensionNumbers

from slimoptax import _slim_adam as slim_adam
from slimoptax import _tree, layers, presets

QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (a, b, c)."""

CUBIC_COEFFS: tuple[float, float, float] = (1.5, -0.5, 0.0)
"""Classical cubic Newton–Schulz: converges to the exact polar factor U V^T."""

NS_COEFFS: dict[str, tuple[float, float, float]] = {
    "quintic": QUINTIC_COEFFS,
    "muon": QUINTIC_COEFFS,
    "cubic": CUBIC_COEFFS,
}

# Layer types never orthogonalized by the default dims: they are not hidden
# linear maps (Muon's authors use AdamW for them).
EXCLUDED_LAYER_TYPES: tuple[str, ...] = (
    "embedding", "pos_embedding", "head", "norm", "bias", "scalar",
)

RMS_SCALES: tuple[str, ...] = ("jordan", "moonlight", "none")


class ReshapedDims(NamedTuple):
  """Orthogonalize a parameter viewed with ``shape`` by the spec ``dims``.

  Used for per-head orthogonalization of 2-D ``(d, H*hd)`` attention kernels:
  ``ReshapedDims((d, H, hd), MuonDimensionNumbers(0, 2))`` orthogonalizes each
  head's ``(d, hd)`` block (axis 1, the heads, is a batch axis).
  """

  shape: tuple[int, ...]
  dims: MuonDimensionNumbers


Spec = Union[MuonDimensionNumbers, ReshapedDims, None]
Dims = Any  # None | MuonDimensionNumbers | pytree of Spec | callable params -> pytree


# --------------------------------------------------------------------------
# Specs: which leaves are matrices and how they are viewed.
# --------------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, (MuonDimensionNumbers, ReshapedDims, optax.MaskedNode))


def _as_tuple(axes: Sequence[int] | int) -> tuple[int, ...]:
  if isinstance(axes, (int,)) or hasattr(axes, "__index__"):
    return (int(axes),)
  return tuple(int(a) for a in axes)


def _normalize_spec(path: str, shape: tuple[int, ...], spec: Spec) -> Spec:
  """Validates a spec against a shape; returns it with sorted non-negative int tuples."""
  if spec is None or isinstance(spec, optax.MaskedNode):
    return None
  if isinstance(spec, ReshapedDims):
    view = tuple(int(s) for s in spec.shape)
    if math.prod(view) != math.prod(shape):
      raise ValueError(
          f"dims for {path!r}: view {view} has {math.prod(view)} entries, the parameter "
          f"{shape} has {math.prod(shape)}")
    inner = _normalize_spec(path, view, spec.dims)
    return ReshapedDims(view, inner)
  if not isinstance(spec, MuonDimensionNumbers):
    raise TypeError(
        f"dims for {path!r}: expected MuonDimensionNumbers, ReshapedDims or None, got {spec!r}")
  ndim = len(shape)
  out = []
  for what, axes in (("reduction_axis", spec.reduction_axis), ("output_axis", spec.output_axis)):
    axes = _as_tuple(axes)
    if not axes:
      raise ValueError(f"dims for {path!r}: empty {what}")
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f"dims for {path!r}: {what} {a} out of range for shape {shape}")
    norm = tuple(sorted(a % ndim for a in axes))
    if len(set(norm)) != len(norm):
      raise ValueError(f"dims for {path!r}: repeated axes in {what} {axes}")
    out.append(norm)
  if set(out[0]) & set(out[1]):
    raise ValueError(
        f"dims for {path!r}: reduction axes {out[0]} and output axes {out[1]} overlap")
  return MuonDimensionNumbers(reduction_axis=out[0], output_axis=out[1])


def default_dims(path: str, shape: Sequence[int], *, per_head: bool = False,
                 num_heads: int | None = None) -> Spec:
  """The default matrix view of one parameter, from its layer type and axis roles.

  Args:
    path: ``"/"``-joined parameter path.
    shape: the parameter's shape.
    per_head: orthogonalize attention kernels (query/key/value/attn_out) per
      head: rows = fan_in without the heads axis, columns = fan_out without
      it, heads = batch.
    num_heads: head count, needed with ``per_head`` for 2-D ``(d, H*hd)``
      attention kernels (they are then viewed as ``(d, H, hd)``).

  Returns:
    ``None`` for excluded layer types (`EXCLUDED_LAYER_TYPES`) and rank < 2;
    otherwise a `MuonDimensionNumbers` (rows = fan_in axes, columns = fan_out
    axes) or a `ReshapedDims`.

  Raises:
    ValueError: if the layer type cannot be told from the path (pass ``dims``).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    return None
  try:
    ltype = presets.layer_type(path, shape)
  except ValueError as err:
    raise ValueError(f"{err}; or give `dims` for it explicitly") from None
  if ltype in EXCLUDED_LAYER_TYPES:
    return None
  is_attn = ltype in ("query", "key", "value", "attn_out")
  view, roles = layers.axis_roles(
      ltype, shape, num_heads=num_heads if (per_head and is_attn) else None, path=path)
  if per_head and is_attn:
    if "heads" not in roles:
      raise ValueError(
          f"per_head=True: cannot find the heads axis of {ltype} kernel {path!r} with shape "
          f"{shape}; pass num_heads= for 2-D (d, H*hd) kernels")
    heads = set(roles["heads"])
    rows = tuple(a for a in roles["fan_in"] if a not in heads)
    cols = tuple(a for a in roles["fan_out"] if a not in heads)
    spec = MuonDimensionNumbers(reduction_axis=rows, output_axis=cols)
  else:
    spec = MuonDimensionNumbers(reduction_axis=roles["fan_in"], output_axis=roles["fan_out"])
  if view != shape:
    return ReshapedDims(view, spec)
  return spec


def _leaf_specs(tree: Any, dims: Dims, per_head: bool, num_heads: int | None):
  """Flattens ``tree`` (MaskedNode as leaves) and gives a normalized spec per leaf.

  Returns:
    ``(leaves, treedef, specs)``; masked leaves get spec ``None``.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
  paths = [_tree.path_str(p) for p, _ in with_path]
  leaves = [x for _, x in with_path]
  shapes = [None if is_masked(x) else _tree.shape_of(x) for x in leaves]
  if dims is None:
    specs = [None if s is None else default_dims(p, s, per_head=per_head, num_heads=num_heads)
             for p, s in zip(paths, shapes)]
  else:
    resolved = dims(tree) if callable(dims) and not _is_spec(dims) else dims
    if isinstance(resolved, (MuonDimensionNumbers, ReshapedDims)):
      # One spec for every leaf of rank >= 2.
      raw = [resolved if (s is not None and len(s) >= 2) else None for s in shapes]
    else:
      try:
        raw = treedef.flatten_up_to(resolved)
      except (ValueError, TypeError):
        # Report missing / extra paths the way the rest of the library does.
        _tree.leaves_like(tree, resolved, what="dims")
        raise
    specs = [None if s is None else _normalize_spec(p, s, d)
             for p, s, d in zip(paths, shapes, raw)]
  return leaves, treedef, specs


def matrix_dims(params: Any, dims: Dims = None, *, per_head: bool = False,
                num_heads: int | None = None) -> Any:
  """Resolves ``dims`` to a pytree like ``params`` of specs (or ``None``).

  Args:
    params: parameters (arrays or `jax.ShapeDtypeStruct`; only paths and
      shapes are read).
    dims: ``None`` (derive from layer types, see `default_dims`); one
      `MuonDimensionNumbers` for every leaf of rank >= 2; a pytree matching
      ``params`` of `MuonDimensionNumbers` / `ReshapedDims` / ``None``; or a
      callable ``params -> such a pytree``.
    per_head: see `default_dims`.
    num_heads: see `default_dims`.

  Returns:
    A pytree with ``params``' structure whose leaves are normalized
    `MuonDimensionNumbers` (sorted tuples of non-negative axes),
    `ReshapedDims`, or ``None`` for leaves that are not orthogonalized.
  """
  leaves, treedef, specs = _leaf_specs(params, dims, per_head, num_heads)
  del leaves
  return jax.tree_util.tree_unflatten(treedef, specs)


def muon_labels(params: Any, dims: Dims = None, *, per_head: bool = False,
                num_heads: int | None = None) -> Any:
  """``"muon"`` for leaves with a matrix spec, ``"adam"`` otherwise (for `optax.partition`)."""
  leaves, treedef, specs = _leaf_specs(params, dims, per_head, num_heads)
  del leaves
  return jax.tree_util.tree_unflatten(treedef, ["adam" if s is None else "muon" for s in specs])


def matrix_shape(shape: Sequence[int], spec: Spec) -> tuple[int, int, int]:
  """``(batch, rows, cols)`` of a parameter of ``shape`` viewed by ``spec``."""
  if isinstance(spec, ReshapedDims):
    shape, spec = spec.shape, spec.dims
  shape = tuple(int(s) for s in shape)
  spec = _normalize_spec("<param>", shape, spec)
  rows = math.prod(shape[a] for a in spec.reduction_axis)
  cols = math.prod(shape[a] for a in spec.output_axis)
  return math.prod(shape) // (rows * cols), rows, cols


def _to_matrices(x: jax.Array, spec: Spec):
  """Views ``x`` as a ``(batch, rows, cols)`` stack; returns it and the inverse map."""
  orig_shape = x.shape
  if isinstance(spec, ReshapedDims):
    x = x.reshape(spec.shape)
    spec = spec.dims
  shape = x.shape
  rows, cols = spec.reduction_axis, spec.output_axis
  batch = tuple(a for a in range(x.ndim) if a not in rows and a not in cols)
  perm = batch + tuple(rows) + tuple(cols)
  inv = tuple(sorted(range(x.ndim), key=lambda i: perm[i]))
  permuted_shape = tuple(shape[a] for a in perm)
  flat = (math.prod(shape[a] for a in batch), math.prod(shape[a] for a in rows),
          math.prod(shape[a] for a in cols))
  mats = jnp.transpose(x, perm).reshape(flat)

  def back(m):
    return jnp.transpose(m.reshape(permuted_shape), inv).reshape(orig_shape)

  return mats, back


# --------------------------------------------------------------------------
# Newton–Schulz.
# --------------------------------------------------------------------------


def _coeff_schedule(ns_steps: int, ns_coeffs: Any) -> list[tuple[float, float, float]]:
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in NS_COEFFS:
      raise ValueError(f"unknown ns_coeffs {ns_coeffs!r}; known: {sorted(NS_COEFFS)}")
    ns_coeffs = NS_COEFFS[ns_coeffs]
  try:
    arr = np.asarray(ns_coeffs, dtype=np.float64)
  except Exception as err:  # traced values cannot become Python floats
    raise TypeError(f"ns_coeffs must be concrete numbers, got {ns_coeffs!r} ({err})") from None
  if arr.ndim == 1 and arr.shape == (3,):
    if int(ns_steps) < 0:
      raise ValueError(f"ns_steps must be >= 0, got {ns_steps}")
    return [tuple(float(c) for c in arr)] * int(ns_steps)
  if arr.ndim == 2 and arr.shape[1] == 3:
    if ns_steps is not None and int(ns_steps) != arr.shape[0]:
      raise ValueError(
          f"ns_coeffs gives {arr.shape[0]} per-step triples but ns_steps={ns_steps}; make them agree")
    return [tuple(float(c) for c in row) for row in arr]
  raise ValueError(f"ns_coeffs must be (a, b, c) or a sequence of such triples, got shape {arr.shape}")


def newton_schulz(
    x: jax.Array,
    ns_steps: int = 5,
    ns_coeffs: Any = QUINTIC_COEFFS,
    *,
    eps: ArrayLike = 1e-7,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
  """Orthogonalizes the last two axes of ``x`` by a Newton–Schulz iteration.

  .. math::

    X_0 = \\frac{G}{\\|G\\|_F + \\epsilon}, \\quad
    X_{k+1} = a X_k + (b X_k X_k^T + c (X_k X_k^T)^2) X_k

  computed on ``G^T`` when ``G`` is tall (rows > columns), so the Gram matrix
  is ``min(rows, cols)`` square; leading axes are a batch.

  Args:
    x: ``(..., rows, cols)`` array.
    ns_steps: number of iterations ``T``.
    ns_coeffs: ``(a, b, c)``, a name in `NS_COEFFS` (``"quintic"``,
      ``"cubic"``), or a sequence of ``ns_steps`` per-step triples.
    eps: added to the Frobenius norm.
    dtype: dtype of the iteration (default: ``x``'s, promoted to at least
      float32). The result has ``x``'s dtype.
    precision: matmul precision passed to `jnp.matmul`.

  Returns:
    An array like ``x`` whose singular values are pushed towards 1.
  """
  schedule = _coeff_schedule(ns_steps, ns_coeffs)
  out_dtype = x.dtype
  compute = jnp.dtype(dtype) if dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(compute)
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  x = x / (norm + jnp.asarray(eps, compute))
  mm = lambda a, b: jnp.matmul(a, b, precision=precision)
  for a, b, c in schedule:
    gram = mm(x, jnp.swapaxes(x, -1, -2))
    poly = b * gram + c * mm(gram, gram) if c != 0.0 else b * gram
    x = a * x + mm(poly, x)
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(out_dtype)


def orthogonalize_leaf(x: jax.Array, spec: Spec, ns_steps: int = 5,
                       ns_coeffs: Any = QUINTIC_COEFFS, *, eps: ArrayLike = 1e-7,
                       dtype: Any = None, precision: Any = None) -> jax.Array:
  """Orthogonalizes one array viewed as matrices by ``spec`` (``None``: returned as is)."""
  if spec is None:
    return x
  spec = _normalize_spec("<param>", tuple(x.shape), spec)
  mats, back = _to_matrices(x, spec)
  return back(newton_schulz(mats, ns_steps, ns_coeffs, eps=eps, dtype=dtype, precision=precision))


def newton_schulz_flops(rows: int, cols: int, ns_steps: int = 1,
                        ns_coeffs: Any = QUINTIC_COEFFS) -> int:
  """Matmul FLOPs of `newton_schulz` on one ``rows x cols`` matrix.

  With ``m = min(rows, cols)``, ``n = max(rows, cols)`` each quintic step does
  ``X X^T`` (``2 m^2 n``), ``A A`` (``2 m^3``) and ``B X`` (``2 m^2 n``):
  ``2 (2 n m^2 + m^3)``, the slides' count. A step with ``c = 0`` (cubic)
  skips ``A A``: ``4 n m^2``. A multiply-add counts as 2 FLOPs.
  """
  m, n = min(rows, cols), max(rows, cols)
  total = 0
  for _, _, c in _coeff_schedule(ns_steps, ns_coeffs):
    total += 4 * n * m * m + (2 * m ** 3 if c != 0.0 else 0)
  return total


def muon_flop_overhead(rows: int, cols: int, batch_tokens: int, ns_steps: int = 5,
                       ns_coeffs: Any = QUINTIC_COEFFS) -> float:
  """Muon's extra FLOPs over the ``6 * rows * cols * B`` of a training step.

  A linear layer with an ``n x m`` weight costs ``6 n m B`` FLOPs for a forward
  and backward pass over ``B`` tokens; Newton–Schulz adds
  `newton_schulz_flops`. The ratio is at most ``T m / B`` (``m`` the smaller
  side), with equality for square weights.
  """
  return newton_schulz_flops(rows, cols, ns_steps, ns_coeffs) / (6.0 * rows * cols * batch_tokens)


# --------------------------------------------------------------------------
# Transformations.
# --------------------------------------------------------------------------


def orthogonalize(
    ns_steps: int = 5,
    ns_coeffs: Any = QUINTIC_COEFFS,
    *,
    eps: ArrayLike = 1e-7,
    dims: Dims = None,
    per_head: bool = False,
    num_heads: int | None = None,
    dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
  """Replaces each matrix update by its Newton–Schulz orthogonalization.

  .. math::

    U \\mapsto \\mathrm{NS}_T(U) \\approx U_G V_G^T \\quad (U = U_G S V_G^T)

  applied per leaf to the matrix view given by ``dims`` (rows = fan_in axes,
  columns = fan_out axes, other axes batch). Leaves without a spec
  (embeddings, heads, norms, biases, scalars under the default) are returned
  unchanged (the same array). Stateless; jit-safe (only static shapes are
  inspected). Integer or complex parameters (``init``) and updates
  (``update``) are refused with a ValueError naming the path.

  Args:
    ns_steps: Newton–Schulz iterations ``T``.
    ns_coeffs: ``QUINTIC_COEFFS`` (default, Muon), ``CUBIC_COEFFS`` (exact
      polar factor in the limit; use ~20-30 steps), a name in `NS_COEFFS`, or
      ``ns_steps`` per-step triples.
    eps: added to the Frobenius norm before the iteration.
    dims: per-leaf matrix views, see `matrix_dims` (``None``: from layer types
      and axis roles).
    per_head: orthogonalize attention kernels per head (default dims only).
    num_heads: head count for ``per_head`` on 2-D attention kernels.
    dtype: iteration dtype (default: the update's, at least float32).
    precision: matmul precision.

  Returns:
    A `optax.GradientTransformation` (empty state).

  Example:
    >>> tx = optax.chain(optax.trace(0.95, nesterov=True),
    ...                  slimoptax.orthogonalize(), optax.scale(-0.02))

  References:
    Jordan et al., Muon, 2024; Bernstein & Newhouse, 2024.
  """
  _coeff_schedule(ns_steps, ns_coeffs)  # validate early

  def update_fn(updates, state, params=None):
    del params
    # Integer updates would come back as zeros, complex ones without their imaginary part.
    _tree.check_float_params(updates, what="update")
    leaves, treedef, specs = _leaf_specs(updates, dims, per_head, num_heads)
    out = [orthogonalize_leaf(u, s, ns_steps, ns_coeffs, eps=eps, dtype=dtype, precision=precision)
           if s is not None else u for u, s in zip(leaves, specs)]
    return jax.tree_util.tree_unflatten(treedef, out), state

  def init_fn(params):
    # Integer / complex parameters (a momentum in front may already have promoted the
    # updates to float, hiding them from update_fn's check).
    _tree.check_float_params(params)
    return optax.EmptyState()

  return optax.GradientTransformation(init_fn, update_fn)


def rms_scale_factor(rows: int, cols: int, rms_scale: str = "jordan", rms: float = 0.2) -> float:
  """The shape factor multiplying an orthogonalized ``rows x cols`` (fan_in x fan_out) update.

  * ``"jordan"``: ``sqrt(max(1, fan_out / fan_in))`` (Keller Jordan's Muon; in
    PyTorch's ``(out, in)`` layout this is ``max(1, rows/cols)**0.5``).
  * ``"moonlight"``: ``rms * sqrt(max(fan_in, fan_out))`` (Liu et al. 2025):
    an orthogonal matrix has RMS ``1/sqrt(max(fan_in, fan_out))``, so the update
    RMS becomes ``rms`` (0.2 matches AdamW's typical update RMS, letting Muon
    and its AdamW fallback share one learning rate and weight decay).
  * ``"none"``: 1.
  """
  if rms_scale == "jordan":
    return math.sqrt(max(1.0, cols / rows))
  if rms_scale == "moonlight":
    return float(rms) * math.sqrt(max(rows, cols))
  if rms_scale in ("none", None):
    return 1.0
  raise ValueError(f"unknown rms_scale {rms_scale!r}; known: {RMS_SCALES}")


def scale_by_matrix_shape(
    rms_scale: str = "jordan",
    *,
    rms: ArrayLike = 0.2,
    dims: Dims = None,
    per_head: bool = False,
    num_heads: int | None = None,
) -> optax.GradientTransformation:
  """Multiplies each matrix update by `rms_scale_factor` of its (per-batch) matrix view.

  Args:
    rms_scale: ``"jordan"`` (``sqrt(max(1, fan_out/fan_in))``), ``"moonlight"``
      (``rms * sqrt(max(fan_in, fan_out))``) or ``"none"``.
    rms: target update RMS of ``"moonlight"``.
    dims: matrix views, see `matrix_dims`; leaves without one are unchanged.
    per_head: see `default_dims`.
    num_heads: see `default_dims`.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  if rms_scale not in RMS_SCALES and rms_scale is not None:
    raise ValueError(f"unknown rms_scale {rms_scale!r}; known: {RMS_SCALES}")

  def update_fn(updates, state, params=None):
    del params
    # Integer updates would come back as zeros, complex ones without their imaginary part.
    _tree.check_float_params(updates, what="update")
    leaves, treedef, specs = _leaf_specs(updates, dims, per_head, num_heads)
    out = []
    for u, s in zip(leaves, specs):
      if s is None:
        out.append(u)
        continue
      _, rows, cols = matrix_shape(u.shape, s)
      if rms_scale == "moonlight":
        factor = jnp.asarray(rms, jnp.float32) * math.sqrt(max(rows, cols))
      else:
        factor = rms_scale_factor(rows, cols, rms_scale or "none")
      out.append((u * factor).astype(u.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), state

  def init_fn(params):
    # Integer / complex parameters (a momentum in front may already have promoted the
    # updates to float, hiding them from update_fn's check).
    _tree.check_float_params(params)
    return optax.EmptyState()

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByMuonState(NamedTuple):
  """State of `scale_by_muon`.

  Attributes:
    count: number of updates applied (int32 scalar).
    mu: momentum (EMA of gradients), same shapes as the parameters.
  """

  count: chex.Array
  mu: optax.Updates


_MASKED = "<masked>"  # placeholder leaf of an optax.MaskedNode in scale_by_muon's checks


def scale_by_muon(
    beta: ArrayLike = 0.95,
    *,
    nesterov: bool = True,
    bias_correction: bool = False,
    ns_steps: int = 5,
    ns_coeffs: Any = QUINTIC_COEFFS,
    eps: ArrayLike = 1e-7,
    dims: Dims = None,
    per_head: bool = False,
    num_heads: int | None = None,
    rms_scale: str = "jordan",
    rms: ArrayLike = 0.2,
    mu_dtype: Any = None,
    dtype: Any = None,
    precision: Any = None,
) -> optax.GradientTransformation:
  """Muon's direction: momentum, Newton–Schulz orthogonalization, shape scale.

  .. math::

    m_t = \\beta m_{t-1} + (1-\\beta) g_t, \\quad
    \\tilde m_t = \\beta m_t + (1-\\beta) g_t \\ (\\text{Nesterov}) \\text{ or } m_t, \\quad
    u_t = s(\\text{fan\\_in}, \\text{fan\\_out}) \\cdot \\mathrm{NS}_T(\\tilde m_t)

  Leaves without a matrix spec get the momentum only (use `muon`, which
  routes them to AdamW).

  Args:
    beta: momentum decay.
    nesterov: Nesterov momentum (Keller Jordan's default).
    bias_correction: divide ``m`` by ``1 - beta^t`` (and, for Nesterov, use
      optax's bias-corrected form, matching `optax.contrib.scale_by_muon`).
      Off by default as in the reference Muon: the Frobenius normalization
      makes the overall scale irrelevant; only Nesterov's relative weighting
      of ``g`` and ``m`` differs in the first steps.
    ns_steps: Newton–Schulz iterations.
    ns_coeffs: see `orthogonalize`.
    eps: added to the Frobenius norm.
    dims: matrix views, see `matrix_dims`.
    per_head: see `default_dims`.
    num_heads: see `default_dims`.
    rms_scale: ``"jordan"``, ``"moonlight"`` or ``"none"``, see
      `rms_scale_factor`.
    rms: target RMS for ``"moonlight"``.
    mu_dtype: momentum dtype (default: the parameters').
    dtype: Newton–Schulz dtype (default: at least float32).
    precision: matmul precision.

  Returns:
    A `optax.GradientTransformation` with state `ScaleByMuonState`.

  References:
    Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM
    Training, 2025.
  """
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None
  ortho = orthogonalize(ns_steps, ns_coeffs, eps=eps, dims=dims, per_head=per_head,
                        num_heads=num_heads, dtype=dtype, precision=precision)
  shape_scale = scale_by_matrix_shape(rms_scale, rms=rms, dims=dims, per_head=per_head,
                                      num_heads=num_heads)

  def init_fn(params):
    _tree.check_float_params(params)
    matrix_dims(params, dims, per_head=per_head, num_heads=num_heads)  # fail early
    return ScaleByMuonState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params),
    )

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    # Masked leaves (optax.partition / optax.masked) are compared as placeholders, so
    # that a missing or extra parameter is named even when it is masked out here.
    marked = lambda t: jax.tree.map(
        lambda x: _MASKED if isinstance(x, optax.MaskedNode) else x, t,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    marked_updates = marked(updates)
    for (path, g), m in zip(_tree.named_leaves(marked_updates),
                            _tree.leaves_like(marked_updates, marked(state.mu),
                                                   what="state.mu")):
      if (g is _MASKED) != (m is _MASKED):
        raise ValueError(
            f"{path!r} is {'masked out' if g is _MASKED else 'a matrix'} in the update but not "
            "in state.mu: the state was created for other parameters (or other dims)")
      if g is not _MASKED and tuple(m.shape) != tuple(g.shape):
        raise ValueError(
            f"momentum of {path!r} has shape {tuple(m.shape)} but the update has "
            f"{tuple(g.shape)}: the state was created for other parameters")
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    mu_leaves = treedef.flatten_up_to(state.mu)
    # The state keeps its dtype (an array-valued beta must not promote a bf16 momentum).
    mu = jax.tree_util.tree_unflatten(
        treedef, [(beta * m + (1 - beta) * g).astype(mu_dtype or m.dtype)
                  for g, m in zip(g_leaves, mu_leaves)])
    if bias_correction:
      c1 = 1 - jnp.asarray(beta, jnp.float32) ** count_inc
      if nesterov:
        c1_next = 1 - jnp.asarray(beta, jnp.float32) ** optax.safe_increment(count_inc)
        direction = jax.tree.map(lambda m, g: beta * m / c1_next + (1 - beta) * g / c1, mu, updates)
      else:
        direction = jax.tree.map(lambda m: m / c1, mu)
    elif nesterov:
      direction = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
    else:
      direction = mu
    direction = jax.tree.map(lambda d, g: d.astype(g.dtype), direction, updates)
    direction, _ = ortho.update(direction, optax.EmptyState())
    direction, _ = shape_scale.update(direction, optax.EmptyState())
    return direction, ScaleByMuonState(count=count_inc, mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: ArrayLike = 0.95,
    weight_decay: ArrayLike = 0.0,
    *,
    nesterov: bool = True,
    bias_correction: bool = False,
    ns_steps: int = 5,
    ns_coeffs: Any = QUINTIC_COEFFS,
    eps: ArrayLike = 1e-7,
    dims: Dims = None,
    per_head: bool = False,
    num_heads: int | None = None,
    rms_scale: str = "jordan",
    rms: ArrayLike = 0.2,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    dtype: Any = None,
    precision: Any = None,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: ArrayLike = 0.9,
    adam_b2: ArrayLike = 0.95,
    adam_eps: ArrayLike = 1e-8,
    adam_weight_decay: ArrayLike | None = None,
    adam_weight_decay_mask: Any = None,
    adam_nesterov: bool = False,
    adam_compress: Any = None,
    adam_mu_dtype: Any = None,
    adam_nu_dtype: Any = None,
) -> optax.GradientTransformation:
  """Muon for hidden matrices, (Slim)AdamW for everything else.

  Matrix parameters (a spec in ``dims``; by default every Dense / attention /
  MLP / conv kernel, see `default_dims`):

  .. math::

    \\theta \\leftarrow \\theta - \\eta_t \\left( s \\cdot \\mathrm{NS}_T(\\tilde m_t)
    + \\lambda \\theta \\right)

  (`scale_by_muon`, then decoupled weight decay, then the learning rate).
  Token/position embeddings, the LM head / classifier, norms, biases and
  scalars go through `slimoptax.slim_adamw` with ``compress=adam_compress``
  (``None``: plain AdamW; ``"slimadam"`` or any preset / rules: SlimAdam).
  The routing is `optax.partition` with labels `muon_labels`.

  Args:
    learning_rate: Muon's learning rate (a float or schedule); Keller Jordan
      uses ~0.02 with ``rms_scale="jordan"``; with ``"moonlight"`` use an
      AdamW-sized rate shared with the fallback.
    beta: momentum decay.
    weight_decay: decoupled weight decay of the matrices (multiplied by the
      learning rate, as in optax and Moonlight's 0.1).
    nesterov: Nesterov momentum.
    bias_correction: see `scale_by_muon` (``True`` reproduces
      `optax.contrib.muon`).
    ns_steps: Newton–Schulz iterations.
    ns_coeffs: see `orthogonalize`.
    eps: Frobenius-norm epsilon.
    dims: matrix views, see `matrix_dims`; leaves with ``None`` go to AdamW.
    per_head: orthogonalize attention kernels per head.
    num_heads: head count for 2-D attention kernels with ``per_head``.
    rms_scale: ``"jordan"`` (``sqrt(max(1, fan_out/fan_in))``) or
      ``"moonlight"`` (``rms * sqrt(max(fan_in, fan_out))``), see
      `rms_scale_factor`.
    rms: Moonlight's target RMS (0.2).
    weight_decay_mask: mask for the matrices' weight decay (default: all).
    mu_dtype: Muon momentum dtype.
    dtype: Newton–Schulz dtype.
    precision: Newton–Schulz matmul precision.
    adam_learning_rate: the fallback's learning rate (default: ``learning_rate``).
    adam_b1: fallback first-moment decay.
    adam_b2: fallback second-moment decay.
    adam_eps: fallback epsilon.
    adam_weight_decay: fallback weight decay (default: ``weight_decay``).
    adam_weight_decay_mask: fallback decay mask (default: ``ndim >= 2``, i.e.
      embeddings and heads, not norms and biases).
    adam_nesterov: Nesterov momentum in the fallback.
    adam_compress: the fallback's second-moment compression: ``None``, a
      preset name (``"slimadam"``, ``"adam-mini"``, ...), `slimoptax.Rules`
      or a callable (a pytree of axes would have to match the masked tree).
    adam_mu_dtype: the fallback's first-moment dtype (default: the
      parameters').
    adam_nu_dtype: the fallback's second-moment dtype (default: the
      parameters').

  Returns:
    A `optax.GradientTransformation` (an `optax.partition`).

  Under `optax.inject_hyperparams`, name ``ns_steps`` in ``static_args`` (a
  Python loop count), as well as callable ``weight_decay_mask`` /
  ``adam_weight_decay_mask`` (inject_hyperparams takes callables for
  schedules)::

    tx = optax.inject_hyperparams(slimoptax.muon, static_args=("ns_steps",))(0.02)

  Example:
    >>> tx = slimoptax.muon(0.02, adam_learning_rate=3e-4, adam_compress="slimadam")
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  References:
    Jordan et al., Muon, 2024; Liu et al., Muon is Scalable for LLM Training,
    2025; Kalra et al., When Can You Get Away with Low Memory Adam?, 2025.
  """
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate
  if adam_weight_decay is None:
    adam_weight_decay = weight_decay
  labels_fn = lambda tree: muon_labels(tree, dims, per_head=per_head, num_heads=num_heads)
  return optax.partition(
      {
          "muon": optax.chain(
              scale_by_muon(beta, nesterov=nesterov, bias_correction=bias_correction,
                            ns_steps=ns_steps, ns_coeffs=ns_coeffs, eps=eps, dims=dims,
                            per_head=per_head, num_heads=num_heads, rms_scale=rms_scale, rms=rms,
                            mu_dtype=mu_dtype, dtype=dtype, precision=precision),
              optax.add_decayed_weights(weight_decay, weight_decay_mask),
              optax.scale_by_learning_rate(learning_rate),
          ),
          "adam": slim_adam.slim_adamw(
              adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay,
              compress=adam_compress, mask=adam_weight_decay_mask, mu_dtype=adam_mu_dtype,
              nu_dtype=adam_nu_dtype, nesterov=adam_nesterov, num_heads=num_heads),
      },
      labels_fn,
  )


__all__ = [
    "CUBIC_COEFFS", "EXCLUDED_LAYER_TYPES", "MuonDimensionNumbers", "NS_COEFFS", "QUINTIC_COEFFS",
    "RMS_SCALES", "ReshapedDims", "ScaleByMuonState", "default_dims", "matrix_dims",
    "matrix_shape", "muon", "muon_flop_overhead", "muon_labels", "newton_schulz",
    "newton_schulz_flops", "orthogonalize", "orthogonalize_leaf", "rms_scale_factor",
    "scale_by_matrix_shape", "scale_by_muon",
]
