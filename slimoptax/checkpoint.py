"""Checkpointing optimizer states with orbax, with a shape check that names the parameter.

A slimoptax state is a pytree of arrays (no Python objects), so orbax saves
and restores it like parameters; sharded states restore onto their mesh when
the target carries shardings (`slimoptax.sharding.abstract_sharded_state`).

What the compression rules decide is the *shape* of a state leaf: a second
moment saved under ``"slimadam"`` is ``(d, 1)`` where ``compress=None`` expects
``(d, 4d)``. `restore_state` compares the saved shapes and dtypes with the
target's, path by path, before restoring, and raises a `StateMismatchError`
naming every differing path, instead of orbax's message about an unnamed array
(or, with padding allowed, a silent reshape). That error is raised only when
the checkpoint's metadata was read and really differs: a checkpoint that
cannot be read (missing directory, no ``_METADATA``, truncated or deleted data
files) raises orbax's own error, unchanged.

`save_state` also writes a checksum of every leaf (``slimoptax_checksums.json``
in the checkpoint directory), and `restore_state` recomputes them after
restoring: bytes corrupted on disk raise a `CheckpointIntegrityError` naming
every corrupted leaf, instead of restoring silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from slimoptax import _tree

__all__ = [
    "CHECKSUM_FILE", "CheckpointIntegrityError", "StateMismatchError", "check_state_compatible",
    "leaf_checksums", "restore_state", "save_state", "saved_state_metadata",
]

CHECKSUM_FILE = "slimoptax_checksums.json"
_CHECKSUM_FORMAT = "slimoptax-checksums/1"


class StateMismatchError(ValueError):
  """A checkpoint does not match the optimizer state it is restored into."""


class CheckpointIntegrityError(OSError):
  """A checkpoint's data differs from what was saved (checksums of `save_state`)."""


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


def _absolute(path: Any) -> Any:
  """A local checkpoint path made absolute (orbax refuses relative ones); URLs unchanged."""
  if not isinstance(path, (str, os.PathLike)):
    return path
  text = os.fspath(path)
  if "://" in text or os.path.isabs(text):
    return text
  return os.path.abspath(text)


def _item_metadata_tree(checkpointer: Any, path: Any) -> Any:
  """The saved tree's per-leaf metadata, or ``None`` where orbax found none.

  orbax's ``metadata`` does not raise for a missing directory, an empty one or
  a deleted ``_METADATA``: it returns a step metadata without item metadata
  (and logs a warning).
  """
  if _is_manager(checkpointer):
    metadata = checkpointer.item_metadata(path)
  else:
    metadata = checkpointer.metadata(path)
  if metadata is None:
    return None
  if not _is_meta_leaf(metadata) and hasattr(metadata, "item_metadata"):
    metadata = metadata.item_metadata
    if metadata is None:
      return None
  tree = _metadata_tree(metadata)
  if not jax.tree_util.tree_leaves(tree, is_leaf=_is_meta_leaf):
    return None
  return tree


def saved_state_metadata(checkpointer: Any, path: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """``{path: (shape, dtype)}`` of a saved pytree, read from its metadata (no arrays loaded).

  Args:
    checkpointer: an orbax checkpointer with ``metadata(directory)`` (e.g.
      ``ocp.StandardCheckpointer()``) or an ``ocp.CheckpointManager`` (then
      ``path`` is the step).
    path: the checkpoint directory (a relative path is made absolute), or the
      step for a manager.

  Returns:
    A dict from ``"/"``-joined leaf path (as `slimoptax._tree.named_leaves`
    writes it: NamedTuple fields by name, tuple entries by index) to shape and
    dtype.

  Raises:
    FileNotFoundError: if orbax finds no metadata of a saved tree at ``path``
      (no checkpoint there, an empty directory, ``_METADATA`` deleted).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> import orbax.checkpoint as ocp
    >>> from slimoptax.checkpoint import saved_state_metadata
    >>> path = tempfile.mkdtemp() + "/tree"
    >>> checkpointer = ocp.StandardCheckpointer()
    >>> checkpointer.save(path, {"w": jnp.zeros((2, 3))})
    >>> checkpointer.wait_until_finished()
    >>> saved_state_metadata(checkpointer, path)
    {'w': ((2, 3), dtype('float32'))}
  """
  path = path if _is_manager(checkpointer) else _absolute(path)
  tree = _item_metadata_tree(checkpointer, path)
  if tree is None:
    what = f"step {path}" if _is_manager(checkpointer) else f"{path}"
    raise FileNotFoundError(
        f"no metadata of a saved tree at checkpoint {what} (no checkpoint there, an empty "
        "directory, or its _METADATA file is missing)")
  return _shapes(tree)
def _listing(problems: list[str], limit: int) -> str:
  """The first ``limit`` problems, one per indented line, and how many more there are."""
  more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
  return "\n  " + "\n  ".join(problems[:limit]) + more


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
    raise StateMismatchError(
        f"the {where} does not match the optimizer state it is restored into "
        f"({len(problems)} difference(s)):{_listing(problems, 20)}\n"
        "Was it written with other compression rules (compress= / factored_axes= / dims=), "
        "another optimizer, or for other parameters? Build the optimizer exactly as when it "
        "was saved (or re-initialise the state).")


def _host_bytes(leaf: Any) -> tuple[bytes, tuple[int, ...], str] | None:
  """A leaf's bytes in C order, little-endian, from its host copy; ``None`` if not addressable."""
  if isinstance(leaf, jax.Array):
    if not leaf.is_fully_addressable:
      return None
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
  host = np.ascontiguousarray(np.asarray(leaf))
  if host.dtype.byteorder == ">":
    host = host.astype(host.dtype.newbyteorder("<"))
  return host.tobytes(), tuple(int(s) for s in host.shape), str(host.dtype)


def leaf_checksums(tree: Any) -> dict[str, dict[str, Any]]:
  """The sha256 of every leaf's bytes, by leaf path (what `save_state` writes beside a checkpoint).

  Each leaf is copied to the host (a sharded array is assembled from its
  shards) and hashed in C order, little-endian, in its own dtype (a typed PRNG
  key through `jax.random.key_data`). An array that is not fully addressable
  from this process (a multi-process global array) gets ``None``: its bytes
  are never gathered onto one host, so it is not verified.

  Args:
    tree: a pytree of arrays (e.g. ``{"params": ..., "opt_state": ...}``).

  Returns:
    ``{path: {"shape": [...], "dtype": str, "sha256": hex digest or None}}``,
    paths as `saved_state_metadata` writes them.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax.checkpoint import leaf_checksums
    >>> sums = leaf_checksums({"w": jnp.zeros((2, 3))})
    >>> sums["w"]["shape"], sums["w"]["dtype"], len(sums["w"]["sha256"])
    ([2, 3], 'float32', 64)
  """
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    got = _host_bytes(leaf)
    path = _tree.path_str(kp)
    if got is None:
      out[path] = {"shape": [int(s) for s in leaf.shape], "dtype": str(leaf.dtype),
                   "sha256": None}
    else:
      data, shape, dtype = got
      out[path] = {"shape": list(shape), "dtype": dtype,
                   "sha256": hashlib.sha256(data).hexdigest()}
  return out


def _checksum_path(checkpointer: Any, path: Any) -> Any:
  """Where the checksums of the checkpoint at ``path`` (a directory, or a manager's step) live."""
  from etils import epath
  if _is_manager(checkpointer):
    root = epath.Path(checkpointer.directory)
    try:
      step_dir = checkpointer._get_read_step_directory(int(path), root)  # noqa: SLF001
    except Exception:  # another orbax version: the default step naming
      step_dir = root / str(int(path))
    return epath.Path(step_dir) / CHECKSUM_FILE
  return epath.Path(path) / CHECKSUM_FILE


def save_state(checkpointer: Any, path: Any, tree: Any, *, force: bool = False) -> Any:
  """Saves ``tree`` with orbax and writes a checksum of every leaf beside it.

  The checksums (`leaf_checksums`) go to ``slimoptax_checksums.json`` in the
  checkpoint directory (a manager's step directory), written once the save
  has finished; `restore_state` verifies them. The checkpoint itself is a
  plain orbax checkpoint (orbax alone restores it; the file is ignored).
  Multi-process: every process calls this (orbax's save is collective);
  process 0 writes the file (the others wait for it), and leaves not fully
  addressable from it are recorded without a checksum (not verified: their
  bytes are never gathered onto one host).

  Args:
    checkpointer: ``ocp.StandardCheckpointer()`` (``path`` = directory) or an
      ``ocp.CheckpointManager`` (``path`` = step; saved as one standard item).
    path: the directory (a relative path is made absolute: orbax needs
      absolute paths) or the step.
    tree: the pytree to save (``{"params": ..., "opt_state": ...}``).
    force: overwrite an existing directory (``StandardCheckpointer`` only).

  Returns:
    The checksum file's path, or ``None`` where a manager skipped the step
    (its ``should_save`` policy).

  Raises:
    Whatever orbax raises for the save (e.g. an existing directory without
    ``force``).

  Example:
    >>> import os, tempfile, jax.numpy as jnp
    >>> import orbax.checkpoint as ocp
    >>> from slimoptax.checkpoint import restore_state, save_state
    >>> path = tempfile.mkdtemp() + "/tree"
    >>> checkpointer = ocp.StandardCheckpointer()
    >>> checksums = save_state(checkpointer, path, {"w": jnp.arange(3.0)})
    >>> os.path.basename(checksums)
    'slimoptax_checksums.json'
    >>> restore_state(checkpointer, path, {"w": jnp.zeros(3)})["w"]  # verified
    Array([0., 1., 2.], dtype=float32)
  """
  sums = leaf_checksums(tree)
  if _is_manager(checkpointer):
    import orbax.checkpoint as ocp
    saved = checkpointer.save(path, args=ocp.args.StandardSave(tree))
  else:
    path = _absolute(path)
    saved = True
    checkpointer.save(path, tree, force=force)
  wait = getattr(checkpointer, "wait_until_finished", None)
  if wait is not None:
    wait()
  if not saved:
    return None
  target = _checksum_path(checkpointer, path)
  if jax.process_index() == 0:
    text = json.dumps({"format": _CHECKSUM_FORMAT, "algorithm": "sha256", "leaves": sums},
                      indent=1)
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(target)  # atomic: a reader sees the whole file or none
  if jax.process_count() > 1:  # every process returns once the file is there
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("slimoptax.checkpoint.save_state")
  return target


def _read_checksums(checkpointer: Any, path: Any) -> dict[str, dict[str, Any]] | None:
  target = _checksum_path(checkpointer, path)
  if not target.exists():
    return None
  try:
    content = json.loads(target.read_text())
    leaves = content["leaves"]
    if content.get("format") != _CHECKSUM_FORMAT or not isinstance(leaves, dict):
      raise ValueError(f"unknown format {content.get('format')!r}")
  except (ValueError, KeyError, TypeError) as err:
    raise CheckpointIntegrityError(f"the checksum file {target} cannot be read: {err}") from err
  return leaves


def _verify(restored: Any, sums: dict[str, dict[str, Any]], where: str) -> None:
  problems = []
  seen = set()
  for kp, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    path = _tree.path_str(kp)
    seen.add(path)
    entry = sums.get(path)
    if entry is None:
      problems.append(f"{path!r}: restored, but has no checksum in {CHECKSUM_FILE}")
      continue
    if entry.get("sha256") is None:
      continue  # saved without one (not addressable from process 0)
    got = _host_bytes(leaf)
    if got is None or got[2] != entry["dtype"]:
      continue  # not addressable here, or restored into another dtype (allow_dtype_change)
    data, shape, _ = got
    if list(shape) != list(entry["shape"]):
      problems.append(f"{path!r}: restored with shape {shape}, saved with {tuple(entry['shape'])}")
    elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
      problems.append(f"{path!r}: the restored {shape} {entry['dtype']} data differ from the "
                      "saved data (sha256 mismatch)")
  problems += [f"{path!r}: has a checksum but is not in the checkpoint"
               for path in sums if path not in seen]
  if problems:
    raise CheckpointIntegrityError(
        f"the {where} is corrupted: {len(problems)} leaf/leaves fail the checksums written by "
        f"save_state:{_listing(problems, 50)}\n"
        "Its files were changed after saving (disk or transfer corruption, a partial copy); "
        "restore an earlier checkpoint.")


def restore_state(
    checkpointer: Any,
    path: Any,
    target_abstract_state: Any,
    *,
    allow_dtype_change: bool = False,
    verify: bool | None = None,
) -> Any:
  """Restores a pytree (an optimizer state, or ``{"params": ..., "opt_state": ...}``), checked.

  Every saved leaf's shape (and dtype) is compared with the target's first;
  a checkpoint written under other compression rules raises a
  `StateMismatchError` naming the parameter paths, never a silent reshape.
  A checkpoint that cannot be read is not reported as a mismatch: orbax's own
  error propagates unchanged (``FileNotFoundError`` for a missing directory,
  an empty one or a missing ``_METADATA``; tensorstore's ``NOT_FOUND`` /
  ``OUT_OF_RANGE`` / ``DATA_LOSS`` errors for deleted, truncated or damaged
  data files). After restoring, the leaves are checked against the checksums
  that `save_state` wrote.

  Args:
    checkpointer: ``ocp.StandardCheckpointer()`` (``path`` = directory) or an
      ``ocp.CheckpointManager`` holding one standard item (``path`` = step).
    path: the directory (a relative path is made absolute: orbax needs
      absolute paths) or the step.
    target_abstract_state: the expected tree of `jax.ShapeDtypeStruct` (or
      arrays), e.g. ``slimoptax.abstract_state(tx, params)`` or, for sharded
      restores, `slimoptax.sharding.abstract_sharded_state`: the restored
      arrays take its shardings.
    allow_dtype_change: restore into other dtypes (orbax casts; leaves
      restored into another dtype than saved are not checksum-verified).
    verify: compare the restored leaves with the checksums of `save_state`.
      ``None`` (default): when the checkpoint has a checksum file; ``True``:
      require one; ``False``: skip.

  Returns:
    The restored tree, with ``target_abstract_state``'s structure.

  Raises:
    StateMismatchError: if the saved metadata shows other paths, shapes or
      dtypes.
    CheckpointIntegrityError: if restored leaves differ from their checksums
      (naming every corrupted leaf), or the checksum file is unreadable.
    FileNotFoundError: ``verify=True`` without a checksum file; and orbax's
      errors for a checkpoint it cannot read (see above).

  Example:
    >>> import tempfile, jax.numpy as jnp, slimoptax
    >>> import orbax.checkpoint as ocp
    >>> from slimoptax.checkpoint import save_state
    >>> params = {"up": {"kernel": jnp.ones((4, 8))}}
    >>> tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
    >>> path = tempfile.mkdtemp() + "/state"
    >>> checkpointer = ocp.StandardCheckpointer()
    >>> _ = save_state(checkpointer, path, tx.init(params))
    >>> restored = slimoptax.restore_state(checkpointer, path, slimoptax.abstract_state(tx, params))
    >>> restored[0].nu["up"]["kernel"].shape
    (4, 1)
    >>> other = slimoptax.abstract_state(slimoptax.slim_adamw(1e-3), params)  # uncompressed
    >>> slimoptax.restore_state(checkpointer, path, other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    slimoptax.checkpoint.StateMismatchError: ...
  """
  manager = _is_manager(checkpointer)
  if not manager:
    path = _absolute(path)
  where = f"checkpoint {'step' if manager else 'at'} {path}"
  try:
    metadata = _item_metadata_tree(checkpointer, path)
  except Exception:  # unreadable metadata: orbax's restore below says what is wrong
    metadata = None
  if metadata is not None:
    check_state_compatible(_shapes(metadata), target_abstract_state,
                           allow_dtype_change=allow_dtype_change, where=where)
  sums = None
  if verify is not False:
    sums = _read_checksums(checkpointer, path)
    if sums is None and verify:
      raise FileNotFoundError(
          f"verify=True, but the {where} has no {CHECKSUM_FILE} (save it with "
          "slimoptax.checkpoint.save_state)")
  if manager:
    import orbax.checkpoint as ocp
    restored = checkpointer.restore(path, args=ocp.args.StandardRestore(target_abstract_state))
  else:
    restored = checkpointer.restore(path, target_abstract_state)
  if sums is not None:
    _verify(restored, sums, where)
  return restored
