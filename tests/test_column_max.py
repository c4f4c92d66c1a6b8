"""Column max descent (Liu, Wang, Zhang, Algorithm 2) against numpy, brute force and closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import slimoptax

jax.config.update("jax_enable_x64", False)

def numpy_direction(m, radius, column_axis):
  """Algorithm 2 in float64: per column (an index of ``column_axis``), R/k_j on the entries of max |m|."""
  m = np.moveaxis(np.asarray(m, np.float64), column_axis, 0)
  u = np.zeros_like(m)
  for j in range(m.shape[0]):
    col = m[j]
    top = np.abs(col).max()
    if top == 0:
      continue
    hit = np.abs(col) == top
    u[j][hit] = np.sign(col[hit]) * radius / hit.sum()
  return np.moveaxis(u, 0, column_axis)

def test_direction_matches_numpy_on_a_flax_kernel_with_ties():
  rng = np.random.default_rng(0)
  m = rng.integers(-3, 4, size=(6, 5)).astype(np.float32)  # small integers: many ties
  m[2] = 0.0  # a column of zeros
  spec = MuonDimensionNumbers(0, 1)  # Flax (fan_in, fan_out): one column per fan_in index
  got = slimoptax.column_max_direction(jnp.asarray(m), spec, 1.5)
  np.testing.assert_array_equal(np.asarray(got), numpy_direction(m, 1.5, 0).astype(np.float32))
  assert np.all(np.asarray(got)[2] == 0)

def test_ties_share_the_budget_evenly():
  m = jnp.array([[1.0, -1.0, 0.5], [2.0, -2.0, 2.0]])
  u = slimoptax.column_max_direction(m, MuonDimensionNumbers(0, 1), 1.0)
  np.testing.assert_allclose(np.asarray(u), [[0.5, -0.5, 0.0], [1 / 3, -1 / 3, 1 / 3]], rtol=1e-7)

@pytest.mark.parametrize("seed", range(5))
def test_brute_force_the_update_maximizes_the_inner_product_under_the_budget(seed):
  """Every vertex of {U: ||U[j]||_1 <= R per column j}: ±R on one entry per column; none beats U."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(3, 4))
  if seed == 0:
    m[1, 2] = m[1, 0] = np.abs(m[1]).max() + 1  # a tie
  radius = 0.7
  u = np.asarray(slimoptax.column_max_direction(jnp.asarray(m, jnp.float32), MuonDimensionNumbers(0, 1), radius),
                 np.float64)
  assert np.all(np.abs(u).sum(axis=1) <= radius * (1 + 1e-6))  # within the budget
  best = -np.inf
  choices = [[(i, s) for i in range(m.shape[1]) for s in (-1.0, 1.0)] for _ in range(m.shape[0])]
  for pick in itertools.product(*choices):
    v = np.zeros_like(m)
    for j, (i, s) in enumerate(pick):
      v[j, i] = s * radius
    best = max(best, float(np.sum(m * v)))
  np.testing.assert_allclose(np.sum(m * u), best, rtol=1e-6)
  np.testing.assert_allclose(best, radius * np.abs(m).max(axis=1).sum(), rtol=1e-12)  # the closed form
  # Random feasible points never do better.
  for _ in range(200):
    v = rng.normal(size=m.shape)
    v *= radius / np.abs(v).sum(axis=1, keepdims=True)
    assert np.sum(m * v) <= np.sum(m * u) + 1e-6

def test_densegeneral_kernels_take_the_max_over_their_fan_out_axes():
  rng = np.random.default_rng(1)
  params = {"attn": {"query": {"kernel": jnp.zeros((4, 2, 3))}, "out": {"kernel": jnp.zeros((2, 3, 4))}}}
  m = {"attn": {"query": {"kernel": jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32)},
                "out": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)}}}
  tx = slimoptax.scale_by_column_max(0.0, radius=1.0)
  u, _ = tx.update(m, tx.init(params))
  q = np.asarray(m["attn"]["query"]["kernel"]).reshape(4, 6)  # (d, H*hd): max over H*hd per d
  np.testing.assert_allclose(np.asarray(u["attn"]["query"]["kernel"]).reshape(4, 6), numpy_direction(q, 1.0, 0),
                             rtol=1e-7)
  o = np.asarray(m["attn"]["out"]["kernel"]).reshape(6, 4)  # (H*hd, d): max over d per (head, dim)
  np.testing.assert_allclose(np.asarray(u["attn"]["out"]["kernel"]).reshape(6, 4), numpy_direction(o, 1.0, 0),
                             rtol=1e-7)

def test_momentum_trajectory_matches_numpy():
  rng = np.random.default_rng(2)
  beta, radius, lr = 0.9, 0.5, 0.1
  params = {"mlp": {"up": {"kernel": jnp.zeros((3, 5))}}}
  tx = optax.chain(slimoptax.scale_by_column_max(beta, radius=radius), optax.scale_by_learning_rate(lr))
  state = tx.init(params)
  w, m_ref, w_ref = params, np.zeros((3, 5)), np.zeros((3, 5))
  for _ in range(6):
    g = rng.normal(size=(3, 5)).astype(np.float32)
    u, state = tx.update({"mlp": {"up": {"kernel": jnp.asarray(g)}}}, state, w)
    w = optax.apply_updates(w, u)
    m_ref = beta * m_ref + (1 - beta) * g
    w_ref = w_ref - lr * numpy_direction(m_ref, radius, 0)
  np.testing.assert_allclose(np.asarray(w["mlp"]["up"]["kernel"]), w_ref, rtol=1e-5, atol=1e-7)
  assert int(state[0].count) == 6

def test_column_max_descent_sends_the_rest_to_adamw():
  params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)},
            "wte": {"embedding": jnp.ones((16, 4))}}
  assert slimoptax.column_max_labels(params) == {"ln": {"scale": "adam"}, "mlp": {"up": {"kernel": "column_max"}},
                                                 "wte": {"embedding": "adam"}}
  tx = slimoptax.column_max_descent(0.02, 0.5, adam_learning_rate=1e-3, weight_decay=0.0)
  ref = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
  rng = np.random.default_rng(3)
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    u, state = tx.update(grads, state, params)
    r, ref_state = ref.update(grads, ref_state, params)
    for path in (("ln", "scale"), ("wte", "embedding")):
      np.testing.assert_allclose(np.asarray(u[path[0]][path[1]]), np.asarray(r[path[0]][path[1]]), rtol=1e-6)
  assert jnp.all(jnp.abs(u["mlp"]["up"]["kernel"]).sum(axis=1) <= 0.02 * (1 + 1e-6))  # lr * R per column

def test_nan_momentum_is_not_hidden_and_non_matrices_are_refused_by_name():
  m = jnp.array([[1.0, jnp.nan], [2.0, 1.0]])
  u = slimoptax.column_max_direction(m, MuonDimensionNumbers(0, 1), 1.0)
  assert np.all(np.isnan(np.asarray(u[0]))) and np.asarray(u[1]).tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match=r"'ln/scale' with shape \(4,\) is not a hidden matrix.*column_max_descent"):
    slimoptax.scale_by_column_max().init({"ln": {"scale": jnp.ones(4)}, "mlp": {"up": {"kernel": jnp.ones((4, 4))}}})
  with pytest.raises(ValueError, match="beta"):
    slimoptax.scale_by_column_max(1.5)
  with pytest.raises(ValueError, match="radius"):
    slimoptax.scale_by_column_max(radius=-1.0)
