"""Axis roles read from the computation: what each axis of a parameter does where it is used.

The presets name the axes of a parameter from its path and the Flax layout
convention (`slimoptax.axis_roles`). That guess is wrong whenever the layout
differs: Hugging Face's ``FlaxConv1D`` kernels are ``(fan_out, fan_in)``,
einsum kernels such as ``"BTD,NDH->BTNH"`` put the contracted axis in the
middle, and layers stacked by ``nn.scan`` / ``nnx.scan`` carry a leading layer
axis. `trace_roles` reads the roles from the model instead: it traces ``fn``
with `jax.make_jaxpr` (nothing is computed; `jax.ShapeDtypeStruct` leaves are
enough) and follows every parameter into the primitives it flows into:

================================ ===============================================
``dot_general``                  contracting axes ``fan_in``, free axes
                                 ``fan_out``, batch axes ``batch``
``conv_general_dilated`` kernel  input features ``fan_in``, output features
                                 ``fan_out``, spatial axes ``window``
``gather`` / ``dynamic_slice``   indexed axes ``token``, kept axes ``embed``
``scan`` over the parameter      leading axis ``stacked`` (the body is followed
                                 with that axis removed)
a product cut apart along a      that part of the free axis ``fused`` (fused
free axis (``split``, slices)    q/k/v or k/v kernels, gate/up kernels)
the blocks of such a cut put     not ``fused``: the axis keeps its role and a
back in another order            ``rotary`` use names the axis that was cut
(``concatenate``, ``stack``)     (rotate-half ``[-x2, x1]``, rotate-every-two
                                 ``[-x[..., 1::2], x[..., ::2]]``: head_dim)
elementwise use, reductions      ``elementwise`` (norm scales, biases)
================================ ===============================================

The value is followed through ``transpose``, ``reshape`` (each new axis knows
which pieces of the parameter's axes it is made of), ``broadcast_in_dim``,
``squeeze``, casts, copies, slices, elementwise transformations of the whole
parameter (a mask) and the sub-jaxprs of ``jit``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``, ``cond``, ``while``, ``scan`` and
``shard_map`` (whose body sees one block of each sharded axis).
Any other primitive records an opaque use (axes ``"unknown"`` unless another
use names them); a parameter never reached is ``"unused"``. Not read: blocks
put back together after being mixed with other values (gemma's
``concatenate([x1 * cos - x2 * sin, ...])``) or in their own order (partial
rotary's ``[rotated, passed]``) leave the cut ``fused``; a stacked parameter
indexed dynamically (``w[i]`` in a ``fori_loop``) reads as a table
(``token``, ``embed``); unaligned slices, any other ``concatenate``, ``pad``,
scatters, sorts and custom kernels end the track with an opaque use.

Models: linen ``lambda p, x: model.apply({"params": p}, x)``; NNX ``graphdef,
params, rest = nnx.split(model, nnx.Param, ...)`` and ``lambda p, x:
nnx.merge(graphdef, p, rest)(x)`` (a model of parameters only splits into
``graphdef, params``); Hugging Face Flax ``lambda p, ids: model(ids,
params=p).logits``; plain JAX ``loss(params, batch)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from slimoptax._trace_walk import (
  ROLES,
  AxisPiece,
  Role,
  TracedRoles,
  Use,
  _result,
  _Track,
  _Walker,
  _whole,
)
from slimoptax._tree import named_leaves, shape_of
from slimoptax.layers import view_groups

Axes = tuple[int, ...]

# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def trace_roles(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Any:
  """Reads the role of every axis of every parameter from the computation ``fn`` performs.

  ``fn(params, *args, **kwargs)`` is traced with `jax.make_jaxpr` (nothing
  runs; arrays or `jax.ShapeDtypeStruct` s will do) and each parameter is
  followed into the primitives it reaches (see the module docstring for what
  each primitive means). Keyword arguments are closed over, so flags such as
  ``deterministic=True`` stay static.

  Args:
    fn: a loss ``loss(params, batch)`` or an apply function ``apply(params,
      x)``; for NNX, ``lambda state, x: nnx.merge(graphdef, state)(x)`` with
      ``graphdef, state = nnx.split(model, nnx.Param)``.
    params: the parameter pytree ``fn`` takes first.
    *args: the other positional arguments (arrays or shape structs).
    **kwargs: keyword arguments, passed as they are.

  Returns:
    A pytree with ``params``' structure whose leaves are `TracedRoles`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slimoptax import trace
    >>> params = {"w": jnp.zeros((16, 8)), "emb": jnp.zeros((100, 8)), "ln": jnp.ones(8)}
    >>> def loss(p, ids):
    ...   h = jnp.take(p["emb"], ids, axis=0) * p["ln"]
    ...   return jnp.mean(h @ p["w"].T)       # w is stored (fan_out, fan_in)
    >>> roles = trace.trace_roles(loss, params, jax.ShapeDtypeStruct((4, 6), jnp.int32))
    >>> roles["w"].roles, roles["emb"].roles, roles["ln"].roles
    (('fan_out', 'fan_in'), ('token', 'embed'), ('elementwise',))
    >>> trace.fan_in_axes(roles["w"])
    (1,)
  """
  closed = jax.make_jaxpr(lambda p, *a: fn(p, *a, **kwargs))(params, *args)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  shapes = [shape_of(x) for x in leaves]
  walker = _Walker(len(leaves))
  ins: list[list[_Track]] = [[_Track(i, False, _whole(s))] for i, s in enumerate(shapes)]
  ins += [[] for _ in closed.jaxpr.invars[len(leaves):]]
  outs = walker.walk(closed.jaxpr, ins)
  walker.opaque(outs, "output")
  return jax.tree_util.tree_unflatten(
      treedef, [_result(s, u) for s, u in zip(shapes, walker.uses)])


def _is_traced(x: Any) -> bool:
  return isinstance(x, TracedRoles)


def axes_with_role(traced: TracedRoles, role: str) -> Axes:
  """The axes whose merged role is ``role`` or has it among its disagreeing alternatives.

  An axis split into pieces with different roles is not counted (see its
  `AxisPiece` s).

  Example:
    >>> from slimoptax.trace import TracedRoles, axes_with_role
    >>> axes_with_role(TracedRoles((100, 8), ("token|fan_out", "embed|fan_in"), ()), "fan_in")
    (1,)
  """
  if role not in ROLES:
    raise ValueError(f"unknown role {role!r}; known: {ROLES}")
  return tuple(i for i, r in enumerate(traced.roles) if isinstance(r, str) and role in r.split("|"))


def fan_in_axes(traced: TracedRoles) -> Axes:
  """The contracted axes of a parameter (``fan_in`` in some use)."""
  return axes_with_role(traced, "fan_in")


def fan_out_axes(traced: TracedRoles) -> Axes:
  """The free axes of a parameter in its products (``fan_out`` in some use)."""
  return axes_with_role(traced, "fan_out")


def stacked_axes(traced: TracedRoles) -> Axes:
  """The axes a ``scan`` runs over (the layer axis of ``nn.scan`` / ``nnx.scan`` stacks)."""
  return axes_with_role(traced, "stacked")


_COMPARED = ("fan_in", "fan_out", "token", "embed")
_FAMILIES = (("fan_in", "fan_out"), ("token", "embed"))


def _has_piece(traced: TracedRoles, role: str) -> bool:
  return any(isinstance(r, tuple) and any(p.role and role in p.role.split("|") for p in r)
             for r in traced.roles)


class RoleDisagreement(NamedTuple):
  """Where the roles read from a parameter's name differ from the traced ones.

  Attributes:
    layer_type: the layer type the name gives (`slimoptax.layer_type`), or
      ``None`` when no recognizer matches.
    names: ``{role: axes}`` from `slimoptax.axis_roles` for the compared roles:
      ``fan_in`` / ``fan_out`` where the trace saw a product, ``token`` /
      ``embed`` where it saw a lookup (empty entries left out).
    traced: ``{role: axes}`` from the trace, for the same roles.
    roles: the traced per-axis roles.
  """

  layer_type: str | None
  names: dict[str, Axes]
  traced: dict[str, Axes]
  roles: tuple[Role, ...]


def compare_with_names(traced: Any) -> dict[str, RoleDisagreement]:
  """The parameters whose name-derived axis roles differ from what the computation does.

  The presets name axes from the parameter's path in Flax layouts
  (`slimoptax.layer_type` then `slimoptax.axis_roles`); the traced roles
  (`trace_roles`) describe what the computation actually does with each axis.
  A disagreement means a preset would average the wrong axes of that
  parameter: a ``(fan_out, fan_in)`` kernel (Hugging Face ``FlaxConv1D``), an
  einsum layout, a stacked layer axis, or a fused kernel. A convolution's
  ``window`` axes count as fan-in here, as the names count them. Parameters that the
  trace does not reach (``unused``) or only reaches opaquely are not compared;
  for a tied embedding both views are legitimate (the names see an input
  table, the trace also sees the output head) and it is reported.

  Args:
    traced: the result of `trace_roles`.

  Returns:
    ``{path: RoleDisagreement}`` for the parameters that disagree, in leaf
    order.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slimoptax import trace
    >>> params = {"c_fc": {"kernel": jnp.zeros((64, 16))}}    # stored (fan_out, fan_in)
    >>> roles = trace.trace_roles(lambda p, x: x @ p["c_fc"]["kernel"].T, params, jnp.zeros((2, 16)))
    >>> d = trace.compare_with_names(roles)["c_fc/kernel"]
    >>> d.layer_type, d.names, d.traced
    ('mlp_up', {'fan_in': (0,), 'fan_out': (1,)}, {'fan_in': (1,), 'fan_out': (0,)})
  """
  from slimoptax.layers import axis_roles
  from slimoptax.presets import layer_type

  out: dict[str, RoleDisagreement] = {}
  for path, t in named_leaves(traced, is_leaf=_is_traced):
    if not t.used or all(r in ("unknown", "unused") for r in t.roles):
      continue
    try:
      ltype = layer_type(path, t.shape)
      _, named = axis_roles(ltype, t.shape, path=path)
    except ValueError:
      ltype, named = None, {}
    got = {r: axes_with_role(t, r) for r in _COMPARED}
    if got["fan_in"]:  # a kernel's window is part of its fan-in, as the names count it
      got["fan_in"] = tuple(sorted(got["fan_in"] + axes_with_role(t, "window")))
    # A family of roles is compared where the trace saw it (a gathered table says nothing of fan_in).
    keep = [r for family in _FAMILIES if any(got[f] or _has_piece(t, f) for f in family)
            for r in family]
    names = {r: tuple(named.get(r, ())) for r in keep}
    if any(names[r] != got[r] for r in keep):
      out[path] = RoleDisagreement(ltype, {r: names[r] for r in keep if names[r]},
                                   {r: got[r] for r in keep if got[r]}, t.roles)
  return out


def _unstacked(shape: tuple[int, ...], stacked: Axes) -> tuple[tuple[int, ...], Callable[[int], int]]:
  """The shape without the stacked axes, and the map from its axes back to the parameter's."""
  kept = [i for i in range(len(shape)) if i not in stacked]
  return tuple(shape[i] for i in kept), lambda a: kept[a]


def _traced_map(ltype: str, t: TracedRoles, stacked: Axes) -> dict[str, Axes]:
  """``{role: axes}`` of a parameter from its trace (a lookup table's fan_in / fan_out are token / embed)."""
  token, embed = axes_with_role(t, "token"), axes_with_role(t, "embed")
  if ltype in ("embedding", "pos_embedding") and token:
    fan_in, fan_out = token, embed
  else:
    fan_in = tuple(sorted(set(fan_in_axes(t)) | set(axes_with_role(t, "window"))))
    fan_out = fan_out_axes(t)
  out = {"fan_in": fan_in, "fan_out": fan_out, "token": token, "vocab": token, "embed": embed,
         "all": tuple(i for i in range(len(t.shape)) if i not in stacked)}
  return {k: tuple(a for a in v if a not in stacked) for k, v in out.items()}


def traced_axes(rules: Any, fn: Callable[..., Any], params: Any, *args: Any, num_heads: int | None = None,
                **kwargs: Any) -> Any:
  """The axes of ``rules`` (a preset) for each parameter, with the roles read from the computation.

  The layer type of each parameter still comes from its name (the preset's
  recognizers); the *axes* its roles name come from `trace_roles` of ``fn``:
  a ``(fan_out, fan_in)`` kernel (Hugging Face ``FlaxConv1D``, PyTorch
  layouts) is averaged over its real fan-out, an einsum kernel over the axes
  its equation contracts or keeps, and a stacked layer axis (``nn.scan`` /
  ``nnx.scan``) is never averaged (``"all"`` means every other axis: one
  value per layer). Where names and trace agree on fan_in / fan_out, the
  name-derived roles are used as they are (head views included, computed on
  the parameter without its stacked axes), except that a 2-D query/key
  kernel whose product a rotary embedding rotates is viewed with the
  head_dim the rotation reads: ``num_heads`` must give that view for queries;
  keys may have fewer heads (grouped-query attention: a ``(d, 2*8)`` key
  with ``num_heads=4`` is viewed ``(d, 2, 8)``, not ``(d, 4, 4)``); any other
  disagreement is a ValueError. Where they disagree, the traced
  roles win (they are what the computation does); a role the trace cannot
  give (``heads`` / ``head_dim`` of a kernel whose layout is not Flax's) is
  a ValueError naming the parameter. Rules with integer axes are declarations
  and are kept as given. Parameters the trace does not reach keep their
  name-derived axes, listed in one warning.

  Args:
    rules: a preset name or `slimoptax.Rules`.
    fn, params, *args, **kwargs: the computation, as `trace_roles` takes it.
    num_heads: head count, for head roles of 2-D attention kernels.

  Returns:
    A pytree like ``params`` of axes (int tuples or `slimoptax.Reshaped`): the
    form every ``compress=`` accepts.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"mlp": {"c_fc": {"kernel": jnp.zeros((64, 16))}}}   # stored (fan_out, fan_in)
    >>> apply = lambda p, x: x @ p["mlp"]["c_fc"]["kernel"].T
    >>> slimoptax.compression_axes(params, "slimadam")["mlp"]["c_fc"]["kernel"]   # names: wrong axis
    (1,)
    >>> slimoptax.preset("slimadam").for_model(apply, params, jnp.zeros((2, 16)))["mlp"]["c_fc"]["kernel"]
    (0,)
  """
  import warnings

  from slimoptax import rules as rules_lib
  from slimoptax.layers import LAYER_TYPES, Reshaped, axis_roles

  rules = rules_lib.as_rules(rules, num_heads=num_heads)
  traced = dict(named_leaves(trace_roles(fn, params, *args, **kwargs), is_leaf=_is_traced))
  out, untraced = [], []
  for path, shape, rule in rules.match_all(params):
    t = traced[path]
    layout = rules.layout(path, shape)
    if layout.fused is not None or layout.torch or layout.einsum or layout.stacked:
      out.append(_declared_axes(rules_lib, rule, path, shape, layout, t))  # declarations win, checked
      continue
    semantic = not isinstance(rule.axes, str) and any(isinstance(a, str) for a in rule.axes)
    if not semantic or rule.label not in LAYER_TYPES or not t.used or all(
        r in ("unknown", "unused", "elementwise") for r in t.roles):
      if semantic and not t.used:
        untraced.append(path)
      out.append(rules_lib.rule_axes(rule, path, shape, layout))
      continue
    stacked = stacked_axes(t)
    inner, back = _unstacked(shape, stacked)
    got = _traced_map(rule.label, t, stacked)
    try:
      _, named = axis_roles(rule.label, inner, path=path)
    except ValueError:
      named = {}
    named = {k: tuple(back(a) for a in v) for k, v in named.items()}
    if all(named.get(k, ()) == got[k] for k in ("fan_in", "fan_out")):
      axes = rules_lib.rule_axes(rule, path, inner, layout)  # Flax layout: names are right
      if isinstance(axes, Reshaped):
        if stacked:
          raise ValueError(f"{path!r}: a head view of a stacked 2-D attention kernel {shape} is not supported; "
                           "give integer axes (of the stored layout) for it")
        out.append(_rotary_view(path, rule.label, t, axes))
      else:
        out.append(tuple(sorted(back(a) for a in axes)))
      continue
    picked: set[int] = set()
    for a in rule.axes:
      if isinstance(a, int):
        raise ValueError(f"rule {rule.pattern!r}: cannot mix integer axes with traced roles ({path!r})")
      if a in ("heads", "head_dim"):
        raise ValueError(
            f"{path!r} (shape {shape}, traced roles {t.roles}) is not in the Flax layout its name implies, "
            f"so its {a!r} axis cannot be told; give integer axes for it, e.g. "
            f"slimoptax.Rules([({rules_lib.exact_pattern(path)!r}, {rule.label!r}, (<axes>,))]) + the preset")
      if not got.get(a):
        raise ValueError(f"{path!r}: the trace gives no {a!r} axis (traced roles {t.roles}) for the "
                         f"{rule.label!r} axes {rule.axes}; give integer axes for it")
      picked.update(got[a])
    out.append(tuple(sorted(picked)))
  if untraced:
    warnings.warn(f"for_model: {len(untraced)} parameter(s) not reached by the traced computation keep their "
                  f"name-derived axes: {untraced[:6]}{' ...' if len(untraced) > 6 else ''}", stacklevel=3)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out)


def _declared_axes(rules_lib: Any, rule: Any, path: str, shape: tuple[int, ...], layout: Any,
                   t: TracedRoles) -> Any:
  """A declared layout's axes, refused where the computation contradicts its fan_in / fan_out / stacked axes."""
  from slimoptax.layouts import layout_roles

  axes = rules_lib.rule_axes(rule, path, shape, layout)
  if layout.fused is not None and t.used:
    _check_fused(path, shape, layout, t)
  if layout.fused is not None or not t.used or isinstance(rule.axes, str):
    return axes
  traced_stacked = tuple(stacked_axes(t))
  if traced_stacked and traced_stacked != tuple(layout.stacked):
    raise ValueError(f"{path!r}: declared stacked axes {layout.stacked}, the computation scans over "
                     f"{traced_stacked} (traced roles {t.roles})")
  try:
    view, declared = layout_roles(rule.label, shape, layout._replace(num_heads=None, num_kv_heads=None), path=path)
  except ValueError:
    return axes
  got = _traced_map(rule.label, t, list(traced_stacked))
  for role in ("fan_in", "fan_out"):
    if view == shape and got.get(role) and declared.get(role) and tuple(got[role]) != tuple(declared[role]):
      raise ValueError(f"{path!r}: its declared layout gives {role} {declared[role]}, the computation "
                       f"{tuple(got[role])} (traced roles {t.roles}); fix the declaration")
  return axes


def _check_fused(path: str, shape: tuple[int, ...], layout: Any, t: TracedRoles) -> None:
  """Refuses a `Fused` declaration whose axis, part count, interleaving or layout the computation contradicts."""
  from slimoptax.layouts import fused_view, layout_roles

  view, part_axis, _, _ = fused_view(shape, layout.fused, layout, path=path)
  groups = view_groups(shape, view)
  axis = next(j for j, g in enumerate(groups) if part_axis in g)
  declared = tuple(view[v] for v in groups[axis])  # (n,), (n, rest) or (heads, n, rest)
  at = groups[axis].index(part_axis)
  traced = [(j, r) for j, r in enumerate(t.roles) if r == "fused" or (
      isinstance(r, tuple) and any(p.role == "fused" for p in r))]
  problem = None
  if [j for j, _ in traced] != [axis]:
    problem = f"the computation cuts axes {[j for j, _ in traced]} into parts, the declaration axis {axis}"
  else:
    pieces = traced[0][1] if isinstance(traced[0][1], tuple) else ()
    sizes = [p.size for p in pieces] or [shape[axis]]
    k = next((i for i, p in enumerate(pieces) if p.role == "fused"), 0)
    if sizes[k] != declared[at] or math.prod(sizes[:k]) != math.prod(declared[:at]):
      problem = (f"the computation cuts axis {axis} as {tuple(sizes)} (parts at {k}), the declaration as "
                 f"{declared} (parts at {at}; per-head parts need Fused(heads=...))")
  if problem is None:
    rest = layout._replace(fused=None, num_heads=None, num_kv_heads=None)
    try:
      _, roles = layout_roles("dense", shape, rest, path=path)
    except ValueError:
      roles = {}
    traced_in = fan_in_axes(t)
    if traced_in and roles.get("fan_in") and tuple(roles["fan_in"]) != tuple(traced_in):
      problem = (f"its declared layout gives fan_in {roles['fan_in']}, the computation {traced_in} "
                 "(torch_layout= for (fan_out, fan_in) kernels)")
  if problem:
    raise ValueError(f"{path!r}: the fused declaration {layout.fused._replace(parts=tuple(getattr(p, 'label', p) for p in layout.fused.parts))} does not fit: {problem} (traced roles {t.roles})")


def _rotated_block(t: TracedRoles, axis: int) -> int | None:
  """The size of the minor block of ``axis`` a rotary embedding rotates (1 if it is not minor), or None."""
  blocks = []
  for use in t.uses:
    role = use.roles[axis]
    pieces = role if isinstance(role, tuple) else (AxisPiece(t.shape[axis], role),)
    if any(p.role == "rotary" for p in pieces):
      block = 1
      for p in reversed(pieces):
        if p.role != "rotary":
          break
        block *= p.size
      blocks.append(block)
  return max(blocks, default=None)


def _rotary_view(path: str, label: str, t: TracedRoles, view: Any) -> Any:
  """The head view of a 2-D ``(d, H*hd)`` kernel, checked against the head_dim its rotary embedding rotates."""
  from slimoptax.layers import _simplify_view

  if label not in ("query", "key") or len(t.shape) != 2 or len(view.shape) != 3 or view.shape[0] != t.shape[0]:
    return view
  d, n = t.shape
  block = _rotated_block(t, 1)
  if block is None or view.shape[1:] == (n // block, block):
    return view
  heads = n // block
  if label == "key" and heads < view.shape[1] and view.shape[1] % heads == 0:  # grouped-query keys
    return _simplify_view(t.shape, (d, heads, block), view.axes)
  raise ValueError(
      f"{path!r}: its rotary embedding rotates blocks of {block} of its fan_out {n} ({heads} heads of "
      f"head_dim {block}), but num_heads gives the head view {view.shape}; pass the num_heads of the model, "
      "or give integer axes for it")


def roles_table(traced: Any) -> str:
  """The traced roles as a text table: path, shape, per-axis roles, uses.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax import trace
    >>> print(trace.roles_table(trace.trace_roles(lambda p, x: x @ p["w"], {"w": jnp.zeros((4, 2)), "u": jnp.zeros(3)}, jnp.zeros(4))))
    path  shape   roles               uses
    u     (3,)    unused              -
    w     (4, 2)  fan_in, fan_out     dot_general
  """
  rows = [("path", "shape", "roles", "uses")]
  for path, t in named_leaves(traced, is_leaf=_is_traced):
    roles = ", ".join(_role_str(r) for r in t.roles) or "-"
    if not t.used:
      roles = "unused"
    rows.append((path, str(t.shape), roles, ", ".join(dict.fromkeys(u.primitive for u in t.uses)) or "-"))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
  return "\n".join(line.rstrip() for line in lines)


def _role_str(role: Role) -> str:
  if isinstance(role, tuple):
    return "(" + " x ".join(f"{p.size}:{p.role}" for p in role) + ")"
  return str(role)


__all__ = [
    "ROLES", "AxisPiece", "RoleDisagreement", "TracedRoles", "Use", "axes_with_role",
    "compare_with_names", "fan_in_axes", "fan_out_axes", "roles_table", "stacked_axes",
    "trace_roles", "traced_axes",
]
