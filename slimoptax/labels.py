"""Pytree labels: parameter paths, layer types, semantic axes and compression rules.

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
``nn.Linear`` weights are ``(fan_out, fan_in)``: for those use integer axes (or
`torch_layout=True` in :func:`axis_roles`).

Reference: Kalra et al., "When Can You Get Away with Low Memory Adam?" (2025),
Table 3 (SlimAdam rules) and App. A (AdaLayer, Adam-mini).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import jax
import numpy as np

Axes = tuple[int, ...]
SemanticAxis = Union[int, str]

# --------------------------------------------------------------------------
# Paths.
# --------------------------------------------------------------------------


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
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name in ("value", "raw_value"):
    keys = keys[:-1]
  return "/".join(_key_str(k) for k in keys)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """Returns ``[(path, leaf), ...]`` of a pytree, paths joined by ``"/"``."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in leaves]


def leaves_like(tree: Any, spec: Any, *, what: str) -> list[Any]:
  """Flattens ``spec`` up to the structure of ``tree``, with a readable error.

  ``spec`` must have the same structure as ``tree`` down to ``tree``'s leaves;
  below them it may hold anything (e.g. tuples of axes). This is how a
  "pytree matching the params" argument is read.

  Args:
    tree: the reference pytree (parameters or updates).
    spec: a pytree with ``tree``'s structure.
    what: the argument's name, for the error message.

  Returns:
    The list of ``spec`` subtrees at ``tree``'s leaf positions.

  Raises:
    ValueError: naming the paths that differ when the structures do not match.
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


def _prefix_paths(spec: Any) -> list[str]:
  """Paths of ``spec`` down to tuples (treated as leaves)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      spec, is_leaf=lambda x: isinstance(x, tuple) or x is None
  )
  return [path_str(p) for p, _ in leaves]


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  if shape is None:
    shape = np.shape(leaf)
  return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------
# Layer types and their axis roles.
# --------------------------------------------------------------------------

LAYER_TYPES: dict[str, str] = {
    "embedding": "token embedding table (vocab, d)",
    "pos_embedding": "learned positional embedding table (positions, d)",
    "head": "output head: LM head or classifier kernel (d, classes)",
    "query": "attention query kernel: (d, H*hd) Dense or (d, H, hd) DenseGeneral",
    "key": "attention key kernel: (d, H*hd) Dense or (d, H, hd) DenseGeneral",
    "value": "attention value kernel: (d, H*hd) Dense or (d, H, hd) DenseGeneral",
    "attn_qkv": "fused query/key/value kernel (d, 3*H*hd); no preset guesses its layout",
    "attn_out": "attention output projection: (H*hd, d) Dense or (H, hd, d) DenseGeneral",
    "mlp_up": "first MLP layer (fan_in, fan_out)",
    "mlp_gate": "gate MLP layer of gated MLPs (fan_in, fan_out)",
    "mlp_down": "last MLP layer (fan_in, fan_out)",
    "dense": "any other Dense / DenseGeneral kernel (*fan_in, fan_out)",
    "conv": "convolution kernel (*window, in, out)",
    "norm": "normalization scale or bias (LayerNorm, RMSNorm, BatchNorm)",
    "bias": "bias vector (or (H, hd) attention bias)",
    "scalar": "0-d parameter",
}

_ATTN = r"(attn|attention|self_attn|self_attention|mha|multiheaddotproductattention(_\d+)?|multiheadattention(_\d+)?)"
_MLP = r"(mlp|ffn|ff|feed_forward|feedforward|mlpblock(_\d+)?|mlp_block)"
_W = r"(kernel|weight|w)"

# Ordered (regex, layer type) recognizers; matched with re.search, case-insensitive,
# against the "/"-joined path. The first match wins.
LAYER_PATTERNS: tuple[tuple[str, str], ...] = (
    # Normalization layers (scale and bias), before generic biases.
    (r"(^|[/.])[^/.]*(norm|^ln|[/._]ln)[^/.]*([/.]\d+)?[/.](scale|bias|weight|gamma|beta|g|b)$", "norm"),
    (r"(^|[/.])(ln_?\w*|layernorm\w*|rmsnorm\w*|batchnorm\w*|bn\w*|norm\w*)[/.](scale|bias|weight)$", "norm"),
    (r"(^|[/.])(bias|b)$", "bias"),
    # Embeddings.
    (r"(^|[/.])(wpe|pos_emb\w*|position_embed\w*|positional_embed\w*|pos_embed\w*)([/.](embedding|weight))?$", "pos_embedding"),
    (r"(^|[/.])(wte|tok_embeddings|embed_tokens|token_embed\w*|tok_emb\w*|word_embeddings)([/.](embedding|weight))?$", "embedding"),
    (r"(^|[/.])embedding$", "embedding"),
    # Heads.
    (rf"(^|[/.])(lm_head|unembed\w*|logits|classifier|head|output_layer)[/.]{_W}$", "head"),
    # Attention.
    (rf"(^|[/.])(c_attn|qkv|qkv_proj|in_proj|wqkv|query_key_value)[/.]{_W}$", "attn_qkv"),
    (rf"(^|[/.])(query|q_proj|wq|to_q|q_lin|q)[/.]{_W}$", "query"),
    (rf"(^|[/.])(key|k_proj|wk|to_k|k_lin|k)[/.]{_W}$", "key"),
    (rf"(^|[/.])(value|v_proj|wv|to_v|v_lin|v)[/.]{_W}$", "value"),
    (rf"(^|[/.]){_ATTN}[/.](out|o_proj|wo|out_proj|c_proj|proj|output_proj|dense|to_out)[/.]{_W}$", "attn_out"),
    (rf"(^|[/.])(o_proj|out_proj|output_proj|to_out|out)[/.]{_W}$", "attn_out"),
    # MLPs (gated first).
    (rf"(^|[/.])(gate|gate_proj|w3|wi_0|mlp_gate)[/.]{_W}$", "mlp_gate"),
    (rf"(^|[/.])(up|up_proj|w1|fc1|c_fc|wi|wi_1|mlp_up|fc_in)[/.]{_W}$", "mlp_up"),
    (rf"(^|[/.])(down|down_proj|w2|fc2|mlp_proj|mlp_down|fc_out)[/.]{_W}$", "mlp_down"),
    (rf"(^|[/.]){_MLP}[/.](c_proj|proj|wo|out|dense_1|linear_1|layers_1)[/.]{_W}$", "mlp_down"),
    (rf"(^|[/.]){_MLP}[/.](dense_0|linear_0|layers_0)[/.]{_W}$", "mlp_up"),
    # Convolutions and everything else.
    (r"(^|[/.])\w*conv\w*([/.]\d+)?[/.](kernel|weight)$", "conv"),
    (r"(^|[/.])(kernel|weight|w)$", "dense"),
)

_ROLE_NAMES = ("fan_in", "fan_out", "heads", "head_dim", "token", "vocab", "embed", "all")


class Reshaped(NamedTuple):
  """Average over ``axes`` of a parameter viewed with shape ``shape``.

  Used when a compression needs a finer view than the stored layout, e.g. one
  second moment per attention head of a ``(d, H*hd)`` query kernel:
  ``Reshaped(shape=(d, H, hd), axes=(0, 2))``.
  """

  shape: tuple[int, ...]
  axes: Axes


def axis_roles(
    layer_type: str,
    shape: Sequence[int],
    *,
    num_heads: int | None = None,
    path: str = "<param>",
) -> tuple[tuple[int, ...], dict[str, Axes]]:
  """Names the axes of a parameter of a given layer type (Flax layouts).

  Args:
    layer_type: one of `LAYER_TYPES`.
    shape: the parameter's shape.
    num_heads: number of attention heads; needed for ``heads``/``head_dim`` of
      2-D ``(d, H*hd)`` attention kernels, which are then viewed as
      ``(d, H, hd)`` (or ``(H, hd, d)`` for ``attn_out``).
    path: the parameter's path, for error messages.

  Returns:
    ``(view_shape, roles)``: the shape the roles refer to (the parameter's own
    shape unless a head view was needed) and a dict from role name
    (``fan_in``, ``fan_out``, ``heads``, ``head_dim``, ``token`` (alias
    ``vocab``), ``embed``, ``all``) to axes of that view. Roles that do not apply are absent.
  """
  if layer_type not in LAYER_TYPES:
    raise ValueError(
        f"unknown layer type {layer_type!r} for parameter {path!r}; known: {sorted(LAYER_TYPES)}"
    )
  shape = tuple(int(s) for s in shape)
  ndim = len(shape)
  roles: dict[str, Axes] = {"all": tuple(range(ndim))}
  if ndim < 2 or layer_type in ("norm", "bias", "scalar"):
    return shape, roles
  if layer_type in ("embedding", "pos_embedding"):
    roles.update(fan_in=(0,), fan_out=tuple(range(1, ndim)), token=(0,), vocab=(0,), embed=tuple(range(1, ndim)))
    return shape, roles
  if layer_type == "head":
    roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,), embed=tuple(range(ndim - 1)),
                 token=(ndim - 1,), vocab=(ndim - 1,))
    return shape, roles
  if layer_type in ("query", "key", "value"):
    if ndim == 2 and num_heads is not None:
      d, hidden = shape
      if hidden % num_heads:
        raise ValueError(
            f"{path!r}: fan_out {hidden} of a {layer_type} kernel {shape} is not divisible by "
            f"num_heads={num_heads}"
        )
      shape = (d, num_heads, hidden // num_heads)
      ndim = 3
      roles["all"] = (0, 1, 2)
    if ndim == 3:
      roles.update(fan_in=(0,), fan_out=(1, 2), heads=(1,), head_dim=(2,))
    else:
      roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,))
    return shape, roles
  if layer_type == "attn_out":
    if ndim == 2 and num_heads is not None:
      hidden, d = shape
      if hidden % num_heads:
        raise ValueError(
            f"{path!r}: fan_in {hidden} of an attn_out kernel {shape} is not divisible by "
            f"num_heads={num_heads}"
        )
      shape = (num_heads, hidden // num_heads, d)
      ndim = 3
      roles["all"] = (0, 1, 2)
    if ndim == 3:
      roles.update(fan_in=(0, 1), fan_out=(2,), heads=(0,), head_dim=(1,))
    else:
      roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,))
    return shape, roles
  # Dense-like and conv kernels: (*fan_in, fan_out).
  roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,))
  return shape, roles


_VECTOR_TYPES = ("norm", "bias", "scalar")


def _recognizers(axes_by_type: Mapping[str, Any] | None = None) -> list["Rule"]:
  """The layer-type recognizers as rules (matrix types need rank >= 2)."""
  rules = []
  for pattern, ltype in LAYER_PATTERNS:
    axes = () if axes_by_type is None else axes_by_type[ltype]
    min_ndim = 0 if ltype in _VECTOR_TYPES else 2
    rules.append(Rule(pattern, ltype, axes, warn_unused=False, min_ndim=min_ndim))
  # Catch-alls: vectors and scalars that no recognizer names ("^" also matches the
  # empty path of a bare array).
  rules.append(Rule(r"^", "bias", () if axes_by_type is None else axes_by_type["bias"],
                    warn_unused=False, min_ndim=1, max_ndim=1))
  rules.append(Rule(r"^", "scalar", (), warn_unused=False, max_ndim=0))
  return rules


def layer_type(path: str, shape: Sequence[int] = ()) -> str:
  """Classifies a parameter by its path and rank into one of `LAYER_TYPES`.

  Matrix-like types (everything but ``norm``, ``bias``, ``scalar``) need rank
  >= 2; an unnamed vector is a ``bias``, a 0-d parameter a ``scalar``.

  Args:
    path: ``"/"``-joined parameter path.
    shape: the parameter's shape.

  Returns:
    The layer type.

  Raises:
    ValueError: if no recognizer matches; the message names the path.
  """
  ndim = len(tuple(shape))
  for rule in _RECOGNIZERS:
    if rule.matches(path, ndim):
      return rule.label
  raise ValueError(
      f"cannot tell the layer type of parameter {path!r} with shape {tuple(shape)}: no "
      "recognizer matches; add a rule for it"
  )


# --------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------

UNSUPPORTED = "unsupported"


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
        if isinstance(a, str) and a not in _ROLE_NAMES:
          raise ValueError(f"rule {self.pattern!r}: unknown axis name {a!r}; known: {_ROLE_NAMES}")
    elif axes != UNSUPPORTED:
      raise ValueError(f"rule {self.pattern!r}: axes must be a tuple, got {axes!r}")
    object.__setattr__(self, "axes", axes)
    re.compile(self.pattern)

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
    >>> rules = slimoptax.Rules([
    ...     (r"attn/qkv/kernel$", "attn_qkv", (0,)),   # fused qkv: fan_in
    ... ]) + slimoptax.preset("slimadam")
    >>> axes = slimoptax.compression_axes(params, rules)
  """

  def __init__(self, rules: Iterable[Rule | Sequence[Any]] = (), *, name: str = "custom",
               num_heads: int | None = None):
    self.rules: tuple[Rule, ...] = tuple(r if isinstance(r, Rule) else Rule(*r) for r in rules)
    self.name = name
    self.num_heads = num_heads

  def __add__(self, other: "Rules") -> "Rules":
    if not isinstance(other, Rules):
      return NotImplemented
    return Rules(self.rules + other.rules, name=f"{self.name}+{other.name}",
                 num_heads=self.num_heads if self.num_heads is not None else other.num_heads)

  def __iter__(self):
    return iter(self.rules)

  def __len__(self):
    return len(self.rules)

  def __eq__(self, other):
    return isinstance(other, Rules) and self.rules == other.rules and self.num_heads == other.num_heads

  def __repr__(self):
    return f"Rules(name={self.name!r}, {len(self.rules)} rules)"

  # -- matching --------------------------------------------------------------

  def match(self, path: str, shape: Sequence[int]) -> Rule:
    """Returns the first rule matching ``path`` and rank; raises ValueError if none."""
    for rule in self.rules:
      if rule.matches(path, len(tuple(shape))):
        return rule
    raise ValueError(f"no rule of {self.name!r} matches parameter {path!r} with shape {tuple(shape)}")

  def resolve(self, params: Any, *, warn: bool = True) -> list[tuple[str, tuple[int, ...], Rule, Axes | Reshaped]]:
    """Resolves every leaf: ``[(path, shape, rule, axes_or_reshaped), ...]``."""
    out = []
    used = set()
    for path, leaf in named_leaves(params):
      shape = _shape(leaf)
      matched = None
      for i, rule in enumerate(self.rules):
        if rule.matches(path, len(shape)):
          matched, idx = rule, i
          break
      if matched is None:
        hint = (" (the parameter tree is a bare array, whose path is empty: no layer type can be "
                "read from it; give integer axes or wrap it in a dict)") if path == "" else ""
        raise ValueError(
            f"no rule of {self.name!r} matches parameter {path!r} with shape {shape}; add a rule "
            f"for it (nothing is left uncompressed silently){hint}"
        )
      used.add(idx)
      out.append((path, shape, matched, _resolve_axes(matched, path, shape, self.num_heads)))
    if warn:
      for i, rule in enumerate(self.rules):
        if rule.warn_unused and i not in used:
          warnings.warn(
              f"rule {rule.pattern!r} -> {rule.label!r} of {self.name!r} matches no parameter",
              stacklevel=3,
          )
    return out

  def labels(self, params: Any) -> Any:
    """A pytree like ``params`` of label strings (``param_labels`` for `optax.partition`)."""
    resolved = self.resolve(params, warn=False)
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [r[2].label for r in resolved])

  def axes(self, params: Any, *, warn: bool = True) -> Any:
    """A pytree like ``params`` of resolved axes (int tuples or `Reshaped`)."""
    resolved = self.resolve(params, warn=warn)
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [r[3] for r in resolved])

  # -- display -----------------------------------------------------------------

  def table(self, params: Any) -> str:
    """A text table: path, shape, label, axes, second moments kept."""
    rows = []
    total_kept = total = 0
    for path, shape, rule, axes in self.resolve(params, warn=False):
      kept = kept_entries(shape, axes)
      size = math.prod(shape)
      total_kept += kept
      total += size
      rows.append((path, str(shape), rule.label, _axes_str(axes), f"{kept:,}"))
    header = ("path", "shape", "label", "axes", "kept")
    rows.append(("TOTAL", "", "", "", f"{total_kept:,} of {total:,} ({_pct(total_kept, total)} kept)"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)

  # -- serialisation -----------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {
        "format": "slimoptax.rules/v1",
        "name": self.name,
        "num_heads": self.num_heads,
        "rules": [
            {"pattern": r.pattern, "label": r.label,
             "axes": r.axes if isinstance(r.axes, str) else list(r.axes),
             "warn_unused": r.warn_unused, "min_ndim": r.min_ndim, "max_ndim": r.max_ndim}
            for r in self.rules
        ],
    }

  def to_json(self, path: str | None = None, *, indent: int = 2) -> str:
    """Serialises to JSON (and writes it to ``path`` if given)."""
    text = json.dumps(self.to_dict(), indent=indent)
    if path is not None:
      with open(path, "w") as f:
        f.write(text + "\n")
    return text

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "Rules":
    """Reads `to_dict` output, or a flat ``{name: [axes] | null}`` mapping.

    The flat form is the one the SlimAdam authors publish: each key is an exact
    parameter name; ``null`` means no compression.
    """
    if data.get("format") == "slimoptax.rules/v1":
      return cls(
          [Rule(r["pattern"], r["label"], r["axes"] if isinstance(r["axes"], str) else tuple(r["axes"]),
                r.get("warn_unused", True), r.get("min_ndim", 0), r.get("max_ndim"))
           for r in data["rules"]],
          name=data.get("name", "custom"), num_heads=data.get("num_heads"))
    rules = []
    for name, axes in data.items():
      if axes is not None and not isinstance(axes, (list, tuple)):
        raise ValueError(f"rule for {name!r}: expected a list of axes or null, got {axes!r}")
      rules.append(Rule(exact_pattern(name), name, tuple(axes or ())))
    return cls(rules, name="mapping")

  @classmethod
  def from_json(cls, path_or_text: str) -> "Rules":
    """Loads rules from a JSON file path or a JSON string."""
    text = path_or_text
    if not path_or_text.lstrip().startswith("{"):
      with open(path_or_text) as f:
        text = f.read()
    return cls.from_dict(json.loads(text))

  def as_mapping(self) -> dict[str, list[int] | None]:
    """The flat ``{label: [axes] | None}`` form (``None`` for no compression)."""
    out = {}
    for r in self.rules:
      if isinstance(r.axes, str) or any(isinstance(a, str) for a in r.axes):
        raise ValueError(f"rule {r.pattern!r} has semantic axes {r.axes}; resolve them first")
      out[r.label] = list(r.axes) if r.axes else None
    return out


def exact_pattern(name: str) -> str:
  """A pattern that matches exactly the path ``name`` (``*`` matches one path component)."""
  return "^" + re.escape(name).replace(r"\*", r"[^/.]+") + "$"


def _resolve_axes(rule: Rule, path: str, shape: tuple[int, ...], num_heads: int | None) -> Axes | Reshaped:
  ndim = len(shape)
  if rule.axes == UNSUPPORTED:
    raise ValueError(
        f"parameter {path!r} (shape {shape}) is a {rule.label!r} layer, which this preset does "
        "not handle; add a rule with explicit axes for it"
    )
  axes = rule.axes
  if not any(isinstance(a, str) for a in axes):
    out = []
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(f"rule {rule.pattern!r}: axis {a} out of range for parameter {path!r} with shape {shape}")
      out.append(a % ndim)
    if len(set(out)) != len(out):
      raise ValueError(f"rule {rule.pattern!r}: repeated axes {axes} for parameter {path!r}")
    return tuple(sorted(out))
  if rule.label not in LAYER_TYPES:
    raise ValueError(
        f"rule {rule.pattern!r} uses semantic axes {axes} but its label {rule.label!r} is not a "
        f"layer type; known layer types: {sorted(LAYER_TYPES)} (parameter {path!r})"
    )
  if ndim < 2 and rule.label not in ("norm", "bias", "scalar") and not set(axes) <= {"all"}:
    # Vector-like parameters only know "all".
    raise ValueError(f"parameter {path!r} with shape {shape} has no axis roles {axes}")
  needs_heads = any(a in ("heads", "head_dim") for a in axes)
  view, roles = axis_roles(rule.label, shape, num_heads=num_heads if needs_heads else None, path=path)
  picked: set[int] = set()
  for a in axes:
    if isinstance(a, int):
      if view != shape:
        raise ValueError(f"rule {rule.pattern!r}: cannot mix integer axes with head roles ({path!r})")
      picked.add(a % ndim)
      continue
    if a not in roles:
      hint = " (pass num_heads= for 2-D attention kernels)" if a in ("heads", "head_dim") else ""
      raise ValueError(
          f"axis role {a!r} is not defined for parameter {path!r} of layer type {rule.label!r} "
          f"with shape {shape}{hint}"
      )
    picked.update(roles[a])
  picked_t = tuple(sorted(picked))
  if view == shape:
    return picked_t
  return _simplify_view(shape, view, picked_t)


def _simplify_view(shape: tuple[int, ...], view: tuple[int, ...], axes: Axes) -> Axes | Reshaped:
  """Maps view axes back to the stored layout when the view is not needed."""
  # Group consecutive view axes into stored axes (view only splits axes).
  groups: list[list[int]] = []
  v = 0
  for s in shape:
    group = []
    prod = 1
    while prod < s or not group:
      group.append(v)
      prod *= view[v]
      v += 1
    groups.append(group)
  out = []
  for i, group in enumerate(groups):
    hit = [g in axes for g in group]
    if all(hit):
      out.append(i)
    elif any(hit):
      return Reshaped(shape=view, axes=axes)
  return tuple(out)


def kept_entries(shape: Sequence[int], axes: Axes | Reshaped) -> int:
  """Number of second-moment entries kept when averaging ``shape`` over ``axes``."""
  if isinstance(axes, Reshaped):
    shape, axes = axes.shape, axes.axes
  return math.prod(s for i, s in enumerate(shape) if i not in axes)


def reduced_shape(shape: Sequence[int], axes: Axes | Reshaped) -> tuple[int, ...]:
  """Shape of a statistic averaged over ``axes`` with kept (size-1) dims."""
  if isinstance(axes, Reshaped):
    shape, axes = axes.shape, axes.axes
  return tuple(1 if i in axes else int(s) for i, s in enumerate(shape))


def _axes_str(axes: Axes | Reshaped) -> str:
  if isinstance(axes, Reshaped):
    return f"{tuple(axes.axes)} of view {tuple(axes.shape)}"
  return str(tuple(axes)) if axes else "-"


def _pct(a: int, b: int) -> str:
  return f"{100.0 * a / b:.3f}%" if b else "n/a"


# --------------------------------------------------------------------------
# Presets.
# --------------------------------------------------------------------------

# layer type -> semantic axes averaged over. UNSUPPORTED: the preset refuses.
_PRESET_AXES: dict[str, dict[str, tuple[str, ...] | str]] = {
    "adam": {t: () for t in LAYER_TYPES},
    # SlimAdam, Table 3 of Kalra et al.: K&Q fan_in, V&proj fan_out, MLP fan_out,
    # token embedding fan_out (= the embedding axis), LM head fan_in (= the
    # embedding axis), vision first layer / conv fan_in, normalization none.
    "slimadam": {
        "embedding": ("fan_out",), "pos_embedding": ("fan_out",), "head": ("fan_in",),
        "query": ("fan_in",), "key": ("fan_in",), "value": ("fan_out",), "attn_out": ("fan_out",),
        "attn_qkv": UNSUPPORTED,
        "mlp_up": ("fan_out",), "mlp_gate": ("fan_out",), "mlp_down": ("fan_out",),
        "dense": ("fan_out",), "conv": ("fan_in",),
        "norm": (), "bias": (), "scalar": (),
    },
    # AdaLayer (Zhao et al. 2024): one second moment per tensor.
    "adalayer": {t: ("all",) for t in LAYER_TYPES},
    # AdaLayer+LN+TN: per-parameter second moments for norms, token embedding and head.
    "adalayer+ln+tn": {**{t: ("all",) for t in LAYER_TYPES}, "norm": (), "embedding": (), "head": ()},
    # Adam-mini v1.1 (Zhang et al. 2024): one value per output neuron; per head for
    # query/key; per token for embedding and head; one per tensor otherwise.
    "adam-mini": {
        "embedding": ("embed",), "head": ("embed",), "pos_embedding": ("all",),
        "query": ("fan_in", "head_dim"), "key": ("fan_in", "head_dim"),
        "value": ("fan_in",), "attn_out": ("fan_in",), "attn_qkv": UNSUPPORTED,
        "mlp_up": ("fan_in",), "mlp_gate": ("fan_in",), "mlp_down": ("fan_in",),
        "dense": ("fan_in",), "conv": ("fan_in",),
        "norm": ("all",), "bias": ("all",), "scalar": (),
    },
}
_PRESET_AXES["adamini"] = _PRESET_AXES["adam-mini"]

PRESETS: tuple[str, ...] = ("adam", "slimadam", "adalayer", "adalayer+ln+tn", "adam-mini")


def preset(
    name: str,
    *,
    num_heads: int | None = None,
    overrides: Mapping[str, Sequence[SemanticAxis] | str] | None = None,
) -> Rules:
  """The rules of a named preset.

  Presets classify parameters by path into layer types (see `LAYER_PATTERNS`)
  and average over semantic axes per type:

  ============== ===================================================================
  ``adam``        nothing compressed
  ``slimadam``    Table 3 of Kalra et al.: key/query fan_in, value/out/MLP fan_out,
                  embedding and head keep one value per token, norms/biases full
  ``adalayer``    one second moment per tensor
  ``adalayer+ln+tn``  AdaLayer, but norms, token embedding and head uncompressed
  ``adam-mini``   Adam-mini v1.1: one value per output neuron, per head for
                  query/key, per token for embedding/head, one per tensor for norms,
                  biases and positional embeddings
  ============== ===================================================================

  Args:
    name: one of `PRESETS` (case-insensitive).
    num_heads: number of attention heads, needed by ``adam-mini`` when query/key
      kernels are 2-D ``(d, H*hd)``.
    overrides: ``{layer_type: axes}`` replacing the preset's axes for those
      layer types; an unknown layer type is an error.

  Returns:
    A `Rules` object.
  """
  key = name.lower().replace("_", "-")
  if key not in _PRESET_AXES:
    raise ValueError(f"unknown preset {name!r}; known presets: {PRESETS}")
  table = dict(_PRESET_AXES[key])
  for ltype, axes in (overrides or {}).items():
    if ltype not in LAYER_TYPES:
      raise ValueError(
          f"override names unknown layer type {ltype!r}; preset {name!r} knows {sorted(LAYER_TYPES)}"
      )
    table[ltype] = axes if isinstance(axes, str) else tuple(axes)
  rules = _recognizers(table)
  uniform = {table[t] for t in LAYER_TYPES if t != "scalar"}
  if len(uniform) == 1:
    # The preset treats every layer type alike (adam, adalayer): any tensor will do.
    rules.append(Rule(r"^", "dense", uniform.pop(), warn_unused=False, min_ndim=2))
  return Rules(rules, name=key, num_heads=num_heads)


def _as_rules(rules: Any, *, num_heads: int | None = None) -> Rules:
  if isinstance(rules, str):
    return preset(rules, num_heads=num_heads)
  if isinstance(rules, Rules):
    out = rules
  elif isinstance(rules, Mapping):
    out = Rules.from_dict(rules)
  elif isinstance(rules, (list, tuple)):
    out = Rules(rules)
  else:
    raise TypeError(
        f"rules must be a preset name, a Rules object, a mapping or a list of rules; got {type(rules)}"
    )
  if num_heads is not None and out.num_heads is None:
    out = Rules(out.rules, name=out.name, num_heads=num_heads)
  return out


def compression_axes(params: Any, rules: Any, *, num_heads: int | None = None, warn: bool = True) -> Any:
  """Resolves rules (or a preset name) to a pytree of axes, one entry per parameter.

  Args:
    params: the parameter pytree (arrays or `jax.ShapeDtypeStruct` s).
    rules: a preset name (see `preset`), a `Rules` object, a flat mapping
      ``{path: [axes] | None}`` or a list of ``(pattern, label, axes)``.
    num_heads: attention head count, for head-wise presets on 2-D kernels.
    warn: warn about user rules that match no parameter.

  Returns:
    A pytree with ``params``' structure whose leaves are sorted tuples of
    non-negative ints (``()`` for no compression) or `Reshaped` views.

  Example:
    >>> axes = slimoptax.compression_axes(params, "slimadam")
    >>> axes["params"]["Dense_0"]["kernel"]
    (1,)
  """
  return _as_rules(rules, num_heads=num_heads).axes(params, warn=warn)


def param_labels(params: Any, rules: Any, *, num_heads: int | None = None) -> Any:
  """Labels of each parameter under ``rules``: ``param_labels`` for `optax.partition`."""
  return _as_rules(rules, num_heads=num_heads).labels(params)


def validate_axes(path: str, shape: tuple[int, ...], spec: Any, *, what: str = "compress") -> Axes | Reshaped:
  """Checks one user-given axes entry against a parameter shape; returns it normalised."""
  ndim = len(shape)
  if spec is None:
    return ()
  if isinstance(spec, Reshaped):
    if math.prod(spec.shape) != math.prod(shape):
      raise ValueError(
          f"{what} for {path!r}: view {spec.shape} has {math.prod(spec.shape)} entries, the "
          f"parameter {shape} has {math.prod(shape)}"
      )
    inner = validate_axes(path, tuple(spec.shape), tuple(spec.axes), what=what)
    return Reshaped(tuple(int(s) for s in spec.shape), inner)
  if isinstance(spec, (int, np.integer)):
    spec = (int(spec),)
  if not isinstance(spec, (tuple, list)) or not all(isinstance(a, (int, np.integer)) for a in spec):
    raise ValueError(f"{what} for {path!r}: expected a tuple of int axes, got {spec!r}")
  out = []
  for a in spec:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} for {path!r}: axis {a} out of range for shape {shape}")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{what} for {path!r}: repeated axes in {tuple(spec)}")
  return tuple(sorted(out))


def resolve_axes_spec(
    params: Any,
    spec: Any,
    *,
    what: str = "compress",
    num_heads: int | None = None,
    warn: bool = True,
) -> list[tuple[str, tuple[int, ...], Axes | Reshaped]]:
  """Reads any accepted form of a per-parameter axes argument.

  Accepted: ``None`` (no axes anywhere); a preset name; a `Rules` object; a
  flat JSON-style mapping ``{exact path: [axes] | None}`` (lists, not
  tuples); a callable ``params -> pytree``; a pytree
  matching ``params`` whose leaves are tuples of ints (``()`` = none) or
  `Reshaped`.

  Args:
    params: parameters or updates (only shapes and paths are read).
    spec: the argument.
    what: its name, for errors.
    num_heads: for presets that need the attention head count.
    warn: warn about unused user rules.

  Returns:
    ``[(path, shape, axes), ...]`` in leaf order.
  """
  named = named_leaves(params)
  shapes = [(p, _shape(x)) for p, x in named]
  if spec is None:
    return [(p, s, ()) for p, s in shapes]
  if isinstance(spec, (str, Rules)) or (
      isinstance(spec, Mapping) and not _is_param_like(spec, params)
      and all(v is None or isinstance(v, list) for v in spec.values())
  ) or (isinstance(spec, list) and spec and isinstance(spec[0], (Rule, tuple)) and not _is_param_like(spec, params)):
    resolved = _as_rules(spec, num_heads=num_heads).resolve(params, warn=warn)
    return [(p, s, a) for p, s, _, a in resolved]
  if callable(spec):
    spec = spec(params)
    if isinstance(spec, (str, Rules)):
      return resolve_axes_spec(params, spec, what=what, num_heads=num_heads, warn=warn)
  per_leaf = leaves_like(params, spec, what=what)
  return [(p, s, validate_axes(p, s, a, what=what)) for (p, s), a in zip(shapes, per_leaf)]


def _is_param_like(spec: Any, params: Any) -> bool:
  try:
    jax.tree_util.tree_structure(params).flatten_up_to(spec)
    return True
  except (ValueError, TypeError):
    return False


def check_float_params(params: Any, *, what: str = "params") -> None:
  """Raises a ValueError naming the path of any non-floating parameter."""
  for path, leaf in named_leaves(params):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
      raise ValueError(f"{what} {path!r} is complex ({dtype}); slimoptax transforms take real floating-point parameters")
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
      raise ValueError(
          f"{what} {path!r} has dtype {dtype}; slimoptax transforms take floating-point "
          "parameters (integer parameters have no gradient: exclude them with optax.masked)"
      )


__all__ = [
    "LAYER_PATTERNS", "LAYER_TYPES", "PRESETS", "Reshaped", "Rule", "Rules", "UNSUPPORTED",
    "axis_roles", "check_float_params", "compression_axes", "exact_pattern", "kept_entries",
    "layer_type", "leaves_like", "named_leaves", "param_labels", "path_str", "preset",
    "reduced_shape", "resolve_axes_spec", "validate_axes",
]


_RECOGNIZERS = _recognizers()
