"""The Newton–Schulz iteration: an odd matrix polynomial that orthogonalizes a matrix.

For ``G = U S V^T``, iterating on ``X_0 = G / (||G||_F + eps)``

.. math::

  A_k = X_k X_k^T, \\qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

maps each singular value by ``s -> a s + b s^3 + c s^5`` and leaves the
singular vectors alone. Five steps of ``QUINTIC_COEFFS`` (Keller Jordan's)
send normalized singular values in [0.01, 1] to about [0.68, 1.13];
``CUBIC_COEFFS`` (``X <- 1.5 X - 0.5 X X^T X``) converges to exactly ``U
V^T``, in about ``log_1.5(1/s_min) + 5`` steps. `slimoptax.orthogonalize`
applies it per parameter.

References:
  Jordan et al., Muon: An optimizer for hidden layers in neural networks, 2024.
  Bernstein & Newhouse, Old Optimizer, New Norm: An Anthology, 2024.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from slimoptax import _tree

QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (a, b, c)."""

CUBIC_COEFFS: tuple[float, float, float] = (1.5, -0.5, 0.0)
"""Classical cubic Newton–Schulz: converges to the exact polar factor U V^T."""

NS_COEFFS = {"quintic": QUINTIC_COEFFS, "muon": QUINTIC_COEFFS, "cubic": CUBIC_COEFFS}


def _coeff_schedule(ns_steps: int | None, ns_coeffs: Any) -> list[tuple[float, ...]]:
  if isinstance(ns_coeffs, str):
    if ns_coeffs not in NS_COEFFS:
      raise ValueError(f"unknown ns_coeffs {ns_coeffs!r}; known: {sorted(NS_COEFFS)}")
    ns_coeffs = NS_COEFFS[ns_coeffs]
  try:
    arr = np.asarray(ns_coeffs, dtype=np.float64)
  except Exception as err:  # traced values cannot become Python floats
    raise TypeError(f"ns_coeffs must be concrete numbers, got {ns_coeffs!r} ({err})") from None
  ns_steps = _tree.static_int("ns_steps", ns_steps, 0)  # a loop count: never traced
  if arr.shape == (3,) and ns_steps is None:
    raise ValueError("ns_steps must be given with one (a, b, c) triple")
  if arr.shape == (3,):
    return [tuple(arr.tolist())] * int(ns_steps)
  if arr.ndim != 2 or arr.shape[1] != 3:
    raise ValueError(f"ns_coeffs must be (a, b, c) or a sequence of such triples, got shape {arr.shape}")
  if ns_steps is not None and int(ns_steps) != arr.shape[0]:
    raise ValueError(f"ns_coeffs gives {arr.shape[0]} per-step triples but ns_steps={ns_steps}")
  return [tuple(row) for row in arr.tolist()]


def newton_schulz(x: jax.Array, ns_steps: int = 5, ns_coeffs: Any = QUINTIC_COEFFS, *,
                  eps: ArrayLike = 1e-7, dtype: Any = None, precision: Any = None) -> jax.Array:
  """Orthogonalizes the last two axes of ``x`` by Newton–Schulz.

  .. math::

    X_0 = \\frac{G}{\\|G\\|_F + \\epsilon}, \\quad
    X_{k+1} = a X_k + (b X_k X_k^T + c (X_k X_k^T)^2) X_k

  on ``G^T`` when ``G`` is tall. (optax.contrib's ``orthogonalize_via_newton_schulz``
  differs by ~1e-6: it runs in the input dtype, not at least float32, has no
  ``precision``, computes ``A^2`` in cubic steps and loops in a `jax.lax.scan`.)

  Args:
    x: ``(..., rows, cols)`` array (leading axes: batch).
    ns_steps: iterations ``T``.
    ns_coeffs: ``(a, b, c)``, a name in `NS_COEFFS`, or one triple per step.
    eps: added to the Frobenius norm.
    dtype: iteration dtype (default: ``x``'s, at least float32).
    precision: matmul precision.

  Returns:
    ``x``'s orthogonalization, in ``x``'s dtype.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> print(slimoptax.newton_schulz(jnp.array([[3.0, 0.0], [0.0, 0.5]]), 30, "cubic"))
    [[1. 0.]
     [0. 1.]]
  """
  schedule = _coeff_schedule(ns_steps, ns_coeffs)
  out_dtype = x.dtype
  compute = jnp.dtype(dtype) if dtype is not None else jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(compute)
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
           + jnp.asarray(eps, compute))
  mm = lambda a, b: jnp.matmul(a, b, precision=precision)
  for a, b, c in schedule:
    gram = mm(x, jnp.swapaxes(x, -1, -2))
    poly = b * gram + c * mm(gram, gram) if c != 0.0 else b * gram
    x = a * x + mm(poly, x)
  return (jnp.swapaxes(x, -1, -2) if transposed else x).astype(out_dtype)


def newton_schulz_flops(rows: int, cols: int, ns_steps: int = 1,
                        ns_coeffs: Any = QUINTIC_COEFFS) -> int:
  """Matmul FLOPs of `newton_schulz` on one ``rows x cols`` matrix.

  With ``m = min(rows, cols)``, ``n = max(rows, cols)``: ``X X^T`` and ``B X``
  (``2 m^2 n`` each) and ``A A`` (``2 m^3``, skipped when ``c = 0``) per step;
  a multiply-add is 2 FLOPs.
  """
  m, n = min(rows, cols), max(rows, cols)
  return sum(4 * n * m * m + (2 * m ** 3 if c != 0.0 else 0)
             for _, _, c in _coeff_schedule(ns_steps, ns_coeffs))


def muon_flop_overhead(rows: int, cols: int, batch_tokens: int, ns_steps: int = 5,
                       ns_coeffs: Any = QUINTIC_COEFFS) -> float:
  """`newton_schulz_flops` over the ``6 rows cols B`` FLOPs of a step on ``B`` tokens.

  At most ``T m / B`` (``m`` the smaller side), equal for square weights.
  """
  return newton_schulz_flops(rows, cols, ns_steps, ns_coeffs) / (6.0 * rows * cols * batch_tokens)


__all__ = ["CUBIC_COEFFS", "NS_COEFFS", "QUINTIC_COEFFS", "muon_flop_overhead", "newton_schulz",
           "newton_schulz_flops"]
