"""Models for the experiments: a GPT-2 style transformer (Flax NNX and linen) and a bigram model.

* :class:`GPT` -- a GPT-2 style decoder in Flax NNX, built from Flax's standard
  layers only; :class:`LinenGPT` is the same model in Flax linen;
* :class:`EmbedHeadLM` -- the embedding + linear head bigram model of the
  vocabulary-size experiment (Kalra et al. 2025, Sec. 4.1);
* :class:`Functional` -- a model split into ``graphdef`` and a pure parameter
  tree, with ``loss(params, x, y)`` and ``logits(params, x)``, which is how the
  training loop (`experiments._lib.train`) steps it;
* :func:`cross_entropy_loss`, :func:`param_paths`, :func:`count_params`.

Parameter paths
---------------
Optimizer presets match parameters by their path. For the NNX :class:`GPT`
(``attention="mha"``, ``tie_embeddings=True``) the ``"/"``-joined paths returned
by :func:`param_paths` / :func:`keypath_to_str` are::

  wte/embedding                  (vocab_size, d_model)
  wpe/embedding                  (seq_len, d_model)
  blocks/0/ln_1/scale            (d_model,)
  blocks/0/attn/query/kernel     (d_model, n_heads, head_dim)
  blocks/0/attn/key/kernel       (d_model, n_heads, head_dim)
  blocks/0/attn/value/kernel     (d_model, n_heads, head_dim)
  blocks/0/attn/out/kernel       (n_heads, head_dim, d_model)
  blocks/0/ln_2/scale            (d_model,)
  blocks/0/mlp/up/kernel         (d_model, 4 d_model)
  blocks/0/mlp/down/kernel       (4 d_model, d_model)
  ...
  ln_f/scale                     (d_model,)
  lm_head/kernel                 (d_model, vocab_size)   only if tie_embeddings=False

With ``attention="dense"`` the attention parameters are
``blocks/<i>/attn/{q_proj,k_proj,v_proj,o_proj}/kernel``, each ``(d_model, d_model)``.
:class:`EmbedHeadLM` has ``wte/embedding`` and ``lm_head/kernel``.
The block index is an ``int`` key (``DictKey(0)``), not a string.

``nnx.state(model, nnx.Param)`` is an ``nnx.State`` whose leaves are
``nnx.Param`` *Variables*: ``jax.tree_util.tree_flatten_with_path`` reaches the
arrays with a trailing ``GetAttrKey('value')``. ``nnx.as_pure`` of it (what
:class:`Functional` steps) has plain ``jax.Array`` leaves and no trailing
``.value``. Label functions must therefore ignore a trailing ``.value``;
:func:`keypath_to_str` (``slimoptax._tree.path_str``) does exactly that. Keys of
``nnx.State`` are kept sorted, so leaf order is alphabetical (``blocks`` <
``ln_f`` < ``wpe`` < ``wte``), not definition order.

For :class:`LinenGPT` the variables are a plain nested dict, so the paths are
``params/wte/embedding``, ``params/blocks_0/attn/query/kernel``,
``params/blocks_0/mlp/down/kernel``, ``params/ln_f/scale`` and so on (linen
names list members ``blocks_0``, ``blocks_1``, ...). The shapes are the same as
in NNX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from slimoptax._tree import named_leaves, path_str

__all__ = [
    "EmbedHeadConfig",
    "EmbedHeadLM",
    "Functional",
    "GPT",
    "GPTConfig",
    "LinenGPT",
    "LAYER_TYPE_NAMES",
    "PRESETS",
    "ROLE_NAMES",
    "build_model",
    "candidate_roles",
    "count_params",
    "cross_entropy_loss",
    "gpt_config",
    "tiny_gpt",
    "keypath_to_str",
    "param_paths",
]

# -----------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Hyperparameters of :class:`GPT` and :class:`LinenGPT`.

  Attributes:
    vocab_size: Embedding rows; must be >= the tokenizer's vocabulary size.
    seq_len: Maximum context length (rows of the positional embedding).
    n_layers: Number of transformer blocks.
    n_heads: Attention heads (``d_model`` must be divisible by it).
    d_model: Residual stream width.
    tie_embeddings: Whether the output projection reuses ``wte``; if False a
      separate ``lm_head`` (d_model, vocab_size) is added.
    attention: ``"mha"`` for ``nnx.MultiHeadAttention`` (3-D kernels) or
      ``"dense"`` for four ``(d_model, d_model)`` ``nnx.Linear`` projections.
    init_std: Std of all weight matrices; residual projections use
      ``init_std / sqrt(2 n_layers)``.
    dtype: Name of the computation dtype, e.g. ``"bfloat16"`` (parameters are
      always float32). A string keeps the config JSON-serializable.
  """

  vocab_size: int = 50304
  seq_len: int = 1024
  n_layers: int = 12
  n_heads: int = 12
  d_model: int = 768
  tie_embeddings: bool = True
  attention: str = "mha"
  init_std: float = 0.02
  dtype: str = "float32"

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}.")
    if self.attention not in ("mha", "dense"):
      raise ValueError(f"attention must be 'mha' or 'dense', got {self.attention!r}.")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def residual_init_std(self) -> float:
    """Std of the residual projections (attention out, MLP down)."""
    return self.init_std / math.sqrt(2 * self.n_layers)


PRESETS: dict[str, GPTConfig] = {
    # ~0.1M parameters: a few hundred steps in about a minute on 2 CPU cores.
    "tiny": GPTConfig(vocab_size=512, seq_len=64, n_layers=2, n_heads=4, d_model=64),
    # ~1.3M parameters: a few minutes on 2 CPU cores.
    "small_cpu": GPTConfig(vocab_size=2048, seq_len=128, n_layers=4, n_heads=4, d_model=128),
    # GPT-2 small (124M): accelerator runs and shape tests only.
    "gpt2_small": GPTConfig(vocab_size=50304, seq_len=1024, n_layers=12, n_heads=12, d_model=768),
}


def gpt_config(name: str, **overrides: Any) -> GPTConfig:
  """Returns the preset ``name`` (see :data:`PRESETS`) with fields overridden.

  Args:
    name: ``"tiny"``, ``"small_cpu"`` or ``"gpt2_small"``.
    **overrides: ``GPTConfig`` fields to replace, e.g. ``vocab_size=256``.

  Returns:
    A new :class:`GPTConfig`.
  """
  if name not in PRESETS:
    raise KeyError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


@dataclasses.dataclass(frozen=True)
class EmbedHeadConfig:
  """Hyperparameters of :class:`EmbedHeadLM`.

  Attributes:
    vocab_size: Vocabulary size.
    d_model: Embedding width.
    seq_len: Context length used for training batches (the model itself is
      position-free).
    init_std: Std of both weight matrices.
  """

  vocab_size: int = 512
  d_model: int = 64
  seq_len: int = 64
  init_std: float = 0.02


def _normal(std: float) -> Callable[..., jax.Array]:
  return nnx.initializers.normal(stddev=std)


def _linear(config: GPTConfig, in_features: int, out_features: int, *, std: float, rngs: nnx.Rngs):
  """A bias-free ``nnx.Linear`` with N(0, std^2) kernel."""
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=False,
      kernel_init=_normal(std),
      dtype=config.compute_dtype,
      rngs=rngs,
  )


class DenseCausalSelfAttention(nnx.Module):
  """Causal self-attention with four ``(d_model, d_model)`` ``nnx.Linear`` projections."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d, std = config.d_model, config.init_std
    self.q_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.k_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.v_proj = _linear(config, d, d, std=std, rngs=rngs)
    self.o_proj = _linear(config, d, d, std=config.residual_init_std, rngs=rngs)
    self.n_heads = config.n_heads

  def __call__(self, x: jax.Array, *, mask: jax.Array) -> jax.Array:
    heads = lambda t: t.reshape(*t.shape[:-1], self.n_heads, -1)
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    y = nnx.dot_product_attention(q, k, v, mask=mask)
    return self.o_proj(y.reshape(x.shape))


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with a 4x hidden width and no biases."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.up = _linear(config, d, 4 * d, std=config.init_std, rngs=rngs)
    self.down = _linear(config, 4 * d, d, std=config.residual_init_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.ln_1 = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    if config.attention == "mha":
      self.attn = nnx.MultiHeadAttention(
          num_heads=config.n_heads,
          in_features=d,
          use_bias=False,
          kernel_init=_normal(config.init_std),
          out_kernel_init=_normal(config.residual_init_std),
          decode=False,
          dtype=config.compute_dtype,
          rngs=rngs,
      )
    else:
      self.attn = DenseCausalSelfAttention(config, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask=mask)
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """A GPT-2 style decoder built from Flax NNX standard layers.

  See the module docstring for parameter names and shapes. Initialization
  follows the SlimAdam paper (Mitchell/OLMo style): every weight matrix and
  embedding ~ N(0, init_std^2), residual projections (``attn/out`` or
  ``attn/o_proj``, ``mlp/down``) ~ N(0, init_std^2 / (2 n_layers)), LayerNorm
  scales 1, no biases anywhere.

  Args:
    config: Model hyperparameters.
    rngs: Parameter RNGs.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, std = config.d_model, config.init_std
    embed = functools.partial(
        nnx.Embed, embedding_init=_normal(std), dtype=config.compute_dtype, rngs=rngs
    )
    self.wte = embed(config.vocab_size, d)
    self.wpe = embed(config.seq_len, d)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
    self.ln_f = nnx.LayerNorm(d, use_bias=False, dtype=config.compute_dtype, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = _linear(config, d, config.vocab_size, std=std, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    positions = jnp.arange(tokens.shape[-1])
    x = self.wte(tokens) + self.wpe(positions)
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask=mask)
    x = self.ln_f(x)
    if self.config.tie_embeddings:
      return self.wte.attend(x)
    return self.lm_head(x)


class EmbedHeadLM(nnx.Module):
  """The 2-layer bigram model ``lm_head(wte(tokens))`` (no tying, no biases).

  Used for the vocabulary-size experiment of the SlimAdam paper (Sec. 4.1).

  Args:
    config: Model hyperparameters.
    rngs: Parameter RNGs.
  """

  def __init__(self, config: EmbedHeadConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = _normal(config.init_std)
    self.wte = nnx.Embed(config.vocab_size, config.d_model, embedding_init=init, rngs=rngs)
    self.lm_head = nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, kernel_init=init, rngs=rngs
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    return self.lm_head(self.wte(tokens))


def build_model(config: GPTConfig | EmbedHeadConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds :class:`GPT` or :class:`EmbedHeadLM` depending on the config type."""
  if isinstance(config, GPTConfig):
    return GPT(config, rngs=rngs)
  if isinstance(config, EmbedHeadConfig):
    return EmbedHeadLM(config, rngs=rngs)
  raise TypeError(f"Unknown model config type {type(config).__name__}.")


# --- linen ------------------------------------------------------------------


def _dense(config: GPTConfig, features: int, *, std: float, name: str) -> nn.Dense:
  """A bias-free ``nn.Dense`` with N(0, std^2) kernel."""
  return nn.Dense(
      features,
      use_bias=False,
      kernel_init=_normal(std),
      dtype=config.compute_dtype,
      name=name,
  )


class _LinenMLP(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = jax.nn.gelu(_dense(c, 4 * c.d_model, std=c.init_std, name="up")(x))
    return _dense(c, c.d_model, std=c.residual_init_std, name="down")(x)


class _LinenDenseAttention(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x, *, mask):
    c = self.config
    heads = lambda t: t.reshape(*t.shape[:-1], c.n_heads, -1)
    q = heads(_dense(c, c.d_model, std=c.init_std, name="q_proj")(x))
    k = heads(_dense(c, c.d_model, std=c.init_std, name="k_proj")(x))
    v = heads(_dense(c, c.d_model, std=c.init_std, name="v_proj")(x))
    y = nn.dot_product_attention(q, k, v, mask=mask)
    return _dense(c, c.d_model, std=c.residual_init_std, name="o_proj")(y.reshape(x.shape))


class _LinenBlock(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x, *, mask):
    c = self.config
    if c.attention == "mha":
      attn = nn.MultiHeadDotProductAttention(
          num_heads=c.n_heads,
          qkv_features=c.d_model,
          use_bias=False,
          kernel_init=_normal(c.init_std),
          out_kernel_init=_normal(c.residual_init_std),
          deterministic=True,
          decode=False,
          dtype=c.compute_dtype,
          name="attn",
      )
    else:
      attn = _LinenDenseAttention(c, name="attn")
    ln_1 = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_1")
    ln_2 = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_2")
    x = x + attn(ln_1(x), mask=mask)
    return x + _LinenMLP(c, name="mlp")(ln_2(x))


class LinenGPT(nn.Module):
  """The :class:`GPT` model in Flax linen (same layers, names and init).

  Variables live under ``params/`` with blocks named ``blocks_0``,
  ``blocks_1``, ...; e.g. ``params/blocks_0/attn/query/kernel``.

  Attributes:
    config: Model hyperparameters.
  """

  config: GPTConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps int tokens ``(batch, time)`` to logits ``(batch, time, vocab_size)``."""
    c = self.config
    embed = functools.partial(
        nn.Embed, embedding_init=_normal(c.init_std), dtype=c.compute_dtype
    )
    wte = embed(c.vocab_size, c.d_model, name="wte")
    wpe = embed(c.seq_len, c.d_model, name="wpe")
    x = wte(tokens) + wpe(jnp.arange(tokens.shape[-1]))
    mask = nn.make_causal_mask(tokens)
    for i in range(c.n_layers):
      x = _LinenBlock(c, name=f"blocks_{i}")(x, mask=mask)
    x = nn.LayerNorm(use_bias=False, dtype=c.compute_dtype, name="ln_f")(x)
    if c.tie_embeddings:
      return wte.attend(x)
    return _dense(c, c.vocab_size, std=c.init_std, name="lm_head")(x)


# -----------------------------------------------------------------------------
# Parameter utilities and loss
# -----------------------------------------------------------------------------


# The "/"-joined path of a key path (a trailing nnx `.value` dropped): the same strings the
# label rules match.
keypath_to_str = path_str


def _named_leaves(tree: Any) -> dict[str, jax.Array]:
  return dict(named_leaves(tree))


def param_paths(params: Any) -> dict[str, tuple[int, ...]]:
  """Returns ``{path: shape}`` for an NNX module or any params pytree.

  Args:
    params: An ``nnx.Module`` (its ``nnx.Param`` state is used) or a pytree
      such as linen ``variables``.

  Returns:
    A dict from ``"/"``-joined path to shape, in flattening order.
  """
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return {path: tuple(x.shape) for path, x in _named_leaves(params).items()}


def count_params(params: Any) -> int:
  """Total number of parameter entries of an NNX module or a params pytree."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy, computed in float32.

  Args:
    logits: ``(..., vocab_size)`` unnormalized log-probabilities.
    targets: ``(...)`` integer labels.

  Returns:
    A scalar: the mean loss over all positions.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return losses.mean()


class Functional:
  """An NNX model as pure functions of its parameters (how `experiments._lib.train` steps it).

  ``nnx.split(module, nnx.Param, ...)`` gives the graph definition, the
  parameters and the rest of the state (empty for the models here); the
  parameters are stepped as a pure tree (``nnx.as_pure``).

  Args:
    model: A :class:`GPTConfig` / :class:`EmbedHeadConfig` (the model is built
      with ``nnx.Rngs(seed)`` by :meth:`init`), or a built NNX module (mapping
      tokens to logits), whose own parameters :meth:`init` returns whatever
      the seed.
  """

  def __init__(self, model: GPTConfig | EmbedHeadConfig | nnx.Module):
    self.module = model if isinstance(model, nnx.Module) else None
    self.config = model.config if self.module is not None else model
    built = self.module if self.module is not None else build_model(model, rngs=nnx.Rngs(0))
    self.graphdef, _, self.rest = nnx.split(built, nnx.Param, ...)
    self.seq_len = self.config.seq_len

  def init(self, seed: int = 0) -> Any:
    """The initial parameters (pure arrays) of the model built with ``nnx.Rngs(seed)``."""
    module = self.module if self.module is not None else build_model(self.config, rngs=nnx.Rngs(seed))
    return nnx.as_pure(nnx.state(module, nnx.Param))

  def logits(self, params: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(self.graphdef, params, self.rest)(x)

  def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return cross_entropy_loss(self.logits(params, x), y)


#: Display names of the GPT's layer types, by depth group (`slimoptax.depth_group`), as the
#: SlimAdam paper names them (Kalra et al. 2025, Table 3).
LAYER_TYPE_NAMES = {
    "blocks/*/attn/query/kernel": "Attn.Query", "blocks/*/attn/key/kernel": "Attn.Key",
    "blocks/*/attn/value/kernel": "Attn.Value", "blocks/*/attn/out/kernel": "Attn.Proj",
    "blocks/*/mlp/up/kernel": "MLP.Up", "blocks/*/mlp/down/kernel": "MLP.Down",
    "blocks/*/ln_1/scale": "LN (attn)", "blocks/*/ln_2/scale": "LN (mlp)", "ln_f/scale": "LN (final)",
    "wte/embedding": "Tok.Embd = LM head", "wpe/embedding": "Pos.Embd",
}

#: What the SNR candidates of a matrix or tensor mean, in `slimoptax.SNRTracker`'s order.
ROLE_NAMES = ("fan_in", "fan_out", "both")


def candidate_roles(candidates, shape) -> dict[tuple[int, ...], str]:
  """``{axes: role}`` for a parameter's SNR candidates (``tracker.candidates[path]``); vectors: "all"."""
  return dict(zip([tuple(c) for c in candidates], ROLE_NAMES if len(shape) >= 2 else ("all",)))


def tiny_gpt(args: Any, vocab_size: int) -> tuple[GPTConfig, Functional]:
  """The ``"tiny"`` GPT with ``args.n_layers``, ``args.d_model``, ``args.n_heads`` (command-line sizes)."""
  config = gpt_config("tiny", n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                      vocab_size=vocab_size)
  return config, Functional(config)
