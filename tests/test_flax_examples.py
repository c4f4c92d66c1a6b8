"""The presets on models of Flax's own examples (lm1b, imagenet, gemma), every leaf checked.

Flax's ``examples/`` are not in the ``flax`` wheel, so their parameter trees
(paths and shapes of tiny configs) are read from
``reference/flax_examples_trees.json``, written by
``reference/export_flax_examples.py`` from the Flax 0.12.8 sdist. Each leaf's
expected axes come from what the example's source does with it (the tables
below cite the layer that creates it) and from each preset's reference as
`tests.test_peers.expected` defines it: Table 3 of the SlimAdam paper
(``"slimadam"``) or Adam-mini 1.1.1's grouping (``"adam-mini"``).

Two claims per model and preset:

* with the declarations a user would write (`DECLARATIONS`) every leaf is
  right and nothing warns;
* with none, no leaf is silently wrong: each is right, or named in a
  `slimoptax.GenericLayerWarning`, or the whole tree is refused with a
  ValueError naming a parameter.

No declaration: lm1b's ``logitdense`` head and the ResNets' ``Dense_0``
classifier are only matched by the generic kernel pattern (warned); gemma's
einsum kernels are recognized by name with their layouts
(`slimoptax.layouts.PRESET_LAYOUTS`), so gemma needs nothing; so are
``ConvLocal_<k>`` kernels. ``_ResNet1Local`` names its first ``nn.ConvLocal``
``conv_init``, as the ``nn.Conv`` of the other ResNets: neither its name nor
its shape tells it apart, so by names it is silently wrong (xfail below;
``Rules.for_model`` reads it, `tests/test_trace.py`).
"""

import json
import pathlib
import warnings

import jax
import jax.numpy as jnp
import pytest

import slimoptax
from slimoptax import GenericLayerWarning
from slimoptax._tree import named_leaves
from tests.test_peers import BIAS, EMBEDDING, SCALE, dense, expected, kernel, leaf_table, split

PRESETS = ("slimadam", "adam-mini")
TREES = pathlib.Path(__file__).parent / "reference" / "flax_examples_trees.json"
_DATA = json.loads(TREES.read_text())
MODELS = _DATA["models"]


def params_of(name):
  """The model's parameter tree: nested dicts of `jax.ShapeDtypeStruct`, keyed by path component."""
  tree = {}
  for path, shape in MODELS[name]["params"].items():
    *head, last = path.split("/")
    node = tree
    for key in head:
      node = node.setdefault(key, {})
    node[last] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return tree


# --------------------------------------------------------------------------
# What each leaf is, read from the example sources (first matching pattern).
# --------------------------------------------------------------------------

# examples/lm1b/models.py: TransformerLM -> Decoder ("decoder"):
#   nn.Embed (vocab, emb_dim) "Embed_0", the input embedding (and, with logits_via_embedding, the
#     output head through Embed.attend);
#   AddPositionEmbs "posembed_output": self.param("pos_embedding", ..., (1, max_len, d)) only when
#     config.posemb_init is given (else fixed sinusoids, no parameter), added to the batch: per position;
#   EncoderDecoder1DBlock "encoderdecoderblock_<i>": nn.LayerNorm x2, nn.MultiHeadDotProductAttention
#     (DenseGeneral query/key/value (d, H, hd), out (H, hd, d), use_bias=False), MlpBlock
#     (nn.Dense(mlp_dim) "Dense_0" = up, nn.Dense(d) "Dense_1" = down, both with biases);
#   nn.LayerNorm "encoderdecoder_norm"; nn.Dense(output_vocab_size) "logitdense", the LM head
#     (only without logits_via_embedding).
LM1B = [
    (r"MultiHeadDotProductAttention_0/query/kernel$", kernel("query", (0,), (1, 2), head_dim=2)),
    (r"MultiHeadDotProductAttention_0/key/kernel$", kernel("key", (0,), (1, 2), head_dim=2)),
    (r"MultiHeadDotProductAttention_0/value/kernel$", kernel("value", (0,), (1, 2))),
    (r"MultiHeadDotProductAttention_0/out/kernel$", kernel("attn_out", (0, 1), (2,))),
    (r"MlpBlock_0/Dense_0/kernel$", dense("mlp_up")),
    (r"MlpBlock_0/Dense_1/kernel$", dense("mlp_down")),
    (r"^decoder/logitdense/kernel$", dense("head")),
    (r"^decoder/Embed_0/embedding$", EMBEDDING),
    (r"^decoder/posembed_output/pos_embedding$", ("table", "pos_embedding", (2,))),
    (r"(LayerNorm_\d+|encoderdecoder_norm)/scale$", SCALE),
    (r"/bias$", BIAS),   # LayerNorm and Dense biases
]

# examples/imagenet/models.py: ResNet with conv = partial(nn.Conv, use_bias=False):
#   "conv_init" (7, 7, 3, F) and, in each ResNetBlock_<k>, "Conv_0", "Conv_1" (3, 3, in, out) and the
#     strided shortcut "conv_proj" (1, 1, in, out): (*window, in, out), one filter per output channel;
#   nn.BatchNorm "bn_init", "BatchNorm_0/1", "norm_proj" (scale, bias; batch_stats are not params);
#   nn.Dense(num_classes) "Dense_0" after the global mean pool: the classifier head.
RESNET = [
    (r"(^conv_init|/Conv_\d+|/conv_proj)/kernel$", kernel("conv", (0, 1, 2), (3,))),
    (r"^Dense_0/kernel$", dense("head")),
    (r"(^bn_init|/BatchNorm_\d+|/norm_proj)/scale$", SCALE),
    (r"/bias$", BIAS),
]

# examples/imagenet/models.py: _ResNet1Local = ResNet(stage_sizes=[1], conv=nn.ConvLocal): the same
# layers, but nn.ConvLocal's kernel is (*output_spatial, prod(window) * in, out) (flax.linen.linear,
# "one (unshared) convolutional kernel per each pixel in the output"): output position (i, j),
# channel c is fed by kernel[i, j, :, c]. Its fan_in is axis 2 alone; axes 0, 1 are output positions,
# as independent as the out channels (a stack of per-position Dense layers).
RESNET_LOCAL = [
    (r"(^conv_init|/ConvLocal_\d+)/kernel$", kernel("conv", (2,), (3,))),
] + RESNET


# examples/gemma/modules.py (Transformer in examples/gemma/transformer.py):
#   modules.ScaledEmbed "embedder" (nnx.Embed (num_embed, d)): the input embedding and, through
#     embedder.attend, the tied output head;
#   Attention "layers/<i>/attn": nnx.Einsum "q_einsum" 'BTD,NDH->BTNH' (N, D, H) and "kv_einsum"
#     'BTD,CKDH->CBTKH' (2, K, D, H): C indexes key (0) and value (1), when num_heads != num_kv_heads;
#     else "qkv_einsum" 'BTD,SNDH->SBTNH' (3, N, D, H): query, key, value; "attn_vec_einsum"
#     'BTNH,NHD->BTD' (N, H, D); layers.RMSNorm "_query_norm", "_key_norm" (head_dim,) with use_qk_norm;
#   FeedForward "mlp": nnx.Linear "gate_proj", "up_proj" (d, F), "down_proj" (F, d), no biases;
#   layers.RMSNorm "pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm",
#     "final_norm": a scale (x * (1 + scale)).
def gemma_table(name):
  config = MODELS[name]["config"]
  n, kv, d, hd = config["num_heads"], config["num_kv_heads"], config["embed_dim"], config["head_dim"]
  query = kernel("query", (1,), (0, 2), head_dim=2)   # (N, D, H): D contracted, N heads, H head_dim
  key = kernel("key", (1,), (0, 2), head_dim=2)       # a (K, D, H) part
  value = kernel("value", (1,), (0, 2))
  return [
      (r"/attn/q_einsum/kernel$", query),
      (r"/attn/kv_einsum/kernel$", split((2, kv, d, hd), 0, key, value)),
      (r"/attn/qkv_einsum/kernel$", split((3, n, d, hd), 0, query, key, value)),
      (r"/attn/attn_vec_einsum/kernel$", kernel("attn_out", (0, 1), (2,))),   # (N, H, D)
      (r"/mlp/gate_proj/kernel$", dense("mlp_gate")),
      (r"/mlp/up_proj/kernel$", dense("mlp_up")),
      (r"/mlp/down_proj/kernel$", dense("mlp_down")),
      (r"^embedder/embedding$", EMBEDDING),
      (r"norm/scale$", SCALE),
  ]


TABLES = {"lm1b": LM1B, "lm1b-tied-learned-pos": LM1B, "imagenet-resnet18": RESNET,
          "imagenet-resnet1-local": RESNET_LOCAL, "gemma-gqa": gemma_table("gemma-gqa"),
          "gemma-mqa": gemma_table("gemma-mqa"), "gemma-mha": gemma_table("gemma-mha")}

# --------------------------------------------------------------------------
# The declarations that make every leaf right (slimoptax.preset keywords).
# --------------------------------------------------------------------------

DECLARATIONS = {
    "lm1b": dict(layer_types={r"^decoder/logitdense/kernel$": "head"}),
    "lm1b-tied-learned-pos": {},
    "imagenet-resnet18": dict(layer_types={r"^Dense_0/kernel$": "head"}),
    # The renamed nn.ConvLocal: its output-position axes (all but the last two) declared stacked.
    "imagenet-resnet1-local": dict(layer_types={r"^Dense_0/kernel$": "head"},
                                   stacked={r"^conv_init/kernel$": "leading"}),
    "gemma-gqa": {}, "gemma-mqa": {}, "gemma-mha": {},
}

# Without declarations, leaves the presets get wrong and say nothing about. Each is a bug to fix.
_SILENTLY_WRONG = {
    "imagenet-resnet1-local": (
        "the nn.ConvLocal conv_init/kernel (16, 16, 147, 4), named as the nn.Conv of the other ResNets, is "
        "averaged over (0, 1, 2), its output-position axes included, with no warning; both presets should "
        "average (2,). Names and shape cannot tell; Rules.for_model reads it, or declare "
        "stacked={r'^conv_init/kernel$': 'leading'}"),
}


def test_the_trees_cover_every_model():
  assert _DATA["flax_version"] == "0.12.8"
  assert set(MODELS) == set(TABLES) == set(DECLARATIONS)
  for name, model in MODELS.items():
    assert model["source"].startswith("examples/") and model["params"], name


def _outcome(params, table, preset, rules):
  """``(wrong, warned, error)``: ``{path: (got, expected)}`` of wrong leaves, the warnings, the ValueError."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      axes = slimoptax.compression_axes(params, rules)
    except ValueError as err:
      return None, caught, str(err)
  got = dict(named_leaves(axes, is_leaf=lambda x: isinstance(x, tuple)))   # Reshaped / Split are tuples
  wrong = {p: (got[p], expected(d, s, preset)) for p, (s, d) in leaf_table(params, table).items()
           if got[p] != expected(d, s, preset)}
  return wrong, caught, None


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_declared_every_leaf_is_right(name, preset):
  params = params_of(name)
  rules = slimoptax.preset(preset, **DECLARATIONS[name])
  wrong, caught, error = _outcome(params, TABLES[name], preset, rules)
  assert error is None, error
  assert not wrong, f"{name} {preset}: (got, expected) {wrong}"
  assert not caught, [str(w.message) for w in caught]   # no GenericLayerWarning, no unused declaration
  jax.eval_shape(slimoptax.scale_by_slim_adam(compress=rules).init, params)   # the state builds


def _undeclared_cases():
  for name in sorted(MODELS):
    for preset in PRESETS:
      marks = ()
      if name in _SILENTLY_WRONG:
        marks = pytest.mark.xfail(strict=True, reason=f"silently wrong ({preset}): {_SILENTLY_WRONG[name]}")
      yield pytest.param(name, preset, marks=marks, id=f"{name}-{preset}")


@pytest.mark.parametrize("name, preset", list(_undeclared_cases()))
def test_undeclared_no_leaf_is_silently_wrong(name, preset):
  params = params_of(name)
  wrong, caught, error = _outcome(params, TABLES[name], preset, slimoptax.preset(preset))
  if error is not None:   # refused: nothing is resolved, and the message names the parameter
    assert any(f"'{path}'" in error for path in MODELS[name]["params"]), error
    return
  warned = " ".join(str(w.message) for w in caught if issubclass(w.category, GenericLayerWarning))
  silent = {p: v for p, v in wrong.items() if f"'{p}'" not in warned}
  assert not silent, f"{name} {preset}: silently wrong (got, expected) {silent}"
