"""Layer types, their axis roles (Flax layouts) and the path patterns that recognize them.

Axis roles name the axes of a parameter of a given layer type, in **Flax
layouts**: ``Dense`` kernels are ``(fan_in, fan_out)``, ``DenseGeneral``
attention kernels are ``(d, heads, head_dim)`` for query/key/value and
``(heads, head_dim, d)`` for the output projection, ``Conv`` kernels are
``(*window, in, out)``, ``Embed`` tables are ``(vocab, d)``. PyTorch
``nn.Linear`` weights and Hugging Face ``Conv1D`` kernels are ``(fan_out,
fan_in)``: roles do not apply to them; give integer axes instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

Axes = tuple[int, ...]

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

ROLE_NAMES = ("fan_in", "fan_out", "heads", "head_dim", "token", "vocab", "embed", "all")


class Reshaped(NamedTuple):
  """Average over ``axes`` of a parameter viewed with shape ``shape``.

  Used when a compression needs a finer view than the stored layout, e.g. one
  second moment per attention head of a ``(d, H*hd)`` query kernel:
  ``Reshaped(shape=(d, H, hd), axes=(0, 2))``.
  """

  shape: tuple[int, ...]
  axes: Axes


class Split(NamedTuple):
  """Per-part averaging of a fused parameter (declared with `slimoptax.layouts.Fused`).

  The parameter is viewed with shape ``view``; index ``i`` of axis ``axis`` is
  part ``i`` (a ``view`` without that axis), averaged over ``parts[i]`` (axes
  of the part, or a `Reshaped` view of it). The statistic is stored flat: the
  parts' kept entries one after the other.
  """

  view: tuple[int, ...]
  axis: int
  parts: tuple[Any, ...]

  @property
  def part_shape(self) -> tuple[int, ...]:
    return self.view[:self.axis] + self.view[self.axis + 1:]


def _head_view(shape: tuple[int, ...], axis: int, num_heads: int, layer_type: str,
               path: str) -> tuple[int, ...]:
  """``(d, H*hd) -> (d, H, hd)`` (``axis=1``) or ``(H*hd, d) -> (H, hd, d)`` (``axis=0``)."""
  hidden = shape[axis]
  if hidden % num_heads:
    side = "fan_in" if axis == 0 else "fan_out"
    raise ValueError(
        f"{path!r}: {side} {hidden} of the {layer_type} kernel {shape} is not divisible by "
        f"num_heads={num_heads}")
  split = (num_heads, hidden // num_heads)
  return split + shape[1:] if axis == 0 else shape[:1] + split


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
    # Leading size-1 axes of a positional table (ViT's (1, N, d), added to a batch) are batch-like:
    # neither positions nor embedding ("all" still covers them).
    lead = 0
    while layer_type == "pos_embedding" and lead < ndim - 2 and shape[lead] == 1:
      lead += 1
    embed = tuple(range(lead + 1, ndim))
    roles.update(fan_in=(lead,), fan_out=embed, token=(lead,), vocab=(lead,), embed=embed)
    return shape, roles
  if layer_type == "head":
    roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,), embed=tuple(range(ndim - 1)),
                 token=(ndim - 1,), vocab=(ndim - 1,))
    return shape, roles
  if layer_type in ("query", "key", "value", "attn_out"):
    is_out = layer_type == "attn_out"
    if ndim == 2 and num_heads is not None:
      shape = _head_view(shape, 0 if is_out else 1, num_heads, layer_type, path)
      ndim = 3
      roles["all"] = (0, 1, 2)
    if ndim == 3 and is_out:
      roles.update(fan_in=(0, 1), fan_out=(2,), heads=(0,), head_dim=(1,))
    elif ndim == 3:
      roles.update(fan_in=(0,), fan_out=(1, 2), heads=(1,), head_dim=(2,))
    else:
      roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,))
    return shape, roles
  # Dense-like and conv kernels: (*fan_in, fan_out).
  roles.update(fan_in=tuple(range(ndim - 1)), fan_out=(ndim - 1,))
  return shape, roles



# --------------------------------------------------------------------------
# Axes entries: checked, mapped back from views, counted.
# --------------------------------------------------------------------------


def view_groups(shape: Sequence[int], view: Sequence[int]) -> list[list[int]]:
  """The consecutive axes of ``view`` each axis of ``shape`` is split into (a view only splits axes)."""
  groups, v = [], 0
  for s in shape:
    group, prod = [], 1
    while prod < s or not group:
      group.append(v)
      prod *= view[v]
      v += 1
    groups.append(group)
  return groups


def _simplify_view(shape: tuple[int, ...], view: tuple[int, ...], axes: Axes) -> Axes | Reshaped:
  """Maps view axes back to the stored layout when the view is not needed."""
  out = []
  for i, group in enumerate(view_groups(shape, view)):
    hit = [g in axes for g in group]
    if all(hit):
      out.append(i)
    elif any(hit):
      return Reshaped(shape=view, axes=axes)
  return tuple(out)


def kept_entries(shape: Sequence[int], axes: Axes | Reshaped | Split) -> int:
  """Number of second-moment entries kept when averaging ``shape`` over ``axes``."""
  if isinstance(axes, Split):
    return sum(kept_entries(axes.part_shape, part) for part in axes.parts)
  if isinstance(axes, Reshaped):
    shape, axes = axes.shape, axes.axes
  return math.prod(s for i, s in enumerate(shape) if i not in axes)


def reduced_shape(shape: Sequence[int], axes: Axes | Reshaped | Split) -> tuple[int, ...]:
  """Shape of a statistic averaged over ``axes`` with kept (size-1) dims (a `Split`'s: flat)."""
  if isinstance(axes, Split):
    return (kept_entries(shape, axes),)
  if isinstance(axes, Reshaped):
    shape, axes = axes.shape, axes.axes
  return tuple(1 if i in axes else int(s) for i, s in enumerate(shape))


def validate_axes(path: str, shape: tuple[int, ...], spec: Any, *, what: str = "compress") -> Axes | Reshaped:
  """Checks one user-given axes entry against a parameter shape; returns it normalised."""
  ndim = len(shape)
  if spec is None:
    return ()
  if isinstance(spec, Split):
    view = tuple(int(s) for s in spec.view)
    if math.prod(view) != math.prod(shape) or not 0 <= spec.axis < len(view) or len(spec.parts) != view[spec.axis]:
      raise ValueError(
          f"{what} for {path!r}: Split view {view} (axis {spec.axis}, {len(spec.parts)} parts) does not fit "
          f"the parameter {shape}")
    part_shape = view[:spec.axis] + view[spec.axis + 1:]
    return Split(view, int(spec.axis), tuple(
        validate_axes(f"{path}[part {i}]", part_shape, p, what=what) for i, p in enumerate(spec.parts)))
  if isinstance(spec, Reshaped):
    if math.prod(spec.shape) != math.prod(shape):
      raise ValueError(
          f"{what} for {path!r}: view {spec.shape} has {math.prod(spec.shape)} entries, the "
          f"parameter {shape} has {math.prod(shape)}")
    inner = validate_axes(path, tuple(spec.shape), tuple(spec.axes), what=what)
    return Reshaped(tuple(int(s) for s in spec.shape), inner)
  if isinstance(spec, (int, np.integer)):
    spec = (int(spec),)
  if not isinstance(spec, (tuple, list)) or not all(isinstance(a, (int, np.integer)) for a in spec):
    hint = " (give axes as tuples: lists are pytree nodes)" if isinstance(spec, list) else ""
    raise ValueError(f"{what} for {path!r}: expected a tuple of int axes, got {spec!r}{hint}")
  out = []
  for a in spec:
    if not -ndim <= a < ndim:
      raise ValueError(f"{what} for {path!r}: axis {a} out of range for shape {shape}")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{what} for {path!r}: repeated axes in {tuple(spec)}")
  return tuple(sorted(out))



_ATTN = r"(attn|attention|self_attn|self_attention|mha|multiheaddotproductattention(_\d+)?|multiheadattention(_\d+)?)"
_MLP = r"(mlp|ffn|ff|feed_forward|feedforward|mlpblock(_\d+)?|mlp_block)"
_W = r"(kernel|weight|w)"
# The last recognizer: any kernel / weight that no name above tells the role of. Presets whose axes
# depend on the role warn about (or, strict, refuse) the parameters only this pattern matches.
GENERIC_KERNEL_PATTERN = r"(^|[/.])(kernel|weight|w)$"

# Ordered (regex, layer type) recognizers; matched with re.search, case-insensitive,
# against the "/"-joined path. The first match wins.
LAYER_PATTERNS: tuple[tuple[str, str], ...] = (
    # Normalization layers (scale and bias), before generic biases.
    (r"(^|[/.])[^/.]*(norm|^ln|[/._]ln)[^/.]*([/.]\d+)?[/.](scale|bias|weight|gamma|beta|g|b)$", "norm"),
    (r"(^|[/.])(ln_?\w*|layernorm\w*|rmsnorm\w*|batchnorm\w*|bn\w*|norm\w*)[/.](scale|bias|weight)$", "norm"),
    (r"(^|[/.])(bias|b)$", "bias"),
    # Bias-like tensors of other shapes: T5's relative attention bias (buckets, heads), added to the
    # attention logits; BART's final_logits_bias (1, vocab); ViT's class token (1, 1, d).
    (r"(^|[/.])relative_attention_bias([/.](embedding|weight))?$", "bias"),
    (r"(^|[/.])(final_logits_bias|cls_token)$", "bias"),
    # Embeddings.
    (r"(^|[/.])(wpe|pos_emb\w*|position_embed\w*|positional_embed\w*|pos_embed\w*)([/.](embedding|weight))?$", "pos_embedding"),
    (r"(^|[/.])embed_positions([/.](embedding|weight))?$", "pos_embedding"),  # BART, OPT
    (r"(^|[/.])(wte|tok_embeddings|embed_tokens|token_embed\w*|tok_emb\w*|word_embeddings)([/.](embedding|weight))?$", "embedding"),
    (r"(^|[/.])embedding$", "embedding"),
    # Heads.
    (rf"(^|[/.])(lm_head|unembed\w*|logits|classifier|head|output_layer)[/.]{_W}$", "head"),
    (rf"(^|[/.])classifier[/.]1[/.]{_W}$", "head"),  # Sequential(Flatten/Dropout, Dense): HF ResNet
    # Attention: gemma's einsum kernels (their layouts are declared by the presets), then Dense names.
    (rf"(^|[/.])q_einsum[/.]{_W}$", "query"),
    (rf"(^|[/.])q?kv_einsum[/.]{_W}$", "attn_qkv"),
    (rf"(^|[/.])attn_vec_einsum[/.]{_W}$", "attn_out"),
    (rf"(^|[/.])(c_attn|qkv|qkv_proj|in_proj|wqkv|query_key_value)[/.]{_W}$", "attn_qkv"),
    (rf"(^|[/.])(query|q_proj|wq|to_q|q_lin|q)[/.]{_W}$", "query"),
    (rf"(^|[/.])(key|k_proj|wk|to_k|k_lin|k)[/.]{_W}$", "key"),
    (rf"(^|[/.])(value|v_proj|wv|to_v|v_lin|v)[/.]{_W}$", "value"),
    (rf"(^|[/.]){_ATTN}[/.](out|o_proj|wo|out_proj|c_proj|proj|output_proj|dense|to_out)[/.]{_W}$", "attn_out"),
    (rf"(^|[/.])(o_proj|out_proj|output_proj|to_out|out)[/.]{_W}$", "attn_out"),
    (rf"(^|[/.])(selfattention|encdecattention)[/.]o[/.]{_W}$", "attn_out"),  # T5
    # BERT / ViT (HF): attention/output/dense is the attention projection, before layer/N/output/dense.
    (rf"(^|[/.])(attention|crossattention)[/.]output[/.]dense[/.]{_W}$", "attn_out"),
    # MLPs (gated first).
    (rf"(^|[/.])(gate|gate_proj|w3|wi_0|mlp_gate)[/.]{_W}$", "mlp_gate"),
    (rf"(^|[/.])(up|up_proj|w1|fc1|c_fc|wi|wi_1|mlp_up|fc_in)[/.]{_W}$", "mlp_up"),
    (rf"(^|[/.])(down|down_proj|w2|fc2|mlp_proj|mlp_down|fc_out)[/.]{_W}$", "mlp_down"),
    (rf"(^|[/.]){_MLP}[/.](c_proj|proj|wo|out|dense_1|linear_1|layers_1)[/.]{_W}$", "mlp_down"),
    (rf"(^|[/.]){_MLP}[/.](dense_0|linear_0|layers_0)[/.]{_W}$", "mlp_up"),
    (rf"(^|[/.])densereludense[/.]wo[/.]{_W}$", "mlp_down"),  # T5
    (rf"(^|[/.])dense_h_to_4h[/.]{_W}$", "mlp_up"),  # Bloom, GPT-NeoX
    (rf"(^|[/.])dense_4h_to_h[/.]{_W}$", "mlp_down"),
    # BERT / ViT (HF): intermediate/dense is the MLP up projection, layer/N/output/dense its down projection.
    (rf"(^|[/.])intermediate[/.]dense[/.]{_W}$", "mlp_up"),
    (rf"(^|[/.])layer[/.]\d+[/.]output[/.]dense[/.]{_W}$", "mlp_down"),
    # Other named hidden Dense layers: a recognized "dense", no guess.
    (rf"(^|[/.])(pooler|predictions[/.]transform)[/.]dense[/.]{_W}$", "dense"),
    # Convolutions and everything else.
    (r"(^|[/.])patch_embed\w*[/.](projection|proj)[/.](kernel|weight)$", "conv"),  # ViT patch projection
    (r"(^|[/.])\w*conv\w*([/.]\d+)?[/.](kernel|weight)$", "conv"),
    (GENERIC_KERNEL_PATTERN, "dense"),
)


__all__ = ["GENERIC_KERNEL_PATTERN", "LAYER_PATTERNS", "LAYER_TYPES", "ROLE_NAMES", "Reshaped", "Split", "axis_roles",
           "kept_entries", "reduced_shape", "validate_axes"]
