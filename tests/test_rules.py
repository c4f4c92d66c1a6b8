"""Label rules and presets: per-leaf axes on Flax models, counts, serialisation, errors."""

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import slimoptax
from slimoptax import _tree as tree_lib
from slimoptax import layers as layers_lib
from slimoptax import rules as rules_lib
from tests.models import NNXGPT, LinenCNN, LinenGPT


def S(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def gpt2_small(*, dense_attention=False, layers=12, d=768, heads=12, vocab=50304, ctx=1024):
  """GPT-2 small shapes as an NNX-style tree (tied embedding, no biases)."""
  hd = d // heads
  tree = {"wte": {"embedding": S(vocab, d)}, "wpe": {"embedding": S(ctx, d)}, "ln_f": {"scale": S(d)},
          "blocks": {}}
  for i in range(layers):
    if dense_attention:
      attn = {n: {"kernel": S(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    else:
      attn = {"query": {"kernel": S(d, heads, hd)}, "key": {"kernel": S(d, heads, hd)},
              "value": {"kernel": S(d, heads, hd)}, "out": {"kernel": S(heads, hd, d)}}
    tree["blocks"][str(i)] = {"ln_1": {"scale": S(d)}, "attn": attn, "ln_2": {"scale": S(d)},
                              "mlp": {"up": {"kernel": S(d, 4 * d)}, "down": {"kernel": S(4 * d, d)}}}
  return tree


def kept(tree, axes):
  flat_axes = tree_lib.leaves_like(tree, axes, what="axes")
  return sum(rules_lib.kept_entries(x.shape, a) for x, a in zip(jax.tree.leaves(tree), flat_axes))


@pytest.mark.parametrize("dense_attention", [False, True])
def test_adam_mini_count_on_gpt2_small(dense_attention):
  tree = gpt2_small(dense_attention=dense_attention)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  assert total == 124_373_760
  # Per layer: 12 + 12 heads (q, k), 768 (v), 768 (o), 3072 (up), 768 (down), 1 + 1 (norms);
  # plus 50304 tokens, 1 (wpe), 1 (ln_f): 12 * 5402 + 50306 = 115,130.
  n = kept(tree, slimoptax.compression_axes(tree, "adam-mini", num_heads=12))
  assert n == 115_130
  assert round(100 * n / total, 3) == 0.093


def test_preset_counts_on_gpt2_small_closed_form():
  tree = gpt2_small()
  d, L, V = 768, 12, 50304
  assert kept(tree, slimoptax.compression_axes(tree, "adam")) == 124_373_760
  assert kept(tree, slimoptax.compression_axes(tree, "adalayer")) == 2 + L * 8 + 1
  # AdaLayer+LN+TN: wte full, norms full, everything else one value per tensor.
  assert kept(tree, slimoptax.compression_axes(tree, "adalayer+ln+tn")) == V * d + 1 + d + L * (2 * d + 6)
  # SlimAdam Table 3: q,k keep fan_out (H*hd = d), v,o keep fan_in (d), up keeps fan_in (d),
  # down keeps fan_in (4d), wte/wpe keep one per row, norms full.
  per_layer = d + d + d + d + d + 4 * d + 2 * d
  assert kept(tree, slimoptax.compression_axes(tree, "slimadam")) == V + 1024 + d + L * per_layer


def test_slimadam_axes_orientation_on_nnx_gpt():
  model = NNXGPT(rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  axes = slimoptax.compression_axes(params, "slimadam")
  flat = dict(zip([p for p, _ in tree_lib.named_leaves(params)], tree_lib.leaves_like(params, axes, what="axes")))
  assert flat["blocks/0/attn/query/kernel"] == (0,)      # (d, H, hd): fan_in
  assert flat["blocks/0/attn/key/kernel"] == (0,)
  assert flat["blocks/0/attn/value/kernel"] == (1, 2)    # fan_out = heads x head_dim
  assert flat["blocks/0/attn/out/kernel"] == (2,)        # (H, hd, d): fan_out
  assert flat["blocks/0/mlp/up/kernel"] == (1,)          # Flax (fan_in, fan_out): fan_out = 1
  assert flat["blocks/0/mlp/down/kernel"] == (1,)
  assert flat["wte/embedding"] == (1,)                   # (vocab, d): one per token
  assert flat["lm_head/kernel"] == (0,)                  # (d, vocab): fan_in, one per token
  assert flat["ln_f/scale"] == () and flat["blocks/0/ln_1/scale"] == ()
  am = slimoptax.compression_axes(params, "adam-mini")
  flat_am = dict(zip(flat, tree_lib.leaves_like(params, am, what="axes")))
  assert flat_am["blocks/0/attn/query/kernel"] == (0, 2)  # keep heads
  assert flat_am["blocks/0/attn/out/kernel"] == (0, 1)    # one per output neuron
  assert flat_am["lm_head/kernel"] == (0,)
  assert flat_am["ln_f/scale"] == (0,)


def test_presets_on_linen_gpt_and_cnn():
  gpt = LinenGPT().init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  axes = slimoptax.compression_axes(gpt, "slimadam")
  assert axes["block_0"]["attn"]["query"]["kernel"] == (0,)
  assert axes["block_0"]["up"]["kernel"] == (1,)  # a Dense named "up" outside an mlp module
  assert axes["wte"]["embedding"] == (1,)
  cnn = LinenCNN().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  axes = slimoptax.compression_axes(cnn, "slimadam")
  assert axes["conv_0"]["kernel"] == (0, 1, 2)  # (h, w, in, out): fan_in = window and in
  assert axes["head"]["kernel"] == (0,)         # classifier: fan_in
  assert axes["bn_0"]["scale"] == () and axes["conv_0"]["bias"] == ()
  lbl = slimoptax.param_labels(cnn, "adam-mini")
  assert lbl["bn_0"]["scale"] == "norm" and lbl["conv_1"]["kernel"] == "conv" and lbl["head"]["kernel"] == "head"
  am = slimoptax.compression_axes(cnn, "adam-mini")
  assert am["conv_1"]["kernel"] == (0, 1, 2) and am["bn_0"]["scale"] == (0,)


def test_pytorch_names_and_integer_axes():
  names = {"transformer.h.0.attn.q_proj.weight": S(768, 768), "transformer.wte.weight": S(50304, 768),
           "transformer.h.0.ln_1.weight": S(768)}
  assert slimoptax.param_labels(names, "slimadam") == {
      "transformer.h.0.attn.q_proj.weight": "query", "transformer.wte.weight": "embedding",
      "transformer.h.0.ln_1.weight": "norm"}
  rules = slimoptax.Rules.from_dict({"transformer.h.0.attn.q_proj.weight": [1],
                                     "transformer.wte.weight": [1], "transformer.h.0.ln_1.weight": None})
  assert slimoptax.compression_axes(names, rules) == {
      "transformer.h.0.attn.q_proj.weight": (1,), "transformer.wte.weight": (1,),
      "transformer.h.0.ln_1.weight": ()}


def test_heads_view_numbers_match_numpy():
  """Adam-mini on a 2-D (d, H*hd) query kernel: one mean per head, as numpy computes it."""
  d, H, hd = 6, 3, 4
  g = np.random.default_rng(0).normal(size=(d, H * hd)).astype(np.float32)
  axes = slimoptax.compression_axes({"attn": {"q_proj": {"kernel": S(d, H * hd)}}}, "adam-mini", num_heads=H)
  spec = axes["attn"]["q_proj"]["kernel"]
  assert spec == layers_lib.Reshaped((d, H, hd), (0, 2))
  ours = slimoptax._slim_adam.mean_square(jnp.asarray(g), spec)
  ref = (g.reshape(d, H, hd) ** 2).mean(axis=(0, 2))
  np.testing.assert_allclose(np.asarray(ours).reshape(H), ref, rtol=1e-6)


def test_rules_json_roundtrip_and_table(tmp_path):
  rules = slimoptax.Rules([(r"attn/qkv/kernel$", "attn_qkv", (0,))]) + slimoptax.preset("slimadam")
  path = tmp_path / "rules.json"
  rules.to_json(str(path))
  loaded = slimoptax.Rules.from_json(str(path))
  assert loaded == rules
  params = {"attn": {"qkv": {"kernel": S(8, 24)}}, "mlp": {"up": {"kernel": S(8, 32)}}, "ln": {"scale": S(8)}}
  assert slimoptax.compression_axes(params, loaded) == slimoptax.compression_axes(params, rules)
  table = rules.table(params)
  assert "attn/qkv/kernel" in table and "attn_qkv" in table
  # 8 (qkv keeps fan_out 24? no: averaged over fan_in -> 24) + 8 (up keeps fan_in) + 8 (norm).
  assert "40 of 456" in table.replace(",", "")
  assert json.loads(path.read_text())["format"] == "slimoptax.rules/v1"


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_mismatched_compress_tree_names_paths():
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"parameters without an entry: \['b'\]"):
    slimoptax.scale_by_slim_adam(compress={"a": (0,), "c": ()}).init(params)


def test_axis_out_of_range_names_path():
  params = {"layer": {"kernel": jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match=r"'layer/kernel'.*axis 2 out of range"):
    slimoptax.scale_by_slim_adam(compress={"layer": {"kernel": (2,)}}).init(params)
  rules = slimoptax.Rules([("kernel", "k", (5,))])
  with pytest.raises(ValueError, match=r"axis 5 out of range for parameter 'layer/kernel'"):
    slimoptax.compression_axes(params, rules)


def test_unknown_layer_type_and_preset():
  with pytest.raises(ValueError, match="unknown layer type 'mlp_upp'"):
    slimoptax.preset("slimadam", overrides={"mlp_upp": ("fan_in",)})
  with pytest.raises(ValueError, match="unknown preset"):
    slimoptax.preset("slim-adam-9000")
  with pytest.raises(ValueError, match=r"label 'my_layer' is not a layer type"):
    slimoptax.compression_axes({"x": {"kernel": S(2, 3)}}, slimoptax.Rules([("x", "my_layer", ("fan_in",))]))


def test_unmatched_rule_warns_and_unmatched_param_errors():
  params = {"dense": {"kernel": S(4, 4)}}
  with pytest.warns(UserWarning, match=r"'nothing_here' -> 'x'.*matches no parameter"):
    slimoptax.compression_axes(params, slimoptax.Rules([("nothing_here", "x", ()), ("kernel", "k", (0,))]))
  with pytest.raises(ValueError, match=r"no rule of 'custom' matches parameter 'dense/kernel'"):
    slimoptax.compression_axes(params, slimoptax.Rules([("bias", "b", ())]))
  with pytest.raises(ValueError, match=r"no rule of 'slimadam' matches parameter 'weird' with shape \(3, 3\)"):
    slimoptax.compression_axes({"weird": S(3, 3)}, "slimadam")
  with pytest.raises(ValueError, match=r"'attn/c_attn/kernel'.*'attn_qkv' layer.*not handle"):
    slimoptax.compression_axes({"attn": {"c_attn": {"kernel": S(4, 12)}}}, "slimadam")
  with pytest.raises(ValueError, match="pass num_heads"):
    slimoptax.compression_axes({"attn": {"q_proj": {"kernel": S(4, 12)}}}, "adam-mini")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    slimoptax.compression_axes({"attn": {"q_proj": {"kernel": S(4, 12)}}}, "slimadam")  # presets never warn


def test_integer_and_complex_params_rejected_with_path():
  with pytest.raises(ValueError, match=r"'step' has dtype int32"):
    slimoptax.slim_adamw(1e-3).init({"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)})
  with pytest.raises(ValueError, match=r"'z' is complex"):
    slimoptax.slim_adamw(1e-3).init({"z": jnp.ones((2,), jnp.complex64)})


def test_state_from_other_rules_is_an_error():
  params = {"dense": {"kernel": jnp.ones((4, 6))}}
  state = slimoptax.scale_by_slim_adam(compress="adalayer").init(params)
  tx = slimoptax.scale_by_slim_adam(compress="slimadam")
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(1, 1\) but the compression rules? gives? \(4, 1\)"):
    tx.update(params, state)


def test_linen_auto_named_layers():
  """Flax's default module names (Dense_0, Conv_0, LayerNorm_0, RMSNorm_0, ...) are recognised."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens, image):
      x = nn.Embed(11, 8)(tokens)
      x = nn.LayerNorm()(x)
      x = nn.MultiHeadDotProductAttention(num_heads=2)(x)
      x = nn.RMSNorm()(nn.Dense(8)(x))
      y = nn.BatchNorm(use_running_average=True)(nn.Conv(3, (2, 2))(image))
      z = nn.DenseGeneral((2, 4))(x)
      return x.sum() + y.sum() + z.sum()

  params = Net().init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 4, 4, 1)))["params"]
  lbl = slimoptax.param_labels(params, "slimadam")
  assert lbl["Embed_0"]["embedding"] == "embedding"
  assert lbl["LayerNorm_0"] == {"scale": "norm", "bias": "norm"}
  assert lbl["RMSNorm_0"]["scale"] == "norm" and lbl["BatchNorm_0"]["scale"] == "norm"
  assert lbl["MultiHeadDotProductAttention_0"]["query"] == {"kernel": "query", "bias": "bias"}
  assert lbl["MultiHeadDotProductAttention_0"]["out"]["kernel"] == "attn_out"
  assert lbl["Dense_0"] == {"kernel": "dense", "bias": "bias"}
  assert lbl["Conv_0"]["kernel"] == "conv"
  # Dense_0 / DenseGeneral_0 are named by nothing but "kernel": their role is a guess, said once.
  with pytest.warns(slimoptax.GenericLayerWarning, match=r"2 parameter\(s\).*'DenseGeneral_0/kernel' \(8, 2, 4\), "
                    r"'Dense_0/kernel' \(8, 8\)"):
    axes = slimoptax.compression_axes(params, "slimadam")
  # A generic n-D kernel reads as (*fan_in, fan_out); other DenseGeneral layouts need a rule.
  assert axes["DenseGeneral_0"]["kernel"] == (2,)
  assert slimoptax.compression_axes(params, slimoptax.preset("slimadam", overrides={"embedding": ("vocab",)}),
                                    warn=False)["Embed_0"]["embedding"] == (0,)


def test_generic_kernels_warn_once_error_under_strict_and_are_marked_in_the_table():
  params = {"Dense_0": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)},
            "Dense_1": {"kernel": jnp.zeros((32, 10))}, "ln": {"scale": jnp.ones(8)}}
  import warnings as _w
  with _w.catch_warnings(record=True) as caught:
    _w.simplefilter("always")
    slimoptax.compression_axes(params, "slimadam")
  generic = [w for w in caught if issubclass(w.category, slimoptax.GenericLayerWarning)]
  assert len(generic) == 1 and "'Dense_0/kernel' (8, 32), 'Dense_1/kernel' (32, 10)" in str(generic[0].message)
  with pytest.raises(ValueError, match=r"generic kernel pattern.*layer_types=\{'\^Dense_0/kernel\$': 'head'\}"
                     r".*strict=True"):
    slimoptax.compression_axes(params, slimoptax.preset("slimadam", strict=True))
  # Declared, the head gets the preset's head axes (fan_in) and the guess is gone.
  declared = slimoptax.preset("slimadam", layer_types={r"^Dense_1/kernel$": "head", r"^Dense_0/kernel$": "mlp_up"},
                              strict=True)
  axes = slimoptax.compression_axes(params, declared)
  assert axes["Dense_1"]["kernel"] == (0,) and axes["Dense_0"]["kernel"] == (1,)
  table = slimoptax.preset("slimadam").table(params)
  assert "dense?" in table and "generic kernel pattern" in table
  assert "?" not in declared.table(params)
  # Presets that treat every role alike have nothing to guess.
  for name in ("adam", "adalayer"):
    with _w.catch_warnings():
      _w.simplefilter("error")
      slimoptax.compression_axes(params, slimoptax.preset(name, strict=True))
  with pytest.raises(ValueError, match="is not a layer type"):
    slimoptax.preset("slimadam", layer_types={"x": "lm_head"})


# --- Rules, JSON and per-parameter lists: errors that name the rule, the key, the path ---


def test_invalid_regex_names_the_rule():
  with pytest.raises(ValueError, match=r"pattern='mlp/\(up', label='mlp_up'\): invalid regular expression"):
    slimoptax.Rules([("mlp/(up", "mlp_up", ("fan_out",))])
  with pytest.raises(TypeError, match=r"rule 1: expected a Rule or a \(pattern, label, axes\) tuple"):
    slimoptax.Rules([("up", "mlp_up"), "down"])


def test_invalid_regex_in_json_names_the_rule_index():
  text = json.dumps({"format": "slimoptax.rules/v1", "rules": [
      {"pattern": "ok$", "label": "dense", "axes": []},
      {"pattern": "[unclosed", "label": "dense", "axes": [0]}]})
  with pytest.raises(ValueError, match=r"rules\[1\] \(pattern='\[unclosed', label='dense'\).*invalid regular"):
    slimoptax.Rules.from_json(text)
  with pytest.raises(ValueError, match=r"flat mapping, key 'x': unknown axis name 'nope'"):
    slimoptax.Rules.from_dict({"x": ["nope"]})


def test_json_top_level_list_is_explained():
  text = json.dumps([{"pattern": "up", "label": "mlp_up", "axes": [1]}])
  with pytest.raises(ValueError, match=r"expected an object with a 'rules' list or a flat "
                                       r"\{name: \[axes\] \| null\} mapping, got a list"):
    slimoptax.Rules.from_json(text)
  with pytest.raises(ValueError, match="got a list"):
    slimoptax.Rules.from_json("  \n [1, 2]")  # whitespace before the bracket: still JSON text
  with pytest.raises(ValueError, match="got int 3"):
    slimoptax.Rules.from_dict(3)


@pytest.mark.parametrize("key", ["pattern", "label", "axes"])
def test_json_missing_rule_key_names_index_and_key(key):
  rule = {"pattern": "up", "label": "mlp_up", "axes": [1]}
  del rule[key]
  text = json.dumps({"format": "slimoptax.rules/v1", "rules": [{"pattern": "x", "label": "x", "axes": []}, rule]})
  with pytest.raises(ValueError, match=rf"rules\[1\] .*missing key '{key}'"):
    slimoptax.Rules.from_json(text)


def test_json_missing_rules_key_and_wrong_values():
  with pytest.raises(ValueError, match="missing key 'rules'"):
    slimoptax.Rules.from_dict({"format": "slimoptax.rules/v1", "name": "x"})
  with pytest.raises(ValueError, match="'rules' must be a list"):
    slimoptax.Rules.from_dict({"format": "slimoptax.rules/v1", "rules": {"up": [1]}})
  with pytest.raises(ValueError, match=r"unknown 'format' 'slimoptax.rules/v9'"):
    slimoptax.Rules.from_dict({"format": "slimoptax.rules/v9", "rules": []})
  base = {"pattern": "up", "label": "mlp_up"}
  with pytest.raises(ValueError, match=r"rules\[0\] \(pattern='up', label='mlp_up'\): 'axes' must be a list"):
    slimoptax.Rules.from_dict({"rules": [{**base, "axes": 1}]})
  with pytest.raises(ValueError, match=r"rules\[0\] .*unknown key\(s\) \['axis'\]"):
    slimoptax.Rules.from_dict({"rules": [{**base, "axes": [1], "axis": [1]}]})
  with pytest.raises(ValueError, match=r"rules\[0\] .*unknown axis name 'fanout'"):
    slimoptax.Rules.from_dict({"rules": [{**base, "axes": ["fanout"]}]})
  with pytest.raises(ValueError, match=r"rules\[0\]: expected an object"):
    slimoptax.Rules.from_dict({"format": "slimoptax.rules/v1", "rules": [["up", "mlp_up", [1]]]})
  with pytest.raises(ValueError, match="key 'name': expected a list of axes or null, got 'x'; for the structured"):
    slimoptax.Rules.from_dict({"name": "x", "up": [1]})
  # Without "format", a "rules" list of objects is the structured form (to_dict minus "format").
  rules = slimoptax.Rules.from_dict({"rules": [{**base, "axes": [1]}], "name": "mine"})
  assert rules.name == "mine" and rules.rules[0].axes == (1,)


def test_from_json_path_or_text(tmp_path):
  rules = slimoptax.preset("slimadam")
  path = tmp_path / "rules.json"
  rules.to_json(str(path))
  assert slimoptax.Rules.from_json(str(path)) == rules
  assert slimoptax.Rules.from_json(path) == rules  # a pathlib.Path
  assert slimoptax.Rules.from_json("\n  " + rules.to_json()) == rules
  missing = str(tmp_path / "nope.json")
  with pytest.raises(FileNotFoundError, match=r"rules file '.*nope\.json' not found") as err:
    slimoptax.Rules.from_json(missing)
  assert "{" not in str(err.value).split("not found")[0]
  with pytest.raises(ValueError, match=r"invalid JSON: .* at line 3, column 1"):
    slimoptax.Rules.from_json('{"a": [0],\n "b": [1],\n}')
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"format": "slimoptax.rules/v1", "rules": [{"pattern": "(", "label": "x", "axes": []}]}))
  with pytest.raises(ValueError, match=r"rules file '.*bad\.json': rules\[0\] \(pattern='\(', label='x'\)"):
    slimoptax.Rules.from_json(str(bad))


def test_lists_of_ints_are_axes_at_a_parameter():
  """Where a parameter is one array, a list of ints is its axes (unambiguous): accepted."""
  a, b = jnp.ones((4, 8)), jnp.ones((8, 4))
  assert slimoptax.compression_axes((a, b), ((0,), [1])) == ((0,), (1,))
  assert slimoptax.compression_axes([a, b], [[0], [0, 1]]) == [(0,), (0, 1)]
  assert slimoptax.compression_axes({"x": a, "y": b}, {"x": [0, 1], "y": None}) == {"x": (0, 1), "y": ()}


def test_list_where_a_tuple_node_is_expected_names_the_path():
  a, b = jnp.ones((4, 8)), jnp.ones((8, 4))
  with pytest.raises(ValueError, match=r"compress at the top level is a list where the parameters have a "
                                       r"tuple \(parameter '0'\): give axes as tuples \(lists are pytree nodes\)"):
    slimoptax.slim_adamw(1e-3, compress=[[0, 1], [1]]).init((a, b))
  with pytest.raises(ValueError, match=r"at the top level is a list where the parameters have a tuple"):
    slimoptax.compression_axes((a, b), [(0,), (1,)])  # not taken for a list of rules
  with pytest.raises(ValueError, match=r"rules at 'm' is the axes \[0, 1\], but the parameters there are a "
                                       r"dict, not one array \(parameter 'm/x'\).*lists are pytree nodes"):
    slimoptax.compression_axes({"m": {"x": a}, "y": b}, {"m": [0, 1], "y": ()})
  with pytest.raises(ValueError, match=r"compress for 'x': expected a tuple of int axes, got \[\[0\]\] "
                                       r"\(give axes as tuples"):
    rules_lib.validate_axes("x", (4, 8), [[0]])


@pytest.mark.parametrize("path,shape,ltype", [
    # BERT / ViT (Hugging Face Flax): the attention projection before the MLP's layer/N/output/dense.
    ("bert/encoder/layer/0/attention/output/dense/kernel", (32, 32), "attn_out"),
    ("bert/encoder/layer/0/crossattention/output/dense/kernel", (32, 32), "attn_out"),
    ("bert/encoder/layer/0/intermediate/dense/kernel", (32, 64), "mlp_up"),
    ("vit/encoder/layer/11/output/dense/kernel", (64, 32), "mlp_down"),
    ("bert.encoder.layer.0.output.dense.weight", (32, 64), "mlp_down"),
    ("bert/pooler/dense/kernel", (32, 32), "dense"),
    ("cls/predictions/transform/dense/kernel", (32, 32), "dense"),
    ("vit/embeddings/patch_embeddings/projection/kernel", (4, 4, 3, 32), "conv"),
    ("vit/embeddings/cls_token", (1, 1, 32), "bias"),
    ("vit/embeddings/position_embeddings", (1, 17, 32), "pos_embedding"),
    # T5.
    ("encoder/block/0/layer/0/SelfAttention/o/kernel", (32, 32), "attn_out"),
    ("decoder/block/0/layer/1/EncDecAttention/o/kernel", (32, 32), "attn_out"),
    ("decoder/block/0/layer/2/DenseReluDense/wo/kernel", (64, 32), "mlp_down"),
    ("encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding", (8, 4), "bias"),
    # Bloom, BART / OPT, ResNet.
    ("transformer/h/0/mlp/dense_h_to_4h/kernel", (32, 128), "mlp_up"),
    ("transformer/h/0/mlp/dense_4h_to_h/kernel", (128, 32), "mlp_down"),
    ("model/decoder/embed_positions/embedding", (18, 32), "pos_embedding"),
    ("final_logits_bias", (1, 100), "bias"),
    ("classifier/1/kernel", (16, 5), "head"),
])
def test_hugging_face_flax_names(path, shape, ltype):
  assert slimoptax.layer_type(path, shape) == ltype


@pytest.mark.parametrize("path,shape,ltype", [
    # Near misses: the names these recognizers must not take over.
    ("bert/encoder/layer/0/output/LayerNorm/scale", (32,), "norm"),
    ("bert/encoder/layer/0/attention/output/dense/bias", (32,), "bias"),
    ("bert/encoder/layer/0/attention/self/query/kernel", (32, 32), "query"),
    ("transformer/h/0/self_attention/dense/kernel", (32, 32), "attn_out"),
    ("blocks/0/output/dense/kernel", (64, 32), "dense"),          # "output/dense" outside layer/N
    ("encoder/output/dense/kernel", (64, 32), "dense"),
    ("intermediate/kernel", (32, 64), "dense"),
    ("model/o/kernel", (32, 32), "dense"),                        # "o" outside T5 attention
    ("SelfAttention/out/kernel", (32, 32), "attn_out"),
    ("DenseReluDense/wi/kernel", (32, 64), "mlp_up"),
    ("DenseReluDense/wi_0/kernel", (32, 64), "mlp_gate"),
    ("DenseReluDense/wi_1/kernel", (32, 64), "mlp_up"),
    ("attention/wo/kernel", (32, 32), "attn_out"),
    ("mlp/wo/kernel", (64, 32), "mlp_down"),
    ("wo/kernel", (64, 32), "dense"),
    ("classifier/kernel", (32, 5), "head"),
    ("classifier/0/kernel", (32, 32), "dense"),                   # a hidden layer of a Sequential head
    ("model/shared/embedding", (100, 32), "embedding"),
    ("model/decoder/embed_tokens/embedding", (100, 32), "embedding"),
    ("projection/kernel", (32, 32), "dense"),
    ("visual_projection/kernel", (32, 32), "dense"),
    ("cls/predictions/bias", (100,), "bias"),
])
def test_near_misses_of_the_hugging_face_names_keep_their_type(path, shape, ltype):
  assert slimoptax.layer_type(path, shape) == ltype


def test_hugging_face_names_are_not_generic():
  params = {"pooler": {"dense": {"kernel": S(32, 32)}},
            "layer": {"0": {"attention": {"output": {"dense": {"kernel": S(32, 32)}}},
                            "intermediate": {"dense": {"kernel": S(32, 64)}},
                            "output": {"dense": {"kernel": S(64, 32)}}}}}
  with warnings.catch_warnings():
    warnings.simplefilter("error", slimoptax.GenericLayerWarning)
    axes = slimoptax.compression_axes(params, "slimadam")
  assert axes["pooler"]["dense"]["kernel"] == (1,)
  assert axes["layer"]["0"]["output"]["dense"]["kernel"] == (1,)
  with pytest.warns(slimoptax.GenericLayerWarning, match=r"'blocks/0/output/dense/kernel'"):
    slimoptax.compression_axes({"blocks": {"0": {"output": {"dense": {"kernel": S(64, 32)}}}}}, "slimadam")


def test_positional_table_with_leading_size_one_axes():
  """ViT's (1, N, d) table: the leading size-1 axis is batch-like, neither positions nor embedding."""
  view, roles = layers_lib.axis_roles("pos_embedding", (1, 17, 32))
  assert view == (1, 17, 32)
  assert (roles["token"], roles["fan_in"], roles["embed"], roles["fan_out"], roles["all"]) == (
      (1,), (1,), (2,), (2,), (0, 1, 2))
  assert layers_lib.axis_roles("pos_embedding", (1, 32))[1]["token"] == (0,)    # a (positions=1, d) table
  assert layers_lib.axis_roles("pos_embedding", (16, 32))[1]["embed"] == (1,)
  assert layers_lib.axis_roles("embedding", (1, 17, 32))[1]["embed"] == (1, 2)  # token tables unchanged
  params = {"embeddings": {"position_embeddings": S(1, 17, 32)}}
  assert slimoptax.compression_axes(params, "slimadam")["embeddings"]["position_embeddings"] == (2,)
  assert slimoptax.compression_axes(params, "adam-mini")["embeddings"]["position_embeddings"] == (0, 1, 2)
