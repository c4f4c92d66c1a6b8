"""Diagonal-curvature estimators: Hutchinson and Gauss–Newton–Bartlett (used by Sophia).

Estimators of ``diag(H)`` (``H`` the Hessian of the loss) from one extra
backward-like pass:

* Hutchinson (`hutchinson_estimate`): ``h = u * (H u)`` with random probes
  ``u`` (Rademacher or Gaussian), ``E[u u^T] = I`` so ``E[h] = diag(H)``. The
  Hessian-vector product is forward-over-reverse (``jax.jvp`` of
  ``jax.grad``). With Rademacher probes ``u_i^2 = 1``, so for a diagonal ``H``
  one probe is exact.
* Gauss–Newton–Bartlett (`gnb_estimate`, softmax cross-entropy models): sample
  labels ``y_hat ~ softmax(f(theta, x))``, take ``g_hat`` the gradient of the
  mean loss on the sampled labels and return ``B * g_hat * g_hat``. By
  Bartlett's second identity ``E[grad l grad l^T] = E[hess l]`` under the
  model's own distribution, so ``E[B g_hat^2] = diag`` of the Gauss–Newton
  matrix of the mean loss (``B`` the number of averaged loss terms; the
  cross terms vanish because labels are sampled independently). Always >= 0.

Both take the parameters at which the curvature is measured and a PRNG key, and
return a pytree like the parameters; `slimoptax.scale_by_hutchinson` calls one
of them on its refresh steps.

References:
  Liu et al., `Sophia: A Scalable Stochastic Second-order Optimizer for
  Language Model Pre-training <https://arxiv.org/abs/2305.14342>`_, ICLR 2024
  (Algorithms 1-2).
  Hutchinson, A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines, 1990.
  Bartlett, Approximate confidence intervals, Biometrika 1953.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")


def _check_distribution(distribution: str) -> None:
  if distribution not in DISTRIBUTIONS and distribution != "normal":
    raise ValueError(f"unknown probe distribution {distribution!r}; known: {DISTRIBUTIONS}")


def _accepts_out_sharding(fn) -> bool:
  try:
    return "out_sharding" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _spec_of(sharding: Any, ndim: int) -> tuple | None:
  """The leaf's partition spec padded to ``ndim`` entries (``None`` when it has no named sharding)."""
  spec = getattr(sharding, "spec", None)
  if spec is None or not hasattr(sharding, "update"):
    return None
  return tuple(spec) + (None,) * (ndim - len(spec))


def _rademacher(key: chex.PRNGKey, shape: tuple[int, ...], sharding: Any) -> jax.Array:
  """``+-1`` float32 signs of ``shape``: the 32 bits of each `jax.random.bits` word give 32 signs.

  Sign ``j`` of a row is bit ``j mod 32`` of word ``j // 32`` (words along the
  last axis, the last one's unused bits dropped): the bits are uniform and
  independent, so are the signs, and the generator runs on 1/32 of the
  entries (`jax.random.rademacher` draws a 32-bit word per sign); unpacking is
  elementwise and fuses with the probe's consumer.
  """
  if not shape:
    return (1 - 2 * (jax.random.bits(key, (), jnp.uint32) & 1).astype(jnp.int32)).astype(jnp.float32)
  last = shape[-1]
  words = -(-last // 32)
  spec = _spec_of(sharding, len(shape)) if _accepts_out_sharding(jax.random.bits) else None
  kwargs = {} if spec is None else {"out_sharding": sharding.update(spec=jax.sharding.PartitionSpec(*spec[:-1], None))}
  w = jax.random.bits(key, shape[:-1] + (words,), jnp.uint32, **kwargs)
  bit = (w[..., None] >> jax.lax.iota(jnp.uint32, 32)) & jnp.uint32(1)
  u = (1 - 2 * bit.astype(jnp.int32)).astype(jnp.float32).reshape(shape[:-1] + (words * 32,))[..., :last]
  if spec is not None and spec[-1] is not None:  # a sharded last axis (explicit sharding): back to the leaf's
    u = jax.sharding.reshard(u, sharding)
  return u


def random_probes(key: chex.PRNGKey, params: Any, distribution: str = "rademacher") -> Any:
  """Probes ``u`` like ``params``: one key per leaf (``jax.random.split(key, n)``).

  ``"rademacher"``: independent ``+-1`` signs, 32 from each 32-bit word of
  `jax.random.bits` (`jax.random.rademacher` spends a word per sign: on a
  GPT-2-small tree it cost more than the Hessian-vector product on the CPU,
  docs/benchmarks.md); ``"gaussian"``: `jax.random.normal`. Drawn in float32
  and cast to each leaf's dtype; each probe gets the leaf's sharding.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from slimoptax._curvature import random_probes
    >>> u = random_probes(jax.random.PRNGKey(0), {"w": jnp.zeros((4, 100))})["w"]
    >>> sorted(set(u.ravel().tolist())), u.shape
    ([-1.0, 1.0], (4, 100))
  """
  _check_distribution(distribution)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves)) if leaves else []
  out = []
  for k, p in zip(keys, leaves):
    sharding = getattr(jax.typeof(p), "sharding", None)
    if distribution == "rademacher":
      u = _rademacher(k, tuple(p.shape), sharding)
    elif _accepts_out_sharding(jax.random.normal) and sharding is not None:
      u = jax.random.normal(k, p.shape, jnp.float32, out_sharding=sharding)
    else:
      u = jax.random.normal(k, p.shape, jnp.float32)
    out.append(u.astype(p.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def hutchinson_estimate(
    obj_fn: Callable[[Any], jax.Array],
    params: Any,
    key: chex.PRNGKey,
    *,
    num_samples: int = 1,
    distribution: str = "rademacher",
) -> Any:
  """Hutchinson's estimate ``u * (H u)`` of the Hessian diagonal, per leaf.

  .. math::

    \\hat h = \\frac{1}{S} \\sum_{s=1}^S u_s \\odot (\\nabla^2 L(\\theta) u_s), \\qquad
    \\mathbb{E}[\\hat h] = \\mathrm{diag}(\\nabla^2 L(\\theta))

  Args:
    obj_fn: ``params -> scalar`` loss (close over the batch).
    params: the point at which the Hessian is taken.
    key: PRNG key. With ``num_samples=1`` the probe is drawn from ``key``
      itself (`random_probes`); otherwise from ``jax.random.split(key,
      num_samples)``.
    num_samples: probes averaged (summed in a `jax.lax.scan`, so memory does
      not grow with it).
    distribution: ``"rademacher"`` (``u_i = +-1``: lower variance, exact for
      diagonal ``H``) or ``"gaussian"`` (the paper's ``N(0, I)``).

  Returns:
    A pytree like ``params``. Entries may be negative (indefinite ``H`` or
    noise).

  Example:
    >>> import jax, jax.numpy as jnp, slimoptax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> loss = lambda p: jnp.sum(jnp.array([3.0, 0.5]) * p["w"] ** 2)  # diag(H) = (6, 1)
    >>> slimoptax.hutchinson_estimate(loss, params, jax.random.PRNGKey(0))["w"].tolist()
    [6.0, 1.0]
  """
  _check_distribution(distribution)
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  grad_fn = jax.grad(obj_fn)

  def one(k):
    u = random_probes(k, params, distribution)
    hu = jax.jvp(grad_fn, (params,), (u,))[1]
    return jax.tree.map(lambda a, b: (a * b).astype(b.dtype), hu, u)

  if num_samples == 1:
    return one(key)

  def body(acc, k):
    est = one(k)
    return jax.tree.map(lambda a, e: a + e.astype(a.dtype), acc, est), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
  total, _ = jax.lax.scan(body, zeros, jax.random.split(key, num_samples))
  return jax.tree.map(lambda t, p: (t / num_samples).astype(p.dtype), total, params)


def gnb_estimate(
    logits_fn: Callable[[Any], jax.Array],
    params: Any,
    key: chex.PRNGKey,
    *,
    batch_size: int | None = None,
) -> Any:
  """Gauss–Newton–Bartlett estimate ``B * g_hat * g_hat`` for softmax cross-entropy.

  .. math::

    \\hat y_b \\sim \\mathrm{softmax}(f(\\theta, x_b)), \\quad
    \\hat g = \\nabla_\\theta \\frac{1}{B} \\sum_b \\ell(f(\\theta, x_b), \\hat y_b), \\quad
    \\hat h = B \\, \\hat g \\odot \\hat g

  One forward and one backward pass (`jax.vjp`; the cross-entropy gradient
  w.r.t. the logits is ``(softmax - onehot(y_hat)) / N``).

  Args:
    logits_fn: ``params -> logits`` of shape ``(..., classes)``; every leading
      position is one loss term (all tokens of an LM batch), averaged.
    params: the parameters.
    key: PRNG key for the sampled labels.
    batch_size: the ``B`` multiplying ``g_hat^2``; default the number of
      averaged loss terms (``prod(logits.shape[:-1])``), which makes ``E[h_hat]``
      the Gauss–Newton diagonal of the mean loss (the official code passes
      ``bs = batch * block_size`` tokens, the same thing).

  Returns:
    A pytree like ``params`` of non-negative estimates.

  Example:
    >>> import jax, jax.numpy as jnp, slimoptax
    >>> params = {"w": jnp.ones((3, 4))}
    >>> x = jnp.arange(6.0).reshape(2, 3) / 6
    >>> h = slimoptax.gnb_estimate(lambda p: x @ p["w"], params, jax.random.PRNGKey(0))
    >>> h["w"].shape, bool((h["w"] >= 0).all())
    ((3, 4), True)
  """
  logits, vjp_fn = jax.vjp(logits_fn, params)
  if logits.ndim < 1:
    raise ValueError(f"logits_fn must return (..., classes) logits, got shape {logits.shape}")
  n = math.prod(logits.shape[:-1])
  logits32 = jax.lax.stop_gradient(logits).astype(jnp.float32)
  sampled = jax.random.categorical(key, logits32, axis=-1)
  probs = jax.nn.softmax(logits32, axis=-1)
  dlogits = (probs - jax.nn.one_hot(sampled, logits.shape[-1], dtype=jnp.float32)) / n
  (g,) = vjp_fn(dlogits.astype(logits.dtype))
  scale = float(n if batch_size is None else batch_size)
  return jax.tree.map(lambda x: (scale * jnp.square(x.astype(jnp.float32))).astype(x.dtype), g)


__all__ = ["DISTRIBUTIONS", "gnb_estimate", "hutchinson_estimate", "random_probes"]
