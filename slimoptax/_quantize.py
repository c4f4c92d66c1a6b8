"""Quantized optimizer states: blockwise 8-bit / 4-bit codes, bf16 with stochastic rounding.

`quantize_state` wraps any optax transformation and stores the state fields
named ``mu`` (first moment) and ``nu`` (second moment) encoded, decoding them
before each inner update and encoding the result after it:

.. math::

  q = \\operatorname*{arg\\,min}_i |c_i - x / a|, \\qquad \\tilde x = c_q \\, a,
  \\qquad a = \\max_{j \\in \\text{block}} |x_j|,

with ``c`` a sorted codebook of 256 (8-bit) or 16 (4-bit) values in
``[-1, 1]`` and one float32 absmax scale ``a`` per block of ``block_size``
consecutive entries along the **last axis**, as in Dettmers et al., 8-bit
Optimizers via Block-wise Quantization, 2022. Blocks along the last axis keep
the codes in the leaf's shape (4-bit: two codes per byte, last dimension
halved, rounded up) and give scales of shape ``shape[:-1] + (ceil(last /
block_size),)``; a partial last block is scaled by its own absmax. The codes
then shard like their parameter (`slimoptax.sharding`).

Codebooks (`codebook`):

* 8-bit (``"int8"``): Dettmers' *dynamic (tree) map* (bitsandbytes'
  ``create_dynamic_map``, also torchao's 8-bit Adam): a sign bit, a run of
  zeros giving a decimal exponent ``10^-e`` (e = 0..6), an indicator bit and
  the remaining bits as a linear fraction in ``[0.1, 1]``. Its codes span
  seven decades below the block's absmax (finest near it, coarser toward
  10^-6), where a linear map would round everything below 1/256 of the
  absmax to zero: second moments span many decades within a block and need
  that range of relative precision. First moments use the
  signed map; second moments, never negative, use the unsigned one, which
  spends the sign bit on one more fraction bit, so no code is wasted on
  negative values.
* 4-bit (``"int4"``): the first moment uses the 4-bit signed dynamic map (3
  exponent/fraction bits); the second moment uses the linear map without
  zero, ``{1/16, 2/16, ..., 1}``, with blocks of 128, as torchao's 4-bit Adam
  does (after Li et al., Memory Efficient Optimizers with 4-bit States,
  2023): a second moment rounded to zero would make ``m / sqrt(v)`` explode
  (their "zero-point problem"), so the map has no zero: an entry below
  ``a / 16`` is stored as ``a / 16``.
* ``"bf16"``: bfloat16 with stochastic rounding, unbiased (``E[round(x)] =
  x``): a float32 is rounded away from zero with probability (its 16 low bits)
  / 2^16, from a PRNG key carried in the state and split every step.

A leaf stays as it is (float32) when it has fewer than ``min_size`` entries
(bitsandbytes' ``min_8bit_size``, 4096: small vectors such as biases and norm
scales, and SlimAdam's compressed second moments, cost little and are
sensitive), when it is a scalar, or when its encoded form would not be
smaller (a last dimension of 1: one scale per entry). ``"bf16"`` leaves
already 16-bit stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slimoptax import _snr, _tree

CODECS: tuple[str, ...] = ("int8", "uint8", "int4", "uint4", "bf16")
OPTIONS: tuple[str | None, ...] = (None, "int8", "int4", "bf16")
DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}
_FIELD_CODEC = {("mu", "int8"): "int8", ("nu", "int8"): "uint8", ("mu", "int4"): "int4",
                ("nu", "int4"): "uint4", ("mu", "bf16"): "bf16", ("nu", "bf16"): "bf16"}


def _bits(codec: str) -> int:
  return {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "bf16": 16}[codec]


def dynamic_map(*, signed: bool, bits: int = 8) -> np.ndarray:
  """Dettmers' dynamic (tree) quantization map, sorted ascending, as float32.

  Each code is read as: a sign bit (signed map only), ``e`` zeros giving the
  scale ``10^-e``, an indicator bit, and the remaining ``F`` bits as a linear
  fraction: the midpoints of ``2^F`` equal bins of ``[0.1, 1]``,

  .. math::

    c = \\pm 10^{-e} \\left(0.1 + 0.9 \\, \\frac{f + 1/2}{2^F}\\right),
    \\qquad f = 0, \\dots, 2^F - 1,

  plus the two codes without an indicator bit: 0 and 1. The signed map has
  ``2^bits`` codes in ``(-1, 1]``, the unsigned one ``2^bits`` in ``[0, 1]``.

  Args:
    signed: with a sign bit (first moments) or without (second moments).
    bits: 8 (exponents 10^0 .. 10^-6, as bitsandbytes' ``create_dynamic_map``)
      or 4 (10^0 .. 10^-2).

  Returns:
    The ``2^bits`` codebook values, sorted, float32.

  Example:
    >>> from slimoptax import dynamic_map
    >>> c = dynamic_map(signed=True, bits=4)
    >>> [round(float(x), 4) for x in c]
    [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0, 0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]

  References:
    Dettmers, 8-Bit Approximations for Parallelism in Deep Learning, 2016
    (the dynamic tree datatype); Dettmers et al., 8-bit Optimizers via
    Block-wise Quantization, 2022.
  """
  if bits not in (4, 8):
    raise ValueError(f"dynamic_map: bits must be 4 or 8, got {bits!r}")
  exponents = bits - 1  # decades 10^0 .. 10^-(bits-2)
  values = [0.0, 1.0]
  for e in range(exponents):
    frac_bits = bits - 1 - e - (1 if signed else 0)
    n = 2 ** frac_bits
    mags = 10.0 ** -e * (0.1 + 0.9 * (np.arange(n) + 0.5) / n)
    values += list(mags) + ([-m for m in mags] if signed else [])
  out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
  assert out.size == 2 ** bits, out.size
  return out


def linear_map(*, bits: int = 4) -> np.ndarray:
  """The unsigned linear map without zero, ``{k / 2^bits : k = 1..2^bits}`` (4-bit second moments)."""
  n = 2 ** bits
  return (np.arange(1, n + 1, dtype=np.float64) / n).astype(np.float32)


@functools.cache
def _codebook(codec: str) -> np.ndarray:
  if codec == "int8":
    return dynamic_map(signed=True, bits=8)
  if codec == "uint8":
    return dynamic_map(signed=False, bits=8)
  if codec == "int4":
    return dynamic_map(signed=True, bits=4)
  if codec == "uint4":
    return linear_map(bits=4)
  raise ValueError(f"codec {codec!r} has no codebook; codecs with one: {CODECS[:4]}")


def codebook(codec: str) -> np.ndarray:
  """The sorted float32 codebook of a blockwise codec (a copy).

  ``"int8"`` / ``"uint8"``: the signed / unsigned 8-bit dynamic map;
  ``"int4"``: the signed 4-bit dynamic map; ``"uint4"``: the 4-bit linear map
  without zero.

  Example:
    >>> from slimoptax import codebook
    >>> codebook("uint4")[:3].tolist()
    [0.0625, 0.125, 0.1875]
  """
  return _codebook(codec).copy()


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales"],
                   meta_fields=["decoded_shape", "decoded_dtype", "codec", "block_size"])
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """One encoded state leaf: a pytree node whose children are arrays.

  Attributes:
    codes: ``"int8"`` / ``"uint8"``: uint8 indices into the sorted codebook,
      of the decoded shape; ``"int4"`` / ``"uint4"``: two 4-bit indices per
      uint8 (entry ``2k`` in the low nibble), last dimension halved (rounded
      up); ``"bf16"``: the bfloat16 values.
    scales: float32 absmax per block, shape ``decoded_shape[:-1] +
      (ceil(last / block_size),)``; ``None`` for ``"bf16"``.
    decoded_shape: the shape it decodes to (static).
    decoded_dtype: the dtype it decodes to (static).
    codec: one of `CODECS` (static).
    block_size: entries per scale along the last axis (static; 0 for bf16).
  """

  codes: Any
  scales: Any
  decoded_shape: tuple[int, ...]
  decoded_dtype: Any
  codec: str
  block_size: int

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes plus scales."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a `QuantizedArray` node."""
  return isinstance(x, QuantizedArray)


def _num_blocks(last: int, block_size: int) -> int:
  return -(-last // block_size)


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``(..., L)`` -> ``(..., ceil(L / block), block)``, the partial last block zero-padded."""
  last = x.shape[-1]
  pad = _num_blocks(last, block_size) * block_size - last
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (-1, block_size))


def _from_blocks(x: jax.Array, last: int) -> jax.Array:
  return x.reshape(x.shape[:-2] + (-1,))[..., :last]


@functools.cache
def _bucket_table(codec: str) -> tuple[np.ndarray, int]:
  """``(T, k)``: for each value of a float32's top 16 bits, the index of the last code <= the bucket's
  smallest value, and the most codes any one bucket holds (the corrections `nearest_code` needs)."""
  book = _codebook(codec).astype(np.float32)
  top = np.arange(2 ** 16, dtype=np.uint32)
  # The smallest float32 of each bucket: low bits 0 for a positive top, all ones for a negative one.
  low = np.where(top >> 15, (top << 16) | 0xFFFF, top << 16).astype(np.uint32).view(np.float32)
  high = np.where(top >> 15, top << 16, (top << 16) | 0xFFFF).astype(np.uint32).view(np.float32)
  with np.errstate(invalid="ignore"):
    table = np.clip(np.searchsorted(book, low, side="right") - 1, 0, book.size - 2)
    inside = np.searchsorted(book, high, side="right") - np.searchsorted(book, low, side="right")
  table[np.isneginf(high)] = 0  # the bucket of -inf (and of negative NaNs, whose scale is NaN anyway)
  finite = np.isfinite(low) & np.isfinite(high)
  return table.astype(np.uint8 if book.size <= 256 else np.int32), int(inside[finite].max())


def nearest_code(v: jax.Array, book: Any, *, codec: str | None = None) -> jax.Array:
  """Index of the nearest value of the sorted ``book`` to each entry of ``v`` (ties: the larger).

  The code below ``v`` is found without a search: a 65,536-entry table indexed by
  the top 16 bits of ``v``'s float32 gives the last code at or below the
  smallest float of that bucket, then at most ``k`` comparisons move it past
  the codes inside the bucket (``k = 1`` for the maps here), so the result is
  the same as a binary search, in a few elementwise passes.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._quantize import nearest_code
    >>> nearest_code(jnp.array([-5.0, 0.24, 0.25, 0.26, 7.0]), jnp.array([0.0, 0.5, 1.0])).tolist()
    [0, 0, 1, 1, 2]
  """
  v = jnp.asarray(v, jnp.float32)
  if codec is None:
    book = jnp.asarray(book, jnp.float32)
    lo = jnp.clip(jnp.searchsorted(book, v, side="right") - 1, 0, book.shape[0] - 2)
  else:
    table, corrections = _bucket_table(codec)
    book = jnp.asarray(_codebook(codec), jnp.float32)
    top = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(v, jnp.uint32), jnp.uint32(16))
    lo = jnp.asarray(table)[top].astype(jnp.int32)
    for _ in range(corrections):
      lo = jnp.minimum(lo + (book[lo + 1] <= v).astype(jnp.int32), book.shape[0] - 2)
  up = (book[lo + 1] - v) <= (v - book[lo])
  return (lo + up.astype(lo.dtype)).astype(jnp.uint8)


def _pack4(codes: jax.Array) -> jax.Array:
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack4(packed: jax.Array, last: int) -> jax.Array:
  pairs = jnp.stack([packed & 15, packed >> 4], axis=-1)
  return pairs.reshape(packed.shape[:-1] + (-1,))[..., :last]


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 whose every output bit depends on every input bit."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: chex.PRNGKey, shape: tuple[int, ...]) -> jax.Array:
  """Uniform uint32 bits for each entry of ``shape``: a counter-based hash of the entry's index and ``key``.

  Two rounds of MurmurHash3's finalizer over ``index + k0 * golden`` and ``k1``:
  integer arithmetic XLA fuses into the rounding (`jax.random.bits` costs several
  passes). Stochastic rounding needs noise uniform and independent of the values,
  not a cryptographic stream; a new key per step gives new noise.
  """
  data = jax.random.key_data(key) if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) else key
  data = jnp.asarray(data, jnp.uint32).reshape(-1)
  index = jax.lax.iota(jnp.uint32, max(math.prod(shape), 1))[:math.prod(shape)].reshape(shape)
  return _fmix32(_fmix32(index + data[0] * jnp.uint32(0x9E3779B9)) ^ data[-1])


def stochastic_round_bf16(x: jax.Array, key: chex.PRNGKey) -> jax.Array:
  """``x`` rounded to bfloat16 stochastically: up or down with the probabilities that make it unbiased.

  .. math::

    \\operatorname{round}(x) = \\begin{cases} \\lceil x \\rceil & \\text{with probability }
    (x - \\lfloor x \\rfloor) / (\\lceil x \\rceil - \\lfloor x \\rfloor) \\\\
    \\lfloor x \\rfloor & \\text{otherwise} \\end{cases}, \\qquad
    \\mathbb{E}[\\operatorname{round}(x)] = x,

  with ``floor`` / ``ceil`` the neighbouring bfloat16 values (toward / away
  from zero). On the float32 bits: add 16 uniform random bits (`hash_bits`)
  to the 16 low bits and truncate them. Non-finite values are cast as they are.

  Args:
    x: a floating-point array (computed in float32).
    key: a PRNG key.

  Returns:
    A bfloat16 array of ``x``'s shape.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slimoptax import stochastic_round_bf16
    >>> x = jnp.full((100_000,), 1.0 + 2.0**-9)  # between bf16 values 1 and 1 + 2^-7
    >>> round(float(stochastic_round_bf16(x, jax.random.PRNGKey(0)).astype(jnp.float32).mean()), 4)
    1.002
    >>> float(x.astype(jnp.bfloat16)[0])  # round-to-nearest: always 1
    1.0
  """
  x32 = jnp.asarray(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
  noise = hash_bits(key, x32.shape) >> 16
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x32), rounded, x32).astype(jnp.bfloat16)


def quantize(x: jax.Array, codec: str = "int8", *, block_size: int | None = None,
             key: chex.PRNGKey | None = None) -> QuantizedArray:
  """Encodes ``x`` blockwise along its last axis (or to bf16 with stochastic rounding).

  .. math::

    a_b = \\max_{j \\in b} |x_j|, \\qquad q_j = \\operatorname*{arg\\,min}_i |c_i - x_j / a_b|

  Args:
    x: a floating-point array with at least one dimension.
    codec: one of `CODECS`: ``"int8"`` / ``"uint8"`` (8-bit dynamic map,
      signed / unsigned), ``"int4"`` (4-bit signed dynamic map), ``"uint4"``
      (4-bit linear map without zero), ``"bf16"``.
    block_size: entries per absmax scale along the last axis (default 256
      for 8-bit, 128 for 4-bit; unused by ``"bf16"``).
    key: PRNG key of the stochastic rounding (``"bf16"`` only).

  Returns:
    A `QuantizedArray`; `dequantize` decodes it.

  Raises:
    ValueError: for an unknown codec, a bad block size, a scalar or
      non-float ``x``, or ``"bf16"`` without a key.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax import dequantize, quantize
    >>> x = jnp.array([[0.5, -1.0, 0.25, 1e-3], [0.0, 0.0, 0.0, 0.0]])
    >>> q = quantize(x, "int8", block_size=2)
    >>> q.codes.dtype, q.codes.shape, q.scales.shape
    (dtype('uint8'), (2, 4), (2, 2))
    >>> [round(v, 5) for v in dequantize(q)[0].tolist()]
    [0.50078, -0.99297, 0.25, 0.00102]
  """
  if codec not in CODECS:
    raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize takes a floating-point array, got dtype {x.dtype}")
  if x.ndim == 0:
    raise ValueError("quantize takes an array with at least one dimension (blocks run along the "
                     "last axis), got a scalar")
  shape, dtype = tuple(x.shape), x.dtype
  if codec == "bf16":
    if key is None:
      raise ValueError("codec 'bf16' rounds stochastically: pass `key=`")
    return QuantizedArray(stochastic_round_bf16(x, key), None, shape, dtype, codec, 0)
  block_size = _tree.static_int("block_size", block_size, 2) or DEFAULT_BLOCK_SIZE[_bits(codec)]
  # A last axis shorter than a block is one block: the same scales as a zero-padded block, without the padding.
  block_size = min(block_size, shape[-1]) if shape[-1] else block_size
  blocks = _to_blocks(x.astype(jnp.float32), block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  codes = _from_blocks(nearest_code(blocks / safe[..., None], None, codec=codec), shape[-1])
  if _bits(codec) == 4:
    codes = _pack4(codes)
  return QuantizedArray(codes, absmax, shape, dtype, codec, block_size)


def _decode(q: QuantizedArray) -> jax.Array:
  if q.codec == "bf16":
    return q.codes.astype(q.decoded_dtype)
  last = q.decoded_shape[-1]
  codes = _unpack4(q.codes, last) if _bits(q.codec) == 4 else q.codes
  book = jnp.asarray(_codebook(q.codec))
  values = book[_to_blocks(codes.astype(jnp.int32), q.block_size)] * q.scales[..., None]
  return _from_blocks(values, last).astype(q.decoded_dtype)


def dequantize(tree: Any) -> Any:
  """Decodes every `QuantizedArray` in ``tree`` (one node, or a whole optimizer state).

  .. math::

    \\tilde x_j = c_{q_j} \\, a_b \\quad (j \\in \\text{block } b)

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax import dequantize, quantize
    >>> x = jnp.linspace(-1.0, 1.0, 512)
    >>> err = jnp.max(jnp.abs(dequantize({"m": quantize(x, "int8")})["m"] - x))
    >>> bool(err <= 0.9 / 128 + 1e-7)  # half the widest gap of the 8-bit map
    True
  """
  return jax.tree.map(lambda x: _decode(x) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def encoded_nbytes(shape: tuple[int, ...], codec: str, block_size: int | None = None) -> int:
  """Bytes of codes plus scales for a leaf of ``shape`` (without encoding anything).

  Example:
    >>> from slimoptax._quantize import encoded_nbytes
    >>> encoded_nbytes((768, 3072), "int8")  # 1 byte per entry + 4 per 256
    2396160
  """
  rows, last = math.prod(shape[:-1]), shape[-1]
  if codec == "bf16":
    return 2 * rows * last
  block = block_size or DEFAULT_BLOCK_SIZE[_bits(codec)]
  code_bytes = last if _bits(codec) == 8 else -(-last // 2)
  return rows * (code_bytes + 4 * _num_blocks(last, block))


class QuantizedState(NamedTuple):
  """State of `quantize_state`.

  Attributes:
    inner_state: the wrapped transformation's state, its ``mu`` / ``nu``
      leaves stored as `QuantizedArray` s (leaves kept in float: as they are).
    key: PRNG key (``jax.random.PRNGKey`` layout) of the stochastic rounding,
      split every step.
  """

  inner_state: Any
  key: chex.Array


def _field_of(key_path: Any) -> tuple[str | None, int]:
  """The outermost state field named ``mu`` / ``nu`` on a key path, and where it sits."""
  for i, k in enumerate(key_path):
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("mu", "nu"):
      return k.name, i
  return None, -1


def quantize_state(
    tx: optax.GradientTransformation,
    *,
    mu: str | None = None,
    nu: str | None = None,
    block_size: int | None = None,
    min_size: int = 4096,
    seed: int = 0,
) -> optax.GradientTransformation:
  """Stores the ``mu`` / ``nu`` fields of ``tx``'s state quantized (8-bit, 4-bit or bf16).

  Each step decodes the stored moments, runs ``tx.update`` on them, and
  encodes the new moments (see the module docstring for the codes):

  .. math::

    (u_t, s_t) = \\mathrm{tx.update}(g_t, D(\\tilde s_{t-1})), \\qquad
    \\tilde s_t = Q(s_t),

  so the update ``u_t`` is computed from the exact new moments; only what is
  carried to the next step is rounded (as bitsandbytes and torchao do).

  The fields are found anywhere in the state by name (NamedTuple fields
  ``mu`` / ``nu``): `optax.scale_by_adam` / `optax.adamw` / `optax.adam`,
  inside `optax.chain`, `optax.inject_hyperparams`, `optax.masked`,
  `optax.partition`, and `slimoptax.scale_by_slim_adam` / `slimoptax.slim_adamw`
  (whose compressed ``nu`` is usually below ``min_size`` and stays float32).

  Args:
    tx: the transformation whose state to store quantized.
    mu: the first moment's storage: ``None`` (as it is), ``"int8"``
      (signed 8-bit dynamic map), ``"int4"`` (signed 4-bit dynamic map) or
      ``"bf16"`` (stochastic rounding).
    nu: the second moment's: ``None``, ``"int8"`` (unsigned 8-bit dynamic
      map), ``"int4"`` (4-bit linear map without zero) or ``"bf16"``.
    block_size: entries per absmax scale along the last axis (default: 256
      for 8-bit, 128 for 4-bit). A Python int >= 2.
    min_size: leaves with fewer entries stay as they are (default 4096, as
      bitsandbytes' ``min_8bit_size``).
    seed: seed of the stochastic rounding's PRNG key.

  Returns:
    A `optax.GradientTransformation` (`optax.GradientTransformationExtraArgs`
    when ``tx`` is one) with state `QuantizedState`.

  Raises:
    ValueError: for an unknown option, a bad ``block_size`` / ``min_size`` /
      ``seed``, when ``tx``'s state has no field for a requested option
      (naming the states it holds), for non-float parameters or moments
      (naming the path).

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"w": jnp.ones((64, 512)), "b": jnp.zeros(512)}
    >>> tx = slimoptax.quantize_state(optax.adam(1e-3), mu="int8", nu="int8")
    >>> state = tx.init(params)
    >>> adam = state.inner_state[0]
    >>> adam.mu["w"].codes.dtype, adam.mu["w"].scales.shape, adam.mu["b"].shape  # b: < min_size
    (dtype('uint8'), (64, 2), (512,))
    >>> updates, state = tx.update({"w": jnp.full((64, 512), 0.1), "b": jnp.ones(512)}, state)
    >>> round(float(updates["w"][0, 0]), 6)
    -0.001
    >>> print(f"{slimoptax.tree_bytes(state) / slimoptax.tree_bytes(optax.adam(1e-3).init(params)):.3f}")
    0.265

  References:
    Dettmers, Lewis, Shleifer, Zettlemoyer, 8-bit Optimizers via Block-wise
    Quantization, ICLR 2022 (bitsandbytes). Li, Chen, Zhu, 2023, Memory
    Efficient Optimizers with 4-bit States (torchao's 4-bit Adam).
  """
  if not hasattr(tx, "init") or not hasattr(tx, "update"):
    raise TypeError(f"quantize_state wraps an optax GradientTransformation, got {type(tx).__name__}")
  options = {"mu": mu, "nu": nu}
  for name, option in options.items():
    if option not in OPTIONS:
      raise ValueError(f"quantize_state: {name} must be one of {OPTIONS}, got {option!r}")
  if mu is None and nu is None:
    raise ValueError("quantize_state: nothing to quantize; give mu= and/or nu= "
                     "('int8', 'int4' or 'bf16')")
  block_size = _tree.static_int("block_size", block_size, 2)
  min_size = _tree.static_int("min_size", min_size, 0)
  seed = _tree.static_int("seed", seed, 0)
  codecs = {f: _FIELD_CODEC[(f, o)] for f, o in options.items() if o is not None}
  extra = isinstance(tx, optax.GradientTransformationExtraArgs)

  def plan(leaf: Any, codec: str) -> bool:
    """Whether a moment leaf is stored encoded (see the module docstring)."""
    shape = tuple(leaf.shape)
    if len(shape) == 0 or math.prod(shape) < max(min_size, 1):
      return False
    if codec == "bf16":
      return np.dtype(leaf.dtype).itemsize > 2
    return encoded_nbytes(shape, codec, block_size) < math.prod(shape) * np.dtype(leaf.dtype).itemsize

  def encode(inner_state: Any, key: chex.PRNGKey) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(inner_state)
    out = []
    for i, (kp, leaf) in enumerate(flat):
      field, at = _field_of(kp)
      if field not in codecs or not hasattr(leaf, "shape"):
        out.append(leaf)
        continue
      if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(
            f"quantize_state: {field} of {_tree.path_str(kp[at + 1:])!r} (state path "
            f"{_tree.path_str(kp)!r}) has dtype {leaf.dtype}; only floating-point moments can be "
            "quantized")
      codec = codecs[field]
      out.append(quantize(leaf, codec, block_size=block_size, key=jax.random.fold_in(key, i))
                 if plan(leaf, codec) else leaf)
    return jax.tree_util.tree_unflatten(treedef, out)

  def init_fn(params):
    _tree.check_float_params(params)
    inner_state = tx.init(params)
    for field in codecs:
      if not optax.tree.get_all_with_path(inner_state, field):
        raise ValueError(
            f"quantize_state: {field}={options[field]!r} was given, but the state of the wrapped "
            f"transformation has no field `{field}`; it holds "
            f"{_snr._state_kinds(inner_state) or 'no optax states'}")
    key = jax.random.PRNGKey(seed)
    return QuantizedState(encode(inner_state, key), key)

  def update_fn(updates, state, params=None, **extra_args):
    _tree.check_state(state, QuantizedState, who="quantize_state")
    key, sub = jax.random.split(state.key)
    inner_state = dequantize(state.inner_state)
    if extra:
      updates, inner_state = tx.update(updates, inner_state, params, **extra_args)
    else:
      updates, inner_state = tx.update(updates, inner_state, params)
    return updates, QuantizedState(encode(inner_state, sub), key)

  if extra:
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return optax.GradientTransformation(init_fn, lambda u, s, p=None: update_fn(u, s, p))


__all__ = [
    "CODECS", "QuantizedArray", "QuantizedState", "codebook", "dequantize", "dynamic_map",
    "encoded_nbytes", "is_quantized", "linear_map", "nearest_code", "quantize", "quantize_state",
    "stochastic_round_bf16",
]
