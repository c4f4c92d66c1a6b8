"""Input sparsity of linear layers (Liu, Wang, Zhang, Figs. 4-5) through Flax's intermediates, against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from slimoptax import diagnostics


def numpy_fraction(x, threshold=0.1, relative=True):
  x = np.asarray(x, np.float64)
  scale = np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True)) if relative else 1.0
  return float(np.mean(np.abs(x) <= threshold * scale))


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.5])
def test_near_zero_fraction_matches_numpy(threshold, relative):
  x = np.random.default_rng(0).standard_t(2, size=(3, 5, 16)).astype(np.float32)
  x[0, 0, :4] = 0.0
  got = float(diagnostics.near_zero_fraction(jnp.asarray(x), threshold, relative=relative))
  assert got == pytest.approx(numpy_fraction(x, threshold, relative), abs=1e-7)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="up")(x))
    return nn.Dense(4, name="down")(h)


def test_linen_layers_sow_their_input_sparsity_and_nothing_outside_the_block():
  model = LinenMLP()
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
  variables = model.init(jax.random.PRNGKey(0), x)
  with diagnostics.record_input_sparsity():
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, x)
  table = diagnostics.input_sparsity(state["intermediates"])
  h = jax.nn.relu(x @ variables["params"]["up"]["kernel"] + variables["params"]["up"]["bias"])
  assert table["up"] == pytest.approx(numpy_fraction(x))
  assert table["down"] == pytest.approx(numpy_fraction(h))  # ReLU zeros count
  assert table["down"] > 0.2
  _, state = model.apply(variables, x, mutable=["intermediates"])  # off: nothing sown
  assert diagnostics.input_sparsity(state.get("intermediates", {})) == {}


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.up = nnx.Linear(8, 32, rngs=rngs)
    self.down = nnx.Linear(32, 8, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.down(nnx.relu(self.up(x)))


def test_nnx_layers_sow_their_input_sparsity_and_classes_are_restored():
  model = NNXBlock(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 8))
  call = nnx.Linear.__call__
  with diagnostics.record_input_sparsity(threshold=0.0):
    y, intermediates = nnx.capture(model, nnx.Intermediate)(x)
  assert nnx.Linear.__call__ is call  # restored
  table = diagnostics.input_sparsity(intermediates)
  assert set(table) == {"attn/query", "attn/key", "attn/value", "attn/out", "up", "down"}
  h = jax.nn.relu(model.up(x + model.attn(x)))
  assert table["down"] == pytest.approx(numpy_fraction(h, 0.0))
  assert table["up"] == 0.0
  del y
  _, intermediates = nnx.capture(model, nnx.Intermediate)(x)  # off: nothing sown
  assert diagnostics.input_sparsity(intermediates) == {}
