"""Diagnostics: optimizer-state memory.

`memory_report` counts the second-moment entries and bytes of an optimizer
state, per parameter and in total, against what Adam would keep (one entry per
parameter), the memory measure of Kalra et al., When Can You Get Away with Low
Memory Adam?, 2025. `tree_bytes` counts the bytes of any pytree of arrays.
Per-layer gradient / weight / update norms are `slimoptax.layer_norms`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slimoptax import _codecs, _snr, _tree


class _Stored:
  """A `slimoptax.QuantizedArray` seen as one leaf: the shape it decodes to, the bytes it stores."""

  def __init__(self, q: Any):
    self.shape, self.nbytes = tuple(q.decoded_shape), q.nbytes


def _nbytes(x: Any) -> int:
  if isinstance(x, _Stored):
    return x.nbytes
  shape = getattr(x, "shape", np.shape(x))
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = np.asarray(x).dtype
  return math.prod(shape) * np.dtype(dtype).itemsize


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of a pytree (works on `jax.ShapeDtypeStruct` s).

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> slimoptax.tree_bytes({"w": jnp.ones((4, 8)), "b": jnp.ones(8, jnp.bfloat16)})
    144
  """
  return sum(_nbytes(x) for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryRow:
  """One parameter's second moment.

  Attributes:
    path: the parameter's ``"/"``-joined path.
    param_shape: its shape.
    nu_shape: its second moment's shape; ``None`` when the state holds none
      for it (masked out by `optax.masked` / `optax.partition`).
    entries: second-moment entries (0 without one).
    nbytes: second-moment bytes (0 without one).
  """

  path: str
  param_shape: tuple[int, ...]
  nu_shape: tuple[int, ...] | None
  entries: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Second-moment memory of an optimizer state.

  Attributes:
    rows: one `MemoryRow` per parameter (path, shapes, entries, bytes).
    entries: total second-moment entries.
    nbytes: total second-moment bytes.
    adam_entries: entries Adam would keep for the parameters that have a
      second moment (their number of entries).
    adam_nbytes: bytes Adam would keep for them at the parameters' dtypes.
    state_nbytes: bytes of the whole optimizer state.
    no_second_moment: paths of the parameters the state holds no second
      moment for (masked out by `optax.masked` / `optax.partition`).
  """

  rows: tuple[MemoryRow, ...]
  entries: int
  nbytes: int
  adam_entries: int
  adam_nbytes: int
  state_nbytes: int
  no_second_moment: tuple[str, ...] = ()

  @property
  def fraction_saved(self) -> float:
    """1 - entries / adam_entries."""
    return 1.0 - self.entries / self.adam_entries if self.adam_entries else 0.0

  def __str__(self) -> str:
    header = ("path", "param shape", "second moment", "entries", "bytes")
    body = [(r.path, str(r.param_shape), "no second moment" if r.nu_shape is None else str(r.nu_shape),
             f"{r.entries:,}", f"{r.nbytes:,}") for r in self.rows]
    body.append(("TOTAL", "", "", f"{self.entries:,}", f"{self.nbytes:,}"))
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths]), *[fmt.format(*b) for b in body]]
    lines.append(
        f"second moments: {self.entries:,} of Adam's {self.adam_entries:,} "
        f"({self.fraction_saved:.2%} saved); optimizer state {self.state_nbytes:,} bytes"
    )
    if self.no_second_moment:
      lines.append(
          f"no second moment (masked out) for {len(self.no_second_moment)} parameter(s), not "
          f"counted above: {', '.join(self.no_second_moment)}")
    return "\n".join(lines)


def memory_report(opt_state: Any, params: Any) -> MemoryReport:
  """Second-moment entries and bytes of ``opt_state``, per leaf and total.

  The second moment is found by `slimoptax.find_second_moment`: fields named
  ``nu`` with the parameters' paths (`optax.scale_by_adam`,
  `slimoptax.scale_by_slim_adam`, ...), also under `optax.masked` and
  `optax.partition`; a quantized one (`slimoptax.quantize_state`) counts its
  decoded entries and the bytes of its codes and scales. A parameter masked
  out of every Adam gets a row with no second moment and is left out of the
  totals and of Adam's count.

  Args:
    opt_state: an optax state (may be abstract, from `jax.eval_shape`).
    params: the parameters (or `jax.ShapeDtypeStruct` s).

  Returns:
    A `MemoryReport`; ``print`` it for a table.

  Raises:
    ValueError: if the state holds no Adam second moment at all, naming the
      kinds of state it holds.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((8, 32))}}, "ln": {"scale": jnp.ones(8)}}
    >>> tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
    >>> report = slimoptax.memory_report(tx.init(params), params)
    >>> print(f"{report.entries} of {report.adam_entries}: {report.fraction_saved:.2%} saved")
    16 of 264: 93.94% saved
  """
  stored = jax.tree.map(lambda x: _Stored(x) if _codecs.is_quantized(x) else x, opt_state,
                        is_leaf=_codecs.is_quantized)
  nu = _snr.find_second_moment(stored, params)
  nu_leaves = _tree.named_leaves(nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  rows, covered = [], []
  for (path, p), (_, v) in zip(_tree.named_leaves(params), nu_leaves):
    if isinstance(v, optax.MaskedNode):
      rows.append(MemoryRow(path, tuple(np.shape(p)), None, 0, 0))
    else:
      covered.append(p)
      rows.append(MemoryRow(path, tuple(np.shape(p)), tuple(np.shape(v)), math.prod(np.shape(v)), _nbytes(v)))
  return MemoryReport(
      rows=tuple(rows),
      entries=sum(r.entries for r in rows),
      nbytes=sum(r.nbytes for r in rows),
      adam_entries=sum(math.prod(r.param_shape) for r in rows if r.nu_shape is not None),
      adam_nbytes=sum(_nbytes(p) for p in covered),
      state_nbytes=tree_bytes(opt_state),
      no_second_moment=tuple(r.path for r in rows if r.nu_shape is None),
  )


def abstract_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """The optimizer state's shapes and dtypes, without allocating it (`jax.eval_shape`).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> state = slimoptax.abstract_state(optax.adam(1e-3), {"w": jnp.ones((4, 8))})
    >>> state[0].nu["w"]
    ShapeDtypeStruct(shape=(4, 8), dtype=float32)
  """
  return jax.eval_shape(tx.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), p.dtype), params))


__all__ = ["MemoryReport", "MemoryRow", "abstract_state", "memory_report", "tree_bytes"]
