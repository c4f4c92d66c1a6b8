"""Tests of AdaVar (Orvieto & Gower, In Search of Adam's Secret Sauce, 2025, Prop. 1, Thm 4.1) against optax and numpy recursions."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax._adavar import mean_variance_from_adam, scale_by_adavar

STEPS = 25
SHAPES = {"params": {"Dense_0": {"kernel": (7, 5), "bias": (5,)}, "Dense_1": {"kernel": (5, 3)}}}


def _grads(steps=STEPS, seed=0):
  """Gradients with a drifting mean and per-coordinate noise, so m and sigma^2 both move."""
  rng = np.random.default_rng(seed)
  mean = jax.tree.map(lambda s: rng.normal(size=s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  out = []
  for k in range(steps):
    out.append(jax.tree.map(
        lambda mu: jnp.asarray(mu * np.cos(0.2 * k) + 0.5 * rng.normal(size=mu.shape), jnp.float32),
        mean))
  return out


def _params():
  return jax.tree.map(lambda s: jnp.zeros(s, jnp.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _run(tx, grads, params=None):
  params = _params() if params is None else params
  state = tx.init(params)
  step = jax.jit(tx.update)
  ups, states = [], []
  for g in grads:
    u, state = step(g, state, params)
    ups.append(u)
    states.append(state)
  return ups, states


def _leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _np_adam(grads, b1, b2, eps=0.0, bias_correction=False):
  """Adam (Kingma & Ba) in float64: returns per-step (update, m, v) leaf lists."""
  m = [np.zeros_like(x) for x in _leaves64(grads[0])]
  v = [np.zeros_like(x) for x in m]
  out = []
  for k, g in enumerate(grads, start=1):
    g = _leaves64(g)
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, g)]
    c1, c2 = (1 - b1**k, 1 - b2**k) if bias_correction else (1.0, 1.0)
    out.append(([(mi / c1) / (np.sqrt(vi / c2) + eps) for mi, vi in zip(m, v)], m, v))
  return out


def _np_adavar(grads, beta, gamma, tau, eps=0.0):
  """Eq. 12 / App. C.4 in float64: d = m / (sqrt(m^2 + gamma EMA_tau[(m_{k-1} - g_k)^2]) + eps)."""
  m = [np.zeros_like(x) for x in _leaves64(grads[0])]
  ema = [np.zeros_like(x) for x in m]
  out = []
  for g in grads:
    g = _leaves64(g)
    ema = [tau * e + (1 - tau) * (mi - gi) ** 2 for e, mi, gi in zip(ema, m, g)]  # m = m_{k-1}
    m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
    sigma2 = [gamma * e for e in ema]
    den = [np.sqrt(mi**2 + s) + eps for mi, s in zip(m, sigma2)]
    d = [np.divide(mi, dn, out=np.zeros_like(mi), where=dn > 0) for mi, dn in zip(m, den)]  # 0/0 := 0
    out.append((d, m, sigma2))
  return out


def _np_thm41(grads, beta):
  """Thm 4.1, eq. (7)-(8): m_{k+1} = beta m_k + (1-beta) g, s_{k+1} = beta s_k + beta(1-beta)(m_k - g)^2."""
  m = [np.zeros_like(x) for x in _leaves64(grads[0])]
  s = [np.zeros_like(x) for x in m]
  out = []
  for g in grads:
    g = _leaves64(g)
    s = [beta * si + beta * (1 - beta) * (mi - gi) ** 2 for si, mi, gi in zip(s, m, g)]
    m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
    out.append((m, s))
  return out


def _close(a_leaves, b_leaves, rtol=2e-5, atol=1e-6):
  for a, b in zip(a_leaves, b_leaves):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [0.9, 0.95])
def test_prop1_adavar_equals_adam_equal_betas_without_bias_correction(beta):
  grads = _grads()
  ups, states = _run(scale_by_adavar(beta, gamma=beta, tau=beta, eps=0.0), grads)
  ref_np = _np_adam(grads, beta, beta, eps=0.0, bias_correction=False)
  # optax always debiases; with b1 = b2 = beta and eps = 0 its update is
  # (m / c) / sqrt(v / c) = (m / sqrt(v)) / sqrt(c), c = 1 - beta^k: multiply by sqrt(c) to undo it.
  opt_ups, opt_states = _run(optax.scale_by_adam(b1=beta, b2=beta, eps=0.0), grads)
  for k, (u, s, (d_np, m_np, v_np), ou, os_) in enumerate(
      zip(ups, states, ref_np, opt_ups, opt_states), start=1):
    _close(jax.tree.leaves(u), d_np)
    undo = np.sqrt(1 - beta**k)
    _close(jax.tree.leaves(u), [np.asarray(x, np.float64) * undo for x in jax.tree.leaves(ou)])
    # State: the same m as Adam, and m^2 + sigma^2 = v (Prop. 1).
    _close(jax.tree.leaves(s.mu), m_np)
    _close([np.asarray(m, np.float64) ** 2 + np.asarray(v, np.float64)
            for m, v in zip(jax.tree.leaves(s.mu), jax.tree.leaves(s.sigma2))], v_np)
    _close(jax.tree.leaves(s.mu), _leaves64(os_.mu), rtol=1e-6, atol=1e-7)
    _close([np.asarray(m, np.float64) ** 2 + np.asarray(v, np.float64)
            for m, v in zip(jax.tree.leaves(s.mu), jax.tree.leaves(s.sigma2))], _leaves64(os_.nu))


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_adavar_with_bias_correction_equals_optax_adam(eps):
  beta = 0.95
  grads = _grads(seed=1)
  ups, _ = _run(scale_by_adavar(beta, eps=eps, bias_correction=True), grads)
  opt_ups, _ = _run(optax.scale_by_adam(b1=beta, b2=beta, eps=eps), grads)
  ref_np = _np_adam(grads, beta, beta, eps=eps, bias_correction=True)
  for u, ou, (d_np, _, _) in zip(ups, opt_ups, ref_np):
    _close(jax.tree.leaves(u), _leaves64(ou))
    _close(jax.tree.leaves(u), d_np)


@pytest.mark.parametrize("beta,gamma,tau", [(0.9, 0.5, 0.99), (0.95, 1.0, 0.8), (0.8, 0.9, 0.9)])
def test_general_adavar_matches_numpy_eq12(beta, gamma, tau):
  grads = _grads(seed=2)
  ups, states = _run(scale_by_adavar(beta, gamma, tau, eps=0.0), grads)
  for u, s, (d_np, m_np, s_np) in zip(ups, states, _np_adavar(grads, beta, gamma, tau)):
    _close(jax.tree.leaves(u), d_np)
    _close(jax.tree.leaves(s.mu), m_np)
    _close(jax.tree.leaves(s.sigma2), s_np)
    for x in jax.tree.leaves(u):
      assert np.all(np.abs(np.asarray(x)) <= 1 + 1e-6)  # |d| <= 1: a trust region (eq. 11)
  # Prop. 2: with gamma != tau it is not Adam for the betas it shares (b1 = beta, b2 = tau).
  adam_np = _np_adam(grads, beta, tau)
  assert not np.allclose(jax.tree.leaves(ups[-1])[0], adam_np[-1][0][0], rtol=1e-3)


def test_zero_gradient_is_finite():
  grads = [jax.tree.map(jnp.zeros_like, _params())] * 3 + _grads(steps=20)
  ups, _ = _run(scale_by_adavar(0.9, eps=0.0), grads)
  ref_np = _np_adavar(grads, 0.9, 0.9, 0.9)
  for k, (u, (d_np, _, _)) in enumerate(zip(ups, ref_np)):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
    if k >= 3:
      _close(jax.tree.leaves(u), d_np)
    else:
      assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))


def _train_states(tx, grads):
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(g, state, params):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  states = []
  for g in grads:
    params, state = step(g, state, params)
    states.append(state)
  return states


@pytest.mark.parametrize("which", ["optax_adam", "optax_adamw_chain", "slim_adam"])
def test_mean_variance_from_adam_matches_thm41_recursion(which):
  beta = 0.9
  grads = _grads(seed=3)
  tx = {
      "optax_adam": optax.adam(1e-2, b1=beta, b2=beta),
      "optax_adamw_chain": optax.chain(optax.clip_by_global_norm(1e3),
                                       optax.adamw(1e-2, b1=beta, b2=beta, weight_decay=0.1)),
      "slim_adam": slimoptax.slim_adamw(1e-2, b1=beta, b2=beta, compress=None),
  }[which]
  states = _train_states(tx, grads)
  for state, (m_np, s_np) in zip(states, _np_thm41(grads, beta)):
    mean, var = mean_variance_from_adam(state)
    _close(jax.tree.leaves(mean), m_np)
    _close(jax.tree.leaves(var), s_np, rtol=1e-4, atol=1e-6)


def test_mean_variance_bias_corrected_is_weighted_mean_and_variance():
  """With beta given: m_hat and v_hat - m_hat^2 are the EMA-weighted mean/variance of the g's."""
  beta = 0.8
  grads = _grads(seed=4)
  states = _train_states(optax.adam(1e-2, b1=beta, b2=beta), grads)
  for k, state in enumerate(states, start=1):
    w = (1 - beta) * beta ** np.arange(k - 1, -1, -1) / (1 - beta**k)  # weights of g_1..g_k
    gs = [np.stack(x) for x in zip(*[_leaves64(g) for g in grads[:k]])]
    mean_np = [np.tensordot(w, g, axes=1) for g in gs]
    var_np = [np.tensordot(w, (g - mu) ** 2, axes=1) for g, mu in zip(gs, mean_np)]
    mean, var = mean_variance_from_adam(state, beta=beta)
    _close(jax.tree.leaves(mean), mean_np)
    _close(jax.tree.leaves(var), var_np, rtol=1e-4, atol=2e-6)


def test_adavar_sigma2_is_the_adam_variance():
  """AdaVar's sigma^2 state with gamma = tau = beta is Adam's v - m^2 (eq. 8)."""
  beta = 0.95
  grads = _grads(seed=5)
  _, av_states = _run(scale_by_adavar(beta), grads)
  _, adam_states = _run(optax.scale_by_adam(beta, beta), grads)
  for s, a, (_, s_np) in zip(av_states, adam_states, _np_thm41(grads, beta)):
    _, var = mean_variance_from_adam(a)
    _close(jax.tree.leaves(s.sigma2), _leaves64(var), rtol=1e-4, atol=1e-6)
    _close(jax.tree.leaves(s.sigma2), s_np)


def test_bad_inputs():
  with pytest.raises(ValueError, match="'w/count'"):
    scale_by_adavar().init({"w": {"kernel": jnp.ones(3), "count": jnp.zeros((), jnp.int32)}})
  tx = scale_by_adavar()
  state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"state \(first moment\).*'c'"):
    tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state)
  params = {"Dense_0": {"kernel": jnp.ones((4, 3))}}
  slim = slimoptax.slim_adamw(1e-3, compress="adalayer")
  with pytest.raises(ValueError, match="'Dense_0/kernel'.*compressed"):
    mean_variance_from_adam(slim.init(params))
  with pytest.raises(ValueError, match="exactly one Adam state"):
    mean_variance_from_adam(optax.sgd(0.1, momentum=0.9).init(params))


def test_exported():
  assert slimoptax.scale_by_adavar is scale_by_adavar
  assert slimoptax.mean_variance_from_adam is mean_variance_from_adam
