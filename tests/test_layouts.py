"""Layout declarations (`slimoptax.layouts`): grouped-query heads, stacked layers, PyTorch layout, einsum
layouts and fused tensors.

The reference of each declaration is the same model stored the Flax way, one layer per tensor: a declared
layout must give exactly the updates that the plain layout gives (transposed, unstacked, split), and the
Flax-layout updates are themselves tested against optax and numpy in test_slim_adam.py. GQA head blocks
are checked against a float64 numpy SlimAdam.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slimoptax
from slimoptax.layouts import Fused, Layout, layout_roles

D, H, HD, KV, F, L = 8, 2, 4, 1, 12, 3
PRESETS = ("slimadam", "adam-mini", "adalayer")


def _grads(tree, steps, seed=0):
  """Deterministic gradient sequences with per-entry scales (so averaging matters)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    out.append(treedef.unflatten([
        jnp.asarray(rng.normal(size=x.shape) * rng.uniform(0.1, 3.0, size=x.shape), jnp.float32)
        for x in leaves]))
  return out


def _updates(tx, params, grads):
  state = tx.init(params)
  out = []
  for g in grads:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


def _tx(rules):
  return slimoptax.scale_by_slim_adam(compress=rules)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Roles in the declared layout.
# --------------------------------------------------------------------------


def test_layout_roles_in_each_layout():
  view, roles = layout_roles("query", (L, D, H, HD), Layout(stacked=(0,)))
  assert view == (L, D, H, HD) and roles["stacked"] == (0,) and roles["all"] == (1, 2, 3)
  assert roles["fan_in"] == (1,) and roles["heads"] == (2,) and roles["head_dim"] == (3,)
  _, roles = layout_roles("mlp_up", (F, D), Layout(torch=True))  # (fan_out, fan_in)
  assert roles["fan_in"] == (1,) and roles["fan_out"] == (0,)
  _, roles = layout_roles("embedding", (100, D), Layout(torch=True))  # nn.Embedding: (vocab, d) as Flax
  assert roles["token"] == (0,)
  view, roles = layout_roles("query", (H * HD, D), Layout(num_heads=H, torch=True))
  assert view == (H, HD, D) and roles["heads"] == (0,) and roles["fan_in"] == (2,)
  view, roles = layout_roles("key", (D, KV * HD), Layout(num_heads=H, num_kv_heads=KV))
  assert view == (D, KV, HD) and roles["heads"] == (1,)
  _, roles = layout_roles("query", (H, D, HD), Layout(einsum="BTD,NDH->BTNH"))  # gemma q_einsum
  assert roles["fan_in"] == (1,) and roles["heads"] == (0,) and roles["head_dim"] == (2,)
  _, roles = layout_roles("attn_out", (H, HD, D), Layout(einsum="BTNH,NHD->BTD"))
  assert roles["fan_in"] == (0, 1) and roles["heads"] == (0,) and roles["fan_out"] == (2,)


# --------------------------------------------------------------------------
# Each declaration against the plain Flax layout.
# --------------------------------------------------------------------------


def _flax_block(rng):
  return {"attn": {"query": {"kernel": rng.normal(size=(D, H * HD))}, "key": {"kernel": rng.normal(size=(D, H * HD))},
                   "value": {"kernel": rng.normal(size=(D, H * HD))}, "out": {"kernel": rng.normal(size=(H * HD, D))}},
          "mlp": {"up": {"kernel": rng.normal(size=(D, F))}, "down": {"kernel": rng.normal(size=(F, D))}},
          "ln": {"scale": rng.normal(size=(D,))}}


@pytest.mark.parametrize("preset", PRESETS)
def test_torch_layout_equals_the_transposed_flax_layout(preset):
  flax = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _flax_block(np.random.default_rng(0)))
  torch = jax.tree.map(lambda x: x.T, flax)  # nn.Linear weights: (fan_out, fan_in); vectors unchanged
  grads = _grads(flax, 3)
  ref = _updates(_tx(slimoptax.preset(preset, num_heads=H)), flax, grads)
  got = _updates(_tx(slimoptax.preset(preset, num_heads=H, torch_layout=True)), torch,
                 [jax.tree.map(lambda x: x.T, g) for g in grads])
  for r, g in zip(ref, got):
    jax.tree.map(lambda a, b: _close(a.T, b), r, g)


@pytest.mark.parametrize("preset", PRESETS)
def test_stacked_layers_equal_one_tensor_per_layer(preset):
  rng = np.random.default_rng(1)
  per_layer = {f"layers_{i}": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _flax_block(rng)) for i in range(L)}
  stacked = {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer.values())}
  grads = _grads(stacked, 3)
  got = _updates(_tx(slimoptax.preset(preset, num_heads=H, stacked=r"^blocks/")), stacked, grads)
  ref = _updates(_tx(slimoptax.preset(preset, num_heads=H)), per_layer,
                 [{f"layers_{i}": jax.tree.map(lambda x: x[i], g["blocks"]) for i in range(L)} for g in grads])
  for r, g in zip(ref, got):
    for i in range(L):
      jax.tree.map(lambda a, b: _close(a, b[i]), r[f"layers_{i}"], g["blocks"])
  # AdaLayer keeps one value per tensor *per layer*, never one for the whole stack.
  axes = slimoptax.compression_axes(stacked, slimoptax.preset("adalayer", stacked=r"^blocks/"))
  assert axes["blocks"]["mlp"]["up"]["kernel"] == (1, 2)


def _numpy_slim_adam(grads, view, axes, b1=0.9, b2=0.95, eps=1e-8):
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, 1):
    g = np.asarray(g, np.float64)
    gv = g.reshape(view)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.mean(gv ** 2, axis=axes, keepdims=True)
    mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
    out.append((mh.reshape(view) / (np.sqrt(vh) + eps)).reshape(g.shape))
  return out


def test_grouped_query_key_blocks_per_kv_head():
  params = {"attn": {"k_proj": {"kernel": jnp.zeros((D, 2 * HD))}, "q_proj": {"kernel": jnp.zeros((D, 4 * HD))}}}
  rules = slimoptax.preset("adam-mini", num_heads=4, num_kv_heads=2)
  axes = slimoptax.compression_axes(params, rules)
  assert axes["attn"]["k_proj"]["kernel"] == slimoptax.Reshaped((D, 2, HD), (0, 2))
  assert axes["attn"]["q_proj"]["kernel"] == slimoptax.Reshaped((D, 4, HD), (0, 2))
  grads = _grads(params, 4)
  got = _updates(_tx(rules), params, grads)
  want = _numpy_slim_adam([g["attn"]["k_proj"]["kernel"] for g in grads], (D, 2, HD), (0, 2))
  for u, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(u["attn"]["k_proj"]["kernel"]), w, rtol=2e-5, atol=1e-6)
  # The same keyword where num_heads= is accepted.
  assert slimoptax.compression_axes(params, "adam-mini", num_heads=4, num_kv_heads=2) == axes


@pytest.mark.parametrize("preset", PRESETS)
def test_gemma_einsum_layout_equals_dense_general(preset):
  """gemma-style kernels: q (N, D, H) 'BTD,NDH->BTNH', out (N, H, D), kv (2, K, D, H) fused, gating (2, F, D)."""
  rng = np.random.default_rng(2)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  gemma = {"attn": {"q_einsum": {"w": f32(H, D, HD)}, "kv_einsum": {"w": f32(2, H, D, HD)},
                    "attn_vec_einsum": {"w": f32(H, HD, D)}},
           "mlp": {"gating_einsum": f32(2, F, D), "linear": f32(F, D)}}
  rules = slimoptax.preset(
      preset,
      layer_types={r"q_einsum/w$": "query", r"kv_einsum/w$": "attn_qkv", r"attn_vec_einsum/w$": "attn_out",
                   r"gating_einsum$": "mlp_gate", r"mlp/linear$": "mlp_down"},
      einsum={r"q_einsum/w$": "BTD,NDH->BTNH", r"kv_einsum/w$": "BSD,CKDH->CBSKH",
              r"attn_vec_einsum/w$": "BTNH,NHD->BTD", r"gating_einsum$": "...F,NHF->...NH",
              r"mlp/linear$": "...H,HF->...F"},
      fused={r"kv_einsum/w$": ("key", "value"), r"gating_einsum$": Fused(("mlp_gate", "mlp_up"), axis=0)})
  # The same model in Flax layouts, one tensor per layer: DenseGeneral (D, N, H), (N, H, D); Dense (in, out).
  to_flax = lambda t: {  # noqa: E731
      "attn": {"query": {"kernel": t["attn"]["q_einsum"]["w"].transpose(1, 0, 2)},
               "key": {"kernel": t["attn"]["kv_einsum"]["w"][0].transpose(1, 0, 2)},
               "value": {"kernel": t["attn"]["kv_einsum"]["w"][1].transpose(1, 0, 2)},
               "out": {"kernel": t["attn"]["attn_vec_einsum"]["w"]}},
      "mlp": {"gate": {"kernel": t["mlp"]["gating_einsum"][0].T}, "up": {"kernel": t["mlp"]["gating_einsum"][1].T},
              "down": {"kernel": t["mlp"]["linear"]}}}
  grads = _grads(gemma, 3)
  got = [to_flax(u) for u in _updates(_tx(rules), gemma, grads)]
  ref = _updates(_tx(slimoptax.preset(preset)), to_flax(gemma), [to_flax(g) for g in grads])
  for r, g in zip(ref, got):
    jax.tree.map(_close, r, g)


@pytest.mark.parametrize("preset", PRESETS)
def test_gpt2_fused_conv1d_equals_separate_query_key_value(preset):
  """HF GPT-2: c_attn is a FlaxConv1D (3d, d) kernel, (fan_out, fan_in), q | k | v blocks of the fan_out."""
  rng = np.random.default_rng(3)
  d = H * HD
  gpt2 = {"attn": {"c_attn": {"kernel": jnp.asarray(rng.normal(size=(3 * d, D)), jnp.float32)},
                   "c_proj": {"kernel": jnp.asarray(rng.normal(size=(D, d)), jnp.float32)}},
          "mlp": {"c_fc": {"kernel": jnp.asarray(rng.normal(size=(F, D)), jnp.float32)}}}
  rules = slimoptax.preset(preset, num_heads=H, torch_layout=r"/c_(attn|proj|fc)/kernel$",
                           fused={r"c_attn/kernel$": ("query", "key", "value")})
  to_flax = lambda t: {  # noqa: E731
      "attn": {name: {"kernel": t["attn"]["c_attn"]["kernel"][i * d:(i + 1) * d].T}
               for i, name in enumerate(("query", "key", "value"))} | {"out": {"kernel": t["attn"]["c_proj"]["kernel"].T}},
      "mlp": {"up": {"kernel": t["mlp"]["c_fc"]["kernel"].T}}}
  grads = _grads(gpt2, 3)
  got = [to_flax(u) for u in _updates(_tx(rules), gpt2, grads)]
  ref = _updates(_tx(slimoptax.preset(preset, num_heads=H)), to_flax(gpt2), [to_flax(g) for g in grads])
  for r, g in zip(ref, got):
    jax.tree.map(_close, r, g)
  # The second moment is stored flat: the parts' kept entries, as for three tensors.
  state = _tx(rules).init(gpt2)
  ref_state = _tx(slimoptax.preset(preset, num_heads=H)).init(to_flax(gpt2))
  kept = sum(ref_state.nu["attn"][n]["kernel"].size for n in ("query", "key", "value"))
  assert state.nu["attn"]["c_attn"]["kernel"].shape == (kept,)


def test_bloom_per_head_interleaved_fused_kernel():
  """Bloom's query_key_value (d, 3*H*hd) is viewed (d, H, 3, hd): parts interleaved per head."""
  rng = np.random.default_rng(4)
  bloom = {"attn": {"query_key_value": {"kernel": jnp.asarray(rng.normal(size=(D, H * 3 * HD)), jnp.float32)}}}
  rules = slimoptax.preset("adam-mini", fused={r"query_key_value/kernel$": Fused(("query", "key", "value"), heads=H)})
  to_flax = lambda t: {"attn": {name: {"kernel": t["attn"]["query_key_value"]["kernel"].reshape(D, H, 3, HD)[:, :, i]}  # noqa: E731
                                for i, name in enumerate(("query", "key", "value"))}}
  grads = _grads(bloom, 3)
  got = [to_flax(u) for u in _updates(_tx(rules), bloom, grads)]
  ref = _updates(_tx(slimoptax.preset("adam-mini")), to_flax(bloom), [to_flax(g) for g in grads])
  for r, g in zip(ref, got):
    jax.tree.map(_close, r, g)


def test_fused_parts_in_sophia_memory_and_table():
  d = H * HD
  rng = np.random.default_rng(5)
  params = {"attn": {"c_attn": {"kernel": jnp.asarray(rng.normal(size=(3 * d, D)), jnp.float32)}}}
  rules = slimoptax.preset("slimadam", torch_layout=True, fused={r"c_attn/kernel$": ("query", "key", "value")})
  # query, key: one value per output neuron (fan_in averaged); value: one per input neuron.
  assert slimoptax.compression_axes(params, rules)["attn"]["c_attn"]["kernel"] == slimoptax.Split(
      (3, d, D), 0, ((1,), (1,), (0,)))
  table = rules.table(params)
  assert "parts (1,), (1,), (0,)" in table and f"{d + d + D:,} of {3 * d * D:,}" in table
  # Sophia with a fixed curvature estimate (the squared parameters): fused == three separate kernels.
  to_flax = lambda t: {"attn": {name: {"kernel": t["attn"]["c_attn"]["kernel"][i * d:(i + 1) * d].T}  # noqa: E731
                                for i, name in enumerate(("query", "key", "value"))}}
  estimator = lambda p, key: jax.tree.map(jnp.square, p)  # noqa: E731
  grads = _grads(params, 3, seed=6)
  sophia = lambda c: slimoptax.scale_by_hutchinson(estimator=estimator, update_every=1, compress=c)  # noqa: E731
  got = [to_flax(u) for u in _updates(sophia(rules), params, grads)]
  ref = _updates(sophia(slimoptax.preset("slimadam")), to_flax(params), [to_flax(g) for g in grads])
  for r, g in zip(ref, got):
    jax.tree.map(_close, r, g)
  assert jax.tree.leaves(sophia(rules).init(params).h)[0].shape == (2 * d + D,)
  with pytest.raises(ValueError, match="c_attn/kernel.*fused parameter has no one matrix view"):
    slimoptax.matrix_dims(params, rules)


def test_nonfinite_part_skips_only_its_groups():
  params = {"attn": {"c_attn": {"kernel": jnp.ones((3 * H * HD, D))}}}
  tx = _tx(slimoptax.preset("slimadam", torch_layout=True, fused={r"c_attn/kernel$": ("query", "key", "value")}))
  state = tx.init(params)
  g = np.ones((3 * H * HD, D), np.float32)
  g[H * HD * 2 + 1, 3] = np.inf  # one entry of the value part: its column group (input neuron 3) skips
  u, _ = tx.update({"attn": {"c_attn": {"kernel": jnp.asarray(g)}}}, state, params)
  u = np.asarray(u["attn"]["c_attn"]["kernel"])
  assert np.isfinite(u).all()
  assert (u[2 * H * HD:, 3] == 0).all() and (u[:2 * H * HD] != 0).all() and (u[2 * H * HD:, :3] != 0).all()


# --------------------------------------------------------------------------
# Serialisation and errors.
# --------------------------------------------------------------------------


def test_declarations_survive_json():
  rules = slimoptax.preset("adam-mini", num_heads=4, num_kv_heads=2, stacked={r"^blocks/": 0},
                           torch_layout=[r"c_attn"], einsum={r"q_einsum": "BTD,NDH->BTNH"},
                           fused={r"c_attn": Fused(("query", "key", "value"), heads=None)})
  back = slimoptax.Rules.from_json(rules.to_json())
  assert back == rules and back.layouts == rules.layouts
  assert json.loads(rules.to_json())["layouts"]["num_kv_heads"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=0), "num_kv_heads: expected a positive int"),
    (dict(stacked={r"^blocks/": "layers"}), r"stacked\['\^blocks/'\]: expected an int axis"),
    (dict(einsum={r"q": "BTD NDH"}), r"einsum\['q'\]: expected an equation"),
    (dict(fused={r"c_attn": ("query", "kee")}), r"fused\['c_attn'\].*unknown: \['kee'\]"),
    (dict(torch_layout=3), "torch_layout: expected a pattern"),
    (dict(stacked="("), "stacked: invalid regular expression"),
])
def test_bad_declarations_name_the_keyword(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    slimoptax.preset("slimadam", **kwargs)


def test_bad_layouts_name_the_parameter():
  params = {"blocks": {"mlp": {"up": {"kernel": jnp.zeros((L, D, F))}}}}
  with pytest.raises(ValueError, match="stacked axis 5 of 'blocks/mlp/up/kernel'"):
    slimoptax.compression_axes(params, slimoptax.preset("slimadam", stacked={r"^blocks/": 5}))
  with pytest.raises(ValueError, match="include its stacked axes"):
    slimoptax.compression_axes(params, slimoptax.Rules([(r"up", "x", (0, 2))], stacked=r"^blocks/"))
  with pytest.raises(ValueError, match="einsum layout of 'blocks/mlp/up/kernel'.*do not name"):
    slimoptax.compression_axes(params, slimoptax.preset("slimadam", einsum={r"up": "BTD,DF->BTF"}))
  with pytest.raises(ValueError, match="fused parameter 'blocks/mlp/up/kernel'.*does not split into 5"):
    slimoptax.compression_axes(params, slimoptax.preset("slimadam", stacked=r"^blocks/",
                                                        fused={r"up": ("mlp_up",) * 5}))
  with pytest.raises(ValueError, match="c_attn/kernel.*declare its parts.*fused="):
    slimoptax.compression_axes({"c_attn": {"kernel": jnp.zeros((D, 3 * D))}}, "slimadam")
  with pytest.raises(ValueError, match="layout declarations.*apply to rules and presets"):
    slimoptax.compression_axes(params, {"blocks": {"mlp": {"up": {"kernel": (1,)}}}}, num_kv_heads=2)


def test_model_wide_declarations_as_transform_keywords():
  """num_kv_heads= and torch_layout= where num_heads= is taken: the same as declaring them on the preset."""
  params = {"attn": {"k_proj": {"kernel": jnp.zeros((2 * HD, D))}, "q_proj": {"kernel": jnp.zeros((4 * HD, D))}},
            "mlp": {"up_proj": {"kernel": jnp.zeros((F, D))}}}   # nn.Linear weights: (fan_out, fan_in)
  grads = _grads(params, 3)
  declared = slimoptax.preset("adam-mini", num_heads=4, num_kv_heads=2, torch_layout=True)
  ref = _updates(slimoptax.slim_adamw(1e-2, compress=declared), params, grads)
  got = _updates(slimoptax.slim_adamw(1e-2, compress="adam-mini", num_heads=4, num_kv_heads=2, torch_layout=True),
                 params, grads)
  for r, g in zip(ref, got):
    jax.tree.map(_close, r, g)
  state = slimoptax.scale_by_hutchinson(compress="adam-mini", num_heads=4, num_kv_heads=2, torch_layout=True,
                                        estimator=lambda p, key: p).init(params)
  assert state.h["attn"]["k_proj"]["kernel"].shape == (2, 1, 1)   # one value per KV head: (H, hd, d) view
  with pytest.raises(ValueError, match="num_kv_heads"):
    slimoptax.scale_by_slim_adam(compress="adam-mini", num_kv_heads=0)


def test_muon_matrix_views_read_the_declarations():
  """Muon's matrix views through `dims=` rules: GQA key heads, PyTorch layout and stacked axes honoured."""
  params = {"blocks": {"k_proj": {"kernel": jnp.zeros((L, 2 * HD, D))}, "q_proj": {"kernel": jnp.zeros((L, 4 * HD, D))}}}
  rules = slimoptax.preset("adam", num_heads=4, num_kv_heads=2, torch_layout=True, stacked=r"^blocks/")
  dims = slimoptax.matrix_dims(params, rules, per_head=True)
  # (L, 2*hd, d) stored (fan_out, fan_in): viewed (L, 2, hd, d), rows d (fan_in), columns hd, batch L and heads.
  assert dims["blocks"]["k_proj"]["kernel"] == slimoptax.ReshapedDims(
      (L, 2, HD, D), slimoptax.MuonDimensionNumbers(reduction_axis=(3,), output_axis=(2,)))
  assert dims["blocks"]["q_proj"]["kernel"].shape == (L, 4, HD, D)
