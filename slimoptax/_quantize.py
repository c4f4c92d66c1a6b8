"""Quantized optimizer states: `quantize_state` stores an optax state's moments 8-bit, 4-bit or bf16.

`quantize_state` wraps any optax transformation and stores the state fields
named ``mu`` (first moment) and ``nu`` (second moment) encoded (the codes:
`slimoptax._codecs`), decoding them before each inner update and encoding the
result after it. First moments use the signed 8-bit (or 4-bit) dynamic map,
second moments, never negative, the unsigned 8-bit dynamic map (or the 4-bit
linear map without zero); ``"bf16"`` is bfloat16 with stochastic rounding.

A leaf stays as it is (float32) when it has fewer than ``min_size`` entries
(bitsandbytes' ``min_8bit_size``, 4096: small vectors such as biases and norm
scales, and SlimAdam's compressed second moments, cost little and are
sensitive), when it is a scalar, or when its encoded form would not be
smaller (a last dimension of 1: one scale per entry). ``"bf16"`` leaves
already 16-bit stay as they are.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from slimoptax import _snr, _tree
from slimoptax._codecs import dequantize, encoded_nbytes, quantize

OPTIONS: tuple[str | None, ...] = (None, "int8", "int4", "bf16")
_FIELD_CODEC = {("mu", "int8"): "int8", ("nu", "int8"): "uint8", ("mu", "int4"): "int4",
                ("nu", "int4"): "uint4", ("mu", "bf16"): "bf16", ("nu", "bf16"): "bf16"}


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

  On XLA's CPU backend a donated step copies the stored codes before
  overwriting them unless JAX starts with
  ``XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true``, which
  drops the copy of bf16 states (docs/benchmarks.md gives the measured steps).

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


__all__ = ["OPTIONS", "QuantizedState", "quantize_state"]
