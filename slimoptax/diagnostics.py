"""Per-layer diagnostics: gradient, weight and update norms; sparsity of the inputs of linear layers.

References:
  Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2019 (the
  update/weight ratio per layer).
  Liu, Wang, Zhang, Optimizer-Model Consistency: Full Finetuning with the
  Same Optimizer as Pretraining Forgets Less (activation sparsity of the
  inputs of the attention qkv / output and MLP up / down projections, per
  optimizer: Figs. 4, 5, 10, 11).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slimoptax import _tree

SPARSITY_NAME = "input_sparsity"
DEFAULT_SPARSITY_THRESHOLD = 0.1


def layer_norms(grads: Any, params: Any, updates: Any | None = None) -> dict[str, dict[str, jax.Array]]:
  """Per-parameter L2 norms ``{path: {"grad", "weight", "update"}}`` (jit-friendly).

  Gradient, weight and update norms per parameter, to watch the
  update/weight ratio layer by layer.

  Args:
    grads: gradients.
    params: parameters.
    updates: the optimizer's updates (optional).

  Returns:
    A dict of dicts of scalar arrays.
  """
  out: dict[str, dict[str, jax.Array]] = {}
  g_named = _tree.named_leaves(grads)
  p_leaves = jax.tree_util.tree_structure(grads).flatten_up_to(params)
  u_leaves = jax.tree_util.tree_structure(grads).flatten_up_to(updates) if updates is not None else None
  for i, (path, g) in enumerate(g_named):
    entry = {"grad": optax.tree.norm(g), "weight": optax.tree.norm(p_leaves[i])}
    if u_leaves is not None:
      entry["update"] = optax.tree.norm(u_leaves[i])
    out[path] = entry
  return out


def near_zero_fraction(x: jax.Array, threshold: float = DEFAULT_SPARSITY_THRESHOLD, *,
                       relative: bool = True) -> jax.Array:
  """The fraction of near-zero entries of an activation ``x`` (the last axis holds the features).

  .. math::

    s(x) = \\frac{1}{N} \\sum_{t, i} \\mathbb{1}\\left[|x_{t,i}| \\le \\tau\\, r_t\\right],
    \\qquad r_t = \\sqrt{\\tfrac{1}{d} \\textstyle\\sum_i x_{t,i}^2} \\ \\text{(relative) or } 1

  With ``relative=True`` (the default) the threshold ``tau`` is a fraction of
  each token's RMS over its features, so the measure means the same at any
  activation scale (a LayerNorm output, an attention output, a GELU output);
  exact zeros (ReLU) always count. ``relative=False`` compares ``|x|`` with
  ``tau`` itself. The default ``tau = 0.1`` counts an entry as near zero when
  it is under a tenth of its token's RMS (a Gaussian activation gives about
  8%).

  Args:
    x: the activation, ``(..., features)``.
    threshold: ``tau``.
    relative: threshold relative to each token's feature RMS.

  Returns:
    A float32 scalar in [0, 1].

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> x = jnp.array([[0.0, 1.0, -1.0, 0.05], [2.0, 0.0, 0.0, 0.0]])  # RMS 0.71 and 1.0
    >>> float(slimoptax.diagnostics.near_zero_fraction(x))  # 0, 0.05 | 0, 0, 0
    0.625
  """
  x = jnp.asarray(x, jnp.float32)
  scale = jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True)) if relative and x.ndim else 1.0
  return jnp.mean((jnp.abs(x) <= threshold * scale).astype(jnp.float32))


def _linen_classes():
  import flax.linen as nn
  return (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _nnx_classes():
  from flax import nnx
  return (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


@contextlib.contextmanager
def record_input_sparsity(threshold: float = DEFAULT_SPARSITY_THRESHOLD, *, relative: bool = True,
                          linen_modules: Sequence[type] | None = None,
                          nnx_modules: Sequence[type] | None = None) -> Iterator[None]:
  """Within the block, every linear layer sows the `near_zero_fraction` of its input.

  Flax's own intermediates mechanism carries the values: a linen module sows
  into the ``"intermediates"`` collection (`flax.linen.intercept_methods`
  wraps the calls: apply with ``mutable=["intermediates"]``), an NNX module
  into `flax.nnx.Intermediate` variables (run the model through
  ``nnx.capture(model, nnx.Intermediate)(x)``, which returns them), each under
  the name ``"input_sparsity"``. Outside the
  block nothing is recorded and nothing costs anything; a function jitted
  inside the block records only if it is traced there. The layers are
  ``Dense`` / ``DenseGeneral`` / ``Einsum`` (linen) and ``Linear`` /
  ``LinearGeneral`` / ``Einsum`` (NNX, ``LoRALinear`` included), or the
  classes given. NNX layers are recorded by replacing their classes'
  ``__call__`` for the duration of the block (restored on exit): use it from
  one thread at a time.

  Args:
    threshold, relative: see `near_zero_fraction`.
    linen_modules, nnx_modules: the layer classes to record.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, slimoptax
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(2, name="down")(nn.relu(nn.Dense(8, name="up")(x)))
    >>> model = MLP()
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    >>> with slimoptax.diagnostics.record_input_sparsity():
    ...   _, state = model.apply(variables, jnp.ones((4, 3)), mutable=["intermediates"])
    >>> table = slimoptax.diagnostics.input_sparsity(state["intermediates"])
    >>> sorted(table), table["up"]  # the all-ones input has no near-zero entry
    (['down', 'up'], 0.0)
  """
  import flax.linen as nn

  linen_classes = tuple(linen_modules or _linen_classes())
  nnx_classes = tuple(nnx_modules or _nnx_classes())

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, linen_classes) and args:
      module.sow("intermediates", SPARSITY_NAME, near_zero_fraction(args[0], threshold, relative=relative))
    return next_fun(*args, **kwargs)

  def recording(call):
    def wrapped(self, x, *args, **kwargs):
      from flax import nnx
      self.sow(nnx.Intermediate, SPARSITY_NAME, near_zero_fraction(x, threshold, relative=relative))
      return call(self, x, *args, **kwargs)
    wrapped.__wrapped__ = call
    return wrapped

  originals = {cls: cls.__dict__["__call__"] for cls in nnx_classes if "__call__" in cls.__dict__}
  try:
    for cls, call in originals.items():
      cls.__call__ = recording(call)
    with nn.intercept_methods(interceptor):
      yield
  finally:
    for cls, call in originals.items():
      cls.__call__ = call


def input_sparsity(intermediates: Any) -> dict[str, float]:
  """``{layer path: mean input sparsity}`` from sown intermediates (linen dict or NNX state).

  The path is the layer's (``blocks/0/mlp/up``); several calls of one layer
  (or a subclass recording too) are averaged.

  Args:
    intermediates: ``state["intermediates"]`` of a linen apply, or the
      state returned by ``nnx.capture(model, nnx.Intermediate)(x)``.

  Returns:
    A dict of Python floats, sorted by path.
  """
  pattern = re.compile(rf"(^|/){SPARSITY_NAME}(/.*)?$")
  values: dict[str, list[float]] = {}
  for path, leaf in _tree.named_leaves(intermediates):
    m = pattern.search(path)
    if m is None:
      continue
    values.setdefault(path[: m.start()], []).append(float(np.mean(jax.device_get(leaf))))
  return {k: float(np.mean(v)) for k, v in sorted(values.items())}


__all__ = ["DEFAULT_SPARSITY_THRESHOLD", "SPARSITY_NAME", "input_sparsity", "layer_norms", "near_zero_fraction",
           "record_input_sparsity"]
