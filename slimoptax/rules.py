"""Label rules: parameter path -> label -> axes, with semantic axis roles, and the one resolver.

A *rule* maps a parameter path to a *label* and to the *axes* of that parameter
along which a second moment (or any other statistic) is averaged. A `Rules`
object is an ordered list of such entries; the first entry whose regular
expression matches a parameter's path wins. Presets (``"slimadam"``,
``"adam-mini"``, ...) are `Rules` objects whose labels are *layer types*
(``"query"``, ``"mlp_down"``, ``"embedding"``, ...) and whose axes are
*semantic* (``"fan_in"``, ``"fan_out"``, ``"heads"``, ``"head_dim"``,
``"token"``, ``"embed"``, ``"all"``), resolved per layer from the parameter's
shape.

Conventions. Paths are the pytree key path joined by ``"/"``: a linen tree gives
``params/Block_0/MultiHeadDotProductAttention_0/query/kernel``, an NNX state
``blocks/0/attn/query/kernel``, a flat PyTorch-style dict
``transformer.h.0.attn.q_proj.weight`` (a single key). Axis roles assume **Flax
layouts**: ``Dense`` kernels are ``(fan_in, fan_out)``, ``DenseGeneral``
attention kernels are ``(d, heads, head_dim)`` for query/key/value and
``(heads, head_dim, d)`` for the output projection, ``Conv`` kernels are
``(*window, in, out)``, ``Embed`` tables are ``(vocab, d)``. PyTorch
``nn.Linear`` weights and Hugging Face ``Conv1D`` kernels are ``(fan_out,
fan_in)``: for those give integer axes.

Reference: Kalra et al., "When Can You Get Away with Low Memory Adam?" (2025),
Table 3 (SlimAdam rules) and App. A (AdaLayer, Adam-mini).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np

from slimoptax import layouts as layouts_lib
from slimoptax._tree import check_lists, is_param_like, leaves_like, named_leaves, shape_of
from slimoptax.layers import (
  GENERIC_KERNEL_PATTERN,
  LAYER_TYPES,
  ROLE_NAMES,
  Reshaped,
  Split,
  _simplify_view,
  kept_entries,
  reduced_shape,
  validate_axes,
)

Axes = tuple[int, ...]
SemanticAxis = Union[int, str]

# --------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------

UNSUPPORTED = "unsupported"


class GenericLayerWarning(UserWarning):
  """Parameters whose layer type only the generic ``kernel|weight|w`` pattern gave (a guess: "dense").

  Raised once per resolution by presets whose axes depend on the layer role
  (``"slimadam"``, ``"adam-mini"``, ``"adalayer+ln+tn"``); ``strict=True``
  makes it an error. Name their layer types (``preset(..., layer_types=...)``)
  to silence it.
  """


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule: parameters whose path matches ``pattern`` get ``label`` and ``axes``.

  Attributes:
    pattern: regular expression searched (``re.search``, case-insensitive) in
      the ``"/"``-joined parameter path.
    label: a name for the group; a layer type from `LAYER_TYPES` when ``axes``
      holds semantic names.
    axes: axes to average over: ints (negative allowed), semantic role names
      (``"fan_in"``, ``"fan_out"``, ``"heads"``, ``"head_dim"``, ``"token"``,
      ``"embed"``, ``"all"``), or a mix; ``()`` means no compression;
      `UNSUPPORTED` makes a match an error (a preset that does not handle a
      layer type).
    warn_unused: warn when the rule matches no parameter (presets turn this off
      for their recognizers).
    min_ndim: the rule only applies to parameters of at least this rank.
    max_ndim: ... and of at most this rank (``None``: no bound).
  """

  pattern: str
  label: str
  axes: tuple[SemanticAxis, ...] | str = ()
  warn_unused: bool = True
  min_ndim: int = 0
  max_ndim: int | None = None

  def __post_init__(self):
    axes = self.axes
    if axes is None:
      axes = ()
    if isinstance(axes, (int, np.integer)):
      axes = (int(axes),)
    if not isinstance(axes, str):
      axes = tuple(int(a) if isinstance(a, (int, np.integer)) else str(a) for a in axes)
      for a in axes:
        if isinstance(a, str) and a not in ROLE_NAMES:
          raise ValueError(f"rule {self.pattern!r}: unknown axis name {a!r}; known: {ROLE_NAMES}")
    elif axes != UNSUPPORTED:
      raise ValueError(f"rule {self.pattern!r}: axes must be a tuple, got {axes!r}")
    object.__setattr__(self, "axes", axes)
    if not isinstance(self.pattern, str) or not isinstance(self.label, str):
      raise TypeError(f"rule (pattern={self.pattern!r}, label={self.label!r}): pattern and label "
                      "must be strings")
    try:
      re.compile(self.pattern)
    except re.error as err:
      raise ValueError(f"rule (pattern={self.pattern!r}, label={self.label!r}): invalid regular "
                       f"expression: {err}") from None

  def matches(self, path: str, ndim: int | None = None) -> bool:
    """Whether the rule applies to a parameter with this path (and rank)."""
    if ndim is not None and (ndim < self.min_ndim or (self.max_ndim is not None and ndim > self.max_ndim)):
      return False
    return re.search(self.pattern, path, flags=re.IGNORECASE) is not None


class Rules:
  """An ordered list of `Rule` s: path pattern -> label -> axes.

  The first rule whose pattern matches a parameter's path decides its label
  and axes. Every parameter must be matched by some rule. Rules are saved to
  and loaded from JSON, print as a table against a parameter tree, and give
  ``param_labels`` for `optax.partition` via `labels`.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"attn": {"qkv": {"kernel": jnp.zeros((8, 24))}}, "ln": {"scale": jnp.ones(8)}}
    >>> rules = slimoptax.Rules([
    ...     (r"attn/qkv/kernel$", "attn_qkv", (0,)),   # fused qkv: average over fan_in
    ... ]) + slimoptax.preset("slimadam")
    >>> slimoptax.compression_axes(params, rules)
    {'attn': {'qkv': {'kernel': (0,)}}, 'ln': {'scale': ()}}
  """

  def __init__(self, rules: Iterable[Rule | Sequence[Any]] = (), *, name: str = "custom",
               num_heads: int | None = None, role_dependent: bool = False, strict: bool = False,
               layouts: layouts_lib.Declarations | None = None, **declarations: Any):
    self.rules: tuple[Rule, ...] = tuple(_as_rule(i, r) for i, r in enumerate(rules))
    self.name = name
    self.num_heads = num_heads
    # What names cannot tell (`slimoptax.layouts`): num_kv_heads=, stacked=, torch_layout=, einsum=, fused=.
    self.layouts = (layouts or layouts_lib.Declarations()).merge(layouts_lib.declarations(**declarations))
    # Set by presets whose axes differ between layer roles: a generic "dense" match is a guess there.
    self.role_dependent = bool(role_dependent)
    self.strict = bool(strict)

  def __add__(self, other: "Rules") -> "Rules":
    if not isinstance(other, Rules):
      return NotImplemented
    return Rules(self.rules + other.rules, name=f"{self.name}+{other.name}",
                 num_heads=self.num_heads if self.num_heads is not None else other.num_heads,
                 role_dependent=self.role_dependent or other.role_dependent,
                 strict=self.strict or other.strict, layouts=self.layouts.merge(other.layouts))

  def for_model(self, fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Any:
    """These rules' axes with roles read from the computation: `slimoptax.trace.traced_axes`."""
    from slimoptax.trace import traced_axes  # the trace builds on the rules: imported here
    return traced_axes(self, fn, params, *args, **kwargs)

  def is_generic(self, rule: Rule) -> bool:
    """Whether ``rule`` is the generic kernel recognizer of a role-dependent preset (its "dense" is a guess)."""
    return self.role_dependent and rule.label == "dense" and rule.pattern == GENERIC_KERNEL_PATTERN

  def __iter__(self):
    return iter(self.rules)

  def __len__(self):
    return len(self.rules)

  def __eq__(self, other):
    return (isinstance(other, Rules) and self.rules == other.rules and self.num_heads == other.num_heads
            and self.layouts == other.layouts)

  def with_layouts(self, **declarations: Any) -> "Rules":
    """These rules with more layout declarations (`slimoptax.layouts.declarations` keywords) taking precedence."""
    return Rules(self.rules, name=self.name, num_heads=self.num_heads, role_dependent=self.role_dependent,
                 strict=self.strict, layouts=layouts_lib.declarations(**declarations).merge(self.layouts))

  def layout(self, path: str, shape: Sequence[int]) -> layouts_lib.Layout:
    """The declared `slimoptax.layouts.Layout` of one parameter (fused parts resolved to these rules)."""
    out = self.layouts.layout(path, len(tuple(shape)), self.num_heads)
    if out.fused is None:
      return out
    parts = []
    for ltype in out.fused.parts:
      rule = next((r for r in self.rules if r.label == ltype and r.axes != UNSUPPORTED), None)
      if rule is None:
        raise ValueError(f"fused parameter {path!r}: no rule of {self.name!r} gives axes to its {ltype!r} part")
      parts.append(rule)
    return out._replace(fused=out.fused._replace(parts=tuple(parts)))

  def __repr__(self):
    return f"Rules(name={self.name!r}, {len(self.rules)} rules)"

  # -- matching --------------------------------------------------------------

  def match(self, path: str, shape: Sequence[int]) -> Rule:
    """Returns the first rule matching ``path`` and rank; raises ValueError if none."""
    for rule in self.rules:
      if rule.matches(path, len(tuple(shape))):
        return rule
    raise ValueError(f"no rule of {self.name!r} matches parameter {path!r} with shape {tuple(shape)}")

  def match_all(self, params: Any, *, warn: bool = True,
                generic: bool = True) -> list[tuple[str, tuple[int, ...], Rule]]:
    """The first matching rule of every leaf: ``[(path, shape, rule), ...]``.

    With ``warn``, rules that match nothing warn, and so (once, listing them:
    `GenericLayerWarning`) do leaves that only the generic kernel pattern of a
    role-dependent preset matched; ``generic=False`` skips that check.

    Raises:
      ValueError: naming a parameter that no rule matches (nothing is left
        uncompressed silently); under ``strict``, naming the generic leaves.
    """
    out = []
    used = set()
    for path, leaf in named_leaves(params):
      shape = shape_of(leaf)
      idx = next((i for i, rule in enumerate(self.rules) if rule.matches(path, len(shape))), None)
      if idx is None:
        hint = (" (the parameter tree is a bare array, whose path is empty: no layer type can be "
                "read from it; give integer axes or wrap it in a dict)") if path == "" else ""
        raise ValueError(
            f"no rule of {self.name!r} matches parameter {path!r} with shape {shape}; add a rule "
            f"for it (nothing is left uncompressed silently){hint}")
      used.add(idx)
      out.append((path, shape, self.rules[idx]))
    if generic:
      self._check_generic(out, warn=warn)
    if warn:
      for i, rule in enumerate(self.rules):
        if rule.warn_unused and i not in used:
          warnings.warn(
              f"rule {rule.pattern!r} -> {rule.label!r} of {self.name!r} matches no parameter",
              stacklevel=3)
    return out

  def _check_generic(self, matched: list[tuple[str, tuple[int, ...], Rule]], *, warn: bool) -> None:
    """One `GenericLayerWarning` (``strict``: a ValueError) listing the leaves only the generic pattern matched."""
    generic = [(path, shape) for path, shape, rule in matched
               if self.is_generic(rule) and self.layouts.layout(path, len(shape), None).fused is None]
    if not generic or not (warn or self.strict):
      return
    listed = ", ".join(f"{p!r} {s}" for p, s in generic[:6]) + (" ..." if len(generic) > 6 else "")
    example = generic[0][0]
    message = (
        f"{self.name!r}: {len(generic)} parameter(s) matched only by the generic kernel pattern, so their "
        f"layer role is a guess (\"dense\", the preset's axes for a hidden Dense layer): {listed}. If one is "
        f"an output head, an attention or MLP kernel, say so: slimoptax.preset({self.name.split('+')[-1]!r}, "
        f"layer_types={{{exact_pattern(example)!r}: 'head'}}) (layer types: {', '.join(sorted(LAYER_TYPES))})")
    if self.strict:
      raise ValueError(message + "; strict=True refuses the guess")
    warnings.warn(message, GenericLayerWarning, stacklevel=4)

  def resolve(self, params: Any, *, warn: bool = True,
              generic: bool = True) -> list[tuple[str, tuple[int, ...], Rule, Axes | Reshaped]]:
    """Resolves every leaf: ``[(path, shape, rule, axes_or_reshaped), ...]`` (see `rule_axes`)."""
    matched = self.match_all(params, warn=warn, generic=generic)
    layouts_lib.check_kv_heads(matched, self)
    return [(path, shape, rule, rule_axes(rule, path, shape, self.layout(path, shape)))
            for path, shape, rule in matched]

  def labels(self, params: Any) -> Any:
    """A pytree like ``params`` of label strings (``param_labels`` for `optax.partition`)."""
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [r.label for _, _, r in self.match_all(params, warn=False)])

  def axes(self, params: Any, *, warn: bool = True) -> Any:
    """A pytree like ``params`` of resolved axes (int tuples or `Reshaped`)."""
    resolved = self.resolve(params, warn=warn)
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [r[3] for r in resolved])

  # -- display -----------------------------------------------------------------

  def table(self, params: Any) -> str:
    """A text table: path, shape, label, axes, second moments kept (`slimoptax.rules_io.rules_table`)."""
    from slimoptax.rules_io import rules_table
    return rules_table(self, params)

  # -- serialisation -----------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """The structured JSON form (``"format": "slimoptax.rules/v1"``), read back by `from_dict`."""
    from slimoptax.rules_io import rules_to_dict  # the JSON I/O builds Rules: imported here
    return rules_to_dict(self)

  def to_json(self, path: str | None = None, *, indent: int = 2) -> str:
    """Serialises to JSON (and writes it to ``path`` if given)."""
    text = json.dumps(self.to_dict(), indent=indent)
    if path is not None:
      with open(path, "w") as f:
        f.write(text + "\n")
    return text

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "Rules":
    """Reads `to_dict` output or a flat ``{name: [axes] | null}`` mapping; see `slimoptax.rules_io`."""
    from slimoptax.rules_io import rules_from_dict
    return rules_from_dict(data)

  @classmethod
  def from_json(cls, path_or_text: str) -> "Rules":
    """Loads a JSON file, or JSON text (stripped, it starts with ``{`` or ``[``); see `slimoptax.rules_io`."""
    from slimoptax.rules_io import rules_from_json
    return rules_from_json(path_or_text)

  def as_mapping(self) -> dict[str, list[int] | None]:
    """The flat ``{label: [axes] | None}`` form (``None`` for no compression)."""
    out = {}
    for r in self.rules:
      if isinstance(r.axes, str) or any(isinstance(a, str) for a in r.axes):
        raise ValueError(f"rule {r.pattern!r} has semantic axes {r.axes}; resolve them first")
      out[r.label] = list(r.axes) if r.axes else None
    return out


def _as_rule(i: int, r: Any) -> Rule:
  if isinstance(r, Rule):
    return r
  if not isinstance(r, (tuple, list)) or not 2 <= len(r) <= 6:
    raise TypeError(f"rule {i}: expected a Rule or a (pattern, label, axes) tuple, got {r!r}")
  return Rule(*r)


def exact_pattern(name: str) -> str:
  """A pattern that matches exactly the path ``name`` (``*`` matches one path component)."""
  return "^" + re.escape(name).replace(r"\*", r"[^/.]+") + "$"


def rule_axes(rule: Rule, path: str, shape: tuple[int, ...],
              layout: layouts_lib.Layout | int | None = None) -> Axes | Reshaped | Split:
  """The axes one rule gives one parameter.

  Integer axes are checked; semantic roles are resolved by
  `slimoptax.layouts.layout_roles` in the parameter's declared layout
  (``layout``: its `slimoptax.layouts.Layout`, or a head count); a fused
  parameter gets one entry per part (`slimoptax.Split`).
  """
  layout = layouts_lib.as_layout(layout)
  ndim = len(shape)
  if layout.fused is not None:
    view, axis, part_shape, part_layout = layouts_lib.fused_view(shape, layout.fused, layout, path=path)
    return Split(view, axis, tuple(
        rule_axes(part, f"{path}[{part.label} part]", part_shape, part_layout) for part in layout.fused.parts))
  if rule.axes == UNSUPPORTED:
    raise ValueError(
        f"parameter {path!r} (shape {shape}) is a {rule.label!r} layer, which this preset does "
        "not handle; declare its parts (preset(..., fused={" + repr(exact_pattern(path)) +
        ": ('query', 'key', 'value')}), with torch_layout=True if the model's kernels are stored "
        "(fan_out, fan_in) as Hugging Face's FlaxConv1D) or add a rule with explicit axes for it")
  axes = rule.axes
  if not any(isinstance(a, str) for a in axes):
    out = []
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f"rule {rule.pattern!r}: axis {a} out of range for parameter {path!r} with shape {shape}")
      out.append(a % ndim)
    if len(set(out)) != len(out):
      raise ValueError(f"rule {rule.pattern!r}: repeated axes {axes} for parameter {path!r}")
    if set(out) & set(layout.stacked):
      raise ValueError(f"rule {rule.pattern!r}: axes {axes} of {path!r} include its stacked axes "
                       f"{layout.stacked}, which are never averaged")
    return tuple(sorted(out))
  if rule.label not in LAYER_TYPES:
    raise ValueError(
        f"rule {rule.pattern!r} uses semantic axes {axes} but its label {rule.label!r} is not a "
        f"layer type; known layer types: {sorted(LAYER_TYPES)} (parameter {path!r})"
    )
  if ndim - len(layout.stacked) < 2 and rule.label not in ("norm", "bias", "scalar") and not set(axes) <= {"all"}:
    # Vector-like parameters only know "all".
    raise ValueError(f"parameter {path!r} with shape {shape} has no axis roles {axes}")
  layouts_lib.check_rank(rule.label, path, shape, layout)
  if not any(a in ("heads", "head_dim") for a in axes):
    layout = layout._replace(num_heads=None, num_kv_heads=None)
  view, roles = layouts_lib.layout_roles(rule.label, shape, layout, path=path)
  picked: set[int] = set()
  for a in axes:
    if isinstance(a, int):
      if view != shape:
        raise ValueError(f"rule {rule.pattern!r}: cannot mix integer axes with head roles ({path!r})")
      picked.add(a % ndim)
      continue
    if a not in roles:
      hint = (" (pass num_heads= for 2-D attention kernels, num_kv_heads= for grouped-query key/value)"
              if a in ("heads", "head_dim") else "")
      raise ValueError(
          f"axis role {a!r} is not defined for parameter {path!r} of layer type {rule.label!r} "
          f"with shape {shape}{hint}"
      )
    picked.update(roles[a])
  picked_t = tuple(sorted(picked))
  if view == shape:
    return picked_t
  return _simplify_view(shape, view, picked_t)


# --------------------------------------------------------------------------
# The one resolver of per-parameter arguments.
# --------------------------------------------------------------------------


def as_rules(rules: Any, *, num_heads: int | None = None, **declarations: Any) -> Rules:
  """Reads a preset name, a `Rules` object, a JSON-style mapping or a list of rules as `Rules`.

  ``declarations``: layout keywords (``num_kv_heads``, ``stacked``, ``torch_layout``, ``einsum``,
  ``fused``; see `slimoptax.layouts.declarations`), taking precedence over the rules' own.
  """
  if isinstance(rules, str):
    from slimoptax.presets import preset  # presets are built from rules: imported here
    return preset(rules, num_heads=num_heads)
  if isinstance(rules, Rules):
    out = rules
  elif isinstance(rules, Mapping):
    out = Rules.from_dict(rules)
  elif isinstance(rules, (list, tuple)):
    out = Rules(rules)
  else:
    raise TypeError(
        f"rules must be a preset name, a Rules object, a mapping or a list of rules; got {type(rules)}")
  if num_heads is not None and out.num_heads is None:
    out = Rules(out.rules, name=out.name, num_heads=num_heads, role_dependent=out.role_dependent,
                strict=out.strict, layouts=out.layouts)
  return out.with_layouts(**declarations) if declarations else out


def _is_rules_like(spec: Any, params: Any) -> bool:
  """A `Rules`, a flat ``{path: [axes] | None}`` mapping or a list of rules (not a params-like pytree)."""
  if isinstance(spec, Rules):
    return True
  if isinstance(spec, Mapping) and not is_param_like(spec, params):
    # The JSON form: lists (not tuples, which a pytree of axes holds) or null.
    return spec.get("format") == "slimoptax.rules/v1" or all(
        v is None or (isinstance(v, list) and all(isinstance(a, (int, np.integer, str)) for a in v))
        for v in spec.values())
  first = spec[0] if isinstance(spec, list) and spec else None  # a Rule or (pattern, label, ...)
  return (isinstance(first, Rule) or isinstance(first, tuple) and bool(first)
          and isinstance(first[0], str)) and not is_param_like(spec, params)


LeafFn = Callable[[str, tuple[int, ...]], Any]


def resolve_tree(
    params: Any,
    spec: Any,
    *,
    what: str,
    from_rule: Callable[[Rule, str, tuple[int, ...], int | None], Any] | None = None,
    check_leaf: Callable[[str, tuple[int, ...], Any], Any] | None = None,
    default: LeafFn | None = None,
    named: Mapping[str, Any] | None = None,
    presets: bool = True,
    num_heads: int | None = None,
    warn: bool = True,
    declarations: Mapping[str, Any] | None = None,
) -> list[tuple[str, tuple[int, ...], Any]]:
  """Reads a per-parameter argument in any of its forms: the resolver of every transform.

  SlimAdam's and Sophia's ``compress``, Adafactor's ``factored_axes`` and
  Muon's ``dims`` all go through this function, so they accept the same forms,
  as `optax.partition` reads ``param_labels``:

  * ``None``: ``default(path, shape)`` for every parameter;
  * a name: ``named[name]`` (any form below), or a preset (`slimoptax.preset`);
  * a `Rules` object, a flat JSON-style mapping ``{exact path: [axes] | None}``
    or a list of ``(pattern, label, axes)``: each parameter's first matching
    rule gives its entry through ``from_rule(rule, path, shape, layout)`` (the
    leaf's declared `slimoptax.layouts.Layout`, which carries ``num_heads``)
    (an unmatched parameter is an error naming it);
  * a callable ``params -> any of these``;
  * a pytree matching ``params`` whose leaves are the entries themselves,
    checked by ``check_leaf(path, shape, entry)``.

  Args:
    params: parameters or updates (only paths and shapes are read).
    spec: the argument.
    what: its name, for errors (``"compress"``).
    from_rule: turns a matched rule into an entry (default: `rule_axes`).
    check_leaf: validates and normalizes a given entry (default: `validate_axes`).
    default: the entry of every parameter when ``spec`` is None (default: ``()``).
    named: names the transform accepts besides the presets.
    presets: whether the `slimoptax.preset` names are accepted too (a
      transform whose entries are not axes to average, such as Adafactor's
      (row, col) pairs, takes only its ``named`` ones).
    num_heads: attention head count, for rules with head roles on 2-D kernels.
    warn: warn about user rules that match no parameter.
    declarations: layout keywords for rules and presets (`slimoptax.layouts.declarations`).

  Returns:
    ``[(path, shape, entry), ...]`` in leaf order.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax.rules import resolve_tree
    >>> params = {"mlp": {"up": {"kernel": jnp.zeros((4, 16))}}, "ln": {"scale": jnp.ones(4)}}
    >>> resolve_tree(params, "slimadam", what="compress")
    [('ln/scale', (4,), ()), ('mlp/up/kernel', (4, 16), (1,))]
  """
  from_rule = from_rule or rule_axes
  check_leaf = check_leaf or (lambda path, shape, entry: validate_axes(path, shape, entry, what=what))
  shapes = [(p, shape_of(x)) for p, x in named_leaves(params)]
  for _ in range(3):  # a callable or a name may give another form
    if spec is None:
      default_fn = default or (lambda path, shape: ())
      return [(p, s, default_fn(p, s)) for p, s in shapes]
    if isinstance(spec, str):
      if named is not None and spec in named:
        spec = named[spec]
        continue
      if not presets:
        raise ValueError(f"unknown {what} preset {spec!r}; known: {tuple(named or ())}")
      try:
        spec = as_rules(spec, num_heads=num_heads, **dict(declarations or {}))
      except ValueError as err:
        extra = f" or one of {sorted(named)}" if named else ""
        raise ValueError(f"{what}: {err}{extra}") from None
    if _is_rules_like(spec, params):
      rules = as_rules(spec, num_heads=num_heads, **dict(declarations or {}))
      matched = rules.match_all(params, warn=warn)
      layouts_lib.check_kv_heads(matched, rules)
      return [(p, s, from_rule(rule, p, s, rules.layout(p, s))) for p, s, rule in matched]
    if callable(spec):
      spec = spec(params)
      continue
    if declarations:
      raise ValueError(f"{what}: layout declarations {sorted(declarations)} apply to rules and presets, "
                       "not to per-parameter entries given directly")
    if not is_param_like(spec, params):
      check_lists(params, spec, what)
    per_leaf = leaves_like(params, spec, what=what)
    return [(p, s, check_leaf(p, s, a)) for (p, s), a in zip(shapes, per_leaf)]
  raise ValueError(f"{what}: {spec!r} does not resolve to per-parameter entries")


def compression_axes(params: Any, rules: Any, *, num_heads: int | None = None,
                     warn: bool = True, **declarations: Any) -> Any:
  """Resolves rules (or a preset name) to a pytree of axes, one entry per parameter.

  Args:
    params: the parameter pytree (arrays or `jax.ShapeDtypeStruct` s).
    rules: any form `resolve_tree` reads: a preset name (see `slimoptax.preset`),
      a `Rules` object, a flat mapping ``{path: [axes] | None}``, a list of
      ``(pattern, label, axes)``, a callable or a pytree of axes.
    num_heads: attention head count, for head-wise presets on 2-D kernels.
    warn: warn about user rules that match no parameter.
    **declarations: what names cannot tell (``num_kv_heads``, ``stacked``,
      ``torch_layout``, ``einsum``, ``fused``): see `slimoptax.layouts.declarations`.

  Returns:
    A pytree with ``params``' structure whose leaves are sorted tuples of
    non-negative ints (``()`` for no compression) or `Reshaped` views.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"params": {"mlp": {"up": {"kernel": jnp.zeros((8, 32))}}}}
    >>> slimoptax.compression_axes(params, "slimadam")["params"]["mlp"]["up"]["kernel"]
    (1,)
  """
  resolved = resolve_tree(params, rules, what="rules", num_heads=num_heads, warn=warn,
                          declarations=declarations)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                      [a for _, _, a in resolved])


def param_labels(params: Any, rules: Any, *, num_heads: int | None = None) -> Any:
  """Labels of each parameter under ``rules``: ``param_labels`` for `optax.partition`.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> slimoptax.param_labels({"mlp": {"up": {"kernel": jnp.zeros((4, 8))}}}, "slimadam")
    {'mlp': {'up': {'kernel': 'mlp_up'}}}
  """
  return as_rules(rules, num_heads=num_heads).labels(params)


__all__ = [
    "GenericLayerWarning", "Rule", "Rules", "UNSUPPORTED", "as_rules", "compression_axes", "exact_pattern", "kept_entries", "param_labels", "reduced_shape",
    "resolve_tree", "rule_axes", "validate_axes",
]
