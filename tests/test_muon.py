"""Newton–Schulz orthogonalization and Muon: numpy SVD, optax.contrib.muon, FLOPs, training."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slimoptax
from slimoptax import _muon as orth
from slimoptax._muon import MuonDimensionNumbers as MDN
from tests.models import NNXGPT, LinenCNN

A, B, C = orth.QUINTIC_COEFFS


def _randn(seed, *shape):
  """Test data from numpy (eager jax.random costs a compilation per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _lm_batch(t, vocab=32, batch=8, seq=8):
  """tests.models.lm_batch's toy language (next token = token + 1 mod vocab), from numpy."""
  start = np.random.default_rng(t).integers(0, vocab, (batch, 1))
  tokens = (start + np.arange(seq + 1)[None, :]) % vocab
  return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])


def _poly5(s, steps=5):
  """The scalar map the quintic iteration applies to each (normalized) singular value."""
  for _ in range(steps):
    s = A * s + B * s ** 3 + C * s ** 5
  return s


def _controlled(shape, lo, seed):
  """A random matrix with random singular vectors and singular values log-uniform in [lo, 1]."""
  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.exp(rng.uniform(np.log(lo), 0.0, k))
  return (u * s) @ v.T


def _svd_check(x, y):
  """``y`` must be U f(S/||S||) V^T for x = U S V^T; returns y's singular values."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  expected = (u * _poly5(s / np.linalg.norm(s))) @ vt
  np.testing.assert_allclose(y, expected, atol=2e-4)
  return np.linalg.svd(y, compute_uv=False)


# --------------------------------------------------------------------------
# The iteration.
# --------------------------------------------------------------------------


def test_quintic_band_of_the_scalar_map():
  # Five quintic steps send every normalized singular value in [0.01, 1] into about
  # [0.68, 1.13]; values in [0.002, 0.01] overshoot to <= 1.21; smaller ones stay small.
  s = np.logspace(-2, 0, 100_001)
  out = _poly5(s)
  assert 0.68 < out.min() < 0.683 and 1.13 < out.max() < 1.135
  out_lo = _poly5(np.logspace(np.log10(2e-3), 0, 100_001))
  assert out_lo.min() > 0.68 and out_lo.max() < 1.21


LEAVES = {
    # path -> (shape, how the default dims view it as a matrix)
    "square": (("mlp", "up", "kernel"), (48, 48)),
    "wide": (("mlp", "gate", "kernel"), (32, 96)),
    "tall": (("mlp", "down", "kernel"), (128, 48)),
    "query": (("attn", "query", "kernel"), (32, 4, 16)),  # (d, H, hd) -> (32, 64)
    "attn_out": (("attn", "out", "kernel"), (4, 16, 24)),  # (H, hd, d) -> (64, 24)
    "conv": (("conv_0", "kernel"), (3, 3, 4, 16)),        # (h, w, in, out) -> (36, 16)
}


def _nest(items):
  tree = {}
  for path, leaf in items:
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_five_quintic_steps_singular_values_in_band(name):
  path, shape = LEAVES[name]
  rows = math.prod(shape[:-1]) if name != "query" else shape[0]
  cols = shape[-1] if name != "query" else shape[1] * shape[2]
  if name == "square":
    # Square Gaussian matrices have near-zero singular values that 5 steps cannot lift
    # (see test_square_gaussian_small_singular_values); use a spectrum in [0.05, 1].
    mat = _controlled((rows, cols), 0.05, seed=0)
  else:
    mat = np.random.default_rng(len(name)).standard_normal((rows, cols))
  x = jnp.asarray(mat.reshape(shape), jnp.float32)
  grads = _nest([(path, x), (("attn", "query", "bias"), jnp.ones((4, 16)))])
  tx = slimoptax.orthogonalize()
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  y = np.asarray(_get(out, path)).reshape(rows, cols)
  sv = _svd_check(mat, y)
  assert sv.min() >= 0.675 and sv.max() <= 1.14, (sv.min(), sv.max())


def test_square_gaussian_small_singular_values():
  x = np.random.default_rng(1).standard_normal((64, 64))
  y = orth.newton_schulz(jnp.asarray(x, jnp.float32))
  _svd_check(x, y)  # exactly U f(S / ||S||) V^T, whatever the spectrum
  s = np.linalg.svd(x, compute_uv=False)
  s_norm = s / np.linalg.norm(s)
  mapped = _poly5(s_norm)
  # Normalized singular values >= 0.01 land in the band; a square Gaussian matrix also has
  # tiny ones (~1/n^1.5) that five steps cannot lift to ~1.
  big = s_norm >= 0.01
  assert mapped[big].min() >= 0.68 and mapped[big].max() <= 1.135
  assert mapped.max() <= 1.21 and mapped.min() < 0.68


@pytest.mark.parametrize("shape,lo", [((48, 16), None), ((16, 48), None), ((32, 32), 0.05)])
def test_cubic_iteration_converges_to_polar_factor(shape, lo):
  if lo is None:
    x = np.random.default_rng(3).standard_normal(shape)
  else:
    x = _controlled(shape, lo, seed=1)
  u, _, vt = np.linalg.svd(x, full_matrices=False)
  polar = u @ vt
  y = np.asarray(orth.newton_schulz(jnp.asarray(x, jnp.float32), 30, orth.CUBIC_COEFFS))
  np.testing.assert_allclose(y, polar, atol=2e-5)
  y_named = np.asarray(orth.newton_schulz(jnp.asarray(x, jnp.float32), 30, "cubic"))
  np.testing.assert_array_equal(y, y_named)
  # The quintic iteration is faster but does not converge to U V^T.
  y5 = np.asarray(orth.newton_schulz(jnp.asarray(x, jnp.float32)))
  assert np.abs(y5 - polar).max() > 0.05


def test_per_step_coefficients_and_validation():
  x = _randn(0, 8, 12)
  same = orth.newton_schulz(x, 3, [orth.QUINTIC_COEFFS] * 3)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(orth.newton_schulz(x, 3)))
  with pytest.raises(ValueError, match="per-step"):
    orth.newton_schulz(x, 5, [orth.QUINTIC_COEFFS] * 3)
  with pytest.raises(ValueError, match="unknown ns_coeffs"):
    slimoptax.orthogonalize(ns_coeffs="septic")


# --------------------------------------------------------------------------
# Matrix views from the label machinery.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt():
  """(graphdef, params) of the tiny NNX GPT of tests/models.py (built once per module)."""
  graphdef, params = nnx.split(NNXGPT(rngs=nnx.Rngs(0)), nnx.Param)
  return graphdef, nnx.as_pure(params)


def test_default_dims_from_layer_types(gpt):
  # (named_leaves would flatten the NamedTuple specs, so pair them with the params' paths.)
  params = gpt[1]
  specs = jax.tree.leaves(orth.matrix_dims(params), is_leaf=lambda x: x is None or isinstance(x, MDN))
  table = {p: s for (p, _), s in zip(slimoptax._tree.named_leaves(params), specs)}
  assert table["blocks/0/attn/query/kernel"] == MDN((0,), (1, 2))
  assert table["blocks/0/attn/value/kernel"] == MDN((0,), (1, 2))
  assert table["blocks/0/attn/out/kernel"] == MDN((0, 1), (2,))
  assert table["blocks/1/mlp/up/kernel"] == MDN((0,), (1,))
  assert table["blocks/1/mlp/down/kernel"] == MDN((0,), (1,))
  for excluded in ("wte/embedding", "wpe/embedding", "lm_head/kernel", "ln_f/scale",
                   "blocks/0/ln_1/scale"):
    assert table[excluded] is None, excluded
  labels = dict(slimoptax._tree.named_leaves(orth.muon_labels(params)))
  assert labels["lm_head/kernel"] == "adam" and labels["blocks/0/mlp/up/kernel"] == "muon"
  # Conv kernels: (h, w, in, out) -> rows (h, w, in), columns out; BatchNorm excluded.
  # (LinenCNN's parameter shapes, without paying for its initialization.)
  cnn = jax.eval_shape(lambda: LinenCNN().init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3))))
  cdims = orth.matrix_dims(cnn["params"])
  assert cdims["conv_0"]["kernel"] == MDN((0, 1, 2), (3,))
  assert cdims["bn_0"]["scale"] is None and cdims["head"]["kernel"] is None
  assert cdims["conv_0"]["bias"] is None


_ns = jax.jit(orth.newton_schulz, static_argnums=(1, 2))


def test_per_head_orthogonalization():
  d, h, hd = 16, 4, 8
  q = _randn(0, d, h, hd)
  o = _randn(1, h, hd, d)
  grads = {"attn": {"query": {"kernel": q}, "out": {"kernel": o}}}
  tx = slimoptax.orthogonalize(per_head=True)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for i in range(h):
    np.testing.assert_allclose(out["attn"]["query"]["kernel"][:, i, :],
                               _ns(q[:, i, :]), atol=1e-6)
    np.testing.assert_allclose(out["attn"]["out"]["kernel"][i], _ns(o[i]), atol=1e-6)
  # 2-D (d, H*hd) kernels need num_heads and give the same result.
  flat = {"attn": {"query": {"kernel": q.reshape(d, h * hd)}}}
  with pytest.raises(ValueError, match="num_heads"):
    slimoptax.orthogonalize(per_head=True).update(flat, optax.EmptyState())
  out2, _ = slimoptax.orthogonalize(per_head=True, num_heads=h).update(flat, optax.EmptyState())
  np.testing.assert_allclose(out2["attn"]["query"]["kernel"].reshape(d, h, hd),
                             out["attn"]["query"]["kernel"], atol=1e-6)
  # Per-head Jordan scale uses the per-head matrix (d, hd): sqrt(max(1, 8/16)) = 1.
  assert orth.matrix_shape((d, h, hd), orth.default_dims("attn/query/kernel", (d, h, hd),
                                                         per_head=True)) == (h, d, hd)


def test_excluded_leaves_pass_through_bit_identically(gpt):
  params = gpt[1]
  grads = jax.tree.map(lambda p: _randn(p.size, *p.shape), params)
  tx = slimoptax.orthogonalize()
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  labels = dict(slimoptax._tree.named_leaves(orth.muon_labels(params)))
  g = dict(slimoptax._tree.named_leaves(grads))
  for path, u in slimoptax._tree.named_leaves(out):
    if labels[path] == "adam":
      assert np.asarray(u).tobytes() == np.asarray(g[path]).tobytes(), path
    else:
      assert not np.allclose(u, g[path]), path
  # Outside jit the very same array objects come back.
  small = {"wte": {"embedding": grads["wte"]["embedding"]}, "ln_f": {"scale": grads["ln_f"]["scale"]},
           "mlp": {"up": {"kernel": jnp.eye(3, 4)}}}
  out_eager, _ = tx.update(small, tx.init(small))
  assert out_eager["wte"]["embedding"] is small["wte"]["embedding"]
  assert out_eager["ln_f"]["scale"] is small["ln_f"]["scale"]


def test_dims_as_pytree_callable_and_errors():
  grads = {"a": jnp.ones((4, 6)) + jnp.eye(4, 6), "b": jnp.arange(3.0),
           "c": _randn(0, 2, 3, 5)}
  dims = {"a": MDN(1, 0), "b": None, "c": MDN(reduction_axis=1, output_axis=2)}
  out, _ = slimoptax.orthogonalize(dims=dims).update(grads, optax.EmptyState())
  np.testing.assert_allclose(out["a"], orth.newton_schulz(grads["a"].T).T, atol=1e-6)
  assert out["b"] is grads["b"]
  for i in range(2):  # axis 0 is a batch axis
    np.testing.assert_allclose(out["c"][i], orth.newton_schulz(grads["c"][i]), atol=1e-6)
  out_fn, _ = slimoptax.orthogonalize(dims=lambda t: dims).update(grads, optax.EmptyState())
  jax.tree.map(np.testing.assert_array_equal, out, out_fn)
  with pytest.raises(ValueError, match="overlap"):
    slimoptax.orthogonalize(dims={**dims, "a": MDN(0, 0)}).update(grads, optax.EmptyState())
  with pytest.raises(ValueError, match="does not match"):
    slimoptax.orthogonalize(dims={"a": MDN()}).update(grads, optax.EmptyState())
  with pytest.raises(ValueError, match="dims"):
    orth.matrix_dims({"mystery": jnp.ones((3, 3))})


def test_lowers_under_jit_from_abstract_shapes(gpt):
  # Only static shapes are inspected: lowering from ShapeDtypeStructs works (no host round trips).
  params = gpt[1]
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  tx = slimoptax.muon(0.02, adam_compress="slimadam")
  state = jax.eval_shape(tx.init, abstract)
  lowered = jax.jit(tx.update).lower(abstract, state, abstract)
  assert "callback" not in lowered.as_text()
  # The fallback is SlimAdam: one second moment per token for the embeddings and LM head.
  slim = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, slimoptax.ScaleBySlimAdamState))
          if isinstance(x, slimoptax.ScaleBySlimAdamState)][0]
  assert slim.nu["wte"]["embedding"].shape == (32, 1)
  assert slim.nu["lm_head"]["kernel"].shape == (1, 32)
  assert slim.nu["ln_f"]["scale"].shape == (16,)


def test_muon_routes_by_user_dims():
  params = {"Dense_0": {"kernel": _randn(0, 4, 6), "bias": jnp.zeros(6)},
            "lm_head": {"kernel": _randn(1, 6, 5)}}
  dims = {"Dense_0": {"kernel": MDN(), "bias": None}, "lm_head": {"kernel": MDN()}}
  assert orth.muon_labels(params, dims) == {"Dense_0": {"kernel": "muon", "bias": "adam"},
                                            "lm_head": {"kernel": "muon"}}
  assert orth.muon_labels(params)["lm_head"]["kernel"] == "adam"  # the default excludes heads
  tx = slimoptax.muon(1.0, dims=dims, rms_scale="none")
  g = jax.tree.map(lambda p: _randn(7 + p.size, *p.shape), params)
  u, _ = jax.jit(tx.update)(g, tx.init(params), params)
  for path in ("Dense_0", "lm_head"):  # -lr * NS(m): orthogonalized (5 quintic steps)
    sv = np.linalg.svd(-np.asarray(u[path]["kernel"]), compute_uv=False)
    assert sv.min() > 0.6 and sv.max() < 1.25, (path, sv)
  # The bias got AdamW's first step: -lr * sign(g) (up to eps).
  np.testing.assert_allclose(u["Dense_0"]["bias"], -np.sign(g["Dense_0"]["bias"]), atol=1e-6)


# --------------------------------------------------------------------------
# Against optax.contrib.muon.
# --------------------------------------------------------------------------


def _run(tx, params, steps, seed=10):
  """``steps`` jitted updates with random gradients (the same for every optimizer)."""

  @jax.jit
  def step(params, state, g):
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  state = tx.init(params)
  for t in range(steps):
    g = jax.tree.map(lambda p: _randn(seed + 100 * t + p.size, *p.shape), params)
    params, state = step(params, state, g)
  return params


def _assert_trees_close(x, y, atol):
  for (path, a), (_, b) in zip(slimoptax._tree.named_leaves(x), slimoptax._tree.named_leaves(y)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0, err_msg=path)


@pytest.mark.parametrize("nesterov,rms_scale,consistent_rms",
                         [(True, "jordan", None), (False, "moonlight", 0.2)])
def test_muon_matches_optax_on_2d_params(nesterov, rms_scale, consistent_rms):
  params = {"Dense_0": {"kernel": _randn(0, 16, 48),
                        "bias": jnp.zeros(48)},
            "Dense_1": {"kernel": _randn(1, 48, 8)},
            "scale": jnp.ones(())}
  ours = slimoptax.muon(0.02, 0.9, 0.01, nesterov=nesterov, bias_correction=True, eps=1e-8,
                        rms_scale=rms_scale, adam_b2=0.999, adam_weight_decay=0.0,
                        adam_nesterov=nesterov)
  ref = optax.contrib.muon(0.02, beta=0.9, eps=1e-8, weight_decay=0.01, nesterov=nesterov,
                           consistent_rms=consistent_rms)
  _assert_trees_close(_run(ours, params, 4), _run(ref, params, 4), atol=2e-6)


def test_muon_matches_optax_on_3d_attention_kernels():
  params = {"attn": {"query": {"kernel": _randn(0, 16, 4, 8)},
                     "out": {"kernel": _randn(1, 4, 8, 16)}},
            "ln": {"scale": jnp.ones(16)}}
  specs = {"attn": {"query": {"kernel": MDN(0, (1, 2))}, "out": {"kernel": MDN((0, 1), 2)}},
           "ln": {"scale": None}}
  ours = slimoptax.muon(0.02, bias_correction=True, eps=1e-8, adam_b2=0.999,
                        adam_weight_decay=0.0, adam_nesterov=True)
  ref = optax.contrib.muon(0.02, eps=1e-8, muon_weight_dimension_numbers=specs)
  _assert_trees_close(_run(ours, params, 3), _run(ref, params, 3), atol=2e-6)
  # Per-head view vs optax with the heads as a batch axis.
  specs_ph = {"attn": {"query": {"kernel": MDN(0, 2)}, "out": {"kernel": MDN(1, 2)}},
              "ln": {"scale": None}}
  ours_ph = slimoptax.muon(0.02, bias_correction=True, eps=1e-8, per_head=True, adam_b2=0.999,
                           adam_weight_decay=0.0, adam_nesterov=True)
  ref_ph = optax.contrib.muon(0.02, eps=1e-8, muon_weight_dimension_numbers=specs_ph)
  _assert_trees_close(_run(ours_ph, params, 3), _run(ref_ph, params, 3), atol=2e-6)


def test_default_momentum_is_scale_free_of_bias_correction():
  # Without Nesterov, bias correction only rescales m, which Newton–Schulz normalizes away.
  params = {"Dense_0": {"kernel": _randn(0, 12, 20)}}
  a = _run(slimoptax.muon(0.02, nesterov=False), params, 4)
  b = _run(slimoptax.muon(0.02, nesterov=False, bias_correction=True), params, 4)
  _assert_trees_close(a, b, atol=1e-6)


def test_rms_scales():
  assert orth.rms_scale_factor(16, 64, "jordan") == 2.0
  assert orth.rms_scale_factor(64, 16, "jordan") == 1.0
  assert orth.rms_scale_factor(64, 16, "moonlight") == pytest.approx(0.2 * 8)
  # Moonlight: an orthogonalized update gets RMS 0.2 whatever its shape.
  for shape in [(16, 64), (64, 16), (32, 32)]:
    x = jnp.asarray(_controlled(shape, 0.3, seed=2), jnp.float32)
    o = orth.newton_schulz(x, 30, "cubic")
    u, _ = slimoptax.scale_by_matrix_shape("moonlight", dims=MDN()).update(o, optax.EmptyState())
    assert float(jnp.sqrt(jnp.mean(u ** 2))) == pytest.approx(0.2, rel=1e-4)


# --------------------------------------------------------------------------
# FLOPs.
# --------------------------------------------------------------------------


def _dot_flops(fn, *args):
  """Counts 2 * (output size) * (contracted size) over the dot_generals of fn's jaxpr."""
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        contracted = math.prod(lhs[i] for i in lhs_contract)
        total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return total


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (96, 40)])
def test_newton_schulz_flops_match_slides(shape):
  n, m = max(shape), min(shape)
  slides = 2 * (2 * n * m ** 2 + m ** 3)  # per step, the slides' formula
  x = jnp.ones(shape, jnp.float32)
  one = _dot_flops(lambda x: orth.newton_schulz(x, 1), x)
  assert one == slides == orth.newton_schulz_flops(*shape, 1)
  assert _dot_flops(lambda x: orth.newton_schulz(x, 5), x) == 5 * slides
  # Cubic steps skip A @ A.
  assert _dot_flops(lambda x: orth.newton_schulz(x, 1, "cubic"), x) == 4 * n * m ** 2
  assert orth.newton_schulz_flops(*shape, 1, "cubic") == 4 * n * m ** 2
  # Overhead vs 6 n m B: at most T m / B, equal for square matrices.
  batch = 524_288
  overhead = orth.muon_flop_overhead(*shape, batch, 5)
  assert overhead <= 5 * m / batch + 1e-15
  if n == m:
    assert overhead == pytest.approx(5 * m / batch)


def test_flop_overhead_examples_of_the_slides():
  nanogpt = orth.muon_flop_overhead(768, 768, 524_288, 5)
  llama = orth.muon_flop_overhead(16384, 16384, 16_000_000, 5)
  assert nanogpt == pytest.approx(5 * 768 / 524_288) and round(100 * nanogpt, 1) == 0.7
  assert llama == pytest.approx(5 * 16384 / 16e6) and round(100 * llama, 1) == 0.5


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def test_muon_trains_nnx_gpt():
  graphdef, params = nnx.split(NNXGPT(layers=1, rngs=nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params)
  tx = slimoptax.muon(0.02, adam_learning_rate=3e-3)
  state = tx.init(params)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for t in range(30):
    params, state, loss = step(params, state, *_lm_batch(t))
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_muon_moonlight_slimadam_with_nnx_optimizer():
  # Moonlight scaling shares one learning rate with the SlimAdam fallback.
  model = NNXGPT(layers=1, rngs=nnx.Rngs(1))
  tx = slimoptax.muon(1e-2, rms_scale="moonlight", weight_decay=0.1, adam_compress="slimadam")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, *_lm_batch(t))) for t in range(30)]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


# --------------------------------------------------------------------------
# One resolver: rules classify paths; optax.contrib's pieces.
# --------------------------------------------------------------------------


def test_rules_classify_unknown_paths():
  params = {"mystery": _randn(0, 6, 10), "probe": _randn(1, 6, 3), "ln": {"scale": jnp.ones(6)}}
  with pytest.raises(ValueError, match="mystery"):
    orth.matrix_dims(params)
  rules = slimoptax.Rules([(r"mystery$", "mlp_up", ()), (r"probe$", "head", ())]) + slimoptax.preset("adam")
  assert orth.matrix_dims(params, rules) == {"mystery": MDN((0,), (1,)), "probe": None,
                                             "ln": {"scale": None}}
  assert orth.muon_labels(params, rules) == {"mystery": "muon", "probe": "adam",
                                             "ln": {"scale": "adam"}}
  out, _ = slimoptax.orthogonalize(dims=rules).update(params, optax.EmptyState())
  np.testing.assert_allclose(out["mystery"], orth.newton_schulz(params["mystery"]), atol=1e-6)
  assert out["probe"] is params["probe"]
  # Under optax.partition (masked leaves) with a preset name and with a pytree of specs.
  for dims in (rules, {"mystery": MDN(), "probe": None, "ln": {"scale": None}}):
    tx = slimoptax.muon(0.02, dims=dims)
    u, _ = tx.update(params, tx.init(params), params)
    assert u["mystery"].shape == (6, 10) and bool(jnp.all(jnp.isfinite(u["probe"])))


def test_scale_by_muon_equals_optax_contrib_pieces():
  params = {"w": _randn(0, 12, 20)}
  ours = slimoptax.scale_by_muon(0.9, bias_correction=True, eps=1e-8)
  specs = {"w": MDN()}
  ref = optax.chain(optax.contrib.scale_by_muon(beta=0.9, eps=1e-8, weight_dimension_numbers=specs),
                    optax.contrib._muon.scale_by_shape(weight_dimension_numbers=specs))
  # Unit-size updates (no learning rate): Newton–Schulz differs from optax's by ~1e-6 a step.
  _assert_trees_close(_run(ours, params, 3), _run(ref, params, 3), atol=1e-5)
  assert isinstance(ours.init(params)[0], slimoptax.ScaleByMuonState)
