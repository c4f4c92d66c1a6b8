"""Checkpointing optimizer states with orbax, with a shape check that names the parameter.

A slimoptax state is a pytree of arrays (no Python objects), so orbax saves
and restores it like parameters; sharded states restore onto their mesh when
the target carries shardings (`slimoptax.sharding.abstract_sharded_state`).

What the compression rules decide is the *shape* of a state leaf: a second
moment saved under ``"slimadam"`` is ``(d, 1)`` where ``compress=None`` expects
``(d, 4d)``. `restore_state` compares the saved shapes and dtypes with the
target's, path by path, before restoring, and raises a `StateMismatchError`
naming every differing path, instead of orbax's message about an unnamed array
(or, with padding allowed, a silent reshape).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from slimoptax import _tree

__all__ = ["StateMismatchError", "check_state_compatible", "restore_state", "saved_state_metadata"]


class StateMismatchError(ValueError):
  """A checkpoint does not match the optimizer state it is restored into."""


def _is_meta_leaf(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _metadata_tree(metadata: Any) -> Any:
  """The tree of per-leaf metadata inside orbax's (step / item / tree) metadata wrappers."""
  for attr in ("item_metadata", "tree"):
    inner = getattr(metadata, attr, None)
    if inner is not None and not _is_meta_leaf(metadata):
      metadata = inner
  return metadata


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_meta_leaf)
  out = {}
  for kp, leaf in leaves:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      shape = np.shape(leaf)
    dtype = getattr(leaf, "dtype", None)
    out[_tree.path_str(kp)] = (tuple(int(s) for s in shape),
                                    None if dtype is None else np.dtype(dtype))
  return out


def _is_manager(checkpointer: Any) -> bool:
  return hasattr(checkpointer, "all_steps") and hasattr(checkpointer, "item_metadata")


def saved_state_metadata(checkpointer: Any, path: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{path: (shape, dtype)}`` of a saved pytree, read from its metadata (no arrays loaded).

  Args:
    checkpointer: an orbax checkpointer with ``metadata(directory)`` (e.g.
      ``ocp.StandardCheckpointer()``) or an ``ocp.CheckpointManager`` (then
      ``path`` is the step).
    path: the checkpoint directory, or the step for a manager.

  Returns:
    A dict from ``"/"``-joined leaf path (as `slimoptax._tree.named_leaves`
    writes it: NamedTuple fields by name, tuple entries by index) to shape and
    dtype.
  """
  if _is_manager(checkpointer):
    metadata = checkpointer.item_metadata(path)
  else:
    metadata = checkpointer.metadata(os.fspath(path) if isinstance(path, os.PathLike) else path)
  return _shapes(_metadata_tree(metadata))


def check_state_compatible(
    saved: dict[str, tuple[tuple[int, ...], Any]],
    target: Any,
    *,
    allow_dtype_change: bool = False,
    where: str = "checkpoint",
) -> None:
  """Raises `StateMismatchError` unless ``saved`` has exactly ``target``'s paths and shapes.

  Args:
    saved: `saved_state_metadata` output.
    target: the expected state (arrays or `jax.ShapeDtypeStruct` s).
    allow_dtype_change: accept different dtypes (orbax casts on restore).
    where: how to name the checkpoint in the message.

  Raises:
    StateMismatchError: listing each differing path with saved and expected
      shape / dtype, leaves only in the checkpoint and leaves only in the
      target.
  """
  expected = _shapes(target)
  problems = []
  for path, (shape, dtype) in expected.items():
    if path not in saved:
      problems.append(f"{path!r}: expected {shape} {dtype}, missing from the {where}")
      continue
    s_shape, s_dtype = saved[path]
    if s_shape != shape:
      problems.append(f"{path!r}: saved with shape {s_shape}, the target expects {shape}")
    elif not allow_dtype_change and s_dtype is not None and dtype is not None and s_dtype != dtype:
      problems.append(f"{path!r}: saved as {s_dtype}, the target expects {dtype}")
  problems += [f"{path!r}: in the {where} (shape {saved[path][0]}) but not in the target"
               for path in saved if path not in expected]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise StateMismatchError(
        f"the {where} does not match the optimizer state it is restored into "
        f"({len(problems)} difference(s)):\n  {shown}{more}\n"
        "Was it written with other compression rules (compress= / factored_axes= / dims=), "
        "another optimizer, or for other parameters? Build the optimizer exactly as when it "
        "was saved (or re-initialise the state).")


def restore_state(
    checkpointer: Any,
    path: Any,
    target_abstract_state: Any,
    *,
    allow_dtype_change: bool = False,
) -> Any:
  """Restores a pytree (an optimizer state, or ``{"params": ..., "opt_state": ...}``), checked.

  Every saved leaf's shape (and dtype) is compared with the target's first;
  a checkpoint written under other compression rules raises a
  `StateMismatchError` naming the parameter paths, never a silent reshape.

  Args:
    checkpointer: ``ocp.StandardCheckpointer()`` (``path`` = directory) or an
      ``ocp.CheckpointManager`` holding one standard item (``path`` = step).
    path: the directory or step.
    target_abstract_state: the expected tree of `jax.ShapeDtypeStruct` (or
      arrays), e.g. ``slimoptax.abstract_state(tx, params)`` or, for sharded
      restores, `slimoptax.sharding.abstract_sharded_state`: the restored
      arrays take its shardings.
    allow_dtype_change: restore into other dtypes (orbax casts).

  Returns:
    The restored tree, with ``target_abstract_state``'s structure.

  Raises:
    StateMismatchError: if paths, shapes or dtypes differ.

  Example:
    >>> import tempfile, jax.numpy as jnp, slimoptax
    >>> import orbax.checkpoint as ocp
    >>> params = {"dense": {"kernel": jnp.ones((4, 8))}}
    >>> tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
    >>> path = tempfile.mkdtemp() + "/state"
    >>> checkpointer = ocp.StandardCheckpointer()
    >>> checkpointer.save(path, tx.init(params))
    >>> checkpointer.wait_until_finished()
    >>> restored = slimoptax.restore_state(checkpointer, path, slimoptax.abstract_state(tx, params))
    >>> restored[0].nu["dense"]["kernel"].shape
    (4, 1)
    >>> other = slimoptax.abstract_state(slimoptax.slim_adamw(1e-3), params)  # uncompressed
    >>> slimoptax.restore_state(checkpointer, path, other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    slimoptax.checkpoint.StateMismatchError: ...
  """
  saved = saved_state_metadata(checkpointer, path)
  where = f"checkpoint {'step' if _is_manager(checkpointer) else 'at'} {path}"
  check_state_compatible(saved, target_abstract_state, allow_dtype_change=allow_dtype_change,
                         where=where)
  if _is_manager(checkpointer):
    import orbax.checkpoint as ocp
    return checkpointer.restore(path, args=ocp.args.StandardRestore(target_abstract_state))
  return checkpointer.restore(path, target_abstract_state)
