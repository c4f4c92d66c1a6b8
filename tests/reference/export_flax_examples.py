"""Writes the parameter shapes of three models from Flax's own examples, for tests/test_flax_examples.py.

Not run by the tests or CI: Flax's ``examples/`` folder is not in the ``flax``
wheel, so CI cannot import these models. This script reads them from an
extracted Flax source distribution and writes ``flax_examples_trees.json``
beside itself (committed), which the test replays with no Flax example
installed. No example code is copied into this repository: only parameter
paths and shapes.

Input: ``--examples DIR``, the ``examples`` folder of an extracted
``flax-<version>`` sdist (``pip download --no-binary :all: --no-deps
flax==0.12.8`` then ``tar -xzf flax-0.12.8.tar.gz``). Run it with this
project's environment (the ``flax`` it imports should be the version of the
sdist, recorded in the JSON)::

  .venv/bin/python tests/reference/export_flax_examples.py --examples /tmp/fx/flax-0.12.8/examples

Models, each from a tiny config and built with ``jax.eval_shape`` /
``nnx.eval_shape`` (shapes only, nothing is computed):

* ``examples/lm1b/models.py``: the linen ``TransformerLM`` (``decode=False``),
  once with its default untied ``logitdense`` head and fixed sinusoidal
  positions, once with ``logits_via_embedding=True`` and a learned
  ``pos_embedding``;
* ``examples/imagenet/models.py``: the linen ``ResNet18`` with 4 filters, and
  ``_ResNet1Local``, its one-block test variant built of ``nn.ConvLocal``
  (unshared, per-position kernels);
* ``examples/gemma/transformer.py``: the NNX gemma ``Transformer`` with
  grouped-query (``q_einsum`` + ``kv_einsum``, 2 kv heads), multi-query (1 kv
  head) and multi-head (``qkv_einsum``) attention.

Only the model modules are imported (lm1b's and imagenet's ``models.py`` from
their files; gemma's ``transformer.py`` with its example folder on
``sys.path``). ``jaxtyping``, which the gemma modules import at top level for a
type annotation only, is replaced by a stub when it is not installed.

Output: ``{"flax_version": ..., "models": {name: {"source": ..., "config":
{...}, "params": {path: [shape...]}}}}``, paths joined as slimoptax names
parameters (`slimoptax._tree.named_leaves`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import re
import sys
import types

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from slimoptax._tree import named_leaves, shape_of

OUT = pathlib.Path(__file__).with_name("flax_examples_trees.json")
IDS = jax.ShapeDtypeStruct((2, 8), jnp.int32)
IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def load_file(path: pathlib.Path, name: str) -> types.ModuleType:
  """Imports one file as module ``name`` (lm1b and imagenet both call theirs ``models``)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shapes(tree) -> dict[str, list[int]]:
  return {path: list(shape_of(leaf)) for path, leaf in named_leaves(tree)}


def lm1b(examples: pathlib.Path) -> dict[str, dict]:
  models = load_file(examples / "lm1b" / "models.py", "flax_example_lm1b_models")
  base = dict(vocab_size=100, output_vocab_size=100, emb_dim=32, num_heads=4, num_layers=2, qkv_dim=32,
              mlp_dim=64, max_len=16, deterministic=True, decode=False)
  variants = {
      "lm1b": (dict(base), {}),
      "lm1b-tied-learned-pos": (dict(base, logits_via_embedding=True),
                                {"posemb_init": nn.initializers.normal(stddev=0.02)}),
  }
  out = {}
  for name, (config, extra) in variants.items():
    module = models.TransformerLM(models.TransformerConfig(**config, **extra))
    variables = jax.eval_shape(module.init, jax.random.key(0), IDS)
    params = nn.meta.unbox(variables["params"])  # nn.with_logical_partitioning boxes
    record = dict(config, **{k: "normal(stddev=0.02)" for k in extra})
    out[name] = {"source": "examples/lm1b/models.py", "config": record, "params": shapes(params)}
  return out


def imagenet(examples: pathlib.Path) -> dict[str, dict]:
  models = load_file(examples / "imagenet" / "models.py", "flax_example_imagenet_models")
  out = {}
  for name, cls in (("imagenet-resnet18", "ResNet18"), ("imagenet-resnet1-local", "_ResNet1Local")):
    config = {"model": cls, "num_classes": 10, "num_filters": 4, "input_shape": list(IMAGES.shape)}
    module = getattr(models, cls)(num_classes=10, num_filters=4)
    variables = jax.eval_shape(lambda x, m=module: m.init(jax.random.key(0), x, train=False), IMAGES)
    out[name] = {"source": "examples/imagenet/models.py", "config": config,
                 "params": shapes(variables["params"])}  # batch_stats are not trained
  return out


def gemma(examples: pathlib.Path) -> dict[str, dict]:
  folder = str(examples / "gemma")
  sys.path.insert(0, folder)
  try:
    try:
      import jaxtyping  # noqa: F401
    except ImportError:
      sys.modules["jaxtyping"] = types.SimpleNamespace(Array=jax.Array)
    transformer = importlib.import_module("transformer")
    cfg = importlib.import_module("transformer_cfg")
  finally:
    sys.path.remove(folder)
  out = {}
  for name, kv_heads in (("gemma-gqa", 2), ("gemma-mqa", 1), ("gemma-mha", 4)):
    config = dict(num_layers=2, num_embed=100, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                  num_kv_heads=kv_heads, final_logit_softcap=None, use_post_attn_norm=True,
                  use_post_ffw_norm=True, use_qk_norm=True)
    model = nnx.eval_shape(lambda c=config: transformer.Transformer(
        cfg.TransformerConfig(**c, attention_types=(cfg.AttentionType.GLOBAL,) * c["num_layers"]),
        rngs=nnx.Rngs(params=0)))
    record = dict(config, attention_types=["GLOBAL"] * config["num_layers"])
    out[name] = {"source": "examples/gemma/transformer.py", "config": record,
                 "params": shapes(nnx.state(model, nnx.Param))}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", required=True, type=pathlib.Path,
                      help="the examples/ folder of an extracted flax-<version> sdist")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args(argv)
  examples = args.examples.resolve()
  models = {**lm1b(examples), **imagenet(examples), **gemma(examples)}
  data = {"flax_version": flax.__version__, "models": models}
  text = json.dumps(data, indent=1)
  text = re.sub(r"\[\s+([-\d,\s]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
  args.out.write_text(text + "\n")  # one shape a line
  print(f"wrote {args.out}: " + ", ".join(f"{n} ({len(m['params'])} params)" for n, m in models.items()))


if __name__ == "__main__":
  main()
