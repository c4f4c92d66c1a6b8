"""Shampoo and SOAP under `optax.inject_hyperparams` and with bf16 parameters (one test per transform)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slimoptax import shampoo, soap

# Python ints that set the refresh schedule / which axes get a factor (see the aliases' docstrings).
STATIC_ARGS = ("precondition_frequency", "max_precond_dim")

# Per transform: its alias, the parameter shapes, the calls before the rate changes (Shampoo's roots
# refresh at counts 0 and 2; SOAP's first call only initializes, its bases refresh at moving step 2),
# the bf16 run's settings and length, and its factor fields. SOAP's shapes are a square and a cube so
# that the first call's one-gradient statistics are full rank (a rank-deficient statistic's eigenbasis
# is arbitrary within its null space, set by eigh's rounding, and Adam there is not rotation
# invariant: two programs, or two dtypes, would take different steps).
CASES = {
    "shampoo": dict(alias=shampoo, shapes={"w": (6, 4), "t": (4, 3, 2), "b": (4,)}, inject_calls=3,
                    bf16_kw=dict(weight_decay=0.1, precondition_frequency=2), bf16_steps=6,
                    factors=("stats", "roots")),
    "soap": dict(alias=soap, shapes={"w": (5, 5), "t": (3, 3, 3), "b": (4,)}, inject_calls=4,
                 bf16_kw=dict(precondition_frequency=2), bf16_steps=7, factors=("stats", "bases")),
}


def _tree_params(shapes, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(0.1 * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _tree_grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [{k: jnp.asarray(rng.standard_normal(p.shape) + 0.3, p.dtype) for k, p in params.items()}
          for _ in range(steps)]


def _assert_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **kw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inject_hyperparams_learning_rate(name):
  """Injected == plain across a refresh; a new rate mid-run gives the alias built with it."""
  case = CASES[name]
  alias, n = case["alias"], case["inject_calls"]
  params = _tree_params(case["shapes"])
  grads = _tree_grads(params, n + 1)
  kw = dict(weight_decay=0.1, precondition_frequency=2)
  with pytest.raises(ValueError, match=r'precondition_frequency must be a Python int.*static_args'):
    optax.inject_hyperparams(alias)(learning_rate=1e-2).init(params)
  inj = optax.inject_hyperparams(alias, static_args=STATIC_ARGS)(learning_rate=1e-2, **kw)
  plain = alias(1e-2, **kw)
  s, rs = inj.init(params), plain.init(params)
  assert {"learning_rate", "weight_decay", "b1", "b2", "eps"} <= set(s.hyperparams)
  p, rp = params, params
  inj_update, plain_update = jax.jit(inj.update), jax.jit(plain.update)
  for g in grads[:n]:
    u, s = inj_update(g, s, p)
    ru, rs = plain_update(g, rs, rp)
    p, rp = optax.apply_updates(p, u), optax.apply_updates(rp, ru)
    _assert_close(p, rp, rtol=1e-5, atol=1e-6)  # float32 eigh / QR in two programs: rounding apart
  s.hyperparams["learning_rate"] = jnp.asarray(3e-3, s.hyperparams["learning_rate"].dtype)
  u, _ = inj_update(grads[n], s, p)
  ref, _ = jax.jit(alias(3e-3, **kw).update)(grads[n], s.inner_state, p)
  assert float(max(jnp.abs(x).max() for x in jax.tree.leaves(ref))) > 0
  _assert_close(u, ref, rtol=1e-5, atol=1e-7)


def _run(tx, params, grads):
  state, update = tx.init(params), jax.jit(tx.update)
  states, updates = [], []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    states.append(state)
    updates.append(u)
  return params, states, updates


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_params_with_fp32_statistics(name):
  """bf16 parameters: the factors stay float32, the update is bf16, the run tracks fp32."""
  case = CASES[name]
  p32 = _tree_params(case["shapes"])
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  grads = _tree_grads(p32, case["bf16_steps"])
  tx = case["alias"](1e-2, **case["bf16_kw"])
  end16, states, updates = _run(tx, p16, [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
                                          for g in grads])
  end32, _, _ = _run(tx, p32, grads)
  for state, u in zip(states, updates):
    factors = jax.tree.leaves(tuple(getattr(state[0], f) for f in case["factors"]))
    assert factors and all(x.dtype == jnp.float32 for x in factors)
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(end16))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(end32), jax.tree.leaves(p32)))
  assert moved > 2e-2
  for a, b, c in zip(jax.tree.leaves(end16), jax.tree.leaves(end32), jax.tree.leaves(p32)):
    # The displacement, within bf16's rounding of parameters ~0.1-0.3 (2^-9 relative) per step.
    d16 = np.asarray(a, np.float64) - np.asarray(c.astype(jnp.bfloat16), np.float64)
    d32 = np.asarray(b, np.float64) - np.asarray(c, np.float64)
    np.testing.assert_allclose(d16, d32, atol=0.1 * moved)
