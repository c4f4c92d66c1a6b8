"""The jaxpr walk behind `slimoptax.trace`: parameter axes followed into the primitives they reach."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

from jax.extend import core as jcore

Axes = tuple[int, ...]

ROLES = ("fan_in", "fan_out", "batch", "window", "token", "embed", "stacked", "fused",
         "rotary", "elementwise", "unknown", "unused")
_WEAK = ("elementwise",)


class AxisPiece(NamedTuple):
  """One piece of an axis that the computation splits (major piece first): its size and role."""

  size: int
  role: str | None


Role = Union[str, None, tuple[AxisPiece, ...]]


class Use(NamedTuple):
  """One use of a parameter: the primitive and what it does with each axis.

  Attributes:
    primitive: the primitive's name (``"dot_general"``, ``"gather"``,
      ``"scan"``, ``"split"`` ...; ``"output"`` when the parameter is returned).
    roles: per axis of the parameter, its role in this use, ``None`` when the
      use says nothing about it, or a tuple of `AxisPiece` when the axis is
      split and its pieces do different things.
  """

  primitive: str
  roles: tuple[Role, ...]


class TracedRoles(NamedTuple):
  """What the computation does with each axis of one parameter.

  Attributes:
    shape: the parameter's shape.
    roles: per axis, the merged role over all uses: one of `ROLES` where the
      uses agree (an ``elementwise`` use gives way to any other; ``fused``
      refines ``fan_out``; ``rotary`` gives way to the role it is part of: its
      use tells the rotated block), the distinct roles joined by ``"|"`` where they
      disagree (``"token|fan_out"`` for a tied embedding), or a tuple of
      `AxisPiece` for an axis whose pieces do different things.
    uses: every distinct use, in trace order.
  """

  shape: tuple[int, ...]
  roles: tuple[Role, ...]
  uses: tuple[Use, ...]

  @property
  def used(self) -> bool:
    return bool(self.uses)


# --------------------------------------------------------------------------
# Tracks: which pieces of which parameter axes each axis of a value is made of.
# --------------------------------------------------------------------------

# An atom is one piece of a parameter axis: (axis, stride, size), the axis read as a
# mixed-radix number whose digit of weight ``stride`` runs over ``size`` values. Axis -1:
# a piece that comes from elsewhere (broadcast, another operand).
Atom = tuple[int, int, int]
Dims = tuple[tuple[Atom, ...], ...]


class _Cut(NamedTuple):
  """A value that is one block of an axis cut apart (``slice``, ``split``): kept to see the blocks rejoined."""

  atoms: tuple[Atom, ...]  # the atoms that pick the block (recorded "fused")
  index: int               # which block
  whole: tuple[Atom, ...]  # the atoms of the axis before the cut
  use: int                 # where the cut's "fused" record is in the leaf's uses (-1: none)


class _Track(NamedTuple):
  leaf: int
  product: bool  # the value is a product of the parameter (followed only to find fused axes)
  dims: Dims
  cuts: tuple[_Cut, ...] = ()  # the cuts that made the value a block, innermost last


def _foreign(n: int) -> tuple[Atom, ...]:
  return ((-1, 1, int(n)),) if n > 1 else ()


def _whole(shape: Sequence[int]) -> Dims:
  return tuple(((d, 1, int(n)),) if n > 1 else () for d, n in enumerate(shape))


def _size(dim: tuple[Atom, ...]) -> int:
  return math.prod(a[2] for a in dim)


def _regroup(dims: Sequence[tuple[Atom, ...]], new_shape: Sequence[int]) -> Dims | None:
  """The atoms of each axis after a row-major reshape to ``new_shape``; None if they do not align."""
  queue = [a for dim in dims for a in dim]
  out = []
  for size in new_shape:
    group, need = [], int(size)
    while need > 1:
      if not queue:
        return None
      d, s, a = queue[0]
      if a <= need:
        if need % a:
          return None
        group.append(queue.pop(0))
        need //= a
      else:
        if a % need:
          return None
        group.append((d, s * (a // need), need))
        queue[0] = (d, s, a // need)
        need = 1
    out.append(tuple(group))
  return None if queue else tuple(out)


def _expanded(track: _Track) -> bool:
  """Whether some axis of the value comes from elsewhere (the parameter met an activation)."""
  return any(a[0] < 0 for dim in track.dims for a in dim)


# --------------------------------------------------------------------------
# The walk over the jaxpr.
# --------------------------------------------------------------------------

_STRUCTURAL = frozenset({
    "convert_element_type", "copy", "copy_p", "reduce_precision", "rev", "sharding_constraint",
    "mesh_cast", "pvary", "optimization_barrier", "device_put",
})
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "pow", "integer_pow", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "sqrt", "rsqrt", "cbrt", "abs",
    "sign", "square", "erf", "erfc", "erf_inv", "select_n", "clamp", "rem", "atan2", "floor",
    "ceil", "round", "is_finite", "eq", "ne", "lt", "le", "gt", "ge", "nextafter", "real",
    "imag", "conj", "and", "or", "not", "xor", "asinh", "acosh", "atanh", "asin", "acos",
    "atan", "sinh", "cosh", "add_any", "stop_gradient",
})
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
})


def _is_var(v: Any) -> bool:
  return isinstance(v, jcore.Var) and not isinstance(v, jcore.DropVar)


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(int(s) for s in getattr(v.aval, "shape", ()))


class _Walker:
  """Follows parameter tracks through a jaxpr and records their uses per leaf."""

  def __init__(self, num_leaves: int):
    # A withdrawn use (a cut whose blocks were rejoined) is left as None.
    self.uses: list[list[tuple[str, dict[Atom, str | None]] | None]] = [[] for _ in range(num_leaves)]
    # (leaf, atom of one block) -> the atoms that pick the block (shard_map bodies see one block)
    self.blocks: dict[tuple[int, Atom], tuple[Atom, ...]] = {}

  def record(self, track: _Track, primitive: str, dim_roles: Sequence[str | None]) -> None:
    roles: dict[Atom, str | None] = {}
    for dim, role in zip(track.dims, dim_roles):
      for atom in dim:
        if atom[0] >= 0:
          roles[atom] = role
          roles.update((a, role) for a in self.blocks.get((track.leaf, atom), ()) if a[0] >= 0)
    self.uses[track.leaf].append((primitive, roles))

  def opaque(self, tracked: Sequence[list[_Track]], primitive: str) -> None:
    for t in (t for ts in tracked for t in ts if not t.product):
      self.uses[t.leaf].append((primitive, {}))

  def fit(self, track: _Track, shape: tuple[int, ...]) -> _Track:
    """A track on a value whose axes have other sizes (a ``shard_map`` body sees one block)."""
    if len(track.dims) != len(shape):
      return track._replace(dims=tuple(_foreign(n) for n in shape))
    dims = []
    for dim, n in zip(track.dims, shape):
      have = _size(dim)
      if have == n:
        dims.append(dim)
      elif 0 < n < have and have % n == 0:  # one block: the block's atoms stand for the whole axis
        block, major = _cut(dim, have, n, 1)
        for atom in block:
          self.blocks[(track.leaf, atom)] = major
        dims.append(block)
      elif n > have and n % have == 0:
        dims.append(_foreign(n // have) + dim)
      else:
        dims.append(_foreign(n))
    return track._replace(dims=tuple(dims))

  # -- jaxprs ----------------------------------------------------------------

  def walk(self, jaxpr: Any, ins: Sequence[list[_Track]]) -> list[list[_Track]]:
    """Walks ``jaxpr`` (open or closed) with tracks on its invars; returns those of its outvars."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    env: dict[Any, list[_Track]] = {}
    for v, tracks in zip(jaxpr.invars, ins):
      if tracks and _is_var(v):
        env[v] = [self.fit(t, _shape(v)) for t in tracks]
    for eqn in jaxpr.eqns:
      tracked = [env.get(v, []) if _is_var(v) else [] for v in eqn.invars]
      if not any(tracked):
        continue
      outs = self.eqn(eqn, tracked)
      for v, tracks in zip(eqn.outvars, outs):
        if tracks and _is_var(v):
          env.setdefault(v, []).extend(self.fit(t, _shape(v)) for t in tracks)
    return [env.get(v, []) if _is_var(v) else [] for v in jaxpr.outvars]

  def eqn(self, eqn: Any, tracked: list[list[_Track]]) -> list[list[_Track]]:
    name = eqn.primitive.name
    nout = len(eqn.outvars)
    none: list[list[_Track]] = [[] for _ in range(nout)]
    handler = getattr(self, "_" + name, None)
    if handler is not None:
      return handler(eqn, tracked)
    if name in _STRUCTURAL and len(eqn.invars) == nout:
      return [list(ts) for ts in tracked]
    if name in _ELEMENTWISE:
      return self._elementwise(eqn, tracked)
    if name in _REDUCTIONS:
      for t in (t for t in tracked[0] if not t.product):
        self.record(t, name, ["elementwise"] * len(t.dims))
      return none
    sub = _call_jaxpr(eqn)
    if sub is not None:
      return self.walk(sub, tracked)
    self.opaque(tracked, name)
    return none

  # -- uses ------------------------------------------------------------------

  def _dot_general(self, eqn, tracked):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    nl, nr = len(_shape(lhs)), len(_shape(rhs))
    lfree = [d for d in range(nl) if d not in lc and d not in lb]
    rfree = [d for d in range(nr) if d not in rc and d not in rb]
    out_ndim = len(lb) + len(lfree) + len(rfree)
    outs: list[_Track] = []
    for side, (contract, batch, free, offset) in enumerate(
        ((lc, lb, lfree, len(lb)), (rc, rb, rfree, len(lb) + len(lfree)))):
      for t in tracked[side]:
        if t.product:
          continue
        roles = ["fan_in" if d in contract else "batch" if d in batch else "fan_out"
                 for d in range(len(t.dims))]
        self.record(t, "dot_general", roles)
        dims = [()] * out_ndim
        for j, d in enumerate(free):
          dims[offset + j] = t.dims[d]
        outs.append(_Track(t.leaf, True, _fill(dims, _shape(eqn.outvars[0]))))
    return [outs]

  def _conv_general_dilated(self, eqn, tracked):
    out_dim, in_dim = eqn.params["dimension_numbers"].rhs_spec[:2]
    self.opaque(tracked[:1], "conv_general_dilated")
    for t in (t for t in tracked[1] if not t.product):
      self.record(t, "conv_general_dilated", ["fan_out" if d == out_dim else "fan_in" if d == in_dim
                                              else "window" for d in range(len(t.dims))])
    return [[]]

  def _gather(self, eqn, tracked):
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    shape = _shape(eqn.invars[0])
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    for t in (t for t in tracked[0] if not t.product):
      self.record(t, "gather", ["batch" if d in batching else "token" if (
          d in dn.start_index_map or sizes[d] < shape[d]) else "embed" for d in range(len(shape))])
    self.opaque(tracked[1:], "gather")
    return [[]]

  def _dynamic_slice(self, eqn, tracked):
    sizes = eqn.params["slice_sizes"]
    shape = _shape(eqn.invars[0])
    if tuple(sizes) == shape:
      return [list(tracked[0])]
    for t in (t for t in tracked[0] if not t.product):
      self.record(t, "dynamic_slice", ["token" if s < n else "embed" for s, n in zip(sizes, shape)])
    self.opaque(tracked[1:], "dynamic_slice")
    return [[]]

  def _elementwise(self, eqn, tracked):
    out_shape = _shape(eqn.outvars[0])
    out_size = math.prod(out_shape)
    sizes = [math.prod(_shape(v)) if hasattr(v, "aval") else 1 for v in eqn.invars]
    outs: list[_Track] = []
    name = eqn.primitive.name
    for i, ts in enumerate(tracked):
      for t in ts:
        same = _shape(eqn.invars[i]) == out_shape
        if t.product:
          # A bias added to a product, or a sign flip, keeps it a product; anything else ends the search.
          others_smaller = all(s < out_size for j, s in enumerate(sizes) if j != i)
          if same and (name == "neg" or name in ("add", "sub", "add_any") and others_smaller):
            outs.append(t)
        elif same and not _expanded(t):
          outs.append(t)  # a transformation of the whole parameter (a cast, a mask, a scale)
        else:
          self.record(t, name, ["elementwise"] * len(t.dims))
    return [outs] + [[] for _ in eqn.outvars[1:]]

  # -- structure ---------------------------------------------------------------

  def _transpose(self, eqn, tracked):
    perm = eqn.params["permutation"]
    return [[t._replace(dims=tuple(t.dims[p] for p in perm)) for t in tracked[0]]]

  def _squeeze(self, eqn, tracked):
    drop = {d % len(_shape(eqn.invars[0])) for d in eqn.params["dimensions"]}
    return [[t._replace(dims=tuple(d for i, d in enumerate(t.dims) if i not in drop))
             for t in tracked[0]]]

  def _reshape(self, eqn, tracked):
    new_shape = _shape(eqn.outvars[0])
    outs = []
    for t in tracked[0]:
      dims = _regroup(t.dims, new_shape) if eqn.params.get("dimensions") is None else None
      outs += [t._replace(dims=dims)] if dims is not None else self.opaque([[t]], "reshape") or []
    return [outs]

  def _broadcast_in_dim(self, eqn, tracked):
    in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    where = dict(zip(eqn.params["broadcast_dimensions"], range(len(in_shape))))
    return [[t._replace(dims=tuple(t.dims[where[o]] if o in where and in_shape[where[o]] == n
                                   else _foreign(n) for o, n in enumerate(out_shape)))
             for t in tracked[0]]]

  def _slice(self, eqn, tracked):
    shape = _shape(eqn.invars[0])
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params.get("strides") or (1,) * len(shape)
    outs = []
    for t in tracked[0]:
      dims, fused, cuts = list(t.dims), {}, []
      for d, n in enumerate(shape):
        lo, hi, step = int(start[d]), int(limit[d]), int(strides[d])
        kept, block = len(range(lo, hi, step)), math.gcd(lo, hi, n)
        if (lo, hi, step) == (0, n, 1):
          continue
        if step == 1 and hi - lo == block:  # one block of n // block
          (dims[d], major), index = _cut(t.dims[d], n, block, 1), lo // block
        elif step > 1 and n % step == 0 and lo < step and kept == n // step:  # one residue class mod step
          (dims[d], major), index = _every(t.dims[d], n, step), lo
        else:
          dims[d], major, index = _foreign(kept), (), 0
        fused.update((a, "fused") for a in major if a[0] >= 0)
        if major:
          cuts.append((major, index, t.dims[d]))
      use = len(self.uses[t.leaf]) if fused else -1
      if fused:
        self.uses[t.leaf].append(("slice", fused))
      outs.append(t._replace(dims=tuple(dims), cuts=t.cuts + tuple(_Cut(*c, use) for c in cuts)))
    return [outs]

  def _split(self, eqn, tracked):
    axis, sizes = eqn.params["axis"], [int(s) for s in eqn.params["sizes"]]
    n = _shape(eqn.invars[0])[axis]
    block = math.gcd(*sizes)
    outs: list[list[_Track]] = [[] for _ in sizes]
    for t in tracked[0]:
      major = _cut(t.dims[axis], n, block, 1)[1]
      fused = {a: "fused" for a in major if a[0] >= 0}
      use = len(self.uses[t.leaf]) if fused else -1
      for i, s in enumerate(sizes):
        dim = _cut(t.dims[axis], n, block, s // block)[0]
        cut = (_Cut(major, sum(sizes[:i]) // block, t.dims[axis], use),) if major and s == block else ()
        outs[i].append(t._replace(dims=t.dims[:axis] + (dim,) + t.dims[axis + 1:], cuts=t.cuts + cut))
      if fused:
        self.uses[t.leaf].append(("split", fused))
    return outs

  def _concatenate(self, eqn, tracked):
    return self._rejoin(eqn, tracked, eqn.params["dimension"])

  def _stack(self, eqn, tracked):
    axis = eqn.params["axis"]
    return self._rejoin(eqn, [[t._replace(dims=t.dims[:axis] + ((),) + t.dims[axis:]) for t in ts]
                              for ts in tracked], axis)

  def _rejoin(self, eqn, tracked, axis):
    """The blocks of one cut put back together in another order: rotate-half, rotate-every-two.

    The result is the value before the cut, its blocks reordered along
    ``axis``: the cut's ``fused`` record is withdrawn and, for a product, the
    axis it cut gets a ``rotary`` use (the block a rotary embedding rotates:
    the head_dim). Blocks put back in their own order (q, k and v packed
    again) and anything else end the track with an opaque use.
    """
    outs: list[_Track] = []
    joined: set[tuple[int, _Track]] = set()
    for t in tracked[0]:
      key = _sibling_key(t)
      if key is None:
        continue
      group = [next((u for u in ts if _sibling_key(u) == key), None) for ts in tracked]
      if any(u is None for u in group):
        continue
      cut, order = t.cuts[-1], [u.cuts[-1].index for u in group]
      if sorted(order) != list(range(math.prod(a[2] for a in cut.atoms))) or order == sorted(order):
        continue
      for i, u in enumerate(group):
        joined.add((i, u))
        self._withdraw(u.leaf, u.cuts[-1])
      rotated = {a: "rotary" for a in cut.whole if a[0] >= 0}
      if t.product and rotated:
        self.uses[t.leaf].append((eqn.primitive.name, rotated))
      out = t._replace(dims=t.dims[:axis] + (cut.atoms + t.dims[axis],) + t.dims[axis + 1:], cuts=t.cuts[:-1])
      outs += [out] if out not in outs else []
    self.opaque([[u for u in ts if (i, u) not in joined] for i, ts in enumerate(tracked)], eqn.primitive.name)
    return [outs]

  def _withdraw(self, leaf: int, cut: _Cut) -> None:
    """Takes a cut's atoms out of its ``fused`` record (a use left with none is withdrawn)."""
    entry = self.uses[leaf][cut.use] if cut.use >= 0 else None
    if entry is not None:
      for atom in cut.atoms:
        entry[1].pop(atom, None)
      if not entry[1]:
        self.uses[leaf][cut.use] = None

  # -- control flow --------------------------------------------------------------

  def _scan(self, eqn, tracked):
    nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
    body_in = []
    for i, ts in enumerate(tracked):
      if i < nc + ncarry:
        body_in.append(ts)
        continue
      inner = []
      for t in ts:
        if not t.product:
          self.record(t, "scan", ["stacked"] + [None] * (len(t.dims) - 1))
        inner.append(t._replace(dims=t.dims[1:]))
      body_in.append(inner)
    body_out = self.walk(eqn.params["jaxpr"], body_in)
    length = eqn.params["length"]
    outs = [list(ts) for ts in body_out[:ncarry]]
    outs += [[t._replace(dims=(_foreign(length),) + t.dims) for t in ts] for ts in body_out[ncarry:]]
    return outs

  def _while(self, eqn, tracked):
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    carry = tracked[cn + bn:]
    self.walk(eqn.params["cond_jaxpr"], tracked[:cn] + carry)
    body_out = self.walk(eqn.params["body_jaxpr"], tracked[cn:cn + bn] + carry)
    return [list(a) + [t for t in b if t not in a] for a, b in zip(carry, body_out)]

  def _cond(self, eqn, tracked):
    self.opaque(tracked[:1], "cond")
    outs: list[list[_Track]] = [[] for _ in eqn.outvars]
    for branch in eqn.params["branches"]:
      for acc, ts in zip(outs, self.walk(branch, tracked[1:])):
        acc.extend(t for t in ts if t not in acc)
    return outs


def _cut(dim: tuple[Atom, ...], n: int, block: int, blocks: int):
  """Cuts an axis of size ``n`` into ``n // block`` blocks of which ``blocks`` are kept.

  Returns the kept axis's atoms and the atoms that index the blocks (the fused part).
  """
  parts = _regroup((dim,), (n // block, block)) if block and n % block == 0 else None
  if parts is None:
    return _foreign(blocks * block), ()
  major, minor = parts
  return _foreign(blocks) + minor, major


def _every(dim: tuple[Atom, ...], n: int, step: int):
  """Keeps one residue class modulo ``step`` of an axis of size ``n`` (``x[..., 1::2]``).

  Returns the kept axis's atoms and the atoms that pick the class.
  """
  parts = _regroup((dim,), (n // step, step))
  return parts if parts is not None else (_foreign(n // step), ())


def _sibling_key(t: _Track) -> tuple | None:
  """What the blocks of one cut share (None for a value that is no block)."""
  if not t.cuts:
    return None
  return t.leaf, t.product, t.dims, t.cuts[:-1], t.cuts[-1].atoms, t.cuts[-1].whole


def _fill(dims: list[tuple[Atom, ...]], shape: tuple[int, ...]) -> Dims:
  """Fills axes without parameter atoms with pieces from elsewhere."""
  return tuple(d if _size(d) == n else _foreign(n) for d, n in zip(dims, shape))


def _call_jaxpr(eqn: Any) -> Any:
  """The sub-jaxpr of a call-like primitive (jit, remat, custom_jvp_call ...) taking its invars."""
  for value in eqn.params.values():
    inner = getattr(value, "jaxpr", value)
    if isinstance(inner, jcore.Jaxpr) and (len(inner.invars), len(inner.outvars)) == (
        len(eqn.invars), len(eqn.outvars)):
      return value
  return None


# --------------------------------------------------------------------------
# From recorded uses to per-axis roles.
# --------------------------------------------------------------------------


def _pieces(axis: int, n: int, uses: list[tuple[str, dict[Atom, str | None]]]) -> list[tuple[int, int]]:
  """The finest pieces ``(stride, size)`` of an axis that every use's atoms are made of, major first."""
  cuts = {1, n}
  for _, roles in uses:
    for d, s, a in roles:
      if d == axis:
        cuts.update((s, s * a))
  cuts = sorted(cuts)
  if any(hi % lo for lo, hi in zip(cuts, cuts[1:])):
    return [(1, n)]
  return [(lo, hi // lo) for lo, hi in reversed(list(zip(cuts, cuts[1:])))]


def _piece_role(axis: int, piece: tuple[int, int], roles: dict[Atom, str | None]) -> str | None:
  lo, size = piece
  found = [r for (d, s, a), r in roles.items() if d == axis and s <= lo and lo * size <= s * a]
  found = [r for r in dict.fromkeys(found) if r is not None]
  return "|".join(found) if found else None


def _merge(roles: Sequence[str | None], used: bool) -> str:
  strong = [r for r in dict.fromkeys(roles) if r is not None and r not in _WEAK]
  if "fused" in strong and "fan_out" in strong:
    strong.remove("fan_out")
  if "rotary" in strong and len(strong) > 1:
    strong.remove("rotary")
  if strong:
    return "|".join(strong)
  if any(r is not None for r in roles):
    return "elementwise"
  return "unknown" if used else "unused"


def _as_role(pieces: list[tuple[int, int]], values: list[str | None]) -> Role:
  out: list[AxisPiece] = []
  for (_, size), v in zip(pieces, values):
    if out and out[-1].role == v:  # neighbouring pieces with one role are one piece
      out[-1] = AxisPiece(out[-1].size * size, v)
    else:
      out.append(AxisPiece(size, v))
  return out[0].role if len(out) == 1 else tuple(out)


def _result(shape: tuple[int, ...], uses: list[tuple[str, dict[Atom, str | None]] | None]) -> TracedRoles:
  uses = [u for u in uses if u is not None]
  per_use: list[list[Role]] = [[] for _ in uses]
  merged: list[Role] = []
  for axis, n in enumerate(shape):
    pieces = _pieces(axis, n, uses) if n > 1 else [(1, n)]
    table = [[_piece_role(axis, p, roles) for p in pieces] for _, roles in uses]
    for row, values in zip(per_use, table):
      row.append(_as_role(pieces, values))
    merged.append(_as_role(pieces, [_merge([row[i] for row in table], bool(uses))
                                    for i in range(len(pieces))]))
  distinct = tuple(dict.fromkeys(Use(name, tuple(row)) for (name, _), row in zip(uses, per_use)))
  return TracedRoles(shape, tuple(merged), distinct)


