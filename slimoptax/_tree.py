"""Pytree plumbing shared by every transform: key paths, path-named checks, per-leaf maps.

Every slimoptax transform reads its parameter tree through these functions, so
that a parameter is always named the same way (``"/"``-joined key path, the
trailing ``.value`` of an NNX Variable dropped) and every mismatch between a
state and the updates it is applied to raises the same kind of error, naming
the parameter path and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _key_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: Sequence[Any]) -> str:
  """Joins a JAX key path into a ``"/"``-separated string.

  Args:
    key_path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    e.g. ``"params/Dense_0/kernel"``. The trailing ``.value`` attribute of an
    `nnx.Variable` leaf is dropped, so an NNX state gives
    ``"blocks/0/attn/query/kernel"``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slimoptax._tree import path_str
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
    ...     {"Dense_0": {"kernel": jnp.zeros(2)}})[0]]
    ['Dense_0/kernel']
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name in ("value", "raw_value"):
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def named_leaves(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """Returns ``[(path, leaf), ...]`` of a pytree, paths joined by ``"/"``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import named_leaves
    >>> [p for p, _ in named_leaves({"a": jnp.zeros(1), "b": [jnp.zeros(2)]})]
    ['a', 'b/0']
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), leaf) for p, leaf in leaves]


def shape_of(leaf: Any) -> tuple[int, ...]:
  """The shape of an array, a `jax.ShapeDtypeStruct` or a Python number, as ints."""
  shape = getattr(leaf, "shape", None)
  if shape is None:
    shape = np.shape(leaf)
  return tuple(int(s) for s in shape)


def _prefix_paths(spec: Any) -> list[str]:
  """Paths of ``spec`` down to tuples (treated as leaves)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      spec, is_leaf=lambda x: isinstance(x, tuple) or x is None)
  return [path_str(p) for p, _ in leaves]


def leaves_like(tree: Any, spec: Any, *, what: str) -> list[Any]:
  """Flattens ``spec`` up to the structure of ``tree``, with a path-named error.

  ``spec`` must have the same structure as ``tree`` down to ``tree``'s leaves;
  below them it may hold anything (e.g. tuples of axes). This is how every "pytree
  matching the params" argument and every state tree is read.

  Args:
    tree: the reference pytree (parameters or updates).
    spec: a pytree with ``tree``'s structure.
    what: the argument's name, for the error message.

  Returns:
    The list of ``spec`` subtrees at ``tree``'s leaf positions.

  Raises:
    ValueError: naming the paths that differ when the structures do not match.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import leaves_like
    >>> leaves_like({"w": jnp.zeros(2)}, {"w": (0,)}, what="compress")
    [(0,)]
  """
  treedef = jax.tree_util.tree_structure(tree)
  try:
    return treedef.flatten_up_to(spec)
  except (ValueError, TypeError) as err:
    tree_paths = [p for p, _ in named_leaves(tree)]
    spec_paths = _prefix_paths(spec)
    missing = [p for p in tree_paths if not any(p == s or p.startswith(s + "/") for s in spec_paths)]
    extra = [s for s in spec_paths if not any(p == s or p.startswith(s + "/") for p in tree_paths)]
    raise ValueError(
        f"`{what}` does not match the parameter tree: parameters without an entry: "
        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; entries without a parameter: "
        f"{extra[:5]}{' ...' if len(extra) > 5 else ''}. ({err})"
    ) from None


def is_param_like(spec: Any, params: Any) -> bool:
  """Whether ``spec`` has ``params``' structure down to ``params``' leaves."""
  try:
    jax.tree_util.tree_structure(params).flatten_up_to(spec)
    return True
  except (ValueError, TypeError):
    return False


def check_float_params(params: Any, *, what: str = "params") -> None:
  """Raises a ValueError naming the path of any parameter that is not real floating point.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import check_float_params
    >>> check_float_params({"step": jnp.zeros((), jnp.int32)})
    Traceback (most recent call last):
    ...
    ValueError: params 'step' has dtype int32; slimoptax transforms take floating-point parameters (integer parameters have no gradient: exclude them with optax.masked)
  """
  for path, leaf in named_leaves(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"{what} {path!r} is complex ({dtype}); slimoptax transforms take real floating-point "
          "parameters")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{what} {path!r} has dtype {dtype}; slimoptax transforms take floating-point "
          "parameters (integer parameters have no gradient: exclude them with optax.masked)")


def canonical_dtype(dtype: Any) -> Any:
  """``None`` stays ``None`` (meaning "the parameters' dtype"); anything else is canonicalized."""
  return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def zeros_like_tree(params: Any, dtype: Any = None) -> Any:
  """Zeros shaped like each parameter, in ``dtype`` (default: each parameter's own)."""
  return jax.tree.map(lambda p: jnp.zeros(shape_of(p), dtype or p.dtype), params)


def state_leaves(
    updates: Any,
    state_tree: Any,
    *,
    name: str,
    shapes: Sequence[tuple[int, ...] | None] | None = None,
    source: str = "the update",
) -> list[Any]:
  """The leaves of one state tree, aligned with ``updates`` and checked leaf by leaf.

  This is the check every ``update_fn`` makes before using its state: the state
  must have the updates' structure (a missing or extra parameter is named) and
  each leaf the expected shape (``shapes``, default: the update's own; ``None``
  for a leaf that must be absent).

  Args:
    updates: the updates (gradients) passed to ``update``.
    state_tree: one field of the transform's state (``mu``, ``nu``, ...).
    name: what the field is, for the error (``"first moment"``).
    shapes: the expected shape per leaf, in ``updates``' leaf order.
    source: where the expected shapes come from, for the error.

  Returns:
    The state's leaves in ``updates``' leaf order.

  Raises:
    ValueError: naming the parameter path whose state does not fit.
  """
  leaves = leaves_like(updates, state_tree, what=f"state ({name})")
  named = named_leaves(updates)
  for i, ((path, g), s) in enumerate(zip(named, leaves)):
    want = shape_of(g) if shapes is None else shapes[i]
    have = None if s is None else shape_of(s)
    if have != (None if want is None else tuple(want)):
      raise ValueError(
          f"{name} of {path!r} has shape {have} but {source} gives "
          f"{None if want is None else tuple(want)}: the state was created for other parameters "
          "(or under other rules)")
  return leaves


def map_update(
    fn: Callable[..., tuple[Any, ...]],
    updates: Any,
    *state_trees: Any,
    names: Sequence[str],
    shapes: Sequence[Sequence[tuple[int, ...] | None] | None] | None = None,
    num_outputs: int,
    source: str = "the update",
    extra: Sequence[Sequence[Any]] = (),
) -> tuple[Any, ...]:
  """Applies ``fn(path, g, *state_leaves, *extra_leaves) -> tuple`` leaf by leaf.

  The per-leaf helper of every ``update_fn``: each state tree is checked with
  `state_leaves` (structure and shapes, path-named errors), then ``fn`` runs on
  each parameter, and its outputs (one tuple per leaf) are reassembled into
  trees with ``updates``' structure (``None`` outputs stay ``None``).

  Args:
    fn: the per-leaf update.
    updates: the updates tree.
    *state_trees: state fields with ``updates``' structure.
    names: one name per state tree, for errors.
    num_outputs: the length of ``fn``'s tuple.
    shapes: per state tree, the expected shapes per leaf (``None``: the update's).
    source: where the expected shapes come from, for errors.
    extra: further per-leaf lists (already aligned, e.g. resolved axes).

  Returns:
    A tuple of trees, one per output of ``fn``.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import map_update
    >>> g, m = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
    >>> u, new_m = map_update(lambda path, g, m: (g + m, 0.9 * m + g), g, m,
    ...                        names=["mu"], num_outputs=2)
    >>> new_m["w"].tolist()
    [1.0, 1.0]
  """
  if len(names) != len(state_trees):
    raise ValueError("map_update: give one name per state tree")
  shapes = shapes or [None] * len(state_trees)
  aligned = [state_leaves(updates, t, name=n, shapes=s, source=source)
             for t, n, s in zip(state_trees, names, shapes)]
  named = named_leaves(updates)
  treedef = jax.tree_util.tree_structure(updates)
  outs = [fn(path, g, *leaves) for (path, g), *leaves in zip(named, *aligned, *extra)]
  cols = list(zip(*outs)) if outs else [()] * num_outputs
  if len(cols) != num_outputs:
    raise ValueError(f"map_update: fn returned {len(cols)} outputs, expected {num_outputs}")
  return tuple(jax.tree_util.tree_unflatten(treedef, list(col)) for col in cols)


__all__ = [
    "canonical_dtype", "check_float_params", "is_param_like", "leaves_like", "map_update",
    "named_leaves", "path_str", "shape_of", "state_leaves", "zeros_like_tree",
]
