"""Tests of scale_by_sign against optax and a numpy re-implementation of Orvieto & Gower's equations (Table 1, §2)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax._sign import scale_by_sign

STEPS = 25
SHAPES = {"params": {"Dense_0": {"kernel": (8, 6), "bias": (6,)}, "LayerNorm_0": {"scale": (6,)}},
          "temp": ()}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def _grads(seed=1, steps=STEPS, zeros=True):
  """Gradient sequence with a drifting mean; some exact zeros to exercise sign(0) = 0."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(steps):
    def leaf(s):
      g = rng.normal(size=s) + 0.3 * np.sin(0.3 * k)
      if zeros and np.ndim(g) and k % 7 == 3:
        g.flat[0] = 0.0
      return jnp.asarray(g, jnp.float32)
    out.append(jax.tree.map(leaf, SHAPES, is_leaf=lambda x: isinstance(x, tuple)))
  return out


def _run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(tx.update)
  ups, states = [], []
  for g in grads:
    u, state = step(g, state, params)
    ups.append(u)
    states.append(state)
  return ups, states


def _np_ref(grads, *, mode, beta, eps=0.0, init="zero", in_sqrt=True):
  """Numpy (float64) re-implementation of Orvieto & Gower §2 / Fig. 4: returns [(d_k, m_k)] per leaf list."""
  gl = [[np.asarray(x, np.float64) for x in jax.tree.leaves(g)] for g in grads]
  m = [np.zeros_like(x) for x in gl[0]]
  out = []
  for k, g in enumerate(gl):
    if mode == "signsgd":
      out.append(([np.sign(x) for x in g], None))
      continue
    s = [np.sign(x) if mode == "emasign" else x for x in g]
    if init == "grad" and k == 0:
      m = [x.copy() for x in s]  # EMA[s_1] := s_1
    else:
      m = [beta * mi + (1 - beta) * si for mi, si in zip(m, s)]
    if mode == "signum":
      d = [np.sign(mi) for mi in m]
    elif mode == "emasign":
      d = [mi.copy() for mi in m]
    else:
      den = [np.sqrt(mi**2 + eps) if in_sqrt else np.abs(mi) + eps for mi in m]
      d = [np.where(dn > 0, mi / np.where(dn > 0, dn, 1), 0) for mi, dn in zip(m, den)]
    out.append((d, [mi.copy() for mi in m]))
  return out


def _assert_signs(d, d_ref, m_ref, rel=1e-5):
  """Signs agree wherever the float64 EMA is not within rounding of zero."""
  for a, b, m in zip(jax.tree.leaves(d), d_ref, m_ref):
    a = np.asarray(a)
    sure = np.abs(m) > rel * (np.max(np.abs(m)) + 1e-30)
    np.testing.assert_array_equal(a[sure], b[sure])
    assert set(np.unique(a)) <= {-1.0, 0.0, 1.0}


def test_signsgd_matches_optax():
  params, grads = _params(), _grads()
  ups, states = _run(scale_by_sign(mode="signsgd"), params, grads)
  ref_ups, _ = _run(optax.scale_by_sign(), params, grads)
  for u, r, (d_np, _) in zip(ups, ref_ups, _np_ref(grads, mode="signsgd", beta=0.0)):
    jax.tree.map(np.testing.assert_array_equal, u, r)
    for a, b in zip(jax.tree.leaves(u), d_np):
      np.testing.assert_array_equal(a, b)
  assert states[-1].mu is None and int(states[-1].count) == STEPS
  # The full optimizer against optax.sign_sgd.
  lr = 0.01
  ours, _ = _run(optax.chain(scale_by_sign(mode="signsgd"), optax.scale_by_learning_rate(lr)),
                 params, grads)
  theirs, _ = _run(optax.sign_sgd(lr), params, grads)
  for u, r in zip(ours, theirs):
    jax.tree.map(np.testing.assert_array_equal, u, r)


@pytest.mark.parametrize("beta", [0.9, 0.95])
def test_signum_zero_init_matches_optax(beta):
  params, grads = _params(), _grads()
  ups, states = _run(scale_by_sign(mode="signum", beta=beta), params, grads)
  # optax.signum = ema(beta, debias=False) -> scale_by_sign -> lr.
  ref_tx = optax.chain(optax.ema(beta, debias=False), optax.scale_by_sign())
  ref_ups, ref_states = _run(ref_tx, params, grads)
  ref_np = _np_ref(grads, mode="signum", beta=beta)
  for u, r, s, rs, (d_np, m_np) in zip(ups, ref_ups, states, ref_states, ref_np):
    jax.tree.map(np.testing.assert_array_equal, u, r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s.mu,
                 rs[0].ema)
    for a, b in zip(jax.tree.leaves(s.mu), m_np):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _assert_signs(u, d_np, m_np)
  lr = 3e-3
  ours, _ = _run(optax.chain(scale_by_sign(mode="signum", beta=beta),
                             optax.scale_by_learning_rate(lr)), params, grads)
  theirs, _ = _run(optax.signum(lr, beta), params, grads)
  for u, r in zip(ours, theirs):
    jax.tree.map(np.testing.assert_array_equal, u, r)


def test_signum_grad_init_matches_numpy():
  params, grads = _params(), _grads()
  ups, states = _run(scale_by_sign(mode="signum", beta=0.9, init="grad"), params, grads)
  ref_np = _np_ref(grads, mode="signum", beta=0.9, init="grad")
  # GI: the first EMA is the first gradient itself, not (1 - beta) g.
  jax.tree.map(np.testing.assert_array_equal, states[0].mu, grads[0])
  for u, s, (d_np, m_np) in zip(ups, states, ref_np):
    for a, b in zip(jax.tree.leaves(s.mu), m_np):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _assert_signs(u, d_np, m_np)
  # ZI and GI differ after the first step.
  _, zi_states = _run(scale_by_sign(mode="signum", beta=0.9), params, grads)
  assert not np.allclose(jax.tree.leaves(zi_states[3].mu)[0], jax.tree.leaves(states[3].mu)[0])


@pytest.mark.parametrize("init", ["zero", "grad"])
def test_emasign(init):
  params, grads = _params(), _grads()
  ups, states = _run(scale_by_sign(mode="emasign", beta=0.9, init=init), params, grads)
  ref_np = _np_ref(grads, mode="emasign", beta=0.9, init=init)
  for u, (d_np, _) in zip(ups, ref_np):
    for a, b in zip(jax.tree.leaves(u), d_np):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      assert np.all(np.abs(np.asarray(a)) <= 1 + 1e-6)
  if init == "zero":  # optax: momentum on the sign = scale_by_sign -> ema(debias=False).
    ref_ups, _ = _run(optax.chain(optax.scale_by_sign(), optax.ema(0.9, debias=False)),
                      params, grads)
    for u, r in zip(ups, ref_ups):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u, r)


@pytest.mark.parametrize("eps,in_sqrt,init", [(1e-3, True, "zero"), (1e-2, False, "zero"),
                                              (1e-3, True, "grad")])
def test_mollified_signum_matches_numpy(eps, in_sqrt, init):
  params, grads = _params(), _grads()
  tx = scale_by_sign(mode="mollified", beta=0.95, eps=eps, eps_in_sqrt=in_sqrt, init=init)
  ups, states = _run(tx, params, grads)
  ref_np = _np_ref(grads, mode="mollified", beta=0.95, eps=eps, init=init, in_sqrt=in_sqrt)
  for u, s, (d_np, m_np) in zip(ups, states, ref_np):
    for a, m, b, mb in zip(jax.tree.leaves(u), jax.tree.leaves(s.mu), d_np, m_np):
      # The EMA matches to rounding; d = m / sqrt(m^2 + eps) amplifies that rounding by up to
      # 1 / sqrt(eps) (1 / eps outside the root), so check d tightly as a function of m.
      np.testing.assert_allclose(m, mb, rtol=1e-5, atol=1e-6)
      m = np.asarray(m, np.float64)
      d_of_m = m / (np.sqrt(m**2 + eps) if in_sqrt else np.abs(m) + eps)
      np.testing.assert_allclose(a, d_of_m, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a, b, atol=2e-6 / (np.sqrt(eps) if in_sqrt else eps))


def test_mollified_eps_zero_is_signum_without_nans():
  params = _params()
  grads = [jax.tree.map(jnp.zeros_like, params)] + _grads(steps=20)
  moll, _ = _run(scale_by_sign(mode="mollified", beta=0.9, eps=0.0), params, grads)
  sig, states = _run(scale_by_sign(mode="signum", beta=0.9), params, grads)
  ref_np = _np_ref(grads, mode="signum", beta=0.9)
  for a, b, (d_np, m_np) in zip(moll, sig, ref_np):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(a))
    _assert_signs(a, d_np, m_np)
    # Equal up to the rounding of m / |m|.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)
  jax.tree.map(np.testing.assert_array_equal, moll[0], jax.tree.map(jnp.zeros_like, params))


def test_mu_dtype_and_jit_roundtrip():
  params, grads = _params(), _grads(steps=20)
  tx = scale_by_sign(mode="emasign", beta=0.9, mu_dtype=jnp.bfloat16)
  ups, states = _run(tx, params, grads)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(states[-1].mu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(ups[-1]))
  ref_np = _np_ref(grads, mode="emasign", beta=0.9)
  for a, b in zip(jax.tree.leaves(ups[-1]), ref_np[-1][0]):
    np.testing.assert_allclose(a, b, atol=2e-2)


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown sign mode"):
    scale_by_sign(mode="sign")
  with pytest.raises(ValueError, match="unknown init"):
    scale_by_sign(init="ones")
  with pytest.raises(ValueError, match="only used by mode='mollified'"):
    scale_by_sign(mode="signum", eps=1e-3)
  with pytest.raises(ValueError, match="keeps no EMA"):
    scale_by_sign(mode="signsgd", init="grad")
  params = {"layer": {"w": jnp.ones((3, 2)), "step": jnp.zeros((), jnp.int32)}}
  with pytest.raises(ValueError, match="'layer/step'"):
    scale_by_sign().init(params)
  tx = scale_by_sign()
  state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"state \(EMA\).*'c'"):
    tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state)


def test_exported():
  assert slimoptax.scale_by_sign is scale_by_sign
  assert slimoptax.ScaleBySignState is slimoptax.ScaleBySignState


def test_inject_hyperparams_signum_equals_plain():
  """Under inject_hyperparams, eps (a tracer) is not taken for a nonzero eps of Signum."""
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  inj = optax.inject_hyperparams(scale_by_sign, static_args=("mode", "init"))(mode="signum", beta=0.9)
  plain = scale_by_sign(mode="signum", beta=0.9)
  s_inj, s_plain = inj.init(params), plain.init(params)
  for _ in range(3):
    u_inj, s_inj = jax.jit(inj.update)(grads, s_inj)
    u_plain, s_plain = plain.update(grads, s_plain)
    np.testing.assert_array_equal(u_inj["w"], u_plain["w"])
