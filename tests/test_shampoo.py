"""Shampoo against float64 numpy references of Algorithms 1 (matrix) and 2 (tensor), and of Adam grafting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slimoptax._shampoo import scale_by_shampoo, shampoo


def _np_root(h, p):
  w, v = np.linalg.eigh(0.5 * (h + h.T))
  w = np.maximum(w, w.max() * np.finfo(np.float64).eps)
  return (v * w ** (-1.0 / p)) @ v.T


def _mode(x, a, axis):
  return np.moveaxis(np.tensordot(x, a, axes=([axis], [1])), -1, axis)


def _np_shampoo(grads, *, eps, beta=None, freq=1, max_dim=10 ** 9, graft=False, b1=0.9, b2=0.999,
                graft_eps=1e-8):
  """Algorithm 2 (Algorithm 1 for a matrix): H_i += G_(i) G_(i)^T (or its EMA) from eps I,
  U = G x_i H_i^{-1/2k}, roots refreshed at steps t % freq == 0 (t from 0); optional Adam graft."""
  shape = grads[0].shape
  axes = [a for a, n in enumerate(shape) if n <= max_dim]
  k = len(axes)
  H = {a: eps * np.eye(shape[a]) for a in axes}
  roots = {a: np.eye(shape[a]) for a in axes}
  m, v = np.zeros(shape), np.zeros(shape)
  out = []
  for t, g in enumerate(grads):
    for a in axes:
      others = [b for b in range(g.ndim) if b != a]
      gg = np.tensordot(g, g, axes=(others, others))
      H[a] = H[a] + gg if beta is None else beta * H[a] + (1 - beta) * gg
    if t % freq == 0:
      roots = {a: _np_root(H[a], 2 * k) for a in axes}
    u = g
    for a in axes:
      u = _mode(u, roots[a], a)
    if graft:
      m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
      adam = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + graft_eps)
      u = u * np.linalg.norm(adam) / np.linalg.norm(u)
    out.append(u)
  return out


def _grads(shape, steps=7, seed=0):
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.normal(0, 0.5, shape[:1] + (1,) * (len(shape) - 1)))
  return [(rng.standard_normal(shape) + 0.3) * scale for _ in range(steps)]


CASES = [
    ("matrix_sum", (5, 3), dict(eps=1e-3)),
    ("matrix_ema", (5, 3), dict(eps=1e-3, beta=0.9)),
    ("matrix_stale_roots", (5, 3), dict(eps=1e-3, beta=0.9, freq=3)),
    ("tensor_sum", (4, 3, 2), dict(eps=1e-2)),
    ("tensor_ema_stale", (4, 3, 2), dict(eps=1e-2, beta=0.95, freq=2)),
    ("dim_above_max", (12, 3), dict(eps=1e-3, max_dim=8)),
    ("graft_adam", (5, 3), dict(eps=1e-3, beta=0.9, graft=True)),
    ("graft_tensor_stale", (4, 3, 2), dict(eps=1e-2, freq=3, graft=True)),
]


@pytest.mark.parametrize("name,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_numpy_reference(name, shape, kw):
  grads = _grads(shape)
  want = _np_shampoo(grads, **kw)
  with jax.enable_x64(True):
    tx = scale_by_shampoo(eps=kw["eps"], beta=kw.get("beta"), precondition_frequency=kw.get("freq", 1),
                          max_precond_dim=kw.get("max_dim", 10000),
                          graft="adam" if kw.get("graft") else None)
    state = tx.init({"w": jnp.zeros(shape, jnp.float64)})
    update = jax.jit(tx.update)
    for t, (g, w) in enumerate(zip(grads, want)):
      u, state = update({"w": jnp.asarray(g)}, state)
      np.testing.assert_allclose(np.asarray(u["w"]), w, rtol=1e-9, atol=1e-12,
                                 err_msg=f"{name} step {t + 1}")
    if "max_dim" in kw:
      assert state.stats["w"][0] is None and state.stats["w"][1].shape == (3, 3)


def test_nan_gradient_skips_the_step_and_keeps_state_finite():
  """A NaN gradient: update 0, statistics / roots / graft moments kept (so parameters stay finite)."""
  tx = shampoo(1e-2, precondition_frequency=1)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = jax.tree.map(jnp.ones_like, params)
  u, state = update(good, state, params)
  before = state
  bad = {"w": jnp.full((3, 2), jnp.nan), "b": jnp.array([jnp.inf, 1.0])}
  u, state = update(bad, state, params)
  for x in jax.tree.leaves(u):
    assert float(jnp.abs(x).max()) == 0.0
  for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state[0])):
    if a.ndim:  # count moves on, everything else is kept
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  u, state = update(good, state, params)  # and the next finite gradient moves again
  assert all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))


def test_dims_matrix_views_batch_and_skip_non_matrices():
  """With dims (Muon's views) a (d, H, hd) query kernel is one (d, H*hd) matrix; a bias gets the graft."""
  params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 3))}}, "ln": {"scale": jnp.ones(4)}}
  tx = scale_by_shampoo(dims="slimadam")
  state = tx.init(params)
  assert [x.shape for x in state.stats["attn"]["query"]["kernel"]] == [(1, 4, 4), (1, 6, 6)]
  assert state.stats["ln"]["scale"] == (None,)
  g = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).standard_normal(p.shape), jnp.float32),
                   params)
  u, _ = jax.jit(tx.update)(g, state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="beta"):
    scale_by_shampoo(beta=1.5)
  with pytest.raises(ValueError, match="precondition_frequency"):
    scale_by_shampoo(precondition_frequency=0)
  with pytest.raises(ValueError, match="graft"):
    scale_by_shampoo(graft="sgd")
  with pytest.raises(ValueError, match="eps"):
    scale_by_shampoo(eps=-1.0)
  tx = scale_by_shampoo()
  state = tx.init({"w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match="'w'"):
    tx.update({"w": jnp.zeros((4, 2))}, state)
  with pytest.raises(ValueError, match="'step'"):
    tx.init({"step": jnp.zeros((), jnp.int32)})
