"""The presets on real peer models: Hugging Face Flax models and Flax linen layers, every leaf checked.

Each model is built from a tiny config (`jax.eval_shape`: nothing is computed) and
every parameter's compression axes are compared with axes derived here from what
the model's source does with that parameter: its layout (``nn.Dense`` kernels are
``(fan_in, fan_out)``, ``FlaxConv1D`` kernels ``(fan_out, fan_in)``, ``nn.Embed``
tables ``(vocab, d)``), its role (query, MLP, head, ...) and Table 3 of the SlimAdam
paper (``"slimadam"``) or Adam-mini's grouping (``"adam-mini"``). Where the library
cannot tell a role it is expected to say so: a `GenericLayerWarning` or a
ValueError naming the parameter; the declarations that settle each case are the
ones a user would write (``layer_types=``, integer-axes rules, `Rules.for_model`).
"""

import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import slimoptax
from slimoptax import GenericLayerWarning, Reshaped, Rules
from slimoptax._tree import named_leaves, shape_of

transformers = pytest.importorskip("transformers")

PRESETS = ("slimadam", "adam-mini")
H = 4  # attention heads of every model below


def S(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


IDS = S(2, 8, dtype=jnp.int32)
PIXELS = S(2, 3, 16, 16)  # the Flax ViT / ResNet take NCHW pixels and transpose them


# --------------------------------------------------------------------------
# What each parameter is, and the axes each preset should average.
# --------------------------------------------------------------------------

# Table 3 of Kalra et al.: K & Q fan_in, V & attention projection fan_out, MLP fan_out,
# LM head / classifier fan_in (one value per class), vision conv fan_in; any other
# hidden Dense layer fan_out (the preset's "dense").
_SLIM_FAN_IN = {"query", "key", "head", "conv"}


def dense(role, heads=None):
  """A Flax-layout kernel ``(*fan_in, fan_out)``; ``heads``: the head count of a 2-D query/key."""
  return ("dense", role, heads)


def kernel(role, fan_in, fan_out, head_dim=None):
  """A kernel with explicit axes; ``head_dim``: the head_dim axis of a 3-D query/key."""
  return ("kernel", role, fan_in, fan_out, head_dim)


EMBEDDING = ("table", "embedding")    # (vocab, *d): one value per token (both presets)
POSITIONS = ("table", "pos_embedding")  # (positions, *d): per position (slimadam), one value (adam-mini)
SCALE = ("scale",)                      # norm scale: full (slimadam), one value (adam-mini)
BIAS = ("bias",)                        # bias: full (both; Adam-mini's name rule covers norm biases)
FUSED = ("fused",)                      # fused q/k/v: no one set of axes is right (Q, K and V differ)


def torch_dense(role, heads=None):
  """A PyTorch / FlaxConv1D-layout kernel ``(fan_out, fan_in)``; ``heads``: the head count of a query/key."""
  return ("torch", role, heads)


def split(view, axis, *parts):
  """A fused kernel viewed ``view``, part ``i`` at index ``i`` of ``axis``, described by ``parts[i]``."""
  return ("split", tuple(view), axis, parts)


def expected(desc, shape, preset):
  kind, ndim = desc[0], len(shape)
  if kind == "stacked":            # nn.scan's leading layer axis is never averaged
    return tuple(a + 1 for a in expected(desc[1], shape[1:], preset))
  if kind == "split":              # a declared fused kernel: each part as the layer it is
    _, view, axis, parts = desc
    part_shape = view[:axis] + view[axis + 1:]
    return slimoptax.Split(view, axis, tuple(expected(d, part_shape, preset) for d in parts))
  if kind == "torch":              # (fan_out, fan_in)
    _, role, heads = desc
    if preset == "adam-mini" and role in ("query", "key"):
      return Reshaped((heads, shape[0] // heads, shape[1]), (1, 2))
    if preset == "slimadam":
      return (1,) if role in _SLIM_FAN_IN else (0,)
    return (1,)
  if kind == "bias":
    return ()
  if kind == "scale":
    return () if preset == "slimadam" else tuple(range(ndim))
  if kind == "table":
    if preset == "adam-mini" and desc[1] == "pos_embedding":
      return tuple(range(ndim))
    return desc[2] if len(desc) > 2 else tuple(range(1, ndim))
  if kind == "dense":
    _, role, heads = desc
    fan_in, fan_out, head_dim = tuple(range(ndim - 1)), (ndim - 1,), None
  else:
    _, role, fan_in, fan_out, head_dim = desc
    heads = None
  if preset == "slimadam":
    return fan_in if role in _SLIM_FAN_IN else fan_out
  if role in ("query", "key"):    # Adam-mini: one value per head
    if heads is not None:         # (d, H*hd) seen as (d, H, hd)
      return Reshaped((shape[0], heads, shape[1] // heads), (0, 2))
    return tuple(sorted(fan_in + (head_dim,)))
  return fan_in                   # Adam-mini: one value per output neuron / class / vocab entry


def leaf_table(params, table):
  """``{path: (shape, description)}`` from ``[(regex, description), ...]`` (first match)."""
  out = {}
  for path, leaf in named_leaves(params):
    desc = next((d for pattern, d in table if re.search(pattern, path, re.IGNORECASE)), None)
    assert desc is not None, f"no description for {path}"
    out[path] = (shape_of(leaf), desc)
  return out


def assert_axes(params, axes, table, preset, skip=()):
  got = dict(named_leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))  # Reshaped / Split are tuples
  wrong = {p: (got[p], expected(d, s, preset)) for p, (s, d) in leaf_table(params, table).items()
           if p not in skip and got[p] != expected(d, s, preset)}
  assert not wrong, f"{preset}: (got, expected) {wrong}"


def resolve(rules, params, fn=None, args=()):
  """The axes by names (``fn=None``) or read from the model, failing on any GenericLayerWarning."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", GenericLayerWarning)
    if fn is None:
      return slimoptax.compression_axes(params, rules)
    return rules.for_model(fn, params, *args)


_VECTORS = [(r"bias$", BIAS), (r"(norm|ln_)\w*/(scale|weight)$", SCALE)]


# --------------------------------------------------------------------------
# Llama and Mistral: nn.Dense everywhere, rotary q/k, GQA k/v.
# --------------------------------------------------------------------------


def _llama_like(cls, config_cls, kv_heads):
  config = config_cls(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=H, num_key_value_heads=kv_heads, max_position_embeddings=16)
  model = cls(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids: model(ids, params=p).logits, kv_heads


def _llama_table(kv_heads):
  return [(r"q_proj/kernel$", dense("query", H)), (r"k_proj/kernel$", dense("key", kv_heads)),
          (r"v_proj/kernel$", dense("value")), (r"o_proj/kernel$", dense("attn_out")),
          (r"gate_proj/kernel$", dense("mlp_gate")), (r"up_proj/kernel$", dense("mlp_up")),
          (r"down_proj/kernel$", dense("mlp_down")), (r"lm_head/kernel$", dense("head")),
          (r"embed_tokens/embedding$", EMBEDDING)] + _VECTORS


@pytest.fixture(scope="module")
def llama():
  return _llama_like(transformers.FlaxLlamaForCausalLM, transformers.LlamaConfig, H)


@pytest.fixture(scope="module", params=["llama-gqa", "mistral"])
def gqa(request):
  if request.param == "mistral":
    return _llama_like(transformers.FlaxMistralForCausalLM, transformers.MistralConfig, 2)
  return _llama_like(transformers.FlaxLlamaForCausalLM, transformers.LlamaConfig, 2)


@pytest.mark.parametrize("preset", PRESETS)
def test_llama_by_names(llama, preset):
  params, _, _ = llama
  axes = resolve(slimoptax.preset(preset, num_heads=H), params)
  assert_axes(params, axes, _llama_table(H), preset)


def test_llama_and_gqa_slimadam_read_from_the_model(llama, gqa):
  for params, fn, kv_heads in (llama, gqa):
    rules = slimoptax.preset("slimadam", num_heads=H)
    assert_axes(params, resolve(rules, params, fn, (IDS,)), _llama_table(kv_heads), "slimadam")
    assert_axes(params, resolve(rules, params), _llama_table(kv_heads), "slimadam")


def test_adam_mini_needs_num_heads_for_2d_query_kernels(llama):
  params, _, _ = llama
  with pytest.raises(ValueError, match=r"'head_dim' is not defined.*[qk]_proj.*pass num_heads="):
    slimoptax.compression_axes(params, "adam-mini")


def test_gqa_adam_mini_by_names_with_num_kv_heads(gqa):
  params, _, kv_heads = gqa
  rules = slimoptax.preset("adam-mini", num_heads=H, num_kv_heads=kv_heads)
  assert_axes(params, resolve(rules, params), _llama_table(kv_heads), "adam-mini")
  # Without the declaration the key's (d, 2*8) would be viewed as num_heads=4 heads of 4: refused, naming the fix.
  with pytest.raises(ValueError, match=r"'model/layers/0/self_attn/k_proj/kernel': 16 output features where the "
                                       r"query .* has 32 \(4 heads of 8\).*num_kv_heads=2"):
    resolve(slimoptax.preset("adam-mini", num_heads=H), params)


def test_adam_mini_for_model_reads_the_heads_of_rotary_query_key(llama, gqa):
  # Rotary embeddings cut head_dim in two and put it back together: the trace reads head_dim from the
  # rotation, so q gets num_heads heads and a GQA k its kv_heads (by names: num_heads heads of 4).
  for params, fn, kv_heads in (llama, gqa):
    rules = slimoptax.preset("adam-mini", num_heads=H)
    assert_axes(params, resolve(rules, params, fn, (IDS,)), _llama_table(kv_heads), "adam-mini")


# --------------------------------------------------------------------------
# BERT (masked LM and a classification head) and ViT: their Dense layers are
# named attention/output/dense, intermediate/dense, layer/N/output/dense (recognized).
# --------------------------------------------------------------------------

_BERT_TABLE = [
    (r"/query/kernel$", dense("query", H)), (r"/key/kernel$", dense("key", H)),
    (r"/value/kernel$", dense("value")), (r"attention/output/dense/kernel$", dense("attn_out")),
    (r"intermediate/dense/kernel$", dense("mlp_up")), (r"layer/\d+/output/dense/kernel$", dense("mlp_down")),
    (r"(pooler|transform)/dense/kernel$", dense("dense")), (r"classifier/kernel$", dense("head")),
    # The MLM decoder is the word-embedding table, transposed (tie_word_embeddings).
    (r"(word|token_type)_embeddings/embedding$", EMBEDDING), (r"position_embeddings/embedding$", POSITIONS),
    # ViT: an nn.Conv patch projection (4, 4, 3, d), a (1, N, d) position table added to the
    # patch sequence, a (1, 1, d) class token concatenated in front of it.
    (r"patch_embeddings/projection/kernel$", kernel("conv", (0, 1, 2), (3,))),
    (r"vit/embeddings/position_embeddings$", ("table", "pos_embedding", (2,))), (r"cls_token$", BIAS),
] + _VECTORS


@pytest.fixture(scope="module", params=["masked-lm", "classifier"])
def bert(request):
  config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=H,
                                   intermediate_size=64, max_position_embeddings=16, num_labels=3)
  cls = (transformers.FlaxBertForMaskedLM if request.param == "masked-lm"
         else transformers.FlaxBertForSequenceClassification)
  model = cls(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids: model(ids, params=p).logits


@pytest.mark.parametrize("preset", PRESETS)
def test_bert_is_right_with_no_declaration(bert, preset):
  params, fn = bert
  rules = slimoptax.preset(preset, num_heads=H)   # resolve: no GenericLayerWarning
  assert_axes(params, resolve(rules, params), _BERT_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS,)), _BERT_TABLE, preset)


@pytest.fixture(scope="module")
def vit():
  config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=H, intermediate_size=64, num_labels=5)
  model = transformers.FlaxViTForImageClassification(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 16, 16, 3)))
  return params, lambda p, x: model(x, params=p).logits


@pytest.mark.parametrize("preset", PRESETS)
def test_vit_is_right_with_no_declaration(vit, preset):
  # The patch projection is a conv, the class token a bias, and the (1, N, d) position table
  # gets one value per position under slimadam (its leading size-1 axis is never averaged).
  params, fn = vit
  rules = slimoptax.preset(preset, num_heads=H)
  assert_axes(params, resolve(rules, params), _BERT_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (PIXELS,)), _BERT_TABLE, preset)


# --------------------------------------------------------------------------
# T5: q/k/v/o and wi/wo nn.Dense without biases, a relative attention bias table.
# --------------------------------------------------------------------------


class _ClipKeywords:
  """jax.numpy, with the ``a_min`` / ``a_max`` keywords of ``clip`` that transformers' Flax T5 passes."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(x, a_min=None, a_max=None):
    return jnp.clip(x, a_min, a_max)


@pytest.fixture(scope="module")
def t5():
  from transformers.models.t5 import modeling_flax_t5
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(modeling_flax_t5, "jnp", _ClipKeywords())
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=H,
                                   relative_attention_num_buckets=8)
    model = transformers.FlaxT5ForConditionalGeneration(config, _do_init=False)
    params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
    yield params, lambda p, ids, dec: model(ids, decoder_input_ids=dec, params=p).logits


_T5_TABLE = [(r"/q/kernel$", dense("query", H)), (r"/k/kernel$", dense("key", H)), (r"/v/kernel$", dense("value")),
             (r"/o/kernel$", dense("attn_out")), (r"/wi/kernel$", dense("mlp_up")), (r"/wo/kernel$", dense("mlp_down")),
             # (buckets, heads), added to the attention logits: a bias, full Adam.
             (r"relative_attention_bias/embedding$", BIAS),
             (r"shared/embedding$", EMBEDDING), (r"layer_norm/weight$", SCALE)]


@pytest.mark.parametrize("preset", PRESETS)
def test_t5_is_right_with_no_declaration(t5, preset):
  params, fn = t5   # o, wo and relative_attention_bias are recognized: no GenericLayerWarning
  rules = slimoptax.preset(preset, num_heads=H)
  assert_axes(params, resolve(rules, params), _T5_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS, IDS)), _T5_TABLE, preset)


# --------------------------------------------------------------------------
# BART and OPT: q/k/v/out_proj, fc1/fc2, learned positions named embed_positions.
# --------------------------------------------------------------------------

_SEQ2SEQ_TABLE = [(r"q_proj/kernel$", dense("query", H)), (r"k_proj/kernel$", dense("key", H)),
                  (r"v_proj/kernel$", dense("value")), (r"out_proj/kernel$", dense("attn_out")),
                  (r"fc1/kernel$", dense("mlp_up")), (r"fc2/kernel$", dense("mlp_down")),
                  (r"(shared|embed_tokens)/embedding$", EMBEDDING),  # also the (tied) LM head
                  (r"embed_positions/embedding$", POSITIONS),
                  (r"final_logits_bias$", BIAS)] + _VECTORS


@pytest.fixture(scope="module")
def bart():
  config = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=H, decoder_attention_heads=H, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, max_position_embeddings=16)
  model = transformers.FlaxBartForConditionalGeneration(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids, dec: model(ids, decoder_input_ids=dec, params=p).logits


@pytest.fixture(scope="module")
def opt():
  config = transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=H,
                                  ffn_dim=64, max_position_embeddings=16, word_embed_proj_dim=32)
  model = transformers.FlaxOPTForCausalLM(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids: model(ids, params=p).logits


@pytest.mark.parametrize("preset", PRESETS)
def test_bart_is_right_with_no_declaration(bart, preset):
  params, fn = bart   # embed_positions: a positional table; final_logits_bias (1, V): a bias
  rules = slimoptax.preset(preset, num_heads=H)
  assert_axes(params, resolve(rules, params), _SEQ2SEQ_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS, IDS)), _SEQ2SEQ_TABLE, preset)


@pytest.mark.parametrize("preset", PRESETS)
def test_opt_is_right_with_no_declaration(opt, preset):
  params, fn = opt
  rules = slimoptax.preset(preset, num_heads=H)
  assert_axes(params, resolve(rules, params), _SEQ2SEQ_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS,)), _SEQ2SEQ_TABLE, preset)


# --------------------------------------------------------------------------
# Fused q/k/v kernels: GPT-2's FlaxConv1D c_attn (3d, d), Bloom's query_key_value (d, 3d).
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=H, vocab_size=100, n_positions=16)
  model = transformers.FlaxGPT2LMHeadModel(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids: model(ids, params=p).logits


@pytest.fixture(scope="module")
def bloom():
  config = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=H)
  model = transformers.FlaxBloomForCausalLM(config, _do_init=False)
  params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 8)))
  return params, lambda p, ids: model(ids, params=p).logits


# FlaxConv1D stores (fan_out, fan_in): x @ kernel.T.
_GPT2_TABLE = [(r"attn/c_proj/kernel$", kernel("attn_out", (1,), (0,))),
               (r"c_fc/kernel$", kernel("mlp_up", (1,), (0,))), (r"mlp/c_proj/kernel$", kernel("mlp_down", (1,), (0,))),
               (r"wte/embedding$", EMBEDDING), (r"wpe/embedding$", POSITIONS), (r"c_attn/kernel$", FUSED)] + _VECTORS
_BLOOM_TABLE = [(r"self_attention/dense/kernel$", dense("attn_out")), (r"dense_h_to_4h/kernel$", dense("mlp_up")),
                (r"dense_4h_to_h/kernel$", dense("mlp_down")), (r"word_embeddings/embedding$", EMBEDDING),
                (r"query_key_value/kernel$", FUSED)] + _VECTORS


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_qkv_kernels_are_refused(gpt2, bloom, preset):
  for (params, fn), name in ((gpt2, "c_attn"), (bloom, "query_key_value")):
    rules = slimoptax.preset(preset, num_heads=H)
    match = rf"'transformer/h/0/\w+/{name}/kernel'.*'attn_qkv' layer, which this preset does not handle"
    with pytest.raises(ValueError, match=match):
      slimoptax.compression_axes(params, rules)
    with pytest.raises(ValueError, match=match):
      rules.for_model(fn, params, IDS)


# The declarations that make them right: GPT-2's Conv1D layout and its q | k | v blocks; Bloom's parts
# interleaved per head ((d, H, 3, hd)).
_GPT2_DECLARED = [(r"attn/c_attn/kernel$", split((3, 32, 32), 0, *(torch_dense(r, H) for r in ("query", "key", "value"))))]
_BLOOM_DECLARED = [(r"query_key_value/kernel$", split((32, H, 3, 8), 2, kernel("query", (0,), (1, 2), head_dim=2),
                                                       kernel("key", (0,), (1, 2), head_dim=2),
                                                       kernel("value", (0,), (1, 2))))]


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_qkv_declared_every_leaf_is_right(gpt2, bloom, preset):
  params, fn = gpt2
  rules = slimoptax.preset(preset, num_heads=H, torch_layout=True, fused={r"c_attn/kernel$": ("query", "key", "value")})
  assert_axes(params, resolve(rules, params), _GPT2_DECLARED + _GPT2_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS,)), _GPT2_DECLARED + _GPT2_TABLE, preset)
  # Without torch_layout, names read c_proj / c_fc as (fan_in, fan_out): for_model reads the truth.
  plain = resolve(Rules([(r"c_attn/kernel$", "attn_qkv", (1,))]) + slimoptax.preset(preset, num_heads=H), params, fn,
                  (IDS,))
  assert_axes(params, plain, _GPT2_TABLE, preset, skip={f"transformer/h/{i}/attn/c_attn/kernel" for i in "01"})
  params, fn = bloom
  rules = slimoptax.preset(preset, num_heads=H,
                           fused={r"query_key_value/kernel$": slimoptax.Fused(("query", "key", "value"), heads=H)})
  assert_axes(params, resolve(rules, params), _BLOOM_DECLARED + _BLOOM_TABLE, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS,)), _BLOOM_DECLARED + _BLOOM_TABLE, preset)


def test_a_declared_layout_the_computation_contradicts_is_refused(bloom):
  params, fn = bloom
  fused = {r"query_key_value/kernel$": slimoptax.Fused(("query", "key", "value"), heads=H)}
  wrong = slimoptax.preset("slimadam", torch_layout=r"dense_h_to_4h/kernel$", fused=fused)  # nn.Dense: not torch
  slimoptax.compression_axes(params, wrong)  # names cannot tell
  with pytest.raises(ValueError, match=r"'transformer/h/0/mlp/dense_h_to_4h/kernel': its declared layout gives "
                                       r"fan_in \(1,\), the computation \(0,\)"):
    wrong.for_model(fn, params, IDS)
  # A fused declaration the computation contradicts: Bloom's parts are interleaved per head.
  contiguous = slimoptax.preset("slimadam", fused={r"query_key_value/kernel$": ("query", "key", "value")})
  with pytest.raises(ValueError, match=r"query_key_value/kernel'.*cuts axis 1 as \(4, 3, 8\).*Fused\(heads=...\)"):
    contiguous.for_model(fn, params, IDS)


def test_a_fused_declaration_in_the_wrong_layout_is_refused(gpt2):
  params, fn = gpt2
  no_torch = slimoptax.preset("slimadam", torch_layout=r"c_(proj|fc)/kernel$",
                              fused={r"c_attn/kernel$": slimoptax.Fused(("query", "key", "value"), axis=0)})
  with pytest.raises(ValueError, match=r"c_attn/kernel'.*declared layout gives fan_in \(0,\), the computation \(1,\)"):
    no_torch.for_model(fn, params, IDS)


# --------------------------------------------------------------------------
# ResNet: nn.Conv kernels, BatchNorm, a classifier named "classifier/1" (recognized: a head).
# --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_resnet_is_right_with_no_declaration(preset):
  config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic", num_labels=5)
  model = transformers.FlaxResNetForImageClassification(config, _do_init=False)
  variables = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 16, 16, 3)))
  params, stats = variables["params"], variables["batch_stats"]
  fn = lambda p, x, bs: model(x, params={"params": p, "batch_stats": bs}, train=False).logits
  table = [(r"convolution/kernel$", kernel("conv", (0, 1, 2), (3,))), (r"classifier/1/kernel$", dense("head")),
           (r"normalization/scale$", SCALE), (r"bias$", BIAS)]
  rules = slimoptax.preset(preset)
  assert_axes(params, resolve(rules, params), table, preset)
  # The (1, 1, 8, 16) shortcut conv's window is traced "unknown": for_model averages (2,) where the
  # names give (0, 1, 2), the same entries (the window axes have size 1).
  axes = resolve(rules, params, fn, (PIXELS, stats))
  shortcut = "resnet/encoder/stages/1/layers/0/shortcut/convolution/kernel"
  assert dict(named_leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))[shortcut] == (2,)
  assert_axes(params, axes, table, preset, skip={shortcut})


# --------------------------------------------------------------------------
# Flax linen, auto-named (Embed_0, Dense_0, ...), looped and nn.scan-stacked.
# --------------------------------------------------------------------------


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=H)(h, h)
    # Dense(16) is constructed first: it is Dense_0, the MLP's *down* projection.
    return x + nn.Dense(16)(nn.gelu(nn.Dense(64)(nn.LayerNorm()(x)))), None


class _AutoNamed(nn.Module):
  scan: bool = False

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(50, 16)(ids)
    if self.scan:
      x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()(x, None)
    else:
      for _ in range(2):
        x, _ = _Block()(x)
    return nn.Dense(50)(nn.LayerNorm()(x))


_LINEN_BLOCK = [(r"/Dense_0/kernel$", dense("mlp_down")), (r"/Dense_1/kernel$", dense("mlp_up")),
                (r"(query|key)/kernel$", kernel("query", (0,), (1, 2), head_dim=2)),   # (d, H, hd)
                (r"value/kernel$", kernel("value", (0,), (1, 2))),
                (r"out/kernel$", kernel("attn_out", (0, 1), (2,))),                      # (H, hd, d)
                (r"bias$", BIAS), (r"LayerNorm_\d+/scale$", SCALE)]
_LINEN_TOP = [(r"^Embed_0/embedding$", EMBEDDING), (r"^Dense_0/kernel$", dense("head")),
              (r"^LayerNorm_0/scale$", SCALE), (r"^\w+/bias$", BIAS)]

_LINEN_TYPES = {r"Block_\d+/Dense_0/kernel$": "mlp_down", r"Block_\d+/Dense_1/kernel$": "mlp_up",
                r"^Dense_0/kernel$": "head"}


def _linen(scan):
  module = _AutoNamed(scan=scan)
  params = jax.eval_shape(module.init, jax.random.key(0), IDS)["params"]
  block = [(p, ("stacked", d) if scan else d) for p, d in _LINEN_BLOCK]
  return params, lambda p, ids: module.apply({"params": p}, ids), _LINEN_TOP + block


@pytest.mark.parametrize("preset", PRESETS)
def test_linen_auto_named_layers(preset):
  params, fn, table = _linen(scan=False)
  with pytest.warns(GenericLayerWarning, match=r"5 parameter\(s\)"):
    slimoptax.compression_axes(params, preset)
  rules = slimoptax.preset(preset, layer_types=_LINEN_TYPES)
  assert_axes(params, resolve(rules, params), table, preset)
  assert_axes(params, resolve(rules, params, fn, (IDS,)), table, preset)


@pytest.mark.parametrize("preset", PRESETS)
def test_linen_scan_stack_read_from_the_model_or_declared(preset):
  params, fn, table = _linen(scan=True)
  rules = slimoptax.preset(preset, layer_types=_LINEN_TYPES)   # the stacked axis is read from the scan
  assert_axes(params, resolve(rules, params, fn, (IDS,)), table, preset)
  declared = slimoptax.preset(preset, layer_types=_LINEN_TYPES, stacked=r"^Scan_Block_0/")
  assert_axes(params, resolve(declared, params), table, preset)
  assert_axes(params, resolve(declared, params, fn, (IDS,)), table, preset)
