"""Hutchinson and Gauss–Newton–Bartlett estimators; Sophia against optax and on a Flax model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import slimoptax
from slimoptax import _sophia as curvature
from slimoptax.layers import Reshaped
from tests.models import NNXGPT


def _randn(seed, *shape, scale=1.0):
  """Test data from numpy (eager jax.random costs a compilation per shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _tree_close(x, y, **kw):
  for (path, a), (_, b) in zip(slimoptax._tree.named_leaves(x), slimoptax._tree.named_leaves(y)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=path, **kw)


# --------------------------------------------------------------------------
# Hutchinson.
# --------------------------------------------------------------------------


def _diag_quadratic():
  params = {"a": _randn(0, 5, 3), "b": _randn(1, 7)}
  # Diagonal Hessian, with some negative entries.
  d = {"a": jnp.asarray(np.random.default_rng(2).uniform(0.1, 3.0, (5, 3)), jnp.float32),
       "b": jnp.linspace(-2.0, 2.0, 7)}
  f = lambda p: 0.5 * sum(jnp.sum(d[k] * p[k] ** 2) for k in p) + jnp.sum(p["a"])
  return params, d, f


def test_diagonal_quadratic_is_exact_with_one_rademacher_probe():
  params, d, f = _diag_quadratic()
  est_fn = jax.jit(lambda key: slimoptax.hutchinson_estimate(f, params, key))
  for seed in range(3):
    _tree_close(est_fn(jax.random.PRNGKey(seed)), d, atol=1e-6, rtol=0)


def test_rademacher_probes_are_independent_fair_signs():
  # 32 signs per jax.random word: every entry +-1, and over many keys each sign is fair and
  # uncorrelated with every other sign of the leaf (also across words and rows; the last word
  # of a 70-wide row is partly unused). Mean and correlations within 5 standard errors.
  params = {"w": jnp.zeros((3, 70)), "s": jnp.zeros(()), "v": jnp.zeros(5, jnp.bfloat16)}
  draws = 4000
  u = jax.jit(jax.vmap(lambda k: ravel_pytree(jax.tree.map(
      lambda x: x.astype(jnp.float32), curvature.random_probes(k, params)))[0]))(
      jax.random.split(jax.random.PRNGKey(3), draws))
  u = np.asarray(u, np.float64)
  assert set(np.unique(u)) == {-1.0, 1.0}
  probes = curvature.random_probes(jax.random.PRNGKey(0), params)
  assert probes["v"].dtype == jnp.bfloat16 and probes["w"].shape == (3, 70) and probes["s"].shape == ()
  se = 1 / np.sqrt(draws)
  assert np.all(np.abs(u.mean(0)) < 5 * se), np.abs(u.mean(0)).max() / se
  corr = (u.T @ u) / draws
  off = corr[~np.eye(corr.shape[0], dtype=bool)]
  assert np.all(np.abs(off) < 5.5 * se), np.abs(off).max() / se
  # Different keys, different probes; the same key, the same probes.
  again = curvature.random_probes(jax.random.PRNGKey(0), params)
  _tree_close(probes, again, atol=0)
  assert not np.array_equal(np.asarray(probes["w"]), np.asarray(curvature.random_probes(
      jax.random.PRNGKey(1), params)["w"]))


_EXPLICIT_PROBES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from slimoptax._curvature import random_probes
mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
params = {"w": jnp.zeros((8, 64)), "v": jnp.zeros((4, 70))}
specs = {"w": P("a", "b"), "v": P("b", None)}
key = jax.random.PRNGKey(7)
plain = random_probes(key, params)
with jax.set_mesh(mesh):
  sharded = {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in params.items()}
  out = jax.jit(random_probes)(key, sharded)
  for k in params:
    assert out[k].sharding.spec == specs[k], (k, out[k].sharding)
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(plain[k]))
print("ok")
"""


def test_rademacher_probes_follow_explicit_shardings():
  # Under an explicit mesh each probe has its leaf's sharding (a sharded last axis included: the
  # words are drawn with it replicated) and the same values as unsharded.
  import os
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _EXPLICIT_PROBES], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_gaussian_probes_are_unbiased_on_a_diagonal_quadratic():
  params, d, f = _diag_quadratic()
  est = jax.jit(lambda key: slimoptax.hutchinson_estimate(
      f, params, key, num_samples=20_000, distribution="gaussian"))(jax.random.PRNGKey(1))
  # d * mean(u^2): relative standard deviation sqrt(2 / 20000) = 1%.
  _tree_close(est, d, rtol=0.05, atol=0)


def test_dense_quadratic_many_probes_within_a_few_percent():
  rng = np.random.default_rng(0)
  n = 12
  m = rng.standard_normal((n, n))
  a = m @ m.T / n + np.diag(rng.uniform(1.0, 3.0, n))
  a_j = jnp.asarray(a, jnp.float32)
  params = {"x": jnp.asarray(rng.standard_normal(5), jnp.float32),
            "y": jnp.asarray(rng.standard_normal(7), jnp.float32)}  # H couples the two leaves

  def f(p):
    v = jnp.concatenate([p["x"], p["y"]])
    return 0.5 * v @ a_j @ v

  samples = 20_000
  est = jax.jit(lambda key: slimoptax.hutchinson_estimate(f, params, key, num_samples=samples))(
      jax.random.PRNGKey(3))
  flat = np.concatenate([np.asarray(est["x"]), np.asarray(est["y"])])
  diag = np.diag(a)
  # Rademacher: Var[u_i (Au)_i] = sum_{j != i} A_ij^2; the mean of 20000 probes is within 3%.
  np.testing.assert_allclose(flat, diag, rtol=0.03)
  sd = np.sqrt((np.sum(a ** 2, axis=1) - diag ** 2) / samples)
  assert np.all(np.abs(flat - diag) < 5 * sd)


def test_num_samples_is_the_mean_of_single_probes():
  params, _, f = _diag_quadratic()
  g = lambda p: f(p) + jnp.sum(p["a"][:, 0] * p["a"][:, 1]) * jnp.sum(p["b"] ** 3)
  key = jax.random.PRNGKey(7)
  many = jax.jit(lambda k: slimoptax.hutchinson_estimate(g, params, k, num_samples=4))(key)
  singles = jax.jit(jax.vmap(lambda k: slimoptax.hutchinson_estimate(g, params, k)))(
      jax.random.split(key, 4))
  singles = [jax.tree.map(lambda x: x[i], singles) for i in range(4)]
  _tree_close(many, jax.tree.map(lambda *xs: sum(xs) / 4, *singles), atol=1e-5, rtol=1e-5)


def _mlp():
  params = {"w1": _randn(0, 3, 4), "b1": _randn(1, 4, scale=0.1), "w2": _randn(2, 4, 2)}
  x = _randn(3, 16, 3)
  y = _randn(4, 16, 2)

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return 0.5 * jnp.mean(jnp.sum((h @ p["w2"] - y) ** 2, axis=-1))

  return params, loss


def test_small_network_against_jax_hessian():
  params, loss = _mlp()
  flat, unravel = ravel_pytree(params)
  hess = np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat), np.float64)
  # One probe: exactly u * (H u) with the full Hessian.
  key = jax.random.PRNGKey(5)
  u, one = jax.jit(lambda k: (ravel_pytree(curvature.random_probes(k, params))[0],
                               ravel_pytree(slimoptax.hutchinson_estimate(loss, params, k))[0]))(key)
  u, one = np.asarray(u, np.float64), np.asarray(one)
  np.testing.assert_allclose(one, u * (hess @ u), atol=1e-5, rtol=1e-5)
  # Many probes: diag(H) within the estimator's own standard error.
  samples = 20_000
  est = jax.jit(lambda k: slimoptax.hutchinson_estimate(loss, params, k, num_samples=samples))(key)
  est = np.asarray(ravel_pytree(est)[0])
  diag = np.diag(hess)
  sd = np.sqrt((np.sum(hess ** 2, axis=1) - diag ** 2) / samples)
  assert np.all(np.abs(est - diag) <= 5 * sd + 1e-5), np.abs(est - diag) / (sd + 1e-12)


# --------------------------------------------------------------------------
# Gauss–Newton–Bartlett.
# --------------------------------------------------------------------------


def _softmax_model(batch=4, d=3, classes=3):
  params = {"w": _randn(11, d, classes), "b": _randn(12, classes, scale=0.5)}
  x = _randn(13, batch, d)
  logits_fn = lambda p: x @ p["w"] + p["b"]
  return params, x, logits_fn


def _gn_diag_closed_form(params, x):
  """diag of J^T (diag(p) - p p^T) J / B for logits = x W + b: x_bi^2 p_bc (1 - p_bc) averaged."""
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  v = p * (1 - p)
  return {"w": (x ** 2).T @ v / len(x), "b": v.mean(0)}


def test_gnb_closed_form_equals_hessian_of_linear_softmax_model():
  params, x, logits_fn = _softmax_model()
  labels = jnp.array([0, 2, 1, 1])
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels).mean()
  flat, unravel = ravel_pytree(params)
  diag = np.diag(np.asarray(jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)))
  expected = _gn_diag_closed_form(params, x)
  np.testing.assert_allclose(diag, ravel_pytree({k: jnp.asarray(v) for k, v in expected.items()})[0],
                             rtol=1e-5, atol=1e-6)


def test_gnb_exact_expectation_by_enumerating_labels():
  # E over all C^B label vectors of B * g_hat^2, weighted by the model's probabilities,
  # is exactly the Gauss–Newton diagonal (Bartlett's identity + independence across rows).
  params, x, logits_fn = _softmax_model()
  batch, classes = 4, 3
  probs = np.asarray(jax.nn.softmax(logits_fn(params)), np.float64)

  @jax.jit
  def b_g2(labels):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels).mean()
    return jax.tree.map(lambda g: batch * g ** 2, jax.grad(loss)(params))

  combos = np.array(list(itertools.product(range(classes), repeat=batch)))
  values = jax.vmap(b_g2)(jnp.asarray(combos))
  weights = np.prod(probs[np.arange(batch), combos], axis=1)
  assert weights.sum() == pytest.approx(1.0)
  expectation = {k: np.tensordot(weights, np.asarray(v, np.float64), axes=1) for k, v in values.items()}
  _tree_close(expectation, _gn_diag_closed_form(params, x), rtol=1e-4, atol=1e-7)


def test_gnb_monte_carlo_matches_gauss_newton_diagonal():
  params, x, logits_fn = _softmax_model()
  keys = jax.random.split(jax.random.PRNGKey(0), 100_000)
  est = jax.jit(jax.vmap(lambda k: slimoptax.gnb_estimate(logits_fn, params, k)))(keys)
  mean = jax.tree.map(lambda e: np.asarray(e, np.float64).mean(0), est)
  _tree_close(mean, _gn_diag_closed_form(params, x), rtol=0.05, atol=1e-4)
  assert all(np.all(np.asarray(e) >= 0) for e in jax.tree.leaves(est))


def test_gnb_batch_size_defaults_to_number_of_loss_terms():
  params = {"w": _randn(0, 4, 5)}
  x = _randn(1, 3, 6, 4)  # (batch, tokens, d): 18 loss terms
  logits_fn = lambda p: x @ p["w"]
  key = jax.random.PRNGKey(0)

  @jax.jit
  def run(key):
    default = slimoptax.gnb_estimate(logits_fn, params, key)
    explicit = slimoptax.gnb_estimate(logits_fn, params, key, batch_size=3)
    # The sampled-label gradient, recomputed with optax's loss.
    labels = jax.random.categorical(key, logits_fn(params), axis=-1)
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(p), labels).mean())(params)
    return default, explicit, g

  default, explicit, g = run(key)
  np.testing.assert_allclose(default["w"], explicit["w"] * 18 / 3, rtol=1e-6)
  np.testing.assert_allclose(default["w"], 18 * g["w"] ** 2, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------
# Sophia.
# --------------------------------------------------------------------------


def _logreg():
  params = {"w": _randn(0, 6, 5, scale=0.3), "b": jnp.zeros(5)}
  x = _randn(1, 32, 6)
  y = jnp.asarray(np.random.default_rng(2).integers(0, 5, 32))
  logits_fn = lambda p: x @ p["w"] + p["b"]
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()
  return params, loss, logits_fn


def _run(tx, params, loss, steps, **extra):
  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p, obj_fn=loss, **extra)
    return optax.apply_updates(p, u), s, u

  state = tx.init(params)
  for _ in range(steps):
    params, state, u = step(params, state)
  return params, state, u


def _at_fixed_params(tx, params, loss, steps, **extra):
  """``steps`` jitted updates at the same params (so estimates are comparable); last u, state."""
  step = jax.jit(lambda s: tx.update(jax.grad(loss)(params), s, params, obj_fn=loss, **extra))
  state = tx.init(params)
  for _ in range(steps):
    u, state = step(state)
  return u, state


def test_sophia_matches_optax_contrib_sophia():
  params, loss, _ = _logreg()
  all_true = lambda p: jax.tree.map(lambda _: True, p)
  # Same settings as optax: bias-corrected momentum, eps 1e-8, decay of every leaf, and optax's
  # probes (a sign per jax.random word, `optax.tree.random_like`) from jax.random.PRNGKey(0) split
  # the same way, through a callable estimator. gamma=0.5 leaves part of the coordinates
  # unclipped, so the curvature values matter.
  def optax_probes_estimate(p, key, obj_fn):
    u = optax.tree.random_like(key, p, jax.random.rademacher, dtype=jnp.float32)
    return jax.tree.map(jnp.multiply, jax.jvp(jax.grad(obj_fn), (p,), (u,))[1], u)

  ours = slimoptax.sophia(0.05, gamma=0.5, eps=1e-8, weight_decay=1e-4, weight_decay_mask=all_true,
                          bias_correction=True, update_every=3, seed=0, track_win_rate=True,
                          estimator=optax_probes_estimate)
  ref = optax.contrib.sophia(0.05, gamma=0.5, weight_decay=1e-4, update_interval=3)
  p_ours, s_ours, _ = _run(ours, params, loss, 10)
  p_ref, s_ref, _ = _run(ref, params, loss, 10)
  _tree_close(p_ours, p_ref, atol=1e-6, rtol=1e-6)
  _tree_close(s_ours[0].h, s_ref[0].nu, atol=1e-7, rtol=1e-6)
  win = float(slimoptax.sophia_win_rate(s_ours))
  assert 0.0 < win < 1.0


def test_win_rate_is_the_fraction_not_clipped():
  params, loss, _ = _logreg()
  tx = slimoptax.scale_by_hutchinson(gamma=0.5, update_every=5, track_win_rate=True)
  _, state, u = _run(tx, params, loss, 3)  # refreshed at step 1 only: h is what step 3 used
  ratios = jax.tree.map(lambda m, h: m / jnp.maximum(0.5 * h, 1e-12), state.mu, state.h)
  not_clipped = sum(int(jnp.sum(jnp.abs(r) < 1.0)) for r in jax.tree.leaves(ratios))
  assert float(state.win_rate) == pytest.approx(not_clipped / 35)
  _tree_close(u, jax.tree.map(lambda r: jnp.clip(r, -1, 1), ratios), atol=1e-6)
  assert slimoptax.sophia_win_rate(optax.chain(tx, optax.scale(-1.0)).init(params)) == 0.0
  # Without the count (the default): the same updates and state, no win_rate, and asking for it says why.
  off = slimoptax.scale_by_hutchinson(gamma=0.5, update_every=5)
  _, state_off, u_off = _run(off, params, loss, 3)
  _tree_close(u_off, u, atol=0)
  _tree_close((state_off.mu, state_off.h), (state.mu, state.h), atol=0)
  assert state_off.win_rate is None and off.init(params).win_rate is None
  with pytest.raises(ValueError, match="track_win_rate=True"):
    slimoptax.sophia_win_rate(optax.chain(off, optax.scale(-1.0)).init(params))


def test_refresh_schedule_and_ordering():
  params, loss, _ = _logreg()
  b2, gamma = 0.99, 0.5
  g = jax.grad(loss)(params)
  _, sub = jax.random.split(jax.random.PRNGKey(4))
  est = jax.jit(lambda k: slimoptax.hutchinson_estimate(loss, params, k))(sub)
  # Default (official code, optax): step 1 still sees h = 0 -> clipped sign steps.
  lagged = slimoptax.scale_by_hutchinson(b2=b2, gamma=gamma, seed=4)
  u, s = _at_fixed_params(lagged, params, loss, 1)
  _tree_close(u, jax.tree.map(jnp.sign, g), atol=0)
  _tree_close(s.h, jax.tree.map(lambda e: (1 - b2) * e, est), rtol=1e-6, atol=1e-9)
  # Algorithm 3 of the paper: refresh, then use the fresh h in the same step.
  fresh = slimoptax.scale_by_hutchinson(b2=b2, gamma=gamma, seed=4, fresh_estimate=True)
  u, _ = _at_fixed_params(fresh, params, loss, 1)
  expected = jax.tree.map(lambda gg, e: jnp.clip((1 - 0.965) * gg / jnp.maximum(
      gamma * (1 - b2) * e, 1e-12), -1, 1), g, est)
  _tree_close(u, expected, rtol=1e-5, atol=1e-6)
  # Refreshes at steps 1, k+1, ...: with k = 3, h only changes at counts 0 and 3.
  tx = slimoptax.scale_by_hutchinson(update_every=3)
  step = jax.jit(lambda s: tx.update(g, s, params, obj_fn=loss)[1])
  s = tx.init(params)
  hs = []
  for _ in range(5):
    s = step(s)
    hs.append(np.asarray(s.h["w"]))
  assert np.array_equal(hs[0], hs[1]) and np.array_equal(hs[1], hs[2])
  assert not np.array_equal(hs[2], hs[3]) and np.array_equal(hs[3], hs[4])


def test_gnb_and_callable_estimators_are_wired():
  params, loss, logits_fn = _logreg()
  _, sub = jax.random.split(jax.random.PRNGKey(0))
  tx = slimoptax.scale_by_hutchinson(estimator="gnb")
  _, s = _at_fixed_params(tx, params, loss, 1, logits_fn=logits_fn)
  expected = jax.jit(lambda k: jax.tree.map(
      lambda e: 0.01 * e, slimoptax.gnb_estimate(logits_fn, params, k)))(sub)
  _tree_close(s.h, expected, rtol=1e-6, atol=1e-10)
  g = jax.grad(loss)(params)
  with pytest.raises(ValueError, match="logits_fn"):
    jax.eval_shape(lambda s: tx.update(g, s, params, obj_fn=loss), tx.init(params))
  ones = lambda p, key, **kw: jax.tree.map(jnp.ones_like, p)
  tx = slimoptax.scale_by_hutchinson(estimator=ones)
  _, s = _at_fixed_params(tx, params, loss, 1)
  _tree_close(s.h, jax.tree.map(lambda p: jnp.full(p.shape, 0.01), params), rtol=1e-6)


def test_negative_curvature_gives_bounded_descent_steps():
  # f = x^2 - 1.5 y^2 + 0.1 (x + y): a saddle. Rademacher probes see h_y = -3 exactly.
  params = {"x": jnp.array([1.0, -0.5]), "y": jnp.array([0.3, -0.2])}
  f = lambda p: jnp.sum(p["x"] ** 2) - 1.5 * jnp.sum(p["y"] ** 2) + 0.1 * jnp.sum(p["x"] + p["y"])
  lr = 0.01
  tx = slimoptax.sophia(lr, weight_decay=0.0, update_every=1, fresh_estimate=True, track_win_rate=True)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, obj_fn=f))
  p, s = params, tx.init(params)
  for _ in range(5):
    g = jax.grad(f)(p)
    u, s = step(g, s, p)
    h_y = s[0].h["y"]
    assert np.all(np.asarray(h_y) < 0)  # the EMA itself is not clamped
    m_y = s[0].mu["y"]
    # Naively dividing by gamma h + eps would step uphill: sign(m / (gamma h)) = -sign(m).
    assert np.all(np.sign(m_y / (0.01 * h_y)) == -np.sign(m_y))
    # Ours: a clipped sign-descent step, exactly lr in size, along -m (here also -g).
    np.testing.assert_array_equal(np.asarray(u["y"]), -lr * np.sign(np.asarray(m_y)))
    assert np.all(np.sign(np.asarray(u["y"])) == -np.sign(np.asarray(g["y"])))
    assert np.all(np.isfinite(np.asarray(u["x"]))) and np.all(np.abs(u["x"]) <= lr)
    new_p = optax.apply_updates(p, u)
    assert f(new_p) < f(p)
    p = new_p
  assert float(slimoptax.sophia_win_rate(s)) <= 0.5  # the y coordinates are clipped
  with pytest.raises(ValueError, match="clip_threshold"):
    slimoptax.scale_by_hutchinson(clip_threshold=None)
  with pytest.raises(ValueError, match="eps"):
    slimoptax.scale_by_hutchinson(eps=0.0)


def test_compressed_curvature_shapes_and_numbers():
  params = {"w": _randn(0, 6, 8), "q": _randn(1, 8, 2, 4), "k": _randn(2, 8, 8), "b": jnp.zeros(8)}
  x = _randn(3, 16, 6)

  def loss(p):
    h = jnp.tanh(x @ p["w"] + p["b"])
    q = jnp.einsum("nd,dhe->nhe", h, p["q"]).reshape(16, 8)
    # An L2 term keeps the curvature positive, so that h decides which ratios are clipped.
    return jnp.mean(jnp.tanh(q @ p["k"]) ** 2) + 0.5 * sum(jnp.sum(v ** 2) for v in p.values())

  compress = {"w": (1,), "q": (0, 2), "k": Reshaped((8, 2, 4), (0, 2)), "b": ()}
  small = slimoptax.scale_by_hutchinson(gamma=5.0, update_every=2, compress=compress)
  full = slimoptax.scale_by_hutchinson(gamma=5.0, update_every=2)
  # 4 steps at the same params: refreshes at steps 1 and 3 with the same probes, and step 4
  # used the h left in the state.
  u_small, s_small = _at_fixed_params(small, params, loss, 4)
  _, s_full = _at_fixed_params(full, params, loss, 4)
  shapes = {k: v.shape for k, v in s_small.h.items()}
  assert shapes == {"w": (6, 1), "q": (1, 2, 1), "k": (1, 2, 1), "b": (8,)}
  # The compressed EMA is the full EMA averaged over the axes (the EMA is linear).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  close(s_small.h["w"], s_full.h["w"].mean(1, keepdims=True))
  close(s_small.h["q"], s_full.h["q"].mean((0, 2), keepdims=True))
  close(s_small.h["k"], s_full.h["k"].reshape(8, 2, 4).mean((0, 2), keepdims=True))
  np.testing.assert_array_equal(s_small.h["b"], s_full.h["b"])
  # The update divides the momentum by the broadcast compressed h.
  den = lambda h: np.maximum(5.0 * np.asarray(h), 1e-12)
  ratio_k = (np.asarray(s_small.mu["k"]).reshape(8, 2, 4) / den(s_small.h["k"])).reshape(8, 8)
  np.testing.assert_allclose(u_small["k"], np.clip(ratio_k, -1, 1), rtol=1e-5, atol=1e-7)
  ratio_w = np.asarray(s_small.mu["w"]) / den(s_small.h["w"])
  np.testing.assert_allclose(u_small["w"], np.clip(ratio_w, -1, 1), rtol=1e-5, atol=1e-7)
  ratio_q = np.asarray(s_small.mu["q"]) / den(s_small.h["q"])
  np.testing.assert_allclose(u_small["q"], np.clip(ratio_q, -1, 1), rtol=1e-5, atol=1e-7)
  unclipped = [np.mean(np.abs(r) < 1) for r in (ratio_w, ratio_q, ratio_k)]
  assert all(0 < f < 1 for f in unclipped), unclipped  # some clipped, some not: h matters


def test_compress_preset_on_nnx_gpt():
  model = nnx.eval_shape(lambda: NNXGPT(rngs=nnx.Rngs(0)))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = slimoptax.sophia(1e-3, compress="slimadam")
  state = jax.eval_shape(tx.init, params)
  axes = slimoptax.compression_axes(params, "slimadam")
  expected = jax.tree.map(lambda p, a: slimoptax.rules.reduced_shape(p.shape, a), params, axes,
                          is_leaf=lambda a: isinstance(a, tuple))
  got = jax.tree.map(lambda h: tuple(h.shape), state[0].h)
  assert jax.tree.leaves(got, is_leaf=lambda a: isinstance(a, tuple)) == \
      jax.tree.leaves(expected, is_leaf=lambda a: isinstance(a, tuple))
  assert sum(h.size for h in jax.tree.leaves(state[0].h)) < 0.2 * sum(
      p.size for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# Training a Flax NNX model (an MLP: Hessian-vector products through attention are slow to
# compile on CPU; the GPT's parameter tree is covered by test_compress_preset_on_nnx_gpt).
# --------------------------------------------------------------------------


class _MLP(nnx.Module):
  """A small NNX classifier: Linear -> LayerNorm -> gelu -> Linear."""

  def __init__(self, rngs):
    self.up = nnx.Linear(8, 32, rngs=rngs)
    self.ln = nnx.LayerNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.gelu(self.ln(self.up(x))))


def _blobs(t, n=64):
  x = np.random.default_rng(t).standard_normal((n, 8))
  y = np.argmax(x @ np.random.default_rng(99).standard_normal((8, 4)), axis=-1)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def test_sophia_h_trains_nnx_mlp():
  graphdef, params = nnx.split(_MLP(nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params)
  tx = slimoptax.sophia(1e-2, update_every=2, track_win_rate=True)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

  @jax.jit
  def step(p, s, x, y):
    obj_fn = lambda q: loss_fn(q, x, y)
    loss, g = jax.value_and_grad(obj_fn)(p)
    u, s = tx.update(g, s, p, obj_fn=obj_fn)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  losses = []
  for t in range(60):
    params, state, loss = step(params, state, *_blobs(t))
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
  assert 0.0 < float(slimoptax.sophia_win_rate(state)) < 1.0


def test_sophia_g_trains_nnx_mlp_with_nnx_optimizer():
  model = _MLP(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, slimoptax.sophia(1e-2, estimator="gnb", update_every=2),
                            wrt=nnx.Param)
  graphdef, _ = nnx.split(model, nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    logits_fn = lambda p: nnx.merge(graphdef, p)(x)  # the optimizer passes pure Param arrays
    optimizer.update(model, grads, logits_fn=logits_fn)
    return loss

  losses = [float(step(model, optimizer, *_blobs(t))) for t in range(60)]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
