"""Codecs of quantized optimizer states: blockwise 8-bit / 4-bit codes, bf16 with stochastic rounding.

A blockwise code stores, for each block of ``block_size`` consecutive entries
along the **last axis**, one float32 absmax scale ``a`` and, per entry, the
index of the nearest value of a sorted codebook ``c`` of 256 (8-bit) or 16
(4-bit) values in ``[-1, 1]``:

.. math::

  q = \\operatorname*{arg\\,min}_i |c_i - x / a|, \\qquad \\tilde x = c_q \\, a,
  \\qquad a = \\max_{j \\in \\text{block}} |x_j|,

as in Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022.
Blocks along the last axis keep the codes in the leaf's shape (4-bit: two
codes per byte, last dimension halved, rounded up) and give scales of shape
``shape[:-1] + (ceil(last / block_size),)``; a partial last block is scaled by
its own absmax. The codes then shard like their parameter
(`slimoptax.sharding`).

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

How the codes are computed (so that a step stays a few fused elementwise
loops, with no parameter-sized temporaries):

* decoding is arithmetic, without a table lookup: the code's rank among the
  positive values gives its fraction-bit count ``F`` (a count of leading
  zeros) and the value ``K_F * n``, with ``n`` an integer and ``K_F`` one
  float32 constant per ``F`` (`dynamic_map` defines the codebook by that
  same product, so decoding gives exactly the codebook's float32 values);
  being elementwise, XLA recomputes it inside each loop that reads it
  instead of storing the decoded moment;
* encoding finds the nearest code exactly (ties to the larger), without a
  search: two 65,536-entry tables indexed by the top 16 bits of the float32
  give the code at the bottom of that bucket and the one midpoint between
  codes inside it (every bucket holds at most one), so one comparison
  finishes it;
* the block absmax is a two-output (max, min) reduction, which XLA's CPU
  backend fuses with the loop producing the moment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from slimoptax import _tree

CODECS: tuple[str, ...] = ("int8", "uint8", "int4", "uint4", "bf16")
DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}


def _bits(codec: str) -> int:
  return {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "bf16": 16}[codec]


def _fraction_scales(*, signed: bool, bits: int) -> np.ndarray:
  """``K_F = 10^-(e+1) / 2^(F+1)`` as float32, for every fraction-bit count ``F`` (``e = bits - 1 - signed - F``)."""
  top = bits - 1 - int(signed)  # e + F
  return np.array([10.0 ** -(top - f + 1) / 2.0 ** (f + 1) for f in range(top + 1)]).astype(np.float32)


def dynamic_map(*, signed: bool, bits: int = 8) -> np.ndarray:
  """Dettmers' dynamic (tree) quantization map, sorted ascending, as float32.

  Each code is read as: a sign bit (signed map only), ``e`` zeros giving the
  scale ``10^-e``, an indicator bit, and the remaining ``F`` bits as a linear
  fraction: the midpoints of ``2^F`` equal bins of ``[0.1, 1]``,

  .. math::

    c = \\pm 10^{-e} \\left(0.1 + 0.9 \\, \\frac{f + 1/2}{2^F}\\right)
      = \\pm K_F \\, n, \\qquad K_F = \\frac{10^{-(e+1)}}{2^{F+1}}, \\quad
      n = 2^{F+1} + 18 f + 9, \\qquad f = 0, \\dots, 2^F - 1,

  plus the two codes without an indicator bit: 0 and 1. The signed map has
  ``2^bits`` codes in ``(-1, 1]``, the unsigned one ``2^bits`` in ``[0, 1]``.
  Each value is the float32 product of ``K_F`` (rounded to float32) and the
  integer ``n``: what the decoder computes, within one unit in the last
  place of the float64 value (72 of the signed 8-bit map's 256 codes differ
  from it, by one unit).

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
  scales = _fraction_scales(signed=signed, bits=bits)
  values = [np.float32(0.0), np.float32(1.0)]
  for e in range(bits - 1):  # decades 10^0 .. 10^-(bits-2)
    frac = bits - 1 - int(signed) - e
    n = (2 ** (frac + 1) + 18 * np.arange(2 ** frac) + 9).astype(np.float32)
    mags = scales[frac] * n  # one float32 multiplication, as in the decoder
    values += list(mags) + ([-m for m in mags] if signed else [])
  out = np.sort(np.asarray(values, np.float32))
  assert out.size == 2 ** bits and out.dtype == np.float32, out.size
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


def _values_of(index: jax.Array, codec: str) -> jax.Array:
  """The codebook values at ``index`` (integers in ``[0, 2^bits)``), computed without a table lookup.

  Linear map: ``(index + 1) / 16``. Dynamic map: ``zero`` is the index of the
  value 0 (the middle of the signed map, 0 in the unsigned one); an index
  above it has rank ``r = index - zero - 1 + o`` among the positive values
  plus an offset ``o`` (1 signed, 2 unsigned) for which ``r`` lies in ``[2^F,
  2^(F+1))``, ``F`` its fraction bits, so ``F = 31 - clz(r)``, ``f = r - 2^F``
  and the value is ``K_F * n`` with ``n = 18 r + 9 - 2^(F+4)`` (`dynamic_map`);
  the top index is 1; the signed map mirrors the indices below ``zero``.
  """
  index = index.astype(jnp.int32)
  if codec == "uint4":
    return (index + 1).astype(jnp.float32) * (1.0 / 16)
  signed, size = codec.startswith("int"), 2 ** _bits(codec)
  zero = size // 2 - 1 if signed else 0
  offset = 1 if signed else 2
  scales = _fraction_scales(signed=signed, bits=_bits(codec))
  rank = jnp.abs(index - zero) - 1                  # -1 at zero; size - zero - 2 at the value 1
  r = jnp.maximum(rank, 0) + offset
  frac = 31 - jax.lax.clz(r)
  n = 18 * r + 9 - jax.lax.shift_left(jnp.int32(16), frac)
  k = jnp.full(index.shape, scales[0], jnp.float32)
  for f in range(1, scales.size):
    k = jnp.where(frac == f, scales[f], k)
  v = k * n.astype(jnp.float32)
  v = jnp.where(rank == size - zero - 2, jnp.float32(1.0), v)
  v = jnp.where(rank < 0, jnp.float32(0.0), v)
  return jnp.where(index < zero, -v, v) if signed else v


def _float32_buckets() -> tuple[np.ndarray, np.ndarray]:
  """The smallest and largest float32 of each value of a float32's top 16 bits."""
  top = np.arange(2 ** 16, dtype=np.uint32)
  negative = (top >> 15).astype(bool)
  low = np.where(negative, (top << 16) | 0xFFFF, top << 16).astype(np.uint32).view(np.float32)
  high = np.where(negative, top << 16, (top << 16) | 0xFFFF).astype(np.uint32).view(np.float32)
  return low, high


def _midpoints(codec: str) -> np.ndarray:
  """For each pair of neighbouring codes, the smallest float32 at or above their exact midpoint.

  A float32 ``v`` is at least as close to the upper code as to the lower one
  exactly when ``v >=`` this value (ties go to the larger code).
  """
  book = _codebook(codec).astype(np.float64)
  exact = (book[:-1] + book[1:]) / 2  # exact in float64: the codes are float32
  mid = exact.astype(np.float32)
  return np.where(mid.astype(np.float64) < exact, np.nextafter(mid, np.float32(np.inf)), mid)


@functools.cache
def _encode_tables(codec: str) -> tuple[np.ndarray, np.ndarray]:
  """``(T, M)``: for each value of a float32's top 16 bits, the nearest code to the bucket's smallest
  value and the one midpoint inside the bucket (NaN where there is none: no value compares >= it)."""
  mid = _midpoints(codec)
  low, high = _float32_buckets()
  finite = np.isfinite(low) & np.isfinite(high)
  with np.errstate(invalid="ignore"):
    below = np.searchsorted(mid, low, side="right")  # midpoints at or below the bucket's smallest value
    inside = np.searchsorted(mid, high, side="right") - below
  if inside[finite].max() > 1:
    raise AssertionError(f"codec {codec!r}: a float32 bucket holds {inside[finite].max()} midpoints")
  below[np.isnan(low)] = 0  # the bucket of -inf (its smallest value is a NaN pattern)
  inner = np.full(2 ** 16, np.nan, np.float32)
  has = finite & (inside == 1)
  inner[has] = mid[below[has]]
  return below.astype(np.uint8), inner


def nearest_code(v: jax.Array, codec: str) -> jax.Array:
  """Index of the nearest value of ``codec``'s sorted codebook to each entry of ``v`` (ties: the larger).

  No search: a table indexed by the top 16 bits of ``v``'s float32 gives the
  nearest code to the bucket's smallest value, and one comparison with the
  only midpoint inside the bucket (a second table) finishes it, exactly (the
  midpoints are the smallest float32 at or above the exact ones). Values
  beyond the codebook's ends get the end codes.

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._codecs import nearest_code
    >>> nearest_code(jnp.array([-5.0, 0.0, 0.09, 0.1, 7.0]), "uint4").tolist()  # 1/16 .. 1
    [0, 0, 0, 1, 15]
  """
  v = jnp.asarray(v, jnp.float32)
  below, inner = _encode_tables(codec)
  top = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(v, jnp.uint32), jnp.uint32(16))
  return jnp.asarray(below)[top] + (v >= jnp.asarray(inner)[top]).astype(jnp.uint8)


def block_absmax(blocks: jax.Array) -> jax.Array:
  """``max |x|`` over the last axis, as one two-output reduction (max and min).

  Equal to ``jnp.max(jnp.abs(blocks), -1)``; written this way, XLA's CPU backend
  fuses the reduction with the loop that produces ``blocks`` (a single-output
  max is handed to a library call that takes a stored input).

  Example:
    >>> import jax.numpy as jnp
    >>> from slimoptax._codecs import block_absmax
    >>> block_absmax(jnp.array([[1.0, -3.0], [0.5, 0.25]])).tolist()
    [3.0, 0.5]
  """
  hi, lo = jax.lax.reduce((blocks, blocks), (jnp.array(-jnp.inf, blocks.dtype), jnp.array(jnp.inf, blocks.dtype)),
                          lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])), (blocks.ndim - 1,))
  return jnp.maximum(hi, -lo)


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
  absmax = block_absmax(blocks)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  codes = _from_blocks(nearest_code(blocks / safe[..., None], codec), shape[-1])
  if _bits(codec) == 4:
    codes = _pack4(codes)
  return QuantizedArray(codes, absmax, shape, dtype, codec, block_size)


def _decode(q: QuantizedArray) -> jax.Array:
  if q.codec == "bf16":
    return q.codes.astype(q.decoded_dtype)
  last = q.decoded_shape[-1]
  codes = _unpack4(q.codes, last) if _bits(q.codec) == 4 else q.codes
  values = _values_of(_to_blocks(codes, q.block_size), q.codec) * q.scales[..., None]
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
    >>> from slimoptax._codecs import encoded_nbytes
    >>> encoded_nbytes((768, 3072), "int8")  # 1 byte per entry + 4 per 256
    2396160
  """
  rows, last = math.prod(shape[:-1]), shape[-1]
  if codec == "bf16":
    return 2 * rows * last
  block = block_size or DEFAULT_BLOCK_SIZE[_bits(codec)]
  code_bytes = last if _bits(codec) == 8 else -(-last // 2)
  return rows * (code_bytes + 4 * _num_blocks(last, block))


__all__ = [
    "CODECS", "QuantizedArray", "block_absmax", "codebook", "dequantize", "dynamic_map", "encoded_nbytes",
    "hash_bits", "is_quantized", "linear_map", "nearest_code", "quantize", "stochastic_round_bf16",
]
