"""Benchmark: one jitted update+apply step of slim_adamw("slimadam") vs optax.adamw.

GPT-2-small-shaped Flax parameter tree (124.4M parameters: 12 layers, d 768,
12 heads, vocab 50304, tied embedding, no biases; DenseGeneral attention
kernels), parameters and optimizer state donated, one process, interleaved
repeats; prints median step times, their ratio, compile times and
optimizer-state bytes.

Usage:
  python benchmarks/bench_step.py [--repeats 10] [--layers 12] [--preset slimadam]
"""

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import slimoptax


def gpt2_params(key, *, layers=12, d=768, heads=12, vocab=50304, ctx=1024, dtype=jnp.float32):
  """Random parameters with GPT-2 small's shapes, in an NNX-style tree."""
  hd = d // heads
  shapes = {"wte": {"embedding": (vocab, d)}, "wpe": {"embedding": (ctx, d)}, "ln_f": {"scale": (d,)},
            "blocks": {str(i): {"ln_1": {"scale": (d,)}, "ln_2": {"scale": (d,)},
                                "attn": {"query": {"kernel": (d, heads, hd)}, "key": {"kernel": (d, heads, hd)},
                                         "value": {"kernel": (d, heads, hd)}, "out": {"kernel": (heads, hd, d)}},
                                "mlp": {"up": {"kernel": (d, 4 * d)}, "down": {"kernel": (4 * d, d)}}}
                       for i in range(layers)}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--preset", default="slimadam")
  parser.add_argument("--json", default=None, help="write the results here")
  args = parser.parse_args()

  params0 = gpt2_params(jax.random.PRNGKey(0), layers=args.layers)
  grads = gpt2_params(jax.random.PRNGKey(1), layers=args.layers)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  txs = {
      "optax.adamw": optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1,
                                 mask=slimoptax.default_weight_decay_mask),
      f"slim_adamw({args.preset})": slimoptax.slim_adamw(3e-4, compress=args.preset),
  }
  runs = {}
  for name, tx in txs.items():
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    report = slimoptax.memory_report(state, params)
    step = make_step(tx)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    params, state = compiled(params, state, grads)  # warm-up
    jax.block_until_ready(params)
    runs[name] = {"compiled": compiled, "params": params, "state": state, "times": [],
                  "compile_s": compile_s, "state_bytes": report.state_nbytes,
                  "nu_entries": report.entries}
  for _ in range(args.repeats):  # interleave so both see the same machine load
    for run in runs.values():
      t0 = time.perf_counter()
      run["params"], run["state"] = run["compiled"](run["params"], run["state"], grads)
      jax.block_until_ready(run["params"])
      run["times"].append(time.perf_counter() - t0)

  base, slim = runs.values()
  results = {
      "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}, "
                f"{jax.device_count()} device(s)",
      "jax": jax.__version__, "optax": optax.__version__, "params": n_params, "repeats": args.repeats,
      "runs": {name: {"median_step_s": statistics.median(r["times"]), "min_step_s": min(r["times"]),
                      "compile_s": r["compile_s"], "state_bytes": r["state_bytes"],
                      "second_moment_entries": r["nu_entries"]} for name, r in runs.items()},
  }
  results["step_time_ratio"] = statistics.median(slim["times"]) / statistics.median(base["times"])
  results["state_bytes_ratio"] = slim["state_bytes"] / base["state_bytes"]
  print(f"device: {results['device']}; jax {jax.__version__}, optax {optax.__version__}; {n_params:,} params")
  print(f"{'optimizer':<26} {'median step':>12} {'min step':>10} {'compile':>9} {'state bytes':>15} {'nu entries':>13}")
  for name, r in results["runs"].items():
    print(f"{name:<26} {r['median_step_s'] * 1e3:>10.1f}ms {r['min_step_s'] * 1e3:>8.1f}ms "
          f"{r['compile_s']:>8.2f}s {r['state_bytes']:>15,} {r['second_moment_entries']:>13,}")
  print(f"step-time ratio (slim / adamw): {results['step_time_ratio']:.3f}; "
        f"state-bytes ratio: {results['state_bytes_ratio']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
