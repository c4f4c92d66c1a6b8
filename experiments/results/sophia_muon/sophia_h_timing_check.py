"""Is Sophia-H slow because of its HVP refresh, or also on steps without one? (diagnostic)

Run: nice python experiments/results/sophia_muon/sophia_h_timing_check.py
(2-layer d64 GPT, batch 16 x 64; median over 6 interleaved rounds of 10 steps;
k = update_every). Output: sophia_h_timing_check.txt.
"""

import time

import jax
import numpy as np
import optax
from flax import nnx

import slimoptax
from slimoptax import ladder, nanolm

_, train_tokens, _ = nanolm.prepare_data(vocab_size=512)
cfg = nanolm.gpt_config("tiny", n_layers=2, d_model=64, vocab_size=512)
graphdef, params, rest = nnx.split(nanolm.build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
params = nnx.as_pure(params)


def logits_fn(p, x):
  return nnx.merge(graphdef, p, rest)(x)


def loss_fn(p, x, y):
  return nanolm.cross_entropy_loss(logits_fn(p, x), y)


batches = nanolm.batch_iterator(train_tokens, batch_size=16, seq_len=64, seed=0)
data = [next(batches) for _ in range(10)]
txs = {
    "adamw": ladder.adamw(1e-3, clip_norm=None),
    "sophiaH k=10": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=10),
    "sophiaH k=1e9": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=10**9),
    "sophiaH k=1": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=1),
    "sophiaG k=10": slimoptax.sophia(1e-3, estimator="gnb", update_every=10),
}


def make_step(tx):
  @jax.jit
  def step(p, s, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p, obj_fn=lambda q: loss_fn(q, x, y),
                           logits_fn=lambda q: logits_fn(q, x))
    return optax.apply_updates(p, updates), s, loss
  return step


steps, states = {}, {}
for name, tx in txs.items():
  tx = optax.with_extra_args_support(tx)
  steps[name] = make_step(tx)
  p, s, loss = steps[name](params, tx.init(params), *data[0])  # compile; count 0 refreshes
  jax.block_until_ready(loss)
  states[name] = (p, s)

times = {name: [] for name in txs}
for _ in range(6):
  for name in txs:
    p, s = states[name]
    t0 = time.perf_counter()
    for x, y in data:
      p, s, loss = steps[name](p, s, x, y)
    jax.block_until_ready(loss)
    times[name].append((time.perf_counter() - t0) / len(data))
    states[name] = (p, s)
for name, t in times.items():
  print(f"{name:15s} median {np.median(t) * 1e3:6.1f} ms/step  "
        f"(rounds: {' '.join(f'{v * 1e3:.0f}' for v in t)})")
