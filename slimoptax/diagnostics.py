"""Per-layer diagnostics: gradient, weight and update norms.

Reference: Loshchilov & Hutter, Decoupled Weight Decay Regularization, 2019
(the update/weight ratio per layer).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from slimoptax import _tree


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


__all__ = ["layer_norms"]
