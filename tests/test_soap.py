"""SOAP against the official code's trajectories; the eigenbasis wrapper against numpy references."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax import _kronecker as kron
from slimoptax._soap import precondition_in_eigenbasis, scale_by_soap, soap

REFERENCE = pathlib.Path(__file__).resolve().parent / "reference" / "soap_official.npz"


def _load_reference():
  with np.load(REFERENCE, allow_pickle=False) as f:
    z = {k: f[k] for k in f.files}
  return z, json.loads(str(z["meta"]))


def _replay(z, meta, case):
  c = meta["cases"][case]
  hp = c["hyperparameters"]
  dt = np.float64 if c["dtype"] == "float64" else np.float32
  names = [p["name"] for p in meta["params"]]
  params = {n: jnp.asarray(z[f"init/{n}"].astype(dt)) for n in names}
  tx = soap(hp["lr"], hp["betas"][0], hp["betas"][1], hp["eps"], hp["weight_decay"],
            shampoo_beta=None if hp["shampoo_beta"] < 0 else hp["shampoo_beta"],
            precondition_frequency=hp["precondition_frequency"],
            max_precond_dim=hp["max_precond_dim"], merge_dims=hp["merge_dims"],
            precondition_1d=hp["precondition_1d"], normalize_grads=hp["normalize_grads"],
            correct_bias=hp["correct_bias"])
  state, update = tx.init(params), jax.jit(tx.update)
  assert meta["cases"][case]["state_steps"][0] == 1
  traj = []
  for t in range(meta["steps"]):
    g = {n: jnp.asarray(z[f"grads/{n}"][t].astype(dt)) for n in names}
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    if t == 0:
      # Degenerate first eigenbases (rank-deficient GG) are set by eigh's rounding: take the official one.
      bases = dict(state[0].bases)
      for n in names:
        if c["params"][n]["init_degenerate"]:
          bases[n] = tuple(None if q is None else jnp.asarray(z[f"{case}/Q{i}/{n}"][0].astype(dt))
                           for i, q in enumerate(bases[n]))
      state = (state[0]._replace(bases=bases), state[1])
    traj.append({n: np.asarray(params[n], np.float64) for n in names})
  return traj


@pytest.mark.skipif(not REFERENCE.exists(), reason="tests/reference/soap_official.npz not generated")
def test_matches_official_soap_trajectory():
  """Every case of the official SOAP (torch) replayed: parameters compared after every step.

  float64 (``default_f64``, eigh / QR in float64 on both sides): rtol 1e-10, a
  reimplementation of the same arithmetic. float32: ``|d| <= 1e-5 |p| + 5e-6``.
  Justification: float32 eigh / QR rounding alone moves SOAP's trajectory by
  that much: the official float32 run differs from the official float64 run by
  up to 6e-7 absolute (2.4e-4 relative) on ``square`` after 30 steps, with the
  same gradients and no degenerate basis; we allow 8x that level.
  """
  z, meta = _load_reference()
  names = [p["name"] for p in meta["params"]]
  for case in meta["case_order"]:
    f64 = meta["cases"][case]["dtype"] == "float64"
    with jax.enable_x64(f64):
      traj = _replay(z, meta, case)
    for t, got in enumerate(traj):
      for n in names:
        ref = z[f"{case}/traj/{n}"][t].astype(np.float64)
        tol = dict(rtol=1e-10, atol=1e-12) if f64 else dict(rtol=1e-5, atol=5e-6)
        np.testing.assert_allclose(got[n], ref, err_msg=f"{case} step {t + 1} {n}", **tol)


# --------------------------------------------------------------------------
# Adafactor in the eigenbasis (Vyas et al., SOAP, Algorithm 2), float64 numpy reference.
# --------------------------------------------------------------------------


def _np_eigenbasis(m):
  _, q = np.linalg.eigh(m + 1e-30 * np.eye(len(m)))
  return q[:, ::-1]


def _np_qr_refresh(m, q):
  """Official: sort by diag(Q^T M Q) descending, QR(M Q_sorted); returns (Q, order)."""
  idx = np.argsort(-np.diag(q.T @ m @ q), kind="stable")
  return np.linalg.qr(m @ q[:, idx])[0], idx


def _np_adafactor_in_eigenbasis(grads, beta, b2, eps1, freq):
  """Algorithm 2 in SOAP's schedule: L, R EMAs, G' = Q_L^T G Q_R, Adafactor's V_hat = A C / sum(A), rotate back.

  Adafactor's row / column statistics are re-sorted with the basis, as the official SOAP re-sorts V.
  """
  m, n = grads[0].shape
  L, R = np.zeros((m, m)), np.zeros((n, n))
  row, col = np.zeros(m), np.zeros(n)
  out = []
  for t, g in enumerate(grads):
    if t == 0:
      L, R = beta * L + (1 - beta) * g @ g.T, beta * R + (1 - beta) * g.T @ g
      ql, qr = _np_eigenbasis(L), _np_eigenbasis(R)
      out.append(np.zeros_like(g))
      continue
    gp = ql.T @ g @ qr
    g2 = gp ** 2 + eps1
    row = b2 * row + (1 - b2) * g2.mean(1)
    col = b2 * col + (1 - b2) * g2.mean(0)
    v_hat = np.outer(row, col) / row.mean()
    out.append(ql @ (gp / np.sqrt(v_hat)) @ qr.T)
    L, R = beta * L + (1 - beta) * g @ g.T, beta * R + (1 - beta) * g.T @ g
    if t % freq == 0:
      ql, il = _np_qr_refresh(L, ql)
      qr, ir = _np_qr_refresh(R, qr)
      row, col = row[il], col[ir]
  return out


def test_adafactor_in_eigenbasis_matches_numpy_reference():
  rng = np.random.default_rng(0)
  # Square: after the first call GG_i = G_(i) G_(i)^T has full rank (a rectangular G leaves a null
  # space whose eigenvectors are set by eigh's rounding).
  grads = [rng.standard_normal((4, 4)) * np.array([[3.0], [1.0], [0.5], [2.0]]) + 0.3
           for _ in range(12)]
  beta, b2, eps1, freq = 0.9, 0.75, 1e-30, 3  # b2 exact in float32 (decay_rate_constant casts it)
  want = _np_adafactor_in_eigenbasis(grads, beta, b2, eps1, freq)
  with jax.enable_x64(True):
    inner = slimoptax.scale_by_factored_second_moment(
        b2, factored_axes="last_two", min_dim_size_to_factor=1, eps1=eps1,
        decay_rate_fn=slimoptax._adafactor.decay_rate_constant)
    tx = precondition_in_eigenbasis(inner, beta=beta, precondition_frequency=freq)
    state = tx.init({"w": jnp.zeros((4, 4), jnp.float64)})
    update = jax.jit(tx.update)
    for t, (g, w) in enumerate(zip(grads, want)):
      u, state = update({"w": jnp.asarray(g)}, state)
      np.testing.assert_allclose(np.asarray(u["w"]), w, rtol=1e-9, atol=1e-12, err_msg=f"step {t + 1}")


def test_slim_soap_and_adafactor_run_inside():
  """SlimAdam (averaged second moment) and full Adafactor (a chain with momentum) run in the eigenbasis, jitted."""
  params = {"mlp": {"up": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}}
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(1).standard_normal(p.shape),
                                             jnp.float32), params)
  for inner in (slimoptax.scale_by_slim_adam(compress="slimadam"),
                slimoptax.scale_by_adafactor(b1=0.9, min_dim_size_to_factor=2)):
    tx = precondition_in_eigenbasis(inner, precondition_frequency=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
      u, state = update(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert float(jnp.abs(u["mlp"]["up"]["kernel"]).max()) > 0


def test_keep_order_refresh_equals_official_resort():
  """The wrapper's column-order-keeping QR refresh takes the official (re-sorting) steps."""
  rng = np.random.default_rng(3)
  g = rng.standard_normal((4, 6))
  m = g @ g.T + np.diag([0.1, 5.0, 1.0, 3.0])
  q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
  v = rng.uniform(1, 2, (4, 6))
  with jax.enable_x64(True):
    q_off, v_off = kron.qr_refresh(jnp.asarray(m), jnp.asarray(q), jnp.asarray(v), 0)
    q_keep, v_keep = kron.qr_refresh(jnp.asarray(m), jnp.asarray(q), jnp.asarray(v), 0, keep_order=True)
  # The same basis, relabelled: the keep-order columns sorted as the official ones.
  idx = np.argsort(-np.diag(q.T @ m @ q), kind="stable")
  np.testing.assert_allclose(np.asarray(q_keep)[:, idx], np.asarray(q_off), atol=1e-12)
  np.testing.assert_allclose(np.asarray(v_keep)[idx], np.asarray(v_off), atol=0)


def test_first_call_initializes_only_and_nan_step_is_skipped():
  tx = soap(1e-2)
  params = {"w": jnp.ones((3, 2))}
  state = tx.init(params)
  u, state = tx.update({"w": jnp.ones((3, 2))}, state, params)
  assert float(jnp.abs(u["w"]).max()) == 0.0
  before = state
  u, state = jax.jit(tx.update)({"w": jnp.full((3, 2), jnp.nan)}, state, params)
  assert bool(jnp.all(jnp.isfinite(u["w"])))
  for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state[0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the whole step skipped


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="b1"):
    scale_by_soap(b1=1.0)
  with pytest.raises(ValueError, match="precondition_frequency"):
    scale_by_soap(precondition_frequency=0)
  with pytest.raises(ValueError, match="weight_decay"):
    soap(1e-3, weight_decay=-1.0)
  tx = scale_by_soap()
  state = tx.init({"w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match="'w'"):
    tx.update({"w": jnp.zeros((4, 2))}, state)
  with pytest.raises(ValueError, match="'step'"):
    tx.init({"step": jnp.zeros((), jnp.int32)})


# ---------------------------------------------------------------------------
# Real kernels through `dims`: stacked layers and DenseGeneral heads.
# ---------------------------------------------------------------------------


def test_dims_stacked_layers_equal_separate_layers():
  """A scanned (L, d, f) kernel under a stacked preset takes each layer's own SOAP steps (no mixing).

  Reference: the official layout on the L layers as separate (d, f) parameters; the
  (d, H, hd) query kernel is SOAP on its (d, H*hd) matrix; the norm scale is plain Adam.
  """
  L, D, F, H, HD = 3, 4, 5, 2, 3
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    stacked = {"blocks": {"mlp": {"up": {"kernel": jnp.zeros((L, D, F))}},
                          "attn": {"query": {"kernel": jnp.zeros((L, D, H, HD))}},
                          "ln": {"scale": jnp.ones((L, D))}}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), stacked) for _ in range(6)]
    rules = slimoptax.preset("slimadam", stacked=r"^blocks/")
    tx = scale_by_soap(eps=1e-3, precondition_frequency=2, dims=rules)
    state = tx.init(stacked)
    assert [x.shape for x in state.stats["blocks"]["mlp"]["up"]["kernel"]] == [(L, D, D), (L, F, F)]
    assert [x.shape for x in state.stats["blocks"]["attn"]["query"]["kernel"]] == [(L, D, D),
                                                                                   (L, H * HD, H * HD)]
    assert state.stats["blocks"]["ln"]["scale"] == (None, None)

    def separate(g):
      b = g["blocks"]
      return {**{f"up{i}": b["mlp"]["up"]["kernel"][i] for i in range(L)},
              **{f"q{i}": b["attn"]["query"]["kernel"][i].reshape(D, H * HD) for i in range(L)}}

    ref = scale_by_soap(eps=1e-3, precondition_frequency=2)
    ref_state = ref.init(separate(stacked))
    m = v = np.zeros((L, D))
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
      u, state = update(g, state)
      want, ref_state = ref.update(separate(g), ref_state)
      got = separate(u)
      for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-9, atol=1e-12,
                                   err_msg=f"{k}, step {t + 1}")
      if t:  # the first call moves nothing; then the official Adam: factor * m / (sqrt(v) + eps)
        x = np.asarray(g["blocks"]["ln"]["scale"])
        m, v = 0.95 * m + 0.05 * x, 0.95 * v + 0.05 * x * x
        want = np.sqrt(1 - 0.95 ** t) / (1 - 0.95 ** t) * m / (np.sqrt(v) + 1e-3)
        np.testing.assert_allclose(np.asarray(u["blocks"]["ln"]["scale"]), want, rtol=1e-9)


def test_dims_refuses_official_layout_flags():
  with pytest.raises(ValueError, match="merge_dims and precondition_1d"):
    scale_by_soap(dims="slimadam", merge_dims=True)
  with pytest.raises(ValueError, match="merge_dims and precondition_1d"):
    soap(1e-3, dims="slimadam", precondition_1d=True)


def test_dims_refuses_state_of_other_layout():
  params = {"blocks": {"mlp": {"up": {"kernel": jnp.zeros((2, 3, 4))}}}}
  state = scale_by_soap().init(params)  # the official layout: one (2, 2), (3, 3), (4, 4) per axis
  tx = scale_by_soap(dims=slimoptax.preset("slimadam", stacked=r"^blocks/"))
  with pytest.raises(ValueError, match="blocks/mlp/up/kernel"):
    tx.update(params, state)
