"""Presets: layer recognizers and the published compression rules.

A preset classifies each parameter by its path into a layer type
(`LAYER_PATTERNS`, matched in order, case-insensitive, against the
``"/"``-joined path) and averages over semantic axes per type (roles resolved
by `slimoptax.axis_roles` in Flax layouts: ``Dense`` kernels are ``(fan_in,
fan_out)``, ``DenseGeneral`` attention kernels ``(d, heads, head_dim)`` and
``(heads, head_dim, d)``, ``Conv`` kernels ``(*window, in, out)``, ``Embed``
tables ``(vocab, d)``).

References:
  Kalra, Kirchenbauer, Barkeshli, Goldstein, When Can You Get Away with Low
  Memory Adam?, 2025 (Table 3: SlimAdam; App. A: AdaLayer, Adam-mini).
  Zhao et al., Deconstructing What Makes a Good Optimizer for Language Models,
  2024 (AdaLayer). Zhang et al., Adam-mini: Use Fewer Learning Rates To Gain
  More, 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from slimoptax import layouts
from slimoptax._tree import path_str, shape_of
from slimoptax.layers import LAYER_PATTERNS, LAYER_TYPES
from slimoptax.rules import UNSUPPORTED, Rule, Rules, SemanticAxis

_VECTOR_TYPES = ("norm", "bias", "scalar")


def recognizers(axes_by_type: Mapping[str, Any] | None = None) -> list["Rule"]:
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
    # Adam-mini 1.1.1 (Zhang et al. 2024): one value per output neuron; per head for
    # query/key; per token for embedding and head; one per tensor for norm scales and
    # positional embeddings; biases (norm biases included: `_BIAS_FIRST`) full Adam.
    "adam-mini": {
        "embedding": ("embed",), "head": ("embed",), "pos_embedding": ("all",),
        "query": ("fan_in", "head_dim"), "key": ("fan_in", "head_dim"),
        "value": ("fan_in",), "attn_out": ("fan_in",), "attn_qkv": UNSUPPORTED,
        "mlp_up": ("fan_in",), "mlp_gate": ("fan_in",), "mlp_down": ("fan_in",),
        "dense": ("fan_in",), "conv": ("fan_in",),
        "norm": ("all",), "bias": (), "scalar": (),
    },
}
_PRESET_AXES["adamini"] = _PRESET_AXES["adam-mini"]
# Presets whose bias rule comes before every recognizer: Adam-mini 1.1.1 gives full Adam to
# every parameter whose name contains "bias" (norm biases included), before any other rule.
_BIAS_FIRST = {"adam-mini": r"bias", "adamini": r"bias"}

PRESETS: tuple[str, ...] = ("adam", "slimadam", "adalayer", "adalayer+ln+tn", "adam-mini")


def preset(
    name: str,
    *,
    num_heads: int | None = None,
    overrides: Mapping[str, Sequence[SemanticAxis] | str] | None = None,
    layer_types: Mapping[str, str] | None = None,
    strict: bool = False,
    num_kv_heads: int | None = None,
    stacked: Any = None,
    torch_layout: Any = None,
    einsum: Mapping[str, str] | None = None,
    fused: Mapping[str, Any] | None = None,
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
  ``adam-mini``   Adam-mini 1.1.1: one value per output neuron, per head for
                  query/key, per token for embedding/head, one per tensor for norm
                  scales and positional embeddings; full Adam for every parameter whose
                  path contains ``bias`` (norm biases too), as the official code; use
                  it with ``mask=weight_decay_mask("adam-mini")``
  ============== ===================================================================

  Args:
    name: one of `PRESETS` (case-insensitive).
    num_heads: number of attention heads, needed by ``adam-mini`` when query/key
      kernels are 2-D ``(d, H*hd)``.
    overrides: ``{layer_type: axes}`` replacing the preset's axes for those
      layer types; an unknown layer type is an error.
    layer_types: ``{path pattern: layer_type}`` naming the role of parameters
      that the recognizers cannot tell from their names (``{"^Dense_4/kernel$":
      "head"}``), matched before them; each gets the preset's axes for that
      type.
    strict: refuse (ValueError naming them) parameters that only the generic
      ``kernel|weight|w`` pattern recognizes, whose role would be a guess;
      without it, presets whose axes depend on the role warn once
      (`slimoptax.GenericLayerWarning`) and `Rules.table` marks them ``?``.
    num_kv_heads: key/value heads of grouped-query attention (``adam-mini``'s
      per-head key blocks; default ``num_heads``).
    stacked: stacked-layer axes (``nn.scan``, ``nnx.scan``): a path pattern or
      list of them (axis 0) or ``{pattern: axis}``; never averaged, and roles
      are read from the other axes.
    torch_layout: ``True`` or path pattern(s) of kernels stored ``(fan_out,
      fan_in)`` (PyTorch ``nn.Linear``, Hugging Face ``FlaxConv1D``).
    einsum: ``{pattern: equation}``: roles of einsum kernels (the equation's
      second operand), e.g. ``{r"q_einsum/w$": "BTD,NDH->BTNH"}``.
    fused: ``{pattern: parts}``: fused kernels split into parts, each with its
      layer type's axes, e.g. ``{r"c_attn/kernel$": ("query", "key", "value")}``
      or a `slimoptax.layouts.Fused` (axis, per-head interleaving).
      See `slimoptax.layouts` for all five. Known names imply their layouts
      after these (`slimoptax.layouts.PRESET_LAYOUTS`): gemma's ``q_einsum``,
      ``kv_einsum``, ``qkv_einsum``, ``attn_vec_einsum`` and ``nn.ConvLocal``.

  Returns:
    A `Rules` object.

  Example:
    >>> import warnings, jax.numpy as jnp, slimoptax
    >>> params = {"Dense_0": {"kernel": jnp.zeros((8, 32))}, "Dense_1": {"kernel": jnp.zeros((32, 100))}}
    >>> rules = slimoptax.preset("slimadam", layer_types={r"^Dense_1/kernel$": "head"})
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   axes = slimoptax.compression_axes(params, rules)
    >>> axes, [type(w.message).__name__ for w in caught]  # Dense_0 is a guess: one warning names it
    ({'Dense_0': {'kernel': (1,)}, 'Dense_1': {'kernel': (0,)}}, ['GenericLayerWarning'])
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
  declared = []
  for pattern, ltype in (layer_types or {}).items():
    if ltype not in LAYER_TYPES:
      raise ValueError(f"layer_types[{pattern!r}] = {ltype!r} is not a layer type; known: {sorted(LAYER_TYPES)}")
    declared.append(Rule(pattern, ltype, table[ltype], min_ndim=0 if ltype in _VECTOR_TYPES else 2))
  if key in _BIAS_FIRST:
    declared.append(Rule(_BIAS_FIRST[key], "bias", table["bias"], warn_unused=False))
  rules = declared + recognizers(table)
  uniform = {table[t] for t in LAYER_TYPES if t != "scalar"}
  if len(uniform) == 1:
    # The preset treats every layer type alike (adam, adalayer): any tensor will do.
    rules.append(Rule(r"^", "dense", uniform.pop(), warn_unused=False, min_ndim=2))
  # A generic "dense" match is a guess when another matrix type would get other axes.
  role_dependent = any(table[t] != table["dense"] for t in LAYER_TYPES if t not in _VECTOR_TYPES)
  user = layouts.declarations(num_kv_heads=num_kv_heads, stacked=stacked, torch_layout=torch_layout,
                              einsum=einsum, fused=fused)
  return Rules(rules, name=key, num_heads=num_heads, role_dependent=role_dependent, strict=strict,
               layouts=user.merge(layouts.PRESET_LAYOUTS))



# --------------------------------------------------------------------------
# Weight-decay masks of the official implementations.
# --------------------------------------------------------------------------

# Adam-mini 1.1.1 decays no parameter whose lower-cased name contains one of these.
_NO_DECAY_SUBSTRINGS = {"adam-mini": ("norm", "ln", "bias")}
_NO_DECAY_SUBSTRINGS["adamini"] = _NO_DECAY_SUBSTRINGS["adam-mini"]


def weight_decay_mask(name: str) -> Callable[[Any], Any]:
  """The weight-decay mask of a preset's official implementation.

  ``"adam-mini"``: decay every parameter except those whose lower-cased
  ``"/"``-joined path contains ``"norm"``, ``"ln"`` or ``"bias"``: the name
  rule of Adam-mini 1.1.1 (Zhang et al.), plain substrings, so a path such as
  ``kiln/kernel`` is not decayed either. ``"slimadam"``: decay parameters with
  ``ndim >= 2``, as the SlimAdam authors' ``SlimAdamW`` (Kalra et al.) and
  `slimoptax.default_weight_decay_mask`.

  Args:
    name: ``"adam-mini"`` or ``"slimadam"`` (case-insensitive).

  Returns:
    A callable ``params -> pytree of bools`` (``True``: decayed), for the
    ``mask`` of `slimoptax.slim_adamw` or `optax.add_decayed_weights`.

  Raises:
    ValueError: for another name.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> params = {"attn": {"query": {"kernel": jnp.zeros((8, 2, 4)), "bias": jnp.zeros((2, 4))}},
    ...           "ln_f": {"scale": jnp.ones(8)}, "wpe": {"embedding": jnp.zeros((4, 8))}}
    >>> slimoptax.weight_decay_mask("adam-mini")(params)
    {'attn': {'query': {'bias': False, 'kernel': True}}, 'ln_f': {'scale': False}, 'wpe': {'embedding': True}}
    >>> slimoptax.weight_decay_mask("slimadam")(params)["attn"]["query"]  # a 2-D bias is decayed
    {'bias': True, 'kernel': True}
  """
  key = name.lower().replace("_", "-")
  if key == "slimadam":
    return lambda params: jax.tree.map(lambda p: len(shape_of(p)) >= 2, params)
  if key not in _NO_DECAY_SUBSTRINGS:
    raise ValueError(f"no weight-decay mask for {name!r}; known: 'adam-mini', 'slimadam'")
  excluded = _NO_DECAY_SUBSTRINGS[key]

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in path_str(path).lower() for s in excluded), params)

  return mask


_RECOGNIZERS = recognizers()


__all__ = ["PRESETS", "layer_type", "preset", "recognizers", "weight_decay_mask"]
