"""LoRA on the experiments' GPT through Flax's nnx.LoRA: exact start, adapters-only training, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slimoptax
from experiments._lib import model
from experiments._lib.lora import LoRAFunctional, adapter_count, with_lora


def _gpt(seed=0):
  cfg = model.gpt_config("tiny", vocab_size=64, n_layers=2, d_model=32, n_heads=4, attention="dense")
  return cfg, model.GPT(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("rank", [8, 32])
def test_lora_starts_at_the_pretrained_model_and_counts_rank_times_in_plus_out(rank):
  cfg, gpt = _gpt()
  x = jax.random.randint(jax.random.PRNGKey(0), (2, cfg.seq_len), 0, cfg.vocab_size)
  before = gpt(x)
  lm = LoRAFunctional(with_lora(gpt, rank, rngs=nnx.Rngs(1)))
  adapters = lm.init()
  np.testing.assert_array_equal(np.asarray(lm.logits(adapters, x)), np.asarray(before))  # B = 0
  d, layers = cfg.d_model, cfg.n_layers
  per_block = 4 * rank * (d + d) + rank * (d + 4 * d) + rank * (4 * d + d)  # q, k, v, o; up; down
  assert adapter_count(adapters) == layers * per_block
  paths = [p for p, _ in slimoptax._tree.named_leaves(adapters)]
  assert all(p.endswith(("lora_a", "lora_b")) for p in paths) and not any("wte" in p for p in paths)


def test_any_transform_trains_the_adapters_only():
  cfg, gpt = _gpt()
  base = nnx.as_pure(nnx.state(gpt, nnx.Param))
  lm = LoRAFunctional(with_lora(gpt, 8, rngs=nnx.Rngs(1)))
  x = jax.random.randint(jax.random.PRNGKey(0), (4, cfg.seq_len), 0, cfg.vocab_size)
  y = jnp.roll(x, -1, axis=1)
  for tx in (optax.adamw(1e-2), slimoptax.slim_adamw(1e-2, compress="adalayer")):
    params, state = lm.init(), tx.init(lm.init())
    loss0 = float(lm.loss(params, x, y))
    for _ in range(5):
      grads = jax.grad(lm.loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    assert float(lm.loss(params, x, y)) < loss0
  frozen = nnx.as_pure(lm.frozen)
  np.testing.assert_array_equal(np.asarray(frozen["wte"]["embedding"]), np.asarray(base["wte"]["embedding"]))
  np.testing.assert_array_equal(np.asarray(frozen["blocks"][0]["mlp"]["up"]["base_module"]["kernel"]),
                                np.asarray(base["blocks"][0]["mlp"]["up"]["kernel"]))


def test_a_model_without_linear_layers_is_refused():
  class EmbedOnly(nnx.Module):
    def __init__(self):
      self.wte = nnx.Embed(10, 4, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match="no nnx.Linear.*attention='dense'"):
    with_lora(EmbedOnly(), 8, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank"):
    with_lora(_gpt()[1], 0, rngs=nnx.Rngs(1))
