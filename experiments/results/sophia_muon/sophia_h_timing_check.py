"""Is Sophia-H slow because of its HVP refresh, or also on steps without one? (diagnostic)

Run from the repository root: nice python -m experiments.results.sophia_muon.sophia_h_timing_check
(2-layer d64 GPT, batch 16 x 64; median over 6 interleaved rounds of 10 steps;
k = update_every). Output: sophia_h_timing_check.txt.

The step is the training loop's (`experiments._lib.train.compiled_step` with the objective hook).
"""

import time

import jax
import numpy as np
import optax

import slimoptax
from experiments._lib import data, ladder, model
from experiments._lib.train import compiled_step

_, train_tokens, _ = data.prepare_data(vocab_size=512)
lm = model.Functional(model.gpt_config("tiny", n_layers=2, d_model=64, vocab_size=512))
params = lm.init(0)

batches = data.batch_iterator(train_tokens, batch_size=16, seq_len=64, seed=0)
batch_list = [next(batches) for _ in range(10)]
txs = {
    "adamw": ladder.adamw(1e-3, clip_norm=None),
    "sophiaH k=10": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=10),
    "sophiaH k=1e9": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=10**9),
    "sophiaH k=1": slimoptax.sophia(1e-3, estimator="hutchinson", update_every=1),
    "sophiaG k=10": slimoptax.sophia(1e-3, estimator="gnb", update_every=10),
}

steps, states = {}, {}
for name, tx in txs.items():
  tx = txs[name] = optax.with_extra_args_support(tx)
  steps[name] = compiled_step(lm, tx, objective=True)
  p, s, loss, _ = steps[name](params, tx.init(params), *batch_list[0], None, None)  # compile; count 0 refreshes
  jax.block_until_ready(loss)
  states[name] = (p, s)

times = {name: [] for name in txs}
for _ in range(6):
  for name in txs:
    p, s = states[name]
    t0 = time.perf_counter()
    for x, y in batch_list:
      p, s, loss, _ = steps[name](p, s, x, y, None, None)
    jax.block_until_ready(loss)
    times[name].append((time.perf_counter() - t0) / len(batch_list))
    states[name] = (p, s)
for name, t in times.items():
  print(f"{name:15s} median {np.median(t) * 1e3:6.1f} ms/step  "
        f"(rounds: {' '.join(f'{v * 1e3:.0f}' for v in t)})")
