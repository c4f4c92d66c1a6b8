"""LoRA adapters on the experiments' GPT, from Flax's own `nnx.LoRA`, stepped as pure functions.

`with_lora` wraps every ``nnx.Linear`` of a model (the four projections of
``attention="dense"`` blocks and the two MLP layers; the embeddings and the
head, tied or not, are left alone) in ``nnx.LoRA(in, rank, out, base_module=linear)``:
the layer computes ``base(x) + x A B`` with ``A`` (in, rank) initialised by
Flax's default and ``B`` (rank, out) zero, so the adapted model starts
exactly where the pretrained one is. `LoRAFunctional` steps only the
adapters (`nnx.LoRAParam`); the pretrained parameters are frozen constants of
the loss, so any optax or slimoptax transformation trains the adapters alone.

Reference: Hu et al., LoRA: Low-Rank Adaptation of Large Language Models,
2021 (as used by Liu, Wang, Zhang, Optimizer-Model Consistency, for the
finetuning comparison).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from experiments._lib.model import Functional, cross_entropy_loss

__all__ = ["LoRAFunctional", "adapter_count", "with_lora"]


def _linears(module: nnx.Module) -> list[tuple[nnx.Module, str, nnx.Linear]]:
  """``(parent, attribute, linear)`` for every ``nnx.Linear`` directly held by a submodule."""
  out = []
  for _, parent in nnx.iter_modules(module):
    for name, child in list(vars(parent).items()):
      if type(child) is nnx.Linear and name != "lm_head":
        out.append((parent, name, child))
  return out


def with_lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """Wraps every ``nnx.Linear`` of ``model`` (in place) in an ``nnx.LoRA`` of this rank; returns it.

  Raises:
    ValueError: if the model holds no ``nnx.Linear``, or for a rank < 1.
      (``attention="mha"`` blocks keep their projections in
      ``nnx.LinearGeneral``, which ``nnx.LoRA`` does not wrap: build the model
      with ``attention="dense"`` to adapt the attention too.)
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  linears = _linears(model)
  if not linears:
    raise ValueError("with_lora: the model has no nnx.Linear layer to adapt (for the GPT: attention='dense')")
  for parent, name, linear in linears:
    in_features, out_features = linear.kernel.shape
    setattr(parent, name, nnx.LoRA(in_features, rank, out_features, base_module=linear, rngs=rngs))
  return model


def adapter_count(params: Any) -> int:
  """The number of adapter entries (``sum rank * (in + out)``) in a LoRA parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


class LoRAFunctional(Functional):
  """A LoRA-adapted model whose stepped parameters are its adapters only.

  ``init`` returns the adapters (`nnx.LoRAParam`); ``loss`` / ``logits`` merge
  them with the frozen pretrained parameters; ``full_params`` gives every
  parameter (adapters included), and ``base_logits`` the frozen model's
  output (for evaluating what finetuning kept).

  Args:
    model: a built NNX model already passed through `with_lora`.
  """

  def __init__(self, model: nnx.Module):
    self.module, self.config = model, model.config
    self.graphdef, self.adapters, self.frozen, self.rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    self.seq_len = self.config.seq_len

  def init(self, seed: int = 0) -> Any:
    del seed  # the adapters were initialised by with_lora's rngs
    return nnx.as_pure(self.adapters)

  def logits(self, params: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(self.graphdef, params, self.frozen, self.rest)(x)

  def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return cross_entropy_loss(self.logits(params, x), y)
