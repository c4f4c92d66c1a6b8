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
import optax


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


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  return getattr(node, key.name) if isinstance(key, jax.tree_util.GetAttrKey) else node[key.key]


def check_lists(params: Any, spec: Any, what: str) -> None:
  """Raises a path-named error where ``spec``'s lists / tuples do not line up with ``params``' nodes."""
  for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    pnode, node = params, spec
    for depth, key in enumerate(key_path):
      at = f"{what} at {path_str(key_path[:depth])!r}" if depth else f"{what} at the top level"
      ours = f"(parameter {path_str(key_path)!r})"
      lists = "give axes as tuples (lists are pytree nodes)" if isinstance(node, list) else ""
      if is_axes_entry(node):
        raise ValueError(f"{at} is the axes {node!r}, but the parameters there are a "
                         f"{type(pnode).__name__}, not one array {ours}: give one entry per "
                         f"parameter{'; ' + lists if lists else ''}")
      if (isinstance(pnode, (list, tuple)) and isinstance(node, (list, tuple))
          and isinstance(pnode, list) != isinstance(node, list)):
        raise ValueError(f"{at} is a {type(node).__name__} where the parameters have a "
                         f"{type(pnode).__name__} {ours}: {lists or 'give lists as in the parameters'}")
      try:
        pnode, node = _child(pnode, key), _child(node, key)
      except (KeyError, IndexError, AttributeError, TypeError):
        break  # another mismatch: `leaves_like` names it


def is_axes_entry(node: Any) -> bool:
  return (isinstance(node, (list, tuple)) and not hasattr(node, "_fields") and bool(node)
          and all(isinstance(a, (int, np.integer)) for a in node))


def is_param_like(spec: Any, params: Any) -> bool:
  """Whether ``spec`` has ``params``' structure down to ``params``' leaves."""
  try:
    jax.tree_util.tree_structure(params).flatten_up_to(spec)
    return True
  except (ValueError, TypeError):
    return False


def check_float_params(params: Any, *, what: str = "params") -> None:
  """Raises a ValueError naming the path of any parameter that is not a real floating-point array.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import check_float_params
    >>> check_float_params({"step": jnp.zeros((), jnp.int32)})
    Traceback (most recent call last):
    ...
    ValueError: params 'step' has dtype int32; slimoptax transforms take floating-point parameters (integer parameters have no gradient: exclude them with optax.masked)

  A Python number is not an array (it has no dtype or sharding of its own, and
  ``optax.apply_updates`` would turn it into one): it is refused by path.
  """
  for path, leaf in named_leaves(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
      raise ValueError(
          f"{what} {path!r} is a Python {type(leaf).__name__} ({leaf!r}), not an array; "
          "slimoptax transforms take arrays as parameters: wrap it, e.g. jnp.asarray(1.0)")
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"{what} {path!r} is complex ({dtype}); slimoptax transforms take real floating-point "
          "parameters")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{what} {path!r} has dtype {dtype}; slimoptax transforms take floating-point "
          "parameters (integer parameters have no gradient: exclude them with optax.masked)")


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


# --------------------------------------------------------------------------
# Construction-time checks of hyperparameters, dtypes and states.
# --------------------------------------------------------------------------


def _concrete(value: Any) -> float | None:
  """``value`` as a Python float, or ``None`` when it cannot be read (traced, a schedule, None)."""
  if value is None or callable(value):
    return None
  try:
    return float(np.asarray(value))
  except Exception:  # a tracer (optax.inject_hyperparams under jit) or a non-scalar
    return None


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = True) -> None:
  """Refuses a concrete hyperparameter outside ``[low, high)`` (by default), naming it.

  Traced values (`optax.inject_hyperparams` under jit), schedules and ``None``
  are not checked: they cannot be read at construction.

  Args:
    name: the argument's name, for the error.
    value: the hyperparameter.
    low, high: the bounds (``None``: unbounded).
    low_open, high_open: exclude the bound (default ``[low, high)``).

  Raises:
    ValueError: naming ``name``, the value and the allowed range.

  Example:
    >>> from slimoptax._tree import check_range
    >>> check_range("b2", 0.95, 0.0, 1.0)
    >>> check_range("b1", 1.0, 0.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: b1 must be in [0.0, 1.0), got 1.0
  """
  x = _concrete(value)
  if x is None:
    return
  too_low = low is not None and (x <= low if low_open else x < low)
  too_high = high is not None and (x >= high if high_open else x > high)
  if too_low or too_high or x != x:
    lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be in {lo}, {hi}, got {value}")


def static_int(name: str, value: Any, low: int | None = None) -> Any:
  """An integer argument that picks shapes or loop counts: a Python int, ``>= low``.

  `optax.inject_hyperparams` turns every int argument into a (traced) array;
  such an argument must be named in its ``static_args``. ``None`` passes.

  Raises:
    ValueError: naming ``name`` (an array, a non-integer, or below ``low``).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import static_int
    >>> static_int("num_heads", jnp.asarray(4))
    Traceback (most recent call last):
    ...
    ValueError: num_heads must be a Python int, got an array (int32): it sets shapes or a loop count, which cannot be traced; under optax.inject_hyperparams name it in static_args=("num_heads",)
  """
  if value is None:
    return None
  if isinstance(value, (jax.Array, np.ndarray)) or isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a Python int, got an array ({value.dtype}): it sets shapes or a loop "
        f"count, which cannot be traced; under optax.inject_hyperparams name it in "
        f"static_args=({name!r},)".replace("'", '"'))
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}")
  return int(value)


def float_dtype(name: str, dtype: Any) -> Any:
  """A state dtype argument (``mu_dtype``, ...): ``None`` or a real floating dtype, canonicalized.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import float_dtype
    >>> float_dtype("mu_dtype", jnp.int32)
    Traceback (most recent call last):
    ...
    ValueError: mu_dtype must be a real floating-point dtype (or None), got int32
  """
  if dtype is None:
    return None
  try:
    canon = jax.dtypes.canonicalize_dtype(dtype)
  except TypeError:
    raise ValueError(f"{name} must be a real floating-point dtype (or None), got {dtype!r}") from None
  if not jnp.issubdtype(canon, jnp.floating):
    raise ValueError(f"{name} must be a real floating-point dtype (or None), got {canon}")
  return canon


def _describe(state: Any) -> str:
  if type(state) is tuple:
    return f"tuple ({', '.join(type(s).__name__ for s in state)})"
  return type(state).__name__


def check_state(state: Any, cls: type, *, who: str) -> None:
  """Refuses a state of another type than ``cls`` (made by another optimizer), naming both.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from slimoptax._tree import check_state
    >>> check_state(optax.sgd(1.0, momentum=0.9).init(jnp.zeros(2))[0], optax.EmptyState,
    ...             who="orthogonalize")
    Traceback (most recent call last):
    ...
    ValueError: slimoptax.orthogonalize got a TraceState state; expected EmptyState: was the state created by another optimizer (or another transform of the chain)?
  """
  same = isinstance(state, cls) or (
      type(state).__name__ == cls.__name__ and getattr(state, "_fields", None) == cls._fields)
  if not same:
    raise ValueError(
        f"slimoptax.{who} got a {_describe(state)} state; expected {cls.__name__}: was the "
        "state created by another optimizer (or another transform of the chain)?")


def checked_chain(who: str, *transforms: Any) -> Any:
  """`optax.chain` whose ``update`` refuses, by name, a state that is not its tuple of states."""
  inner = optax.chain(*transforms)

  def update_fn(updates, state, params=None, **extra_args):
    if type(state) is not tuple or len(state) != len(transforms):
      raise ValueError(
          f"slimoptax.{who} got a {_describe(state)} state; expected a tuple of "
          f"{len(transforms)} states (an optax.chain): was the state created by another "
          "optimizer?")
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def safe_mean(x: jax.Array, axis: Any, keepdims: bool = False) -> jax.Array:
  """``jnp.mean``, but 0 (not NaN) over axes of size 0 (a zero-size parameter's statistics).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._tree import safe_mean
    >>> safe_mean(jnp.ones((3, 0)), 1).tolist()
    [0.0, 0.0, 0.0]
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(x.shape[a] == 0 for a in axes):
    return jnp.sum(x, axis=axes, keepdims=keepdims)  # zeros of the reduced shape
  return jnp.mean(x, axis=axes, keepdims=keepdims)


__all__ = [
    "check_float_params", "check_range", "check_state", "checked_chain",
    "float_dtype", "is_param_like", "leaves_like", "map_update", "named_leaves", "path_str",
    "safe_mean", "shape_of", "state_leaves", "static_int", "zeros_like_tree",
]
