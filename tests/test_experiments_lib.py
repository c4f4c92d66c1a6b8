"""Tests for experiments._lib: corpus, tokenizers, batches, models, the training loop, schedules."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments._lib import data, schedules
from experiments._lib import model as lm_lib
from experiments._lib import train as train_lib

TINY = lm_lib.gpt_config("tiny")


@pytest.fixture(scope="module")
def small_corpus():
  return data.stdlib_corpus(max_bytes=300_000)


def _tiny_model(**overrides):
  return lm_lib.GPT(lm_lib.gpt_config("tiny", **overrides), rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _random_tokens(shape, vocab_size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, shape), jnp.int32)


# --- corpus -------------------------------------------------------------------


def test_stdlib_file_split_is_deterministic_disjoint_and_nonempty():
  files = data.stdlib_source_files()
  assert files == sorted(files) and len(files) > 100
  assert not any(part in ("site-packages", "test", "tests", "idle_test")
                 for f in files for part in f.split("/")[:-1])
  train, val = data.split_train_val(files, val_fraction=0.02)
  assert (train, val) == data.split_train_val(list(files), val_fraction=0.02)
  assert train and val
  assert not set(train) & set(val)
  assert set(train) | set(val) == set(files)
  assert 0.002 < len(val) / len(files) < 0.06
  # Never an empty split, even for two files.
  assert all(data.split_train_val(["a.py", "b.py"], val_fraction=f)[i]
             for f in (0.0, 1.0) for i in (0, 1))


def test_stdlib_corpus_respects_max_bytes(small_corpus):
  train, val = small_corpus
  assert train and val
  assert (train, val) == data.stdlib_corpus(max_bytes=300_000)
  assert sum(len(t.encode()) for t in train + val) <= 300_000
  assert all(t.strip() for t in train + val)


def test_default_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv("SLIMOPTAX_CACHE", str(tmp_path))
  assert data.default_cache_dir() == tmp_path / "tokenizers"
  monkeypatch.delenv("SLIMOPTAX_CACHE")
  assert data.default_cache_dir().parts[-3:] == (".cache", "slimoptax", "tokenizers")


# --- tokenizers ---------------------------------------------------------------


def test_byte_tokenizer_round_trips(tmp_path):
  tokenizer = data.train_tokenizer(["unused"], 256, cache_dir=tmp_path)
  assert isinstance(tokenizer, data.ByteTokenizer) and tokenizer.vocab_size == 256
  text = "def f(x):\n\treturn x  # héllo wörld ✓ \ufffd 🐍\r\n"
  ids = tokenizer.encode(text)
  assert max(ids) < 256 and tokenizer.decode(ids) == text
  tokens = data.encode_corpus(["ab", "c"], tokenizer)
  np.testing.assert_array_equal(tokens, [97, 98, 0, 99, 0])
  assert tokens.dtype == np.uint16


def test_bpe_tokenizer_round_trips_and_caches(small_corpus, tmp_path):
  pytest.importorskip("tokenizers")
  train, val = small_corpus
  tokenizer = data.train_tokenizer(train, 400, cache_dir=tmp_path)
  assert isinstance(tokenizer, data.BPETokenizer)
  assert tokenizer.vocab_size == 400 and tokenizer.eot_id == 0
  snippet = val[0][:5000]
  ids = tokenizer.encode(snippet)
  assert len(ids) < len(snippet.encode())  # BPE compresses.
  assert tokenizer.decode(ids) == snippet
  assert tokenizer.decode(tokenizer.encode("  x = 'ü'\n\n\tpass  ")) == "  x = 'ü'\n\n\tpass  "

  # Cached on disk, keyed by vocab size and corpus.
  assert (tmp_path / f"{tokenizer.name}.json").exists()
  reloaded = data.train_tokenizer(train, 400, cache_dir=tmp_path)
  assert reloaded.name == tokenizer.name and reloaded.encode(snippet) == ids
  assert data.train_tokenizer(train[:-1], 400, cache_dir=tmp_path).name != tokenizer.name

  tokens = data.encode_corpus(val, tokenizer)
  assert tokens.dtype == np.uint16 and tokens[-1] == tokenizer.eot_id
  assert (tokens == tokenizer.eot_id).sum() == len(val)
  assert len(list(tmp_path.glob(f"{tokenizer.name}.tokens-*.npy"))) == 1
  np.testing.assert_array_equal(data.encode_corpus(val, tokenizer), tokens)


# --- batches ------------------------------------------------------------------


def test_batch_iterator_windows_match_numpy_slicing():
  tokens = np.arange(1000, dtype=np.uint16)  # token value == position
  batches = data.batch_iterator(tokens, batch_size=4, seq_len=16, seed=3)
  for _ in range(3):
    x, y = next(batches)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    for row_x, row_y in zip(x, y):
      start = int(row_x[0])
      np.testing.assert_array_equal(row_x, tokens[start : start + 16])
      np.testing.assert_array_equal(row_y, tokens[start + 1 : start + 17])
  first = next(data.batch_iterator(tokens, batch_size=4, seq_len=16, seed=3))[0]
  again = next(data.batch_iterator(tokens, batch_size=4, seq_len=16, seed=3))[0]
  other = next(data.batch_iterator(tokens, batch_size=4, seq_len=16, seed=4))[0]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_eval_batches_are_contiguous_and_capped():
  tokens = np.arange(1000, dtype=np.uint16)
  batches = data.eval_batches(tokens, batch_size=4, seq_len=16, max_batches=None)
  assert len(batches) == (999 // 16) // 4
  for i, (x, y) in enumerate(batches):
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    for row in range(4):
      start = (4 * i + row) * 16
      np.testing.assert_array_equal(x[row], tokens[start : start + 16])
      np.testing.assert_array_equal(y[row], tokens[start + 1 : start + 17])
  assert len(data.eval_batches(tokens, batch_size=4, seq_len=16, max_batches=2)) == 2
  short = data.eval_batches(tokens[:40], batch_size=4, seq_len=16)
  assert len(short) == 1 and short[0][0].shape == (2, 16)


# --- models -------------------------------------------------------------------


def _expected_gpt_params(c: lm_lib.GPTConfig) -> int:
  d = c.d_model
  per_block = 2 * d + 4 * d * d + 8 * d * d  # ln_1, ln_2 scales; q,k,v,o; up, down
  head = 0 if c.tie_embeddings else d * c.vocab_size
  return c.vocab_size * d + c.seq_len * d + c.n_layers * per_block + d + head


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attention": "dense"}])
def test_gpt_parameter_shapes(overrides):
  model = _tiny_model(**overrides)
  c = model.config
  shapes = lm_lib.param_paths(model)
  assert lm_lib.count_params(model) == _expected_gpt_params(c)
  assert sum(math.prod(s) for s in shapes.values()) == _expected_gpt_params(c)
  d, h, hd, v = c.d_model, c.n_heads, c.head_dim, c.vocab_size
  assert shapes["wte/embedding"] == (v, d) and shapes["wpe/embedding"] == (c.seq_len, d)
  assert shapes["blocks/1/mlp/up/kernel"] == (d, 4 * d)
  assert shapes["blocks/1/mlp/down/kernel"] == (4 * d, d)
  assert shapes["blocks/0/ln_1/scale"] == shapes["ln_f/scale"] == (d,)
  assert ("lm_head/kernel" in shapes) == (not c.tie_embeddings)
  if c.attention == "mha":
    assert shapes["blocks/0/attn/query/kernel"] == (d, h, hd)
    assert shapes["blocks/0/attn/key/kernel"] == (d, h, hd)
    assert shapes["blocks/0/attn/out/kernel"] == (h, hd, d)
  else:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      assert shapes[f"blocks/0/attn/{name}/kernel"] == (d, d)
  assert not any("bias" in path for path in shapes)


def test_gpt2_small_shapes_abstract():
  c = lm_lib.gpt_config("gpt2_small")
  model = nnx.eval_shape(lambda: lm_lib.GPT(c, rngs=nnx.Rngs(0)))
  assert lm_lib.count_params(model) == _expected_gpt_params(c) == 124_373_760
  assert lm_lib.param_paths(model)["blocks/11/attn/out/kernel"] == (12, 64, 768)


def test_param_paths_ignore_variable_wrappers():
  model = _tiny_model()
  with_variables = nnx.state(model, nnx.Param)  # what `tx.init` sees
  pure = nnx.as_pure(with_variables)  # what `tx.update` sees

  def paths(tree):
    return [lm_lib.keypath_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]

  assert paths(with_variables) == paths(pure)
  assert "blocks/0/attn/query/kernel" in paths(pure)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"attention": "dense"}])
def test_linen_gpt_matches_nnx_structure(overrides):
  model = nnx.eval_shape(lambda: _tiny_model(**overrides))
  linen_model = lm_lib.LinenGPT(model.config)
  linen_vars = jax.eval_shape(linen_model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  nnx_shapes = lm_lib.param_paths(model)
  linen_shapes = lm_lib.param_paths(linen_vars)
  renamed = {
      "params/" + p.replace("blocks/0/", "blocks_0/").replace("blocks/1/", "blocks_1/"): s
      for p, s in nnx_shapes.items()
  }
  assert linen_shapes == renamed


def _assert_causal(apply, vocab_size, position=40):
  # Same shape as in test_initial_loss_is_log_vocab, so the jitted forward is reused.
  tokens = _random_tokens((4, TINY.seq_len), vocab_size)
  changed = tokens.at[:, position].set((tokens[:, position] + 1) % vocab_size)
  before, after = apply(tokens), apply(changed)
  np.testing.assert_allclose(before[:, :position], after[:, :position], atol=1e-6)
  assert not np.allclose(before[:, position:], after[:, position:], atol=1e-6)


@pytest.mark.parametrize("attention", ["mha", "dense"])
def test_attention_is_causal(attention):
  model = _tiny_model(attention=attention)
  _assert_causal(lambda t: _logits(model, t), TINY.vocab_size)


def test_linen_gpt_computes_the_nnx_function_and_is_causal():
  model = _tiny_model()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params.update({f"blocks_{i}": block for i, block in params.pop("blocks").items()})
  linen_apply = jax.jit(lambda t: lm_lib.LinenGPT(TINY).apply({"params": params}, t))
  tokens = _random_tokens((4, TINY.seq_len), TINY.vocab_size)
  np.testing.assert_allclose(linen_apply(tokens), _logits(model, tokens), atol=1e-5)
  _assert_causal(linen_apply, TINY.vocab_size)


def test_mitchell_init_std():
  model = _tiny_model()
  residual_std = 0.02 / math.sqrt(2 * TINY.n_layers)
  assert TINY.residual_init_std == pytest.approx(residual_std)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  stds = {
      lm_lib.keypath_to_str(p): float(jnp.std(x))
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  for path in ("blocks/0/mlp/down/kernel", "blocks/1/attn/out/kernel"):
    assert stds[path] == pytest.approx(residual_std, rel=0.05)
  for path in ("wte/embedding", "blocks/0/attn/query/kernel", "blocks/1/mlp/up/kernel"):
    assert stds[path] == pytest.approx(0.02, rel=0.05)
  assert stds["ln_f/scale"] == 0.0  # LayerNorm scales start at 1
  dense = _tiny_model(attention="dense")
  o_proj_std = float(jnp.std(dense.blocks[0].attn.o_proj.kernel[...]))
  assert o_proj_std == pytest.approx(residual_std, rel=0.1)


def test_initial_loss_is_log_vocab():
  tokens = _random_tokens((4, TINY.seq_len + 1), TINY.vocab_size)
  for model in (_tiny_model(), _tiny_model(tie_embeddings=False)):
    logits = _logits(model, tokens[:, :-1])
    assert logits.shape == (4, TINY.seq_len, TINY.vocab_size)
    loss = lm_lib.cross_entropy_loss(logits, tokens[:, 1:])
    assert abs(float(loss) - math.log(TINY.vocab_size)) < 0.1


def test_embed_head_lm():
  config = lm_lib.EmbedHeadConfig(vocab_size=300, d_model=32)
  model = lm_lib.build_model(config, rngs=nnx.Rngs(0))
  assert lm_lib.param_paths(model) == {"lm_head/kernel": (32, 300), "wte/embedding": (300, 32)}
  tokens = _random_tokens((2, 9), 300)
  loss = lm_lib.cross_entropy_loss(_logits(model, tokens[:, :-1]), tokens[:, 1:])
  assert abs(float(loss) - math.log(300)) < 0.05


# --- training -----------------------------------------------------------------


def _byte_streams(small_corpus):
  train_texts, val_texts = small_corpus
  tokenizer = data.ByteTokenizer()
  return data.encode_corpus(train_texts, tokenizer), data.encode_corpus(val_texts, tokenizer)


def test_train_lowers_loss(small_corpus, tmp_path):
  train_tokens, val_tokens = _byte_streams(small_corpus)
  config = lm_lib.gpt_config("tiny", vocab_size=256, seq_len=32)
  hooked = []
  records = []
  result = train_lib.train_lm(
      lm_lib.Functional(config),
      lambda schedule: optax.adamw(schedule, weight_decay=0.1),
      train_tokens=train_tokens,
      val_tokens=val_tokens,
      steps=30,
      batch_size=8,
      lr=3e-3,
      warmup=5,
      seed=0,
      eval_every=15,
      eval_batches=4,
      log_every=10,
      norm_log_every=30,
      log_fn=records.append,
      log_path=tmp_path / "log.jsonl",
      progress=False,
      # The whole state: (clip_by_global_norm, adamw); adamw's first state is scale_by_adam's.
      state_hook=lambda step, state: hooked.append((step, int(state[1][0].count))),
      state_hook_steps=[0, 10, 30],
  )
  history = result["history"]
  assert history == records
  assert [json.loads(line) for line in open(tmp_path / "log.jsonl")] == history
  assert [r["step"] for r in history] == [0, 10, 15, 20, 30]
  initial, final = history[0]["val_loss"], result["final_val_loss"]
  assert abs(initial - math.log(256)) < 0.1
  assert final < initial - 0.5
  assert history[-1]["train_loss"] < history[1]["train_loss"]
  assert history[0]["lr"] == 0.0 and history[-1]["lr"] == pytest.approx(3e-4, rel=0.05)
  assert hooked == [(0, 0), (10, 10), (30, 30)]
  norms = history[-1]["norms"]
  assert set(norms) == set(lm_lib.param_paths(result["params"]))
  assert all(v["grad"] > 0 and v["weight"] > 0 and v["update"] > 0 for v in norms.values())
  assert result["param_bytes"] == 4 * result["num_params"] == 4 * _expected_gpt_params(config)
  assert result["opt_state_bytes"] > 2 * result["param_bytes"]  # mu and nu
  assert int(result["opt_state"][1][0].count) == result["steps_done"] == 30


def test_schedules():
  # Orvieto & Gower's warm-up starts at lr / warmup (no step at rate 0); traced arguments work.
  lr, steps, warmup = 0.1, 100, 10
  sched = schedules.warmup_cosine(lr, steps, warmup)
  np.testing.assert_allclose(float(sched(0)), lr / warmup, rtol=1e-6)
  np.testing.assert_allclose(float(sched(warmup - 1)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(sched(warmup)), lr, rtol=1e-6)
  np.testing.assert_allclose(float(sched(steps)), 1e-5, rtol=1e-4)
  mid = warmup + (steps - warmup) // 2
  np.testing.assert_allclose(float(sched(mid)), 1e-5 + (lr - 1e-5) * 0.5, rtol=1e-5)
  traced = jax.jit(jax.vmap(lambda r, n: schedules.warmup_cosine(r, n, n // 10)(25)))(
      jnp.asarray([0.1, 0.2]), jnp.asarray([100.0, 200.0]))
  np.testing.assert_allclose(traced, [schedules.warmup_cosine(0.1, 100, 10)(25),
                                      schedules.warmup_cosine(0.2, 200, 20)(25)], rtol=1e-6)
  assert float(schedules.warmup_cosine(1.0, 10, 1, end_value=0.0)(10)) == 0.0
  ref = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 30, 3e-4)
  ours = schedules.lm_warmup_cosine(3e-3, 30, 5)
  assert [float(ours(k)) for k in range(31)] == [float(ref(k)) for k in range(31)]


def test_vmapped_models_match_separate_runs(small_corpus):
  """K models in lock-step (traced hyperparameters, per-model init) = K separate runs."""
  train_tokens, val_tokens = _byte_streams(small_corpus)
  lm = lm_lib.Functional(lm_lib.gpt_config("tiny", vocab_size=256, seq_len=32, n_layers=1, d_model=32))
  val = data.eval_batches(val_tokens, batch_size=4, seq_len=32, max_batches=2)
  make_tx = lambda h: optax.adamw(schedules.warmup_cosine(h["lr"], 8, 2), b2=h["b2"])
  hp = {"lr": [1e-3, 3e-3], "b2": [0.95, 0.99]}
  kw = dict(train_tokens=train_tokens, steps=8, batch_size=4, seed=0, val_batches=val, eval_every=4)
  both = train_lib.train(lm, make_tx, hparams=hp, num_models=2, init_seeds=[0, 1], **kw)
  for k in range(2):
    one = train_lib.train(lm, make_tx, hparams={n: jnp.float32(v[k]) for n, v in hp.items()},
                          init_seed=k, **kw)
    np.testing.assert_allclose(both["final_val_loss"][k], one["final_val_loss"], rtol=1e-5)
    np.testing.assert_allclose(both["train_losses"][:, k], one["train_losses"], rtol=1e-5)
  assert [s for s, _ in both["val_curve"]] == [0, 4, 8]


def test_external_learning_rate_and_objective_hook(small_corpus):
  train_tokens, _ = _byte_streams(small_corpus)
  lm = lm_lib.Functional(lm_lib.gpt_config("tiny", vocab_size=256, seq_len=32, n_layers=1, d_model=32))
  kw = dict(train_tokens=train_tokens, steps=6, batch_size=4, seed=0)
  sched = schedules.lm_warmup_cosine(1.0, 6, 2)
  # The rate outside the optimizer (p + lr_t u with tx at rate 1) is the scheduled optimizer.
  outside = train_lib.train(lm, optax.adamw(1.0), lr_scale=lambda k: 3e-3 * float(sched(k - 1)), **kw)
  inside = train_lib.train(lm, optax.adamw(schedules.lm_warmup_cosine(3e-3, 6, 2)), **kw)
  np.testing.assert_allclose(outside["train_losses"], inside["train_losses"], rtol=1e-5)
  # The objective hook: tx.update gets the batch loss as a function of the parameters.
  seen = []

  def update(updates, state, params=None, *, obj_fn, logits_fn, **extra):
    seen.append((obj_fn(params), logits_fn(params).shape))
    return jax.tree.map(lambda g: -1e-3 * g, updates), state

  tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  run = train_lib.train(lm, tx, objective=True, **kw)
  loss, shape = seen[0]  # traced once, inside the jitted step
  assert loss.shape == () and shape == (4, 32, 256)
  assert np.isfinite(run["train_losses"]).all()


