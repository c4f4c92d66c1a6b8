"""Layout declarations: what a parameter's name cannot tell about its axes.

Presets read each axis's role from the layer type and the **Flax layout**
(`slimoptax.axis_roles`). Real trees break that convention in five ways, each
declared here once and honoured by every preset and transform that resolves
rules (SlimAdam, Sophia, Muon's matrix views, the memory report, `Rules.table`):

* **grouped-query attention**: key/value kernels have ``num_kv_heads`` heads,
  fewer than the queries' ``num_heads``;
* **stacked layers** (``nn.scan``, ``nnx.scan`` / ``nnx.vmap``): a leading layer
  axis, never averaged over and never mixed with the others;
* **PyTorch layout** (``nn.Linear`` weights, Hugging Face ``FlaxConv1D``
  kernels): ``(fan_out, fan_in)``, the reverse of Flax's ``(fan_in, fan_out)``;
* **einsum layouts** (gemma-style ``"BTD,NDH->BTNH"``): roles from the equation,
  the kernel being its second operand: letters contracted with the input are
  fan_in, letters kept in the output fan_out; for attention kernels the first
  kept (query/key/value) or contracted (output projection) letter is the heads
  axis, the second head_dim;
* **fused tensors** (GPT-2's ``c_attn``, Bloom's ``query_key_value``, gemma's
  ``qkv_einsum``, gated-MLP ``gating_einsum``): declared as `Fused` parts, each
  part gets its own layer type's axes (`Split`), instead of a refusal.

A `Layout` is the resolved declaration of one leaf; `Declarations` maps path
patterns to them and lives on a `slimoptax.Rules` (``preset(...,
num_kv_heads=, stacked=, torch_layout=, einsum=, fused=)``). Presets also
declare, after the user's own, the layouts that known names imply
(`PRESET_LAYOUTS`): gemma's ``q_einsum`` / ``kv_einsum`` / ``qkv_einsum`` /
``attn_vec_einsum`` equations and fused parts, and ``nn.ConvLocal``'s
output-position axes. `slimoptax.Rules.for_model` checks declared layouts
against the computation.

Reference: Kalra et al., "When Can You Get Away with Low Memory Adam?" (2025),
Table 3 (the roles SlimAdam averages over); Zhang et al., Adam-mini (2024)
(per-head query/key blocks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from slimoptax import layers
from slimoptax.layers import Axes, Reshaped, Split

_MATRIX_FREE = ("norm", "bias", "scalar")
# PyTorch's nn.Embedding stores (vocab, d) as Flax's nn.Embed does: no reversal.
_SAME_IN_TORCH = ("embedding", "pos_embedding", *_MATRIX_FREE)


class Fused(NamedTuple):
  """A fused tensor: the parts of one axis, each a layer of its own.

  Attributes:
    parts: the parts' layer types, in storage order (``("query", "key",
      "value")``).
    axis: the stored axis holding the parts; ``None``: the kernel's fan_out
      axis under its layout (axis 1 of a Flax ``(d, 3*H*hd)`` kernel, axis 0 of
      a ``FlaxConv1D`` ``(3*H*hd, d)``), or, with an einsum layout, the first
      kernel letter kept in the output only that has ``len(parts)`` entries
      (``C`` of gemma's ``"BSD,CKDH->CBSKH"``).
    heads: parts interleaved per head, as Bloom's ``query_key_value``: the
      axis is viewed ``(heads, len(parts), rest)``; ``None``: contiguous blocks
      (``(len(parts), rest)``), or, when the axis has exactly ``len(parts)``
      entries (gemma's ``(3, H, d, hd)``), one index per part.
  """

  parts: tuple[str, ...]
  axis: int | None = None
  heads: int | None = None


class Layout(NamedTuple):
  """The declarations that apply to one parameter (see the module docstring).

  Attributes:
    num_heads: attention heads (query heads), for 2-D ``(d, H*hd)`` kernels.
    num_kv_heads: key/value heads of grouped-query attention (``None``: as
      ``num_heads``).
    stacked: stacked-layer axes (never averaged).
    torch: the kernel is stored ``(fan_out, fan_in)`` (PyTorch, ``FlaxConv1D``).
    einsum: the einsum equation the kernel is the second operand of.
    fused: the kernel's `Fused` parts; resolved by `slimoptax.Rules` into
      ``(layer_type, rule)`` pairs.
  """

  num_heads: int | None = None
  num_kv_heads: int | None = None
  stacked: Axes = ()
  torch: bool = False
  einsum: str | None = None
  fused: Any = None


def as_layout(layout: Layout | int | None) -> Layout:
  """A `Layout` from a `Layout`, a head count (the older ``num_heads`` argument) or None."""
  return layout if isinstance(layout, Layout) else Layout(num_heads=layout)


# --------------------------------------------------------------------------
# Roles in the stored layout.
# --------------------------------------------------------------------------


def _einsum_order(equation: str, core: list[int], path: str) -> list[int]:
  """Stored core axes in canonical order (fan_in letters, then fan_out letters) from ``equation``."""
  eq = equation.replace(" ", "")
  m = re.fullmatch(r"([\w.]*),([\w.]*)->([\w.]*)", eq)
  if m is None:
    raise ValueError(f"einsum layout of {path!r}: expected 'x,kernel->out' (e.g. 'BTD,NDH->BTNH'), "
                     f"got {equation!r}")
  x, w, out = (s.replace("...", "") for s in m.groups())
  if len(w) != len(core) or len(set(w)) != len(w):
    raise ValueError(f"einsum layout of {path!r}: kernel letters {w!r} do not name its {len(core)} "
                     f"(non-stacked) axes once each ({equation!r})")
  fan_in = [i for i, c in enumerate(w) if c in x and c not in out]
  fan_out = [i for i, c in enumerate(w) if c in out and c not in x]
  other = [c for i, c in enumerate(w) if i not in fan_in + fan_out]
  if other:
    raise ValueError(f"einsum layout of {path!r}: kernel letters {other} of {equation!r} are neither "
                     "contracted with the input nor kept in the output only (declare them stacked or fused)")
  if not fan_in or not fan_out:
    raise ValueError(f"einsum layout of {path!r}: {equation!r} has no contracted or no kept kernel axis")
  return [core[i] for i in fan_in + fan_out]


def _canonical_order(layer_type: str, ndim: int, layout: Layout, path: str) -> tuple[list[int], list[int]]:
  """``(core, order)``: the non-stacked axes, and the same in the order of their Flax layout."""
  for a in layout.stacked:
    if not 0 <= a < ndim:
      raise ValueError(f"stacked axis {a} of {path!r} is out of range for its {ndim} axes")
  core = [i for i in range(ndim) if i not in layout.stacked]
  if layout.einsum is not None and len(core) >= 2 and layer_type not in _MATRIX_FREE:
    return core, _einsum_order(layout.einsum, core, path)
  if layout.torch and layer_type not in _SAME_IN_TORCH:
    return core, core[::-1]
  return core, core


def layout_roles(layer_type: str, shape: Sequence[int], layout: Layout | int | None = None, *,
                 path: str = "<param>") -> tuple[tuple[int, ...], dict[str, Axes]]:
  """`slimoptax.axis_roles` in a parameter's declared layout.

  The stacked axes are set aside (role ``stacked``; ``all`` leaves them out),
  the others put in Flax order (reversed for ``torch``, by letter role for
  ``einsum``), named by `slimoptax.axis_roles` with the head count of the
  layer type (``num_kv_heads`` for key/value), and mapped back to the stored
  order.

  Args:
    layer_type: one of `slimoptax.LAYER_TYPES`.
    shape: the stored shape.
    layout: the leaf's `Layout` (or a head count).
    path: for error messages.

  Returns:
    ``(view_shape, roles)`` as `slimoptax.axis_roles`, in the stored order.

  Example:
    >>> from slimoptax.layouts import Layout, layout_roles
    >>> view, roles = layout_roles("query", (6, 32, 4, 8), Layout(stacked=(0,)))  # (L, d, H, hd)
    >>> view, roles["fan_in"], roles["heads"], roles["stacked"], roles["all"]
    ((6, 32, 4, 8), (1,), (2,), (0,), (1, 2, 3))
    >>> layout_roles("mlp_up", (128, 32), Layout(torch=True))[1]["fan_in"]  # (fan_out, fan_in)
    (1,)
  """
  layout = as_layout(layout)
  shape = tuple(int(s) for s in shape)
  heads = layout.num_heads
  if layer_type in ("key", "value") and layout.num_kv_heads is not None:
    heads = layout.num_kv_heads
  core, order = _canonical_order(layer_type, len(shape), layout, path)
  canon = tuple(shape[i] for i in order)
  cview, croles = layers.axis_roles(layer_type, canon, num_heads=heads, path=path)
  if not layout.stacked and order == list(range(len(shape))):
    return cview, croles
  groups = layers.view_groups(canon, cview)
  where, view, stacked = {}, [], []
  for j, s in enumerate(shape):
    if j not in core:
      stacked.append(len(view))
      view.append(s)
      continue
    for v in groups[order.index(j)]:
      where[v] = len(view)
      view.append(cview[v])
  roles = {r: tuple(sorted(where[v] for v in ax)) for r, ax in croles.items()}
  if stacked:
    roles["stacked"] = tuple(stacked)
  return tuple(view), roles


# --------------------------------------------------------------------------
# Fused tensors.
# --------------------------------------------------------------------------


def _einsum_fused_axis(shape: tuple[int, ...], n: int, layout: Layout, path: str) -> int:
  """The first kernel axis kept in the output only (not in the input) with exactly ``n`` entries."""
  x, rest = layout.einsum.replace(" ", "").split(",", 1)
  w, out = (t.replace("...", "") for t in rest.split("->"))
  core = [j for j in range(len(shape)) if j not in layout.stacked]
  if len(w) != len(core):
    raise ValueError(f"einsum layout of {path!r}: kernel letters {w!r} do not name its {len(core)} "
                     f"(non-stacked) axes ({layout.einsum!r})")
  for c, j in zip(w, core):
    if c in out and c not in x and shape[j] == n:
      return j
  raise ValueError(f"fused parameter {path!r} {shape}: no kernel letter of {layout.einsum!r} is an output "
                   f"axis of {n} entries; give Fused(parts, axis=...)")


def fused_view(shape: Sequence[int], fused: Fused, layout: Layout, *,
               path: str = "<param>") -> tuple[tuple[int, ...], int, tuple[int, ...], Layout]:
  """``(view, part_axis, part_shape, part_layout)`` of a fused parameter.

  ``view`` splits the fused axis so that index ``i`` of ``part_axis`` is part
  ``i``; ``part_shape`` is one part (``view`` without ``part_axis``) and
  ``part_layout`` its layout (stacked axes renumbered, the fused einsum letter
  dropped).
  """
  shape = tuple(int(s) for s in shape)
  n = len(fused.parts)
  axis = fused.axis
  if axis is None and layout.einsum is not None:
    axis = _einsum_fused_axis(shape, n, layout, path)
  elif axis is None:
    _, roles = layout_roles("dense", shape, layout._replace(fused=None), path=path)
    axis = roles["fan_out"][0]
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f"fused parameter {path!r} {shape}: axis {axis} out of range")
  axis %= len(shape)
  if axis in layout.stacked:
    raise ValueError(f"fused parameter {path!r}: axis {axis} is declared stacked")
  size = shape[axis]
  if fused.heads is not None:
    if size % (fused.heads * n):
      raise ValueError(f"fused parameter {path!r} {shape}: axis {axis} ({size}) is not {fused.heads} heads "
                       f"x {n} parts")
    if layout.torch or layout.einsum:
      raise ValueError(f"fused parameter {path!r}: per-head parts are read in the Flax layout only")
    split, part_axis = (fused.heads, n, size // (fused.heads * n)), axis + 1
  elif size == n:
    split, part_axis = (n,), axis
  elif size % n == 0:
    split, part_axis = (n, size // n), axis
  else:
    hint = "" if layout.torch else (" (a kernel stored (fan_out, fan_in), as Hugging Face's FlaxConv1D, needs "
                                    "torch_layout=, for the model's other such kernels too)")
    raise ValueError(f"fused parameter {path!r} {shape}: axis {axis} ({size}) does not split into {n} parts{hint}")
  view = shape[:axis] + split + shape[axis + 1:]
  part_shape = view[:part_axis] + view[part_axis + 1:]
  # Stored axis of each part axis, to renumber the stacked ones.
  origin = [j for j in range(len(shape)) for _ in (split if j == axis else (0,))]
  del origin[part_axis]
  stacked = tuple(i for i, j in enumerate(origin) if j in layout.stacked)
  einsum = layout.einsum
  if einsum is not None and size == n:
    x, rest = einsum.replace(" ", "").split(",", 1)
    w, out = rest.split("->")
    letter = w.replace("...", "")[[j for j in range(len(shape)) if j not in layout.stacked].index(axis)]
    einsum = f"{x},{w.replace(letter, '')}->{out.replace(letter, '')}"
  return view, part_axis, part_shape, layout._replace(stacked=stacked, einsum=einsum, fused=None)


# The most axes a layer type has in its Flax layout, one layer per tensor; more is a stacked layer axis
# (nn.scan, nnx.scan / nnx.vmap) that names cannot tell.
_MAX_RANK = {"embedding": 2, "pos_embedding": 3, "head": 2, "query": 3, "key": 3, "value": 3, "attn_out": 3,
             "mlp_up": 2, "mlp_gate": 2, "mlp_down": 2, "norm": 1}


def check_rank(layer_type: str, path: str, shape: tuple[int, ...], layout: Layout) -> None:
  """Refuses a parameter with more axes than its layer type has (a stacked axis no declaration names)."""
  rank = len(shape) - len(layout.stacked)
  if layout.einsum is None and rank > _MAX_RANK.get(layer_type, rank):
    raise ValueError(
        f"parameter {path!r} {tuple(shape)} has {rank} axes, a {layer_type!r} layer at most "
        f"{_MAX_RANK[layer_type]}: a stacked layer axis (nn.scan, nnx.scan / vmap)? Declare it "
        f"(preset(..., stacked={{<pattern of the stack>: 0}})) or read it from the model (Rules.for_model)")


def check_kv_heads(matched: Sequence[tuple[str, tuple[int, ...], Any]], rules: Any) -> None:
  """Refuses 2-D key/value kernels that a query head count would view wrongly (grouped-query attention).

  With ``num_heads`` and no ``num_kv_heads``, a key or value kernel whose
  fan_out differs from its sibling query's would be cut into ``num_heads``
  wrong heads; the error names it and the ``num_kv_heads`` that fits.
  """
  if rules.num_heads is None or rules.layouts.num_kv_heads is not None:
    return
  sizes = {}
  for path, shape, rule in matched:
    if rule.label not in ("query", "key", "value") or isinstance(rule.axes, str) or not any(
        a in ("heads", "head_dim") for a in rule.axes):
      continue
    layout = rules.layout(path, shape)
    if len(shape) - len(layout.stacked) != 2 or layout.fused is not None:
      continue
    _, roles = layout_roles("dense", shape, layout._replace(num_heads=None), path=path)
    parent = "/".join(re.split(r"[/.]", path)[:-2])
    sizes[(parent, rule.label)] = (path, shape[roles["fan_out"][0]])
  for (parent, label), (path, size) in sizes.items():
    query = sizes.get((parent, "query"))
    if label != "query" and query is not None and query[1] != size and query[1] % rules.num_heads == 0:
      head_dim = query[1] // rules.num_heads
      fits = f"num_kv_heads={size // head_dim}" if size % head_dim == 0 else "num_kv_heads="
      raise ValueError(
          f"{path!r}: {size} output features where the query {query[0]!r} has {query[1]} "
          f"({rules.num_heads} heads of {head_dim}): grouped-query attention needs its key/value head "
          f"count declared ({fits}), or the {label} would be cut into {rules.num_heads} wrong heads")


# --------------------------------------------------------------------------
# Declarations: path patterns -> layouts.
# --------------------------------------------------------------------------


def _patterns(value: Any, what: str, default: Any) -> list[tuple[str, Any]]:
  """``[(pattern, value), ...]`` from ``None``, ``True`` (every path), a pattern, patterns or a mapping."""
  if value is None or value is False:
    return []
  if value is True:
    return [(r"^", default)]
  if isinstance(value, str):
    value = [value]
  if isinstance(value, Mapping):
    items = list(value.items())
  elif isinstance(value, Sequence):
    items = [(p, default) for p in value]
  else:
    raise TypeError(f"{what}: expected a pattern, a list of patterns or a mapping, got {value!r}")
  for pattern, _ in items:
    if not isinstance(pattern, str):
      raise TypeError(f"{what}: patterns are strings, got {pattern!r}")
    try:
      re.compile(pattern)
    except re.error as err:
      raise ValueError(f"{what}: invalid regular expression {pattern!r}: {err}") from None
  return items


def _fused(pattern: str, value: Any) -> Fused:
  if isinstance(value, Fused):
    parts = value
  elif isinstance(value, (tuple, list)) and all(isinstance(p, str) for p in value):
    parts = Fused(tuple(value))
  else:
    raise TypeError(f"fused[{pattern!r}]: expected Fused(...) or a tuple of layer types, got {value!r}")
  unknown = [p for p in parts.parts if p not in layers.LAYER_TYPES]
  if len(parts.parts) < 2 or unknown:
    raise ValueError(f"fused[{pattern!r}]: expected two or more layer types, got {parts.parts} "
                     f"(unknown: {unknown}; known: {sorted(layers.LAYER_TYPES)})")
  return parts._replace(parts=tuple(parts.parts))


class Declarations(NamedTuple):
  """Layout declarations by path pattern (first match wins, ``re.search``, case-insensitive).

  Build them with `declarations`; `slimoptax.preset` and `slimoptax.Rules`
  take the same keywords.
  """

  num_kv_heads: int | None = None
  stacked: tuple[tuple[str, Axes], ...] = ()
  torch: tuple[str, ...] = ()
  einsum: tuple[tuple[str, str], ...] = ()
  fused: tuple[tuple[str, Fused], ...] = ()

  def __bool__(self):
    return any(v not in (None, ()) for v in self)

  def layout(self, path: str, ndim: int, num_heads: int | None) -> Layout:
    """The `Layout` of the parameter at ``path`` with ``ndim`` axes."""
    def first(items):
      return next((v for p, v in items if re.search(p, path, flags=re.IGNORECASE)), None)

    stacked = first(self.stacked) or ()
    if stacked == "leading":  # every axis but the last two: nn.ConvLocal's output positions
      stacked = tuple(range(max(ndim - 2, 0)))
    for a in stacked:
      if not -ndim <= a < ndim:
        raise ValueError(f"stacked axis {a} of {path!r} is out of range for its {ndim} axes")
    stacked = tuple(sorted(a % ndim for a in stacked))
    return Layout(num_heads=num_heads, num_kv_heads=self.num_kv_heads, stacked=stacked,
                  torch=any(re.search(p, path, flags=re.IGNORECASE) for p in self.torch),
                  einsum=first(self.einsum), fused=first(self.fused))

  def merge(self, other: "Declarations") -> "Declarations":
    """These declarations first, then ``other``'s."""
    kv = self.num_kv_heads if self.num_kv_heads is not None else other.num_kv_heads
    return Declarations(kv, self.stacked + other.stacked, self.torch + other.torch,
                        self.einsum + other.einsum, self.fused + other.fused)


def declarations(*, num_kv_heads: int | None = None, stacked: Any = None, torch_layout: Any = None,
                 einsum: Mapping[str, str] | None = None, fused: Mapping[str, Any] | None = None) -> Declarations:
  """Layout declarations, checked (each error names the keyword).

  Args:
    num_kv_heads: key/value heads of grouped-query attention.
    stacked: the stacked-layer axis of matching parameters: a pattern or list
      of patterns (axis 0), or ``{pattern: axis or axes}``; ``"leading"`` for
      every axis but the last two (``nn.ConvLocal``'s output positions).
    torch_layout: ``True`` (every kernel), a pattern or list of patterns:
      kernels stored ``(fan_out, fan_in)`` (``nn.Linear``, ``FlaxConv1D``).
    einsum: ``{pattern: "BTD,NDH->BTNH"}``.
    fused: ``{pattern: ("query", "key", "value")}`` or ``{pattern: Fused(...)}``.

  Returns:
    A `Declarations`.
  """
  if num_kv_heads is not None and (not isinstance(num_kv_heads, int) or isinstance(num_kv_heads, bool)
                                   or num_kv_heads < 1):
    raise ValueError(f"num_kv_heads: expected a positive int, got {num_kv_heads!r}")
  stacked_items = []
  for pattern, axes in _patterns(stacked, "stacked", (0,)):
    if axes == "leading":
      stacked_items.append((pattern, axes))
      continue
    axes = (axes,) if isinstance(axes, int) else tuple(axes) if isinstance(axes, (tuple, list)) else axes
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
      raise ValueError(f"stacked[{pattern!r}]: expected an int axis, a tuple of them or 'leading', got {axes!r}")
    stacked_items.append((pattern, axes))
  einsum_items = []
  for pattern, eq in _patterns(einsum or {}, "einsum", None):
    if not isinstance(eq, str) or "->" not in eq or "," not in eq:
      raise ValueError(f"einsum[{pattern!r}]: expected an equation 'x,kernel->out', got {eq!r}")
    einsum_items.append((pattern, eq))
  fused_items = [(p, _fused(p, v)) for p, v in _patterns(fused or {}, "fused", None)]
  torch_items = [p for p, _ in _patterns(torch_layout, "torch_layout", None)]
  return Declarations(num_kv_heads, tuple(stacked_items), tuple(torch_items), tuple(einsum_items),
                      tuple(fused_items))


# The layouts that known names imply, declared by every preset after the user's own: gemma's einsum kernels
# (DeepMind's gemma and Flax's NNX gemma example), and nn.ConvLocal's unshared per-position filters.
_GEMMA = r"(^|[/.]){}[/.](kernel|w)$"
PRESET_LAYOUTS = declarations(
    einsum={_GEMMA.format("q_einsum"): "BTD,NDH->BTNH", _GEMMA.format("kv_einsum"): "BTD,CKDH->CBTKH",
            _GEMMA.format("qkv_einsum"): "BTD,SNDH->SBTNH", _GEMMA.format("attn_vec_einsum"): "BTNH,NHD->BTD"},
    fused={_GEMMA.format("kv_einsum"): ("key", "value"), _GEMMA.format("qkv_einsum"): ("query", "key", "value")},
    stacked={r"(^|[/.])ConvLocal(_\d+)?[/.]kernel$": "leading"})


def to_json(decl: Declarations) -> dict[str, Any]:
  """The JSON form of `Declarations` (read back by `from_json`)."""
  return {"num_kv_heads": decl.num_kv_heads,
          "stacked": {p: a if isinstance(a, str) else list(a) for p, a in decl.stacked},
          "torch_layout": list(decl.torch), "einsum": dict(decl.einsum),
          "fused": {p: {"parts": list(f.parts), "axis": f.axis, "heads": f.heads} for p, f in decl.fused}}


def from_json(data: Mapping[str, Any]) -> Declarations:
  """Reads `to_json` output (errors name the key)."""
  if not isinstance(data, Mapping):
    raise ValueError(f"rules JSON: 'layouts' must be an object, got {data!r}")
  unknown = sorted(set(data) - {"num_kv_heads", "stacked", "torch_layout", "einsum", "fused"})
  if unknown:
    raise ValueError(f"rules JSON: unknown 'layouts' key(s) {unknown}")
  fused = {}
  for p, f in (data.get("fused") or {}).items():
    if not isinstance(f, Mapping) or "parts" not in f:
      raise ValueError(f"rules JSON: layouts.fused[{p!r}] needs 'parts', got {f!r}")
    fused[p] = Fused(tuple(f["parts"]), f.get("axis"), f.get("heads"))
  return declarations(num_kv_heads=data.get("num_kv_heads"),
                      stacked={p: a if isinstance(a, str) else tuple(a) for p, a in (data.get("stacked") or {}).items()},
                      torch_layout=list(data.get("torch_layout") or ()), einsum=data.get("einsum"),
                      fused=fused)


__all__ = ["Declarations", "Fused", "Layout", "Reshaped", "Split", "as_layout", "declarations", "fused_view",
           "layout_roles"]
