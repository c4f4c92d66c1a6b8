"""Tests of slimoptax._adafactor (Adafactor) against optax and a numpy re-implementation."""

import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax import _tree as tree_lib
from slimoptax import rules as rules_lib
from slimoptax._adafactor import (
    decay_rate_constant,
    decay_rate_pow,
    relative_step_size,
    resolve_factored_axes,
    scale_by_adafactor,
    scale_by_factored_second_moment,
    second_moment_entries,
)

STEPS = 20


def _tree(shapes, seed, scale=1.0, shift=0.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(shift + scale * rng.normal(size=s), jnp.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


def _core(state):
  """The factored second moment's state: the first of `scale_by_adafactor`'s chain."""
  return state[0]


def _momentum(state):
  """The momentum (`optax.ema`'s accumulator) of a `scale_by_adafactor` state, or None."""
  return next((s.ema for s in state if isinstance(s, optax.EmaState)), None)


def _grad_seq(shapes, steps=STEPS, seed=10):
  return [_tree(shapes, seed + k, scale=1.0 + 0.5 * np.sin(k)) for k in range(steps)]


def _close(a, b, rtol=2e-5, atol=1e-7, atol_rel=0.0):
  """allclose; ``atol_rel`` adds an absolute tolerance relative to the largest reference entry
  (float32 momentum sums cancel near zero, where relative error is meaningless)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  atol = atol + atol_rel * (np.max(np.abs(b)) if b.size else 0.0)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# A numpy re-implementation of Shazeer & Stern (2018), Alg. 4/5, written with
# row/column *sums* and the I-divergence closed form V = R C / 1^T R.
# --------------------------------------------------------------------------


class NumpyAdafactor:

  def __init__(self, pairs, *, decay="pow", decay_rate=0.8, step_offset=0, b1=None, eps1=1e-30,
               eps2=1e-3, d=1.0, param_scale=True, relative_step=False):
    self.pairs, self.decay, self.decay_rate, self.offset = pairs, decay, decay_rate, step_offset
    self.b1, self.eps1, self.eps2, self.d = b1, eps1, eps2, d
    self.param_scale, self.relative_step = param_scale, relative_step
    self.t = 0
    self.R, self.C, self.V, self.M = {}, {}, {}, {}

  def beta2(self):
    if self.decay == "pow":
      return 1.0 - (self.t - self.offset) ** (-self.decay_rate)
    return self.decay_rate

  def step(self, grads, params):
    """grads, params: lists of float arrays (leaf order). Returns the list of updates."""
    self.t += 1
    b2 = self.beta2()
    out = []
    for i, (g, p, pair) in enumerate(zip(grads, params, self.pairs)):
      g = np.asarray(g, np.float64)
      g2 = g**2 + self.eps1
      if pair is not None:
        r, c = pair
        gm = np.moveaxis(g2, (r, c), (-2, -1))  # (*batch, rows, cols)
        self.R[i] = b2 * self.R.get(i, 0.0) + (1 - b2) * gm.sum(-1)  # row sums
        self.C[i] = b2 * self.C.get(i, 0.0) + (1 - b2) * gm.sum(-2)  # column sums
        v_hat = (self.R[i][..., :, None] * self.C[i][..., None, :]
                 / self.R[i].sum(-1)[..., None, None])
        v_hat = np.moveaxis(v_hat, (-2, -1), (r, c))
      else:
        self.V[i] = b2 * self.V.get(i, 0.0) + (1 - b2) * g2
        v_hat = self.V[i]
      u = g / np.sqrt(v_hat)
      if self.d is not None:
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / self.d)
      alpha = 1.0
      if self.relative_step:
        alpha *= min(1e-2, 1.0 / np.sqrt(self.t))
      if self.param_scale:
        alpha *= max(self.eps2, np.sqrt(np.mean(np.asarray(p, np.float64) ** 2)))
      u = alpha * u
      if self.b1 is not None:
        self.M[i] = self.b1 * self.M.get(i, 0.0) + (1 - self.b1) * u
        u = self.M[i]
      out.append(u)
    return out

  def state_means(self, i, shape):
    """(v_row, v_col) in slimoptax's layout (means, original axis order)."""
    r, c = self.pairs[i]
    row = np.moveaxis(self.R[i] / shape[c], -1, r - (c < r))
    col = np.moveaxis(self.C[i] / shape[r], -1, c - (r < c))
    return row, col


def _run_lockstep(tx, params, grads, ref: NumpyAdafactor, *, lr=0.05, rtol=2e-5):
  """Steps ``tx`` (jitted) and the numpy reference on the same gradients and parameters."""
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    u, state = step(g, state, params)
    ref_u = ref.step(jax.tree.leaves(g), jax.tree.leaves(params))
    for a, b in zip(jax.tree.leaves(u), ref_u):
      _close(a, b, rtol=rtol, atol=0.0, atol_rel=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda x: -lr * x, u))
  return state


# --------------------------------------------------------------------------
# Against optax.
# --------------------------------------------------------------------------

OPTAX_SHAPES = {"enc": {"kernel": (160, 130), "bias": (130,)}, "conv": {"kernel": (2, 140, 129)},
                "small": {"kernel": (64, 32)}, "t": ()}


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(min_dim_size_to_factor=16, decay_rate=0.9),
    dict(decay_rate=0.99, decay_rate_fn=decay_rate_constant),
])
def test_matches_optax_scale_by_factored_rms(cfg):
  params = _tree(OPTAX_SHAPES, 0)
  grads = _grad_seq(OPTAX_SHAPES)
  ours = scale_by_adafactor(factored_axes=None, clipping_threshold=None,
                            multiply_by_parameter_scale=False, **cfg)
  ocfg = dict(cfg)
  if "decay_rate_fn" in ocfg:
    ocfg["decay_rate_fn"] = lambda step, rate: jnp.asarray(rate, jnp.float32)
  theirs = optax.scale_by_factored_rms(**ocfg)
  s, rs = ours.init(params), theirs.init(params)
  step, rstep = jax.jit(ours.update), jax.jit(theirs.update)
  pairs = {p: a for p, _, a in resolve_factored_axes(
      params, None, min_dim_size_to_factor=cfg.get("min_dim_size_to_factor", 128))}
  assert pairs["enc/kernel"] == (1, 0) and pairs["conv/kernel"] == (2, 1)
  assert (pairs["small/kernel"] is None) == ("min_dim_size_to_factor" not in cfg)
  for g in grads:
    u, s = step(g, s, params)
    ru, rs = rstep(g, rs, params)
    jax.tree.map(lambda a, b: _close(a, b, rtol=1e-5), u, ru)
    for (path, _), vr, vc, v, rvr, rvc, rv in zip(
        tree_lib.named_leaves(params), tree_lib.leaves_like(params, _core(s).v_row, what="v_row"),
        tree_lib.leaves_like(params, _core(s).v_col, what="v_col"),
        tree_lib.leaves_like(params, _core(s).v, what="v"),
        jax.tree.leaves(rs.v_row), jax.tree.leaves(rs.v_col), jax.tree.leaves(rs.v)):
      if pairs[path] is None:
        assert vr is None and vc is None
        _close(v, rv, rtol=1e-5)
      else:
        assert v is None
        _close(vr, rvr, rtol=1e-5)
        _close(vc, rvc, rtol=1e-5)
  assert int(_core(s).count) == int(rs.count) == STEPS


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_full_adafactor_matches_optax_adafactor(momentum):
  """clip_by_block_rms -> lr -> param scale -> ema: the same algorithm as optax.adafactor."""
  lr = 0.05
  params = _tree(OPTAX_SHAPES, 1)
  grads = _grad_seq(OPTAX_SHAPES, seed=40)
  ours = optax.chain(scale_by_adafactor(b1=momentum), optax.scale_by_learning_rate(lr))
  theirs = optax.adafactor(lr, momentum=momentum)
  s, rs = ours.init(params), theirs.init(params)
  step, rstep = jax.jit(ours.update), jax.jit(theirs.update)
  for g in grads:
    u, s = step(g, s, params)
    ru, rs = rstep(g, rs, params)
    jax.tree.map(lambda a, b: _close(a, b, rtol=2e-5, atol=0.0, atol_rel=1e-6), u, ru)
    params = optax.apply_updates(params, u)


# --------------------------------------------------------------------------
# Against the numpy re-implementation.
# --------------------------------------------------------------------------

NP_SHAPES = {"a": (6, 5, 7), "b": (9, 4), "c": (8, 8), "bias": (5,)}


@pytest.mark.parametrize("cfg", [
    dict(b1=0.9, relative_step=True, decay="const", decay_rate=0.95),
    dict(b1=None, relative_step=False, decay="pow", decay_rate=0.8, d=0.5),
    dict(b1=0.8, relative_step=False, param_scale=False, d=None),
])
def test_matches_numpy_general_axes(cfg):
  spec = {"a": (2, 0), "b": (1, 0), "c": None, "bias": None}
  params = _tree(NP_SHAPES, 2, scale=0.02)
  grads = _grad_seq(NP_SHAPES, seed=70)
  tx = scale_by_adafactor(
      cfg.get("decay_rate", 0.8), factored_axes=spec, min_dim_size_to_factor=1, b1=cfg.get("b1"),
      clipping_threshold=cfg.get("d", 1.0),
      multiply_by_parameter_scale=cfg.get("param_scale", True),
      relative_step=cfg.get("relative_step", False),
      decay_rate_fn=decay_rate_constant if cfg.get("decay") == "const" else decay_rate_pow,
      step_offset=cfg.get("step_offset", 0))
  pairs = [a for _, _, a in resolve_factored_axes(params, spec, min_dim_size_to_factor=1)]
  ref = NumpyAdafactor(pairs, **cfg)
  state = _run_lockstep(tx, params, grads, ref)
  leaves = jax.tree.leaves(params)
  for i, (vr, vc) in enumerate(zip(tree_lib.leaves_like(params, _core(state).v_row, what="v_row"),
                                   tree_lib.leaves_like(params, _core(state).v_col, what="v_col"))):
    if pairs[i] is not None:
      row, col = ref.state_means(i, leaves[i].shape)
      _close(vr, row, rtol=1e-5)
      _close(vc, col, rtol=1e-5)


def test_step_offset_restarts_the_decay_schedule():
  """Fine-tuning from a restored count: beta2 restarts at step_offset (as optax's step_offset)."""
  shapes = {"w": (10, 12), "b": (12,)}
  params, grads = _tree(shapes, 9), _grad_seq(shapes, seed=9)
  kw = dict(min_dim_size_to_factor=1, multiply_by_parameter_scale=False)
  offset = 7
  tx = scale_by_adafactor(step_offset=offset, **kw)
  state = tx.init(params)
  state = (_core(state)._replace(count=jnp.asarray(offset, jnp.int32)), *state[1:])
  pairs = [a for _, _, a in resolve_factored_axes(params, None, min_dim_size_to_factor=1)]
  ref = NumpyAdafactor(pairs, param_scale=False)
  step = jax.jit(tx.update)
  for g in grads:
    u, state = step(g, state, params)
    for a, b in zip(jax.tree.leaves(u), ref.step(jax.tree.leaves(g), jax.tree.leaves(params))):
      _close(a, b)
  assert int(_core(state).count) == offset + STEPS


def test_rules_with_semantic_axes_match_numpy():
  """A Rules spec with ("fan_in", "fan_out") resolved per layer from linen/NNX-style paths."""
  shapes = {"params": {"Dense_0": {"kernel": (12, 10), "bias": (10,)},
                       "attn": {"query": {"kernel": (10, 2, 5)}, "out": {"kernel": (2, 5, 10)}},
                       "LayerNorm_0": {"scale": (10,)}}}
  rules = rules_lib.Rules([
      (r"query/kernel$", "query", ("fan_in", "head_dim")),
      (r"attn/out/kernel$", "attn_out", ("head_dim", "fan_out")),
      (r"Dense_\d+/kernel$", "dense", ("fan_in", "fan_out")),
      (r"(bias|scale)$", "bias", ()),
  ])
  params = _tree(shapes, 3, scale=0.1)
  resolved = {p: a for p, _, a in resolve_factored_axes(params, rules, min_dim_size_to_factor=1)}
  assert resolved == {"params/Dense_0/kernel": (0, 1), "params/Dense_0/bias": None,
                      "params/attn/query/kernel": (0, 2), "params/attn/out/kernel": (1, 2),
                      "params/LayerNorm_0/scale": None}
  # The "fan" preset gives the same pairs for these layers.
  fan = {p: a for p, _, a in resolve_factored_axes(params, "fan", min_dim_size_to_factor=1)}
  assert fan == resolved
  tx = scale_by_adafactor(factored_axes=rules, min_dim_size_to_factor=1, b1=0.9)
  ref = NumpyAdafactor([resolved[p] for p, _ in tree_lib.named_leaves(params)], b1=0.9)
  _run_lockstep(tx, params, _grad_seq(shapes, seed=90), ref)


def test_spec_forms_resolve_alike():
  shapes = {"params": {"Embed_0": {"embedding": (50, 16)}, "Conv_0": {"kernel": (3, 3, 4, 8)},
                       "Dense_0": {"kernel": (16, 40), "bias": (40,)}}}
  params = _tree(shapes, 4)
  expected = {"params/Conv_0/kernel": (2, 3), "params/Dense_0/bias": None,
              "params/Dense_0/kernel": (0, 1), "params/Embed_0/embedding": (0, 1)}
  tree_spec = {"params": {"Embed_0": {"embedding": (0, 1)}, "Conv_0": {"kernel": (-2, -1)},
                          "Dense_0": {"kernel": (0, 1), "bias": None}}}
  flat = {"params/Embed_0/embedding": [0, 1], "params/Conv_0/kernel": [2, 3],
          "params/Dense_0/kernel": [0, 1], "params/Dense_0/bias": None}
  for spec in ("fan", "last_two", tree_spec, lambda p: tree_spec, flat, lambda p: "fan"):
    got = {p: a for p, _, a in resolve_factored_axes(params, spec, min_dim_size_to_factor=1)}
    assert got == expected, spec
  largest = {p: a for p, _, a in resolve_factored_axes(params, None, min_dim_size_to_factor=1)}
  assert largest["params/Embed_0/embedding"] == (1, 0)  # optax: row = 2nd largest
  assert largest["params/Conv_0/kernel"] == (2, 3)
  # min_dim_size_to_factor applies to every form.
  got = {p: a for p, _, a in resolve_factored_axes(params, tree_spec, min_dim_size_to_factor=5)}
  assert got["params/Conv_0/kernel"] is None and got["params/Embed_0/embedding"] == (0, 1)


def test_row_col_order_is_symmetric():
  """V = R C / 1^T R does not depend on which axis is called the row: same updates."""
  shapes = {"w": (9, 13)}
  params, grads = _tree(shapes, 5), _grad_seq(shapes, seed=5)
  out = []
  for pair in [(0, 1), (1, 0)]:
    tx = scale_by_adafactor(factored_axes={"w": pair}, min_dim_size_to_factor=1, b1=0.9)
    s = tx.init(params)
    step = jax.jit(tx.update)
    ups = []
    for g in grads:
      u, s = step(g, s, params)
      ups.append(u["w"])
    out.append((ups, s))
  for a, b in zip(out[0][0], out[1][0]):
    _close(a, b, rtol=1e-5)
  assert _core(out[0][1]).v_row["w"].shape == (9,) and _core(out[1][1]).v_row["w"].shape == (13,)


# --------------------------------------------------------------------------
# The factored estimate.
# --------------------------------------------------------------------------


def _v_hat(state, path_leaf_pair):
  (vr, vc), (r, c) = path_leaf_pair
  r_in_row = r - 1 if r > c else r
  return (np.expand_dims(vr / vr.mean(axis=r_in_row, keepdims=True), c)
          * np.expand_dims(vc, r))


def test_rank_one_second_moment_is_reproduced_exactly():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=7), rng.normal(size=11)
  a3, b3 = rng.normal(size=(4, 5)), rng.normal(size=(4, 6))  # one rank-1 slice per batch index
  params = {"w": jnp.zeros((7, 11)), "w3": jnp.zeros((5, 4, 6))}
  spec = {"w": (0, 1), "w3": (0, 2)}
  kw = dict(min_dim_size_to_factor=1, clipping_threshold=None, multiply_by_parameter_scale=False,
            eps1=0.0, decay_rate=0.9, decay_rate_fn=decay_rate_constant)
  fac = scale_by_adafactor(factored_axes=spec, **kw)
  full = scale_by_adafactor(factored_axes={"w": None, "w3": None}, **kw)
  sf, su = fac.init(params), full.init(params)
  fstep, ustep = jax.jit(fac.update), jax.jit(full.update)
  v_np = {"w": 0.0, "w3": 0.0}
  for k in range(STEPS):
    scale = 1.0 + 0.7 * np.cos(k)
    g = {"w": jnp.asarray(scale * np.outer(a, b), jnp.float32),
         "w3": jnp.asarray(scale * np.einsum("bi,bj->ibj", a3, b3), jnp.float32)}
    uf, sf = fstep(g, sf, params)
    uu, su = ustep(g, su, params)
    for name in ("w", "w3"):
      # Adam-style EMA of g^2 in float64: the quantity the factored estimate approximates.
      v_np[name] = 0.9 * v_np[name] + 0.1 * np.asarray(g[name], np.float64) ** 2
      cf = _core(sf)
      est = _v_hat(cf, ((np.asarray(cf.v_row[name]), np.asarray(cf.v_col[name])), spec[name]))
      _close(est, v_np[name], rtol=2e-5, atol=1e-12)
      _close(_core(su).v[name], v_np[name], rtol=2e-5, atol=1e-12)
      _close(uf[name], uu[name], rtol=2e-5, atol=1e-7)


def test_closed_form_is_the_i_divergence_minimiser():
  """One step (beta2_1 = 0): V_hat = R C / sum(R) of V = g^2; keeps V's row/column sums."""
  rng = np.random.default_rng(7)
  g = rng.normal(size=(6, 9))
  tx = scale_by_adafactor(factored_axes={"w": (0, 1)}, min_dim_size_to_factor=1, eps1=0.0,
                          clipping_threshold=None, multiply_by_parameter_scale=False)
  s = tx.init({"w": jnp.zeros((6, 9))})
  _, s = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, s)
  s = _core(s)
  est = _v_hat(s, ((np.asarray(s.v_row["w"], np.float64), np.asarray(s.v_col["w"], np.float64)),
                   (0, 1)))
  v = g.astype(np.float32).astype(np.float64) ** 2
  r_sum, c_sum = v.sum(1), v.sum(0)
  _close(est, np.outer(r_sum, c_sum) / r_sum.sum(), rtol=1e-5)
  _close(est.sum(1), r_sum, rtol=1e-5)
  _close(est.sum(0), c_sum, rtol=1e-5)

  def idiv(approx):
    return np.sum(v * np.log(v / approx) - v + approx)

  best = idiv(est)
  for _ in range(20):
    r2 = r_sum * np.exp(0.1 * rng.normal(size=6))
    c2 = c_sum * np.exp(0.1 * rng.normal(size=9))
    assert idiv(np.outer(r2, c2) / r_sum.sum()) >= best - 1e-9


def test_memory_rows_plus_cols():
  shapes = {"w": (300, 200), "w3": (4, 256, 128), "small": (100, 3), "bias": (200,)}
  params = _tree(shapes, 8)
  full_state = scale_by_adafactor().init(params)
  state = _core(full_state)
  assert state.v_row["w"].size + state.v_col["w"].size == 300 + 200
  assert state.v_row["w3"].size + state.v_col["w3"].size == 4 * (256 + 128)
  assert state.v["w"] is None and state.v["w3"] is None
  assert state.v["small"].size == 300 and state.v["bias"].size == 200
  kept = sum(x.size for x in jax.tree.leaves((state.v_row, state.v_col, state.v)))
  assert kept == 500 + 4 * 384 + 300 + 200
  assert second_moment_entries(params) == (kept, sum(math.prod(s) for s in shapes.values()))
  assert _momentum(full_state) is None
  with_momentum = _momentum(scale_by_adafactor(b1=0.9).init(params))
  assert sum(x.size for x in jax.tree.leaves(with_momentum)) == second_moment_entries(params)[1]


# --------------------------------------------------------------------------
# The chain: the factored core, then optax's transforms.
# --------------------------------------------------------------------------

GOLDEN_SHAPES = {"w": (12, 10), "k3": (3, 8, 6), "b": (10,)}
# Recorded from a single-transform implementation of the same algorithm (every
# piece fused in one update_fn): per leaf, after 20 jitted steps at lr 0.05,
# (sum |u_20|, u_20.flat[0], sum |x_20 - x_0|).
GOLDEN = {
    "clip+param_scale": (dict(min_dim_size_to_factor=1), {
        "w": (51.84121, 0.3972974, 9.707936), "k3": (52.43264, 0.2801978, 10.23939),
        "b": (2.987513, 0.3004959, 0.7902529)}),
    "momentum+relative_step": (dict(min_dim_size_to_factor=1, b1=0.9, relative_step=True,
                                    clipping_threshold=0.5, factored_axes="last_two"), {
        "w": (0.05517192, 0.0002668452, 0.03729073), "k3": (0.0607242, 0.0003561428, 0.0371512),
        "b": (0.003909613, -0.0001676334, 0.002840638)}),
    "momentum,constant_decay": (dict(min_dim_size_to_factor=1, b1=0.8,
                                     multiply_by_parameter_scale=False, decay_rate=0.95,
                                     decay_rate_fn=decay_rate_constant, eps1=1e-20), {
        "w": (27.77281, 0.1281342, 18.5038), "k3": (36.1694, 0.2511264, 21.15838),
        "b": (2.895663, 0.1581551, 2.19948)}),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_chain_gives_the_fused_transforms_numbers(name):
  cfg, expected = GOLDEN[name]
  tx = scale_by_adafactor(**cfg)
  p0 = params = _tree(GOLDEN_SHAPES, 1, scale=0.5)
  state, step = tx.init(params), jax.jit(tx.update)
  for k in range(STEPS):
    u, state = step(_tree(GOLDEN_SHAPES, 50 + k, scale=1.0 + 0.5 * np.sin(k)), state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda x: -0.05 * x, u))
  for leaf, (abs_sum, first, moved) in expected.items():
    got = (np.sum(np.abs(np.asarray(u[leaf], np.float64))), np.asarray(u[leaf]).flat[0],
           np.sum(np.abs(np.asarray(params[leaf], np.float64) - np.asarray(p0[leaf], np.float64))))
    _close(got, (abs_sum, first, moved), rtol=2e-5)


def _optax_chain(cfg):
  """`scale_by_adafactor(**cfg)` written out: the core, then optax's own transforms."""
  core = scale_by_factored_second_moment(
      cfg.get("decay_rate", 0.8), factored_axes=cfg.get("factored_axes"), min_dim_size_to_factor=1)
  extras = []
  if cfg.get("clipping_threshold", 1.0) is not None:
    extras.append(optax.clip_by_block_rms(cfg.get("clipping_threshold", 1.0)))
  if cfg.get("relative_step"):
    extras.append(optax.scale_by_schedule(lambda count: jnp.minimum(1e-2, 1 / jnp.sqrt(count + 1))))
  if cfg.get("multiply_by_parameter_scale", True):
    extras.append(optax.scale_by_param_block_rms(min_scale=cfg.get("eps2", 1e-3)))
  if cfg.get("b1") is not None:
    extras.append(optax.ema(cfg["b1"], debias=False))
  return optax.chain(core, *extras)


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(b1=0.9, relative_step=True, clipping_threshold=0.3, eps2=0.05),
    dict(factored_axes="last_two", multiply_by_parameter_scale=False, clipping_threshold=None,
         b1=0.5),
])
def test_scale_by_adafactor_is_the_core_chained_with_optax_transforms(cfg):
  tx, ref = scale_by_adafactor(min_dim_size_to_factor=1, **cfg), _optax_chain(cfg)
  params = _tree(GOLDEN_SHAPES, 2, scale=0.05)
  s, rs = tx.init(params), ref.init(params)
  assert jax.tree.structure(s) == jax.tree.structure(rs)
  step, rstep = jax.jit(tx.update), jax.jit(ref.update)
  for g in _grad_seq(GOLDEN_SHAPES, seed=30):
    u, s = step(g, s, params)
    ru, rs = rstep(g, rs, params)
    jax.tree.map(lambda a, b: _close(a, b, rtol=1e-6, atol=0.0), u, ru)
    params = optax.apply_updates(params, jax.tree.map(lambda x: -0.05 * x, u))


def test_each_extra_is_the_papers_formula():
  """Each optax transform chained after the core computes the paper's equation, per leaf."""
  rng = np.random.default_rng(11)
  rms = lambda x: np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))
  u = {"big": jnp.asarray(3.0 * rng.normal(size=(5, 7)), jnp.float32),
       "small": jnp.asarray(0.1 * rng.normal(size=(4,)), jnp.float32)}
  # Update clipping (§6): U / max(1, RMS(U) / d), per leaf.
  for d in (0.5, 1.0, 10.0):
    got, _ = optax.clip_by_block_rms(d).update(u, optax.EmptyState())
    for k in u:
      _close(got[k], np.asarray(u[k], np.float64) / max(1.0, rms(u[k]) / d), rtol=1e-6)
  # Parameter scale (§8): U * max(eps2, RMS(X)), zero and tiny parameters included.
  params = {"big": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "small": jnp.full((4,), 1e-5)}
  for eps2, p in ((1e-3, params), (1e-3, jax.tree.map(jnp.zeros_like, params)), (0.5, params)):
    got, _ = optax.scale_by_param_block_rms(eps2).update(u, optax.EmptyState(), p)
    for k in u:
      _close(got[k], np.asarray(u[k], np.float64) * max(eps2, rms(p[k])), rtol=1e-6)
  # Relative step (§8): rho_t = min(1e-2, 1/sqrt(t)) at step t = 1, 2, ... (count 0, 1, ...).
  tx = optax.scale_by_schedule(relative_step_size)
  s = tx.init(u)
  for t in (1, 2, 100, 10_000, 10_001, 40_000):
    s = optax.ScaleByScheduleState(count=jnp.asarray(t - 1, jnp.int32))
    got, s = tx.update(u, s)
    assert int(s.count) == t
    _close(got["big"], np.asarray(u["big"], np.float64) * min(1e-2, 1 / np.sqrt(t)), rtol=1e-6)
  # Momentum (§§7, 9): M_t = b1 M_{t-1} + (1 - b1) U_t, no bias correction.
  tx, m = optax.ema(0.9, debias=False), {k: np.zeros(np.shape(v)) for k, v in u.items()}
  s = tx.init(u)
  for k in range(3):
    uk = jax.tree.map(lambda x, k=k: x * (1.0 + k), u)
    got, s = tx.update(uk, s)
    for key in u:
      m[key] = 0.9 * m[key] + 0.1 * np.asarray(uk[key], np.float64)
      _close(got[key], m[key], rtol=1e-6)
      _close(s.ema[key], m[key], rtol=1e-6)


def test_state_is_a_chain_with_the_core_first():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  names = lambda tx: [type(s).__name__ for s in tx.init(params)]
  assert names(scale_by_adafactor(clipping_threshold=None, multiply_by_parameter_scale=False)) == [
      "ScaleByAdafactorState"]
  assert names(scale_by_adafactor(b1=0.9, relative_step=True)) == [
      "ScaleByAdafactorState", "EmptyState", "ScaleByScheduleState", "EmptyState", "EmaState"]
  assert isinstance(_core(scale_by_adafactor().init(params)), slimoptax.ScaleByAdafactorState)
  ema = _momentum(scale_by_adafactor(b1=0.9, mu_dtype=jnp.bfloat16).init(params))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ema))


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------


def test_bad_inputs_name_the_parameter():
  params = {"enc": {"kernel": jnp.ones((4, 4)), "steps": jnp.zeros((2,), jnp.int32)}}
  with pytest.raises(ValueError, match="'enc/steps'"):
    scale_by_adafactor().init(params)
  params = {"enc": {"kernel": jnp.ones((4, 6)), "bias": jnp.ones(6)}}
  with pytest.raises(ValueError, match="factored_axes.*enc/bias"):
    scale_by_adafactor(factored_axes={"enc": {"kernel": (0, 1)}}).init(params)
  with pytest.raises(ValueError, match="'enc/kernel'.*same axis"):
    scale_by_adafactor(factored_axes={"enc": {"kernel": (1, -1), "bias": None}}).init(params)
  with pytest.raises(ValueError, match="'enc/kernel'.*expected a \\(row_axis, col_axis\\)"):
    scale_by_adafactor(factored_axes={"enc": {"kernel": (0,), "bias": None}}).init(params)
  with pytest.raises(ValueError, match="'enc/kernel'.*out of range"):
    scale_by_adafactor(factored_axes={"enc": {"kernel": (0, 2), "bias": None}}).init(params)
  attn = {"attn": {"out": {"kernel": jnp.ones((2, 3, 8))}}}
  bad_rules = rules_lib.Rules([(r"out/kernel$", "attn_out", ("fan_in", "fan_out"))])
  with pytest.raises(ValueError, match="'attn/out/kernel'.*spans axes \\(0, 1\\)"):
    scale_by_adafactor(factored_axes=bad_rules, min_dim_size_to_factor=1).init(attn)
  one_axis = rules_lib.Rules([(r"kernel$", "dense", ("fan_in",))])
  with pytest.raises(ValueError, match="exactly two axes"):
    resolve_factored_axes({"k": {"kernel": jnp.ones((3, 3))}}, one_axis)
  with pytest.raises(ValueError, match="no rule"):
    resolve_factored_axes({"x": jnp.ones((3, 3))}, rules_lib.Rules([(r"^y$", "dense", (0, 1))]))
  with pytest.raises(ValueError, match="unknown factored_axes preset"):
    resolve_factored_axes(params, "rows")
  with pytest.raises(ValueError, match="unknown factored_axes preset 'slimadam'"):
    resolve_factored_axes(params, "slimadam")  # SlimAdam's presets give no (row, col) pairs
  # A state made with other factored axes.
  tx_a = scale_by_adafactor(factored_axes={"enc": {"kernel": (0, 1), "bias": None}},
                            min_dim_size_to_factor=1)
  tx_b = scale_by_adafactor(factored_axes={"enc": {"kernel": (1, 0), "bias": None}},
                            min_dim_size_to_factor=1)
  with pytest.raises(ValueError, match="state.v_row of 'enc/kernel'"):
    tx_b.update(params, tx_a.init(params), params)
  with pytest.raises(ValueError, match="needs `params`"):
    scale_by_adafactor().update(params, scale_by_adafactor().init(params))
  with pytest.raises(ValueError, match="`params` does not match.*'enc/bias'"):
    scale_by_adafactor().update(params, scale_by_adafactor().init(params),
                                {"enc": {"kernel": params["enc"]["kernel"]}})


def test_exported():
  assert slimoptax.scale_by_adafactor is scale_by_adafactor
  assert slimoptax.resolve_factored_axes is resolve_factored_axes
  assert isinstance(slimoptax.factored_rules(), slimoptax.Rules)
