"""Axis roles read from the computation: Flax layers, Hugging Face GPT-2, einsum kernels, scans."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import slimoptax
from slimoptax import trace
from slimoptax.trace import AxisPiece, Use


def S(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def linen_params(module, *inputs):
  """Abstract linen parameters: nothing is initialised."""
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


# --------------------------------------------------------------------------
# Plain JAX: each primitive's rule.
# --------------------------------------------------------------------------


def test_dot_general_sides_and_batch_dims():
  params = {"w": S(3, 8, 5), "v": S(8, 4)}

  def f(p, x):
    h = jnp.einsum("bd,ndk->bnk", x, p["w"])           # w on the right, n a free axis
    g = jnp.einsum("dk,bd->bk", p["v"], x)             # v on the left
    return h.sum() + g.sum()

  roles = trace.trace_roles(f, params, S(2, 8))
  assert roles["w"].roles == ("fan_out", "fan_in", "fan_out")
  assert roles["v"].roles == ("fan_in", "fan_out")
  batched = trace.trace_roles(lambda p, x: jnp.einsum("btd,bdk->btk", x, p["w"]).sum(),
                              {"w": S(2, 8, 5)}, S(2, 3, 8))
  assert batched["w"].roles == ("batch", "fan_in", "fan_out")


def test_reshape_splits_and_merges():
  # A (6, 4) kernel viewed as (2, 3, 4) whose first piece is contracted: reported per piece.
  split = trace.trace_roles(
      lambda p, x: jnp.einsum("bi,ijk->bjk", x, p["w"].reshape(2, 3, 4)).sum(), {"w": S(6, 4)},
      S(5, 2))["w"]
  assert split.roles == ((AxisPiece(2, "fan_in"), AxisPiece(3, "fan_out")), "fan_out")
  assert trace.fan_in_axes(split) == () and trace.fan_out_axes(split) == (1,)
  # A (2, 3, 4) kernel merged to (6, 4): the merged axis passes fan_in to both parts.
  merged = trace.trace_roles(lambda p, x: (x @ p["w"].reshape(6, 4)).sum(), {"w": S(2, 3, 4)},
                             S(5, 6))["w"]
  assert merged.roles == ("fan_in", "fan_in", "fan_out")
  assert trace.fan_in_axes(merged) == (0, 1)


def test_followed_through_casts_transposes_calls_and_control_flow():
  params = {f"w{i}": S(8, 4) for i in range(6)}

  @jax.custom_jvp
  def double(w):
    return 2.0 * w

  double.defjvp(lambda primals, tangents: (double(primals[0]), 2.0 * tangents[0]))

  @jax.custom_vjp
  def triple(w):
    return 3.0 * w

  triple.defvjp(lambda w: (triple(w), None), lambda _, g: (3.0 * g,))

  def f(p, x):
    a = jax.jit(lambda w: x @ w.astype(jnp.bfloat16).astype(jnp.float32))(p["w0"])
    b = jax.checkpoint(lambda w: x @ w.T.T)(p["w1"])
    c = x @ double(p["w2"]) + x @ triple(p["w3"])
    d = jax.lax.cond(x.sum() > 0, lambda w: x @ w, lambda w: x @ (w * 0.5), p["w4"])
    _, e = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] + x @ p["w5"]),
                              (0, jnp.zeros((2, 4))))
    return (a + b + c + d + e).sum()

  roles = trace.trace_roles(f, params, S(2, 8))
  for name in params:
    assert roles[name].roles == ("fan_in", "fan_out"), name


def test_followed_into_shard_map():
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:1]), ("model",))

  def f(p, x):
    body = jax.shard_map(lambda w, x: jax.lax.psum(x @ w, "model"), mesh=mesh,
                         in_specs=(P("model", None), P(None, "model")), out_specs=P())
    return body(p["w"], x).sum()

  assert trace.trace_roles(f, {"w": S(8, 4)}, S(2, 8))["w"].roles == ("fan_in", "fan_out")


def test_conv_gather_elementwise_unused_and_opaque():
  params = {"conv": S(3, 3, 4, 8), "table": S(10, 6), "scale": S(6), "unused": S(5, 5),
            "sorted": S(7)}

  def f(p, img, ids):
    y = jax.lax.conv_general_dilated(img, p["conv"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = p["table"][ids] * p["scale"]
    return y.sum() + h.sum() + jnp.sort(p["sorted"]).sum()

  roles = trace.trace_roles(f, params, S(2, 5, 5, 4), S(2, 3, dtype=jnp.int32))
  assert roles["conv"].roles == ("window", "window", "fan_in", "fan_out")
  assert roles["table"].roles == ("token", "embed")
  assert roles["scale"].roles == ("elementwise",)
  assert roles["unused"].roles == ("unused", "unused") and not roles["unused"].used
  # A primitive the trace does not read: an opaque use, axes unknown (not guessed).
  assert roles["sorted"].roles == ("unknown",) and roles["sorted"].uses[0].roles == (None,)


def test_dynamic_index_and_weight_transformations():
  params = {"table": S(10, 6), "w": S(6, 3)}

  def f(p, i, x):
    row = jax.lax.dynamic_index_in_dim(p["table"], i, keepdims=False)
    w = p["w"] * (jnp.arange(3) > 0)                    # a mask keeps the kernel a kernel
    return (row @ jnp.ones(6)) + (x @ w).sum()

  roles = trace.trace_roles(f, params, S(dtype=jnp.int32), S(2, 6))
  assert roles["table"].roles == ("token", "embed")
  assert roles["w"].roles == ("fan_in", "fan_out")


# --------------------------------------------------------------------------
# Flax linen layers.
# --------------------------------------------------------------------------


class _Layers(nn.Module):

  @nn.compact
  def __call__(self, img, ids):
    y = nn.Conv(8, (3, 3), name="conv")(img).mean((1, 2))
    e = nn.Embed(50, 16, name="embed")(ids)
    q = nn.DenseGeneral((4, 4), name="query")(nn.LayerNorm(name="ln")(e))
    o = nn.DenseGeneral(16, axis=(-2, -1), name="out")(q)
    self.param("unused", nn.initializers.zeros, (3, 3))
    return y.sum() + o.sum()


def test_flax_linen_layers():
  module = _Layers()
  img, ids = S(2, 6, 6, 3), S(2, 5, dtype=jnp.int32)
  params = linen_params(module, img, ids)
  roles = trace.trace_roles(lambda p, *a: module.apply({"params": p}, *a), params, img, ids)
  assert roles["conv"]["kernel"].roles == ("window", "window", "fan_in", "fan_out")
  assert roles["conv"]["bias"].roles == ("elementwise",)
  assert roles["embed"]["embedding"].roles == ("token", "embed")
  assert roles["query"]["kernel"].roles == ("fan_in", "fan_out", "fan_out")    # (d, H, hd)
  assert roles["out"]["kernel"].roles == ("fan_in", "fan_in", "fan_out")       # (H, hd, d)
  assert roles["ln"]["scale"].roles == ("elementwise",)
  assert roles["unused"].roles == ("unused", "unused")
  # Flax layouts are what the names assume: no disagreement with the presets' roles.
  assert trace.compare_with_names(roles) == {}


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(32, name="up")(nn.LayerNorm(name="ln")(x))
    return x + nn.Dense(8, name="down")(nn.gelu(h)), None


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(name="blocks")(x, None)[0]


def test_linen_scan_stacks_a_leading_axis():
  module, x = _Scanned(), S(2, 8)
  params = linen_params(module, x)
  roles = trace.trace_roles(lambda p, x: module.apply({"params": p}, x), params, x)
  blocks = roles["blocks"]
  for name in ("up", "down"):
    kernel = blocks[name]["kernel"]
    assert kernel.shape[0] == 3
    assert kernel.roles == ("stacked", "fan_in", "fan_out")
    assert trace.stacked_axes(kernel) == (0,) and trace.fan_in_axes(kernel) == (1,)
    assert Use("scan", ("stacked", None, None)) in kernel.uses
  assert blocks["ln"]["scale"].roles == ("stacked", "elementwise")
  # The names read the stacked (3, 8, 32) kernel as a (*fan_in, fan_out) dense kernel.
  diff = trace.compare_with_names(roles)["blocks/up/kernel"]
  assert diff.names["fan_in"] == (0, 1) and diff.traced["fan_in"] == (1,)


class _NNXBlock(nnx.Module):

  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class _NNXStack(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(block, x):
      return block(x)

    return step(self.blocks, x)


def test_nnx_vmap_stacked_and_scanned():
  model = _NNXStack(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  roles = trace.trace_roles(lambda s, x: nnx.merge(graphdef, s)(x), state, S(2, 8))
  named = dict(slimoptax._tree.named_leaves(roles, is_leaf=lambda x: isinstance(x, trace.TracedRoles)))
  assert named["blocks/up/kernel"].shape == (3, 8, 16)
  assert named["blocks/up/kernel"].roles == ("stacked", "fan_in", "fan_out")
  assert named["blocks/down/kernel"].roles == ("stacked", "fan_in", "fan_out")
  assert named["blocks/norm/scale"].roles == ("stacked", "elementwise")


# --------------------------------------------------------------------------
# Gemma-layout einsum attention.
# --------------------------------------------------------------------------


def test_gemma_einsum_attention():
  B, T, D, N, K, H = 2, 5, 16, 4, 2, 8
  params = {"q_einsum": {"w": S(N, D, H)}, "kv_einsum": {"w": S(2, K, D, H)},
            "attn_vec_einsum": {"w": S(N, H, D)}}

  def attend(p, x):
    q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
    k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["kv_einsum"]["w"])
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k)
    probs = jax.nn.softmax(logits, axis=-1)
    enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
    return jnp.einsum("BTNH,NHD->BTD", enc, p["attn_vec_einsum"]["w"])

  roles = trace.trace_roles(attend, params, S(B, T, D))
  assert roles["q_einsum"]["w"].roles == ("fan_out", "fan_in", "fan_out")
  kv = roles["kv_einsum"]["w"]
  assert kv.roles == ("fused", "fan_out", "fan_in", "fan_out")   # C: k and v are cut apart
  assert Use("dot_general", ("fan_out", "fan_out", "fan_in", "fan_out")) in kv.uses
  assert roles["attn_vec_einsum"]["w"].roles == ("fan_in", "fan_in", "fan_out")
  assert trace.fan_in_axes(roles["q_einsum"]["w"]) == (1,)
  assert trace.fan_out_axes(roles["attn_vec_einsum"]["w"]) == (2,)


# --------------------------------------------------------------------------
# Hugging Face Flax GPT-2.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_gpt2():
  transformers = pytest.importorskip("transformers")
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)
  model = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  roles = trace.trace_roles(lambda p, ids: model(ids, params=p).logits, params,
                            S(2, 8, dtype=jnp.int32))
  return params, roles


def test_hf_gpt2_conv1d_kernels_are_fan_out_fan_in(hf_gpt2):
  _, roles = hf_gpt2
  for i in ("0", "1"):
    block = roles["transformer"]["h"][i]
    for layer in (block["attn"]["c_proj"], block["mlp"]["c_fc"], block["mlp"]["c_proj"]):
      assert layer["kernel"].roles == ("fan_out", "fan_in")
    c_attn = block["attn"]["c_attn"]["kernel"]                 # (3 * d, d), q/k/v split apart
    assert c_attn.shape == (96, 32)
    assert c_attn.uses[0] == Use("dot_general", ("fan_out", "fan_in"))
    assert c_attn.roles == ((AxisPiece(3, "fused"), AxisPiece(32, "fan_out")), "fan_in")
    assert trace.fan_in_axes(c_attn) == (1,)
    assert block["ln_1"]["scale"].roles == ("elementwise",)


def test_hf_gpt2_embeddings(hf_gpt2):
  _, roles = hf_gpt2
  wte = roles["transformer"]["wte"]["embedding"]
  # Tied: gathered for the input, contracted over d for the logits.
  assert wte.uses == (Use("gather", ("token", "embed")), Use("dot_general", ("fan_out", "fan_in")))
  assert wte.roles == ("token|fan_out", "embed|fan_in")
  assert roles["transformer"]["wpe"]["embedding"].roles == ("token", "embed")


def test_hf_gpt2_disagrees_with_names(hf_gpt2):
  params, roles = hf_gpt2
  diff = trace.compare_with_names(roles)
  c_fc = diff["transformer/h/0/mlp/c_fc/kernel"]
  assert c_fc.layer_type == "mlp_up"
  assert c_fc.names == {"fan_in": (0,), "fan_out": (1,)}
  assert c_fc.traced == {"fan_in": (1,), "fan_out": (0,)}
  assert diff["transformer/h/1/attn/c_attn/kernel"].traced == {"fan_in": (1,)}
  assert "transformer/wte/embedding" in diff                   # tied: also a head
  # Norms, biases and the positional table agree with their names.
  assert "transformer/wpe/embedding" not in diff
  assert not any(p.endswith(("bias", "scale")) for p in diff)
  assert len(diff) == 2 * 4 + 1


def test_table_and_errors():
  roles = trace.trace_roles(lambda p, x: x @ p["w"], {"w": np.zeros((4, 2), np.float32)}, S(3, 4))
  assert "fan_in, fan_out" in trace.roles_table(roles)
  with pytest.raises(ValueError, match="unknown role"):
    trace.axes_with_role(roles["w"], "rows")


# --------------------------------------------------------------------------
# Presets with traced roles (Rules.for_model).
# --------------------------------------------------------------------------


def test_for_model_averages_hf_gpt2_conv1d_kernels_over_their_real_fan_out(hf_gpt2):
  params, _ = hf_gpt2
  transformers = pytest.importorskip("transformers")
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16)
  model = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
  rules = slimoptax.Rules([(r"c_attn/kernel$", "attn_qkv", (0,))]) + slimoptax.preset("slimadam")
  axes = rules.for_model(lambda p, ids: model(ids, params=p).logits, params, S(2, 8, dtype=jnp.int32))
  by_name = slimoptax.compression_axes(params, rules)
  for i in ("0", "1"):
    block, named = axes["transformer"]["h"][i], by_name["transformer"]["h"][i]
    # Table 3: attention proj and MLP fan_out; a (fan_out, fan_in) kernel's fan_out is axis 0.
    for layer in (("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
      assert block[layer[0]][layer[1]]["kernel"] == (0,)
      assert named[layer[0]][layer[1]]["kernel"] == (1,)       # what the names alone would average
    assert block["attn"]["c_attn"]["kernel"] == (0,)          # a declaration is kept as given
    assert block["ln_1"]["scale"] == () and block["attn"]["c_attn"]["bias"] == ()
  assert axes["transformer"]["wte"]["embedding"] == (1,)      # tied table: one value per token


def test_for_model_never_averages_the_stacked_axis():
  module, x = _Scanned(), S(2, 8)
  params = linen_params(module, x)
  apply = lambda p, x: module.apply({"params": p}, x)
  ada = slimoptax.preset("adalayer").for_model(apply, params, x)["blocks"]
  assert ada["up"]["kernel"] == (1, 2) and ada["ln"]["scale"] == (1,)   # one value per layer
  slim = slimoptax.preset("slimadam").for_model(apply, params, x)["blocks"]
  assert slim["up"]["kernel"] == (2,) and slim["down"]["kernel"] == (2,)  # fan_out, per layer
  with pytest.raises(ValueError, match=r"'blocks/down/kernel' \(3, 32, 8\) has 3 axes.*stacked"):  # names
    slimoptax.compression_axes(params, "adalayer")
  named = slimoptax.compression_axes(params, slimoptax.preset("adalayer", stacked=r"^blocks/"))["blocks"]
  assert named["up"]["kernel"] == ada["up"]["kernel"] and named["ln"]["scale"] == ada["ln"]["scale"]


def test_for_model_reads_einsum_kernels_and_refuses_head_roles_it_cannot_tell():
  B, T, D, N, H = 2, 5, 16, 4, 8
  params = {"q_einsum": {"w": S(N, D, H)}, "attn_vec_einsum": {"w": S(N, H, D)}}

  def attend(p, x):
    q = jnp.einsum("BTD,NDH->BTNH", x, p["q_einsum"]["w"])
    return jnp.einsum("BTNH,NHD->BTD", q, p["attn_vec_einsum"]["w"])

  rules = slimoptax.preset("slimadam", layer_types={r"q_einsum/w$": "query", r"attn_vec_einsum/w$": "attn_out"})
  axes = rules.for_model(attend, params, S(B, T, D))
  assert axes["q_einsum"]["w"] == (1,)            # query: fan_in, the contracted D
  assert axes["attn_vec_einsum"]["w"] == (2,)     # attn_out: fan_out, the kept D
  # gemma's names imply their einsum layouts (slimoptax.layouts.PRESET_LAYOUTS): heads read, checked by the trace.
  mini = slimoptax.preset("adam-mini")
  axes = mini.for_model(attend, params, S(B, T, D))
  assert axes["q_einsum"]["w"] == (1, 2)          # one value per head: D and H averaged
  assert axes["attn_vec_einsum"]["w"] == (0, 1)   # one value per output neuron
  assert slimoptax.compression_axes(params, mini) == axes
  # Under other names, a head role the trace cannot tell is refused.
  renamed = {"proj_q": params["q_einsum"], "proj_o": params["attn_vec_einsum"]}
  attend2 = lambda p, x: attend({"q_einsum": p["proj_q"], "attn_vec_einsum": p["proj_o"]}, x)  # noqa: E731
  mini = slimoptax.preset("adam-mini", layer_types={r"proj_q/w$": "query", r"proj_o/w$": "attn_out"})
  with pytest.raises(ValueError, match=r"'proj_q/w'.*not in the Flax layout.*'head_dim'"):
    mini.for_model(attend2, renamed, S(B, T, D))


# --------------------------------------------------------------------------
# Rotary embeddings: head_dim cut in two and put back together.
# --------------------------------------------------------------------------

B, T, D, H, HD = 2, 5, 32, 4, 8


def _rope(x, interleaved):
  """Rotary embedding of ``x`` (B, T, heads, HD): Llama's rotate-half, or GPT-J's rotate-every-two."""
  angles = jnp.arange(T)[:, None, None] * 10000.0 ** (-jnp.arange(HD // 2) / (HD // 2))
  if interleaved:  # as GPT-J: x[..., :rotary_dim] rotated, x[..., rotary_dim:] (here empty) passed through
    x, passed = x[..., :HD], x[..., HD:]
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = jnp.stack((-x2, x1), axis=-1).reshape(x.shape)
    angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.concatenate((x * jnp.cos(angles) + rotated * jnp.sin(angles), passed), axis=-1)
  rotated = jnp.concatenate((-x[..., HD // 2:], x[..., :HD // 2]), axis=-1)
  angles = jnp.concatenate((angles, angles), axis=-1)
  return x * jnp.cos(angles) + rotated * jnp.sin(angles)


def _rotary_attention(kv_heads, interleaved):
  params = {"q_proj": {"kernel": S(D, H * HD)}, "k_proj": {"kernel": S(D, kv_heads * HD)},
            "v_proj": {"kernel": S(D, kv_heads * HD)}, "o_proj": {"kernel": S(H * HD, D)}}

  def attend(p, x):
    q = _rope((x @ p["q_proj"]["kernel"]).reshape(B, T, H, HD), interleaved)
    k = _rope((x @ p["k_proj"]["kernel"]).reshape(B, T, kv_heads, HD), interleaved)
    v = (x @ p["v_proj"]["kernel"]).reshape(B, T, kv_heads, HD)
    k, v = jnp.repeat(k, H // kv_heads, axis=2), jnp.repeat(v, H // kv_heads, axis=2)
    probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(B, T, H * HD) @ p["o_proj"]["kernel"]

  return params, attend


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "rotate-every-two"])
@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
def test_rotary_query_key_are_not_fused_and_give_their_heads(kv_heads, interleaved):
  params, attend = _rotary_attention(kv_heads, interleaved)
  roles = trace.trace_roles(attend, params, S(B, T, D))
  for name, heads in (("q_proj", H), ("k_proj", kv_heads)):
    t = roles[name]["kernel"]
    assert t.roles == ("fan_in", "fan_out"), name        # the rotation is no fused kernel
    assert not any(u.primitive in ("slice", "split") for u in t.uses)
    # The rotated block is the head_dim: the rest of the fan_out is the heads.
    assert [u.roles for u in t.uses if u.primitive != "dot_general"] == [
        (None, (AxisPiece(heads, None), AxisPiece(HD, "rotary")))]
  assert trace.compare_with_names(roles) == {}
  mini = slimoptax.preset("adam-mini", num_heads=H).for_model(attend, params, S(B, T, D))
  assert mini["q_proj"]["kernel"] == slimoptax.Reshaped((D, H, HD), (0, 2))
  assert mini["k_proj"]["kernel"] == slimoptax.Reshaped((D, kv_heads, HD), (0, 2))   # GQA: 2 heads of 8
  assert mini["v_proj"]["kernel"] == (0,) and mini["o_proj"]["kernel"] == (0,)
  if kv_heads < H:  # by names, num_heads (the query heads) would view the key as 4 heads of 4: refused
    with pytest.raises(ValueError, match=rf"'k_proj/kernel'.*num_kv_heads={kv_heads}"):
      slimoptax.compression_axes(params, "adam-mini", num_heads=H)
    named = slimoptax.compression_axes(params, "adam-mini", num_heads=H, num_kv_heads=kv_heads)
    assert named["k_proj"]["kernel"] == mini["k_proj"]["kernel"]
  slim = slimoptax.preset("slimadam", num_heads=H).for_model(attend, params, S(B, T, D))
  assert slimoptax.compression_axes(params, "slimadam") == slim
  assert (slim["q_proj"]["kernel"], slim["k_proj"]["kernel"], slim["v_proj"]["kernel"]) == ((0,), (0,), (1,))
  with pytest.raises(ValueError, match=r"'[qk]_proj/kernel': its rotary embedding rotates blocks of 8"):
    slimoptax.preset("adam-mini", num_heads=2).for_model(attend, params, S(B, T, D))


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "rotate-every-two"])
def test_rotary_on_a_fused_qkv_kernel_leaves_it_fused(interleaved):
  params = {"c_attn": {"kernel": S(D, 3 * H * HD)}}

  def attend(p, x):
    q, k, v = (y.reshape(B, T, H, HD) for y in jnp.split(x @ p["c_attn"]["kernel"], 3, axis=-1))
    packed = jnp.stack((q, k, v), axis=2)     # q, k, v put back in their own order: still fused
    q, k = _rope(q, interleaved), _rope(k, interleaved)
    probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v).sum() + packed.sum()

  c_attn = trace.trace_roles(attend, params, S(B, T, D))["c_attn"]["kernel"]
  assert c_attn.roles == ("fan_in", (AxisPiece(3, "fused"), AxisPiece(H * HD, "fan_out")))
  with pytest.raises(ValueError, match=r"'c_attn/kernel'.*'attn_qkv' layer, which this preset does not handle"):
    slimoptax.preset("adam-mini", num_heads=H).for_model(attend, params, S(B, T, D))


def test_for_model_reads_conv_local_output_positions():
  """flax.linen.ConvLocal: one unshared filter per output pixel, kernel (*out_spatial, window * in, out)."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.ConvLocal(4, (3, 3), name="conv_init")(x)   # named as an nn.Conv would be
      x = nn.ConvLocal(4, (3, 3))(x)
      return nn.Dense(5, name="head")(x.mean((1, 2)))

  net, x = Net(), S(2, 8, 8, 3)
  params = jax.eval_shape(net.init, jax.random.key(0), x)["params"]
  fn = lambda p, x: net.apply({"params": p}, x)  # noqa: E731
  assert slimoptax.trace_roles(fn, params, x)["conv_init"]["kernel"].roles == ("batch", "batch", "fan_in", "fan_out")
  for name in ("slimadam", "adam-mini"):   # both average the fan_in only: one value per position and channel
    rules = slimoptax.preset(name)
    axes = rules.for_model(fn, params, x)
    assert axes["conv_init"]["kernel"] == axes["ConvLocal_0"]["kernel"] == (2,)
    by_names = slimoptax.compression_axes(params, rules)
    assert by_names["ConvLocal_0"]["kernel"] == (2,)            # recognized by its name
    assert by_names["conv_init"]["kernel"] == (0, 1, 2)         # a name cannot tell it from an nn.Conv
