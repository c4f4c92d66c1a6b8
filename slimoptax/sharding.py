"""Optimizer states that follow the parameters' sharding.

A state leaf that belongs to a parameter (a first moment, a compressed second
moment, a factored row statistic, ...) gets the parameter's `NamedSharding`
with every dimension that the optimizer reduced dropped from the spec: a
compressed second moment ``nu`` of shape ``(d, 1)`` for a kernel ``(d, 4d)``
sharded ``P("data", "model")`` gets ``P("data", None)``. It stays spread over
the mesh like its parameter (never gathered onto one device); only the size-1
dimension is replicated. Leaves that belong to no parameter (``count``, PRNG
keys, injected hyperparameters) are replicated.

Which parameter a state leaf belongs to is read off ``tx.init`` with
`optax.tree_map_params` (the state fields ``init`` fills with a copy of the
parameter tree: ``mu``, ``nu``, ...); for an ``init`` that cannot run on
optax's placeholder, from the state's paths instead (`param_index`: a leaf at
``.../nu/<param path>`` inside a subtree holding exactly the parameters' paths
belongs to ``<param path>``). Its spec is then derived from shapes alone:

* same rank as the parameter: dimension ``i`` keeps the parameter's entry if
  its size is unchanged (and still divisible by the mesh axes), else ``None``
  (averaged / size-1 dimensions);
* one dimension fewer (a factored statistic, e.g. Adafactor's ``v_row``): the
  removed dimension is found from the shapes and the others keep their
  entries; where the shapes leave it ambiguous which dimension was removed
  (equal sizes) only the entries every reading agrees on are kept;
* anything else (e.g. a `slimoptax.Reshaped` head view): replicated.
* Shampoo's and SOAP's per-axis factors (`slimoptax.shampoo`'s statistics
  and roots, `slimoptax.soap`'s statistics and eigenbases: ``(d_i, d_i)``,
  ``(batch, d_i, d_i)`` under ``dims``, in a tuple per parameter) are no copy
  of the parameter tree, so they belong to no parameter and are replicated,
  also along an axis the parameter shards (each device holds ``sum_i d_i^2``
  entries per matrix and runs its ``eigh`` / QR whole); their graft / inner
  Adam moments are copies and follow the rules above.

A quantized leaf (`slimoptax.QuantizedArray`, `slimoptax.quantize_state`)
belongs to its parameter as a whole, and each of its arrays follows the same
rule: 8-bit codes, of the parameter's shape, keep its spec; 4-bit codes (last
dimension halved) and the per-block scales drop the last dimension's entry.

Dropping an entry is always safe (the program computes the same numbers; a
dimension is merely not split); it never moves a whole large leaf to one
device.

`init_sharded` creates the state directly with these shardings under
`jax.jit` from abstract shapes, so a large model's optimizer state is never
materialised unsharded (nor on one host in a multi-process run).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from slimoptax import _codecs, _tree

__all__ = [
    "abstract_sharded_state", "init_sharded", "param_index", "reduced_spec", "state_shardings",
]


def _is_empty(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _is_param_node(x: Any) -> bool:
  """A parameter's state leaf: an array, or a `slimoptax.QuantizedArray` (codes and scales) whole."""
  return _is_empty(x) or _codecs.is_quantized(x)


def _for_each_array(leaf: Any, value: Any) -> Any:
  """``value`` in place of ``leaf``, or of each array of a `slimoptax.QuantizedArray`."""
  return jax.tree.map(lambda _: value, leaf) if _codecs.is_quantized(leaf) else value


def _dtype(p: Any) -> Any:
  dtype = getattr(p, "dtype", None)
  return dtype if dtype is not None else jnp.result_type(p)


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (no sharding) for arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), _dtype(p)), tree)


def _entries(spec: PartitionSpec, ndim: int, path: str) -> list[Any]:
  entries = list(spec)
  if len(entries) > ndim:
    raise ValueError(
        f"sharding of parameter {path!r}: spec {spec} has {len(entries)} entries but the "
        f"parameter has rank {ndim}")
  return entries + [None] * (ndim - len(entries))


def _check_divides(path: str, shape: tuple[int, ...], sharding: NamedSharding) -> None:
  """Refuses a parameter spec whose mesh axes do not divide the dimension (as `jax.device_put`)."""
  entries = _entries(sharding.spec, len(shape), path)
  for dim, (size, entry) in enumerate(zip(shape, entries)):
    n = _axis_size(sharding.mesh, entry)
    if size % n:
      raise ValueError(
          f"sharding of parameter {path!r}: dimension {dim} (size {size}) is not divisible by "
          f"mesh axis {entry!r} (size {n}) of spec {sharding.spec}; JAX cannot place the "
          "parameter with this sharding either")


def _axis_size(mesh: Any, entry: Any) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(int(mesh.shape[n]) for n in names)


def _removed_axis_maps(leaf_shape: tuple[int, ...], param_shape: tuple[int, ...]) -> list[list[int]]:
  """Readings of ``leaf_shape`` as ``param_shape`` with one axis removed (leaf dim -> param dim)."""
  out = []
  for a in range(len(param_shape)):
    if param_shape[:a] + param_shape[a + 1:] == leaf_shape:
      out.append([j if j < a else j + 1 for j in range(len(leaf_shape))])
  return out


def reduced_spec(
    leaf_shape: Sequence[int],
    param_shape: Sequence[int],
    param_spec: PartitionSpec,
    mesh: Any,
    *,
    path: str = "<param>",
) -> PartitionSpec:
  """The spec of a state leaf derived from its parameter's (see the module docstring).

  Args:
    leaf_shape: the state leaf's shape.
    param_shape: the parameter's shape.
    param_spec: the parameter's `PartitionSpec`.
    mesh: the mesh (for axis sizes: an entry is kept only where it divides).
    path: the parameter's path, for errors.

  Returns:
    A `PartitionSpec` with one entry per dimension of ``leaf_shape``.

  Example:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from slimoptax.sharding import reduced_spec
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> reduced_spec((16, 1), (16, 64), P("data", "model"), mesh) == P("data", None)
    True
  """
  leaf_shape = tuple(int(s) for s in leaf_shape)
  param_shape = tuple(int(s) for s in param_shape)
  entries = _entries(param_spec, len(param_shape), path)

  def keep(j: int, i: int | None) -> Any:
    if i is None or leaf_shape[j] != param_shape[i] or leaf_shape[j] == 1:
      return None
    entry = entries[i]
    return entry if leaf_shape[j] % _axis_size(mesh, entry) == 0 else None

  if len(leaf_shape) == len(param_shape):
    return PartitionSpec(*[keep(j, j) for j in range(len(leaf_shape))])
  if len(leaf_shape) == len(param_shape) - 1:
    readings = _removed_axis_maps(leaf_shape, param_shape)
    if readings:
      per_reading = [[keep(j, m[j]) for j in range(len(leaf_shape))] for m in readings]
      return PartitionSpec(*[
          col[0] if all(c == col[0] for c in col) else None for col in zip(*per_reading)])
  return PartitionSpec(*([None] * len(leaf_shape)))


def _param_shardings_list(params: Any, param_shardings: Any, mesh: Any) -> list[NamedSharding]:
  named = _tree.named_leaves(params)
  if param_shardings is None:
    out = []
    for path, p in named:
      sharding = getattr(p, "sharding", None)
      if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"parameter {path!r} has no NamedSharding ({type(sharding).__name__}); pass "
            "`param_shardings` (a pytree of NamedSharding or, with `mesh=`, of PartitionSpec)")
      out.append(sharding)
    return out
  if isinstance(param_shardings, (NamedSharding, PartitionSpec)):
    per_leaf = [param_shardings] * len(named)
  else:
    per_leaf = _tree.leaves_like(params, param_shardings, what="param_shardings")
  out = []
  for (path, _), s in zip(named, per_leaf):
    if isinstance(s, PartitionSpec):
      if mesh is None:
        raise ValueError(
            f"param_shardings gives a PartitionSpec for {path!r}; pass `mesh=` too (or give "
            "NamedShardings)")
      s = NamedSharding(mesh, s)
    if not isinstance(s, NamedSharding):
      raise TypeError(
          f"param_shardings for {path!r}: expected a NamedSharding or PartitionSpec, got {s!r}")
    out.append(s)
  return out


def param_index(state: Any, params: Any) -> Any:
  """For each leaf of ``state``: the index (in ``params``' leaf order) of its parameter, or ``None``.

  A leaf belongs to parameter ``p`` when it sits at ``prefix + path(p)`` and
  the subtree at ``prefix`` holds exactly the parameters' paths (a copy of the
  parameter tree: ``mu``, ``nu``, masked copies with `optax.MaskedNode`,
  factored statistics with ``None`` where absent).

  Args:
    state: an optimizer state (arrays or `jax.ShapeDtypeStruct` s).
    params: the parameters.

  Returns:
    A pytree like ``state`` (``None`` / `optax.MaskedNode` kept) whose leaves
    are ints or ``None``.
  """
  p_paths = [tuple(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  p_set = frozenset(p_paths)
  p_pos = {kp: i for i, kp in enumerate(p_paths)}
  flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_param_node)
  suffixes: dict[tuple, set] = {}
  for kp, _ in flat:
    kp = tuple(kp)
    for k in range(len(kp) + 1):
      suffixes.setdefault(kp[:k], set()).add(kp[k:])
  copies = {prefix for prefix, s in suffixes.items() if s == p_set}
  out = []
  for kp, leaf in flat:
    kp = tuple(kp)
    idx = None
    if not _is_empty(leaf) and p_set:
      for k in range(len(kp) + 1):  # shortest prefix first = longest parameter path
        if kp[:k] in copies and kp[k:] in p_pos:
          idx = p_pos[kp[k:]]
          break
    out.append(leaf if _is_empty(leaf) else _for_each_array(leaf, idx))
  return jax.tree_util.tree_unflatten(treedef, out)


def _param_index_optax(tx: Any, state: Any, params: Any) -> Any:
  """`param_index` read off ``tx.init`` itself with `optax.tree_map_params`.

  optax initialises ``tx`` on a placeholder tree and maps over the state fields
  that ``init`` filled with a copy of it: exact, where `param_index` infers the
  copies from paths. Raises if ``tx.init`` cannot run on the placeholder.
  """
  treedef = jax.tree.structure(params)
  numbered = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
  with warnings.catch_warnings():  # rules "match no parameter" of the empty placeholder
    warnings.simplefilter("ignore")
    mapped = optax.tree_map_params(
        tx, lambda leaf, i: leaf if _is_empty(leaf) else _for_each_array(leaf, _Index(i)), state,
        numbered, transform_non_params=lambda _: None, is_leaf=_is_param_node)
  out = jax.tree.map(lambda leaf, m: leaf if _is_empty(leaf) else (m.i if isinstance(m, _Index) else None),
                     state, mapped, is_leaf=_is_empty)
  return out


class _Index:
  """A parameter index as an opaque pytree leaf."""

  def __init__(self, i: int):
    self.i = int(i)


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: Any = None,
) -> Any:
  """The `NamedSharding` of every leaf of ``tx``'s state, following the parameters'.

  Args:
    tx: any optax transformation (slimoptax or not; chains, `optax.partition`,
      `optax.masked`, `optax.inject_hyperparams`, `optax.MultiSteps` ...).
    params: the parameters, as arrays or `jax.ShapeDtypeStruct` s (only
      shapes and dtypes are read; ``tx.init`` is evaluated abstractly).
    param_shardings: a pytree like ``params`` of `NamedSharding` (or of
      `PartitionSpec` with ``mesh=``), one sharding for all, or ``None`` to
      take the ``.sharding`` of ``params``' arrays.
    mesh: the mesh for `PartitionSpec` s and for replicated leaves (default:
      the first parameter's mesh).

  Returns:
    A pytree like the state (``None`` / `optax.MaskedNode` kept) of
    `NamedSharding`: a parameter's statistics get its spec with reduced or
    size-1 dimensions set to ``None`` (`reduced_spec`); other leaves
    (``count``, keys, hyperparameters) ``PartitionSpec()`` (replicated).

  Raises:
    ValueError: naming the parameter path when a sharding is missing or does
      not fit the parameter (a spec longer than its rank, or a mesh axis that
      does not divide its dimension: naming the dimension and the axis), or
      when no mesh can be found. Only the parameters' own specs are checked:
      a state leaf whose reduced dimension no longer divides gets ``None``
      there (`reduced_spec`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, slimoptax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> params = {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((16, 64), jnp.float32)}}}
    >>> param_shardings = {"mlp": {"up": {"kernel": NamedSharding(mesh, P("data", "model"))}}}
    >>> tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
    >>> shardings = slimoptax.state_shardings(tx, params, param_shardings)
    >>> shardings[0].nu["mlp"]["up"]["kernel"].spec == P("data", None)  # nu (16, 1): fan_out averaged
    True
    >>> mesh8 = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
    >>> slimoptax.state_shardings(tx, {"w": jax.ShapeDtypeStruct((16, 6), jnp.float32)},
    ...                           {"w": P("data", "model")}, mesh=mesh8)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sharding of parameter 'w': dimension 1 (size 6) is not divisible by mesh axis 'model' (size 4) ...
  """
  shardings = _param_shardings_list(params, param_shardings, mesh)
  named = _tree.named_leaves(params)
  shapes = [tuple(int(s) for s in jnp.shape(p)) for _, p in named]
  for (path, _), shape, s in zip(named, shapes, shardings):
    _check_divides(path, shape, s)
  if mesh is None:
    if not shardings:
      raise ValueError(
          "state_shardings: the parameter tree is empty, so no mesh can be read from it; pass "
          "`mesh=`")
    mesh = shardings[0].mesh
  abstract = jax.eval_shape(tx.init, _abstract(params))
  try:
    index = _param_index_optax(tx, abstract, params)
  except Exception:  # an init that needs real leaves: infer the parameter copies from paths
    index = param_index(abstract, params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(leaf, idx):
    if _is_empty(leaf):
      return leaf
    if idx is None:
      return replicated
    ps = shardings[idx]
    spec = reduced_spec(jnp.shape(leaf), shapes[idx], ps.spec, ps.mesh, path=named[idx][0])
    return NamedSharding(ps.mesh, spec)

  return jax.tree.map(one, abstract, index, is_leaf=_is_empty)


def abstract_sharded_state(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: Any = None,
) -> Any:
  """``jax.eval_shape(tx.init, params)`` with each leaf's `state_shardings` attached.

  The restore target of a sharded optimizer state (see
  `slimoptax.checkpoint.restore_state`).
  """
  shardings = state_shardings(tx, params, param_shardings, mesh=mesh)
  abstract = jax.eval_shape(tx.init, _abstract(params))
  return jax.tree.map(
      lambda a, s: a if _is_empty(a) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings, is_leaf=_is_empty)


def init_sharded(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any = None,
    *,
    mesh: Any = None,
) -> Any:
  """``tx.init`` compiled with ``out_shardings=state_shardings(...)``: a state born sharded.

  Args:
    tx: the transformation.
    params: `jax.ShapeDtypeStruct` s (e.g. ``jax.eval_shape(model.init, ...)``)
      or arrays. From abstract parameters, ``tx.init`` runs under `jax.jit` on
      zeros created inside the computation with the parameters' shardings, so
      nothing is materialised unsharded; this needs an ``init`` that reads only
      shapes and dtypes (true of every slimoptax transform and of optax's Adam
      family). Concrete arrays are passed in, for inits that read values.
    param_shardings: see `state_shardings` (default: ``params``' own).
    mesh: see `state_shardings`.

  Returns:
    The optimizer state, every leaf a `jax.Array` with the sharding of
    `state_shardings`.

  Raises:
    ValueError: see `state_shardings` (e.g. a parameter whose mesh axis does
      not divide its dimension, naming the parameter, dimension and axis).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, slimoptax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> abstract = jax.eval_shape(lambda: {"up": {"kernel": jnp.zeros((16, 64))}})
    >>> param_shardings = {"up": {"kernel": NamedSharding(mesh, P("data", "model"))}}
    >>> tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
    >>> opt_state = slimoptax.init_sharded(tx, abstract, param_shardings)
    >>> nu = opt_state[0].nu["up"]["kernel"]
    >>> nu.shape, nu.sharding.spec == P("data", None)
    ((16, 1), True)
  """
  out_shardings = state_shardings(tx, params, param_shardings, mesh=mesh)
  leaves = jax.tree.leaves(params)
  if leaves and all(isinstance(p, jax.Array) for p in leaves):
    return jax.jit(tx.init, out_shardings=out_shardings)(params)
  p_shardings = _param_shardings_list(params, param_shardings, mesh)
  treedef = jax.tree.structure(params)
  abstract_leaves = [jax.ShapeDtypeStruct(jnp.shape(p), _dtype(p)) for p in leaves]

  def make():
    zeros = [jax.lax.with_sharding_constraint(jnp.zeros(a.shape, a.dtype), s)
             for a, s in zip(abstract_leaves, p_shardings)]
    return tx.init(jax.tree.unflatten(treedef, zeros))

  return jax.jit(make, out_shardings=out_shardings)()
