"""scale_by_slim_adam / slim_adamw against optax and a numpy re-implementation of eq. 2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import slimoptax
from slimoptax import _tree as tree_lib
from slimoptax import layers as layers_lib
from slimoptax import rules as rules_lib
from tests.models import NNXGPT, LinenCNN, LinenGPT, lm_batch

SHAPES = {"w": (5, 7), "t": (3, 4, 6), "b": (7,), "s": ()}


def _params(dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SHAPES))
  return {k: jax.random.normal(key, s, dtype) for key, (k, s) in zip(keys, SHAPES.items())}


def _grads(params, step):
  key = jax.random.PRNGKey(1000 + step)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  # Heavy-ish tails so per-entry second moments differ a lot.
  return jax.tree.unflatten(treedef, [jax.random.t(k, 3.0, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def _run(tx, params, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, _grads(params, t))
  return params, state


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("compress", [None, "adam", lambda p: jax.tree.map(lambda _: (), p)])
def test_no_compression_equals_optax_adamw(dtype, atol, compress):
  params = _params(dtype)
  mask = slimoptax.default_weight_decay_mask
  ours, _ = _run(slimoptax.slim_adamw(3e-2, compress=compress), params, 50)
  ref, _ = _run(optax.adamw(3e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask), params, 50)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(ours[k], np.float32), np.asarray(ref[k], np.float32),
                               atol=atol, rtol=atol, err_msg=k)


@pytest.mark.parametrize("nesterov", [False, True])
def test_float64_equals_optax_adamw(nesterov):
  """Under x64 the bias corrections are float64 too: float64 rounding, not float32 (~3e-6 at b2=0.999)."""
  with jax.enable_x64(True):
    params = _params(jnp.float64)
    mask = slimoptax.default_weight_decay_mask
    ours, _ = _run(slimoptax.slim_adamw(3e-2, b2=0.999, nesterov=nesterov), params, 50)
    ref, _ = _run(optax.adamw(3e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, mask=mask,
                              nesterov=nesterov), params, 50)
    for k in SHAPES:
      assert ours[k].dtype == jnp.float64, k
      np.testing.assert_allclose(ours[k], ref[k], atol=1e-13, rtol=1e-13, err_msg=k)


def test_scale_by_slim_adam_equals_scale_by_adam_with_nesterov():
  params = _params()
  ours, _ = _run(optax.chain(slimoptax.scale_by_slim_adam(0.8, 0.9, 1e-6, nesterov=True), optax.scale(-1e-2)),
                 params, 30)
  ref, _ = _run(optax.chain(optax.scale_by_adam(0.8, 0.9, 1e-6, nesterov=True), optax.scale(-1e-2)), params, 30)
  for k in SHAPES:
    np.testing.assert_allclose(ours[k], ref[k], atol=1e-6, rtol=1e-6)


def _numpy_slim_adam(params, grads_fn, axes, steps, lr, b1=0.9, b2=0.95, eps=1e-8):
  """Eq. 2 of Kalra et al. written out in float64 numpy."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {}
  for k, x in p.items():
    a = axes[k]
    if isinstance(a, layers_lib.Reshaped):
      v[k] = np.zeros(rules_lib.reduced_shape(x.shape, a))
    else:
      v[k] = np.zeros([1 if i in a else s for i, s in enumerate(x.shape)])
  for t in range(1, steps + 1):
    g = {k: np.asarray(x, np.float64) for k, x in grads_fn(t - 1).items()}
    for k in p:
      a = axes[k]
      gk = g[k]
      view = a.shape if isinstance(a, layers_lib.Reshaped) else gk.shape
      ax = a.axes if isinstance(a, layers_lib.Reshaped) else a
      sq = (gk.reshape(view) ** 2)
      if ax:
        sq = sq.mean(axis=ax, keepdims=True)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * sq
      m_hat = m[k] / (1 - b1 ** t)
      v_hat = v[k] / (1 - b2 ** t)
      u = (m_hat.reshape(view) / (np.sqrt(v_hat) + eps)).reshape(gk.shape)
      p[k] = p[k] - lr * u
  return p, v


@pytest.mark.parametrize("axes", [
    {"w": (0,), "t": (1, 2), "b": (0,), "s": ()},
    {"w": (1,), "t": (0,), "b": (), "s": ()},
    {"w": (0, 1), "t": (0, 1, 2), "b": (0,), "s": ()},
    {"w": (-1,), "t": layers_lib.Reshaped((3, 2, 2, 6), (0, 2)), "b": (), "s": ()},
])
def test_compressed_update_matches_numpy_eq2(axes):
  params = _params()
  tx = optax.chain(slimoptax.scale_by_slim_adam(compress=axes), optax.scale(-1e-2))
  ours, state = _run(tx, params, 25)
  norm_axes = {k: rules_lib.validate_axes(k, SHAPES[k], a) for k, a in axes.items()}
  ref, ref_v = _numpy_slim_adam(params, lambda t: _grads(params, t), norm_axes, 25, 1e-2)
  nu = state[0].nu
  for k in SHAPES:
    np.testing.assert_allclose(ours[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert nu[k].shape == ref_v[k].shape, k  # memory really shrinks
    np.testing.assert_allclose(nu[k], ref_v[k], rtol=1e-4, atol=1e-12)


def test_state_dtypes_and_shapes():
  params = _params(jnp.bfloat16)
  tx = slimoptax.scale_by_slim_adam(compress="adalayer", mu_dtype=jnp.float32, nu_dtype=jnp.float32)
  _, state = _run(tx, params, 3)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.nu))
  assert {k: v.shape for k, v in state.nu.items()} == {"w": (1, 1), "t": (1, 1, 1), "b": (1,), "s": ()}


# ---------------------------------------------------------------------------
# Flax training loops with every preset.
# ---------------------------------------------------------------------------


def _lm_loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("preset", slimoptax.PRESETS)
def test_nnx_loop_trains_with_every_preset(preset):
  model = NNXGPT(rngs=nnx.Rngs(0))
  tx = slimoptax.slim_adamw(1e-2, compress=preset, num_heads=2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: _lm_loss(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  x0, y0 = lm_batch(jax.random.PRNGKey(123))
  first = float(_lm_loss(model(x0), y0))
  for i in range(40):
    step(model, optimizer, *lm_batch(jax.random.PRNGKey(i)))
  last = float(_lm_loss(model(x0), y0))
  assert last < 0.6 * first, (preset, first, last)
  # The optimizer state holds exactly the second-moment entries the rules promise.
  params = nnx.state(model, nnx.Param)
  report = slimoptax.memory_report(optimizer.opt_state, params)
  axes = slimoptax.compression_axes(params, preset, num_heads=2)
  expected = sum(rules_lib.kept_entries(np.shape(p), a) for p, a in zip(
      jax.tree.leaves(params), tree_lib.leaves_like(params, axes, what="axes")))
  assert report.entries == expected


@pytest.mark.parametrize("preset", slimoptax.PRESETS)
def test_linen_loop_trains_with_every_preset(preset):
  model = LinenGPT()
  x0, y0 = lm_batch(jax.random.PRNGKey(123))
  params = model.init(jax.random.PRNGKey(0), x0)["params"]
  tx = slimoptax.slim_adamw(1e-2, compress=preset)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: _lm_loss(model.apply({"params": p}, x), y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  first = float(_lm_loss(model.apply({"params": params}, x0), y0))
  for i in range(40):
    params, state, _ = step(params, state, *lm_batch(jax.random.PRNGKey(i)))
  last = float(_lm_loss(model.apply({"params": params}, x0), y0))
  assert last < 0.6 * first, (preset, first, last)


def test_linen_cnn_with_batchnorm_trains_with_slimadam():
  model = LinenCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 3))
  y = (x.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32)
  variables = model.init(jax.random.PRNGKey(1), x)
  params, stats = variables["params"], variables["batch_stats"]
  tx = slimoptax.slim_adamw(3e-2, compress="slimadam")
  state = tx.init(params)

  def loss_fn(p, stats):
    logits, upd = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

  @jax.jit
  def step(p, stats, state):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), stats, state, loss

  losses = []
  for _ in range(40):
    params, stats, state, loss = step(params, stats, state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]


def test_partition_with_preset_labels():
  """The preset's labels drive optax.partition: SGD on norms, SlimAdam elsewhere."""
  model = LinenGPT()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  lbl = slimoptax.param_labels(params, "slimadam")
  assert lbl["ln_f"]["scale"] == "norm" and lbl["block_0"]["attn"]["query"]["kernel"] == "query"
  tx = optax.partition(
      {t: (optax.sgd(0.1) if t == "norm" else slimoptax.slim_adamw(1e-3, compress="slimadam"))
       for t in set(jax.tree.leaves(lbl))}, lbl)
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(g, state, params)
  np.testing.assert_allclose(updates["ln_f"]["scale"], -0.1 * np.ones(16), rtol=1e-6)
  # First Adam step: |update| = lr (bias-corrected m/sqrt(v) = 1) + decay.
  q = params["block_0"]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(updates["block_0"]["attn"]["query"]["kernel"],
                             -1e-3 * (1.0 / (1.0 + 1e-8) + 0.1 * q), rtol=1e-5)


def test_jit_and_no_recompile_across_steps():
  params = _params()
  tx = slimoptax.slim_adamw(1e-3, compress={"w": (0,), "t": (2,), "b": (), "s": ()})
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for t in range(3):
    _, state = step(_grads(params, t), state, params)
  assert step._cache_size() == 1
