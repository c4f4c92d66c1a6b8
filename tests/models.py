"""Small Flax models for the tests (linen and NNX), built from standard layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class LinenBlock(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(use_bias=False, name="ln_1")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False, name="attn")(
        h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    x = x + h
    h = nn.LayerNorm(use_bias=False, name="ln_2")(x)
    h = nn.Dense(4 * self.d, use_bias=False, name="up")(h)
    h = nn.Dense(self.d, use_bias=False, name="down")(nn.gelu(h))
    return x + h


class LinenGPT(nn.Module):
  """Tiny GPT in linen: tied embedding, DenseGeneral attention kernels."""

  vocab: int = 32
  d: int = 16
  heads: int = 2
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(self.vocab, self.d, name="wte")
    x = wte(tokens)
    for i in range(self.layers):
      x = LinenBlock(self.d, self.heads, name=f"block_{i}")(x)
    x = nn.LayerNorm(use_bias=False, name="ln_f")(x)
    return wte.attend(x)


class LinenCNN(nn.Module):
  """Tiny CNN: Conv -> BatchNorm -> Conv -> Dense head."""

  classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), name="conv_0")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn_0")(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), name="conv_1")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.classes, name="head")(x)


class NNXMLPBlock(nnx.Module):
  def __init__(self, d, rngs):
    self.up = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


class NNXBlock(nnx.Module):
  def __init__(self, d, heads, rngs):
    self.ln_1 = nnx.LayerNorm(d, use_bias=False, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, use_bias=False,
                                       decode=False, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, use_bias=False, rngs=rngs)
    self.mlp = NNXMLPBlock(d, rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attn(self.ln_1(x), mask=mask)
    return x + self.mlp(self.ln_2(x))


class NNXGPT(nnx.Module):
  """Tiny GPT in NNX with an untied LM head and a learned position table."""

  def __init__(self, vocab=32, d=16, heads=2, layers=2, seq=8, *, rngs):
    self.wte = nnx.Embed(vocab, d, rngs=rngs)
    self.wpe = nnx.Embed(seq, d, rngs=rngs)
    self.blocks = nnx.List([NNXBlock(d, heads, rngs) for _ in range(layers)])
    self.ln_f = nnx.RMSNorm(d, rngs=rngs)
    self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def lm_batch(key, vocab=32, batch=8, seq=8):
  """A learnable toy language: the next token is (token + 1) mod vocab with noise."""
  start = jax.random.randint(key, (batch, 1), 0, vocab)
  tokens = (start + jnp.arange(seq + 1)[None, :]) % vocab
  return tokens[:, :-1], tokens[:, 1:]
