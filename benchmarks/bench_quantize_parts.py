"""Where a quantized-state step spends its time: the codec pieces against one elementwise pass.

Times, on one (4096, 2048) float32 array (8.4M entries), jitted, outputs not donated: an elementwise
``x * 2 + 1``, a uint8 copy, the nearest-code search by ``jnp.searchsorted`` over the sorted int8
codebook and by the codec's bucket tables, the block absmax as ``jnp.max(jnp.abs(x))`` and as the
codecs' two-output reduction, the whole int8 `slimoptax.quantize`, 16 random bits per entry
(``jax.random.bits``), the bf16 stochastic rounding; then the three loops of an 8-bit AdamW step
(new first moment and its block absmax; its encoding; the parameter update decoding both moments)
against the float32 update.

With ``--profile-step`` it instead traces (`jax.profiler`) a jitted, donated
AdamW step on a GPT-2-small-shaped tree of ``--layers`` layers, float32 and
8-bit (``mu``, ``nu`` int8), and prints each step's total time and its
costliest loops (XLA fusions and copies: time per step, output type), so the
cost of each pass is read off the real step rather than a standalone piece.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/bench_quantize_parts.py [--repeats 3]
  JAX_PLATFORMS=cpu python benchmarks/bench_quantize_parts.py --profile-step [--layers 2] [--top 8]
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp

import slimoptax
from slimoptax import _codecs


def step_temporaries() -> None:
  """Temporary bytes XLA allocates for one jitted, donated AdamW step on a (3072, 768) leaf."""
  import optax
  p = {"w": jnp.ones((3072, 768))}
  for name, tx in [("float32", optax.adamw(1e-3)),
                   ("8-bit (mu, nu int8)", slimoptax.quantize_state(optax.adamw(1e-3), mu="int8", nu="int8")),
                   ("bf16 SR (mu, nu)", slimoptax.quantize_state(optax.adamw(1e-3), mu="bf16", nu="bf16"))]:
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile()
    print(f"temporaries of a (3072, 768) AdamW step, {name:20s} "
          f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:6.1f} MiB")


def profile_step(layers: int, repeats: int, top: int) -> None:
  """Per-loop time of a donated AdamW step, float32 and 8-bit, from a `jax.profiler` trace."""
  import optax
  from bench_all import gpt2_params
  params = gpt2_params(jax.random.PRNGKey(0), layers=layers)
  grads = jax.tree.map(lambda x: x * 1e-3, params)
  print(f"{jax.default_backend()}, {layers}-layer GPT-2-small tree "
        f"({sum(x.size for x in jax.tree.leaves(params)):,} parameters), {repeats} traced steps")
  base = lambda: optax.adamw(3e-4, b2=0.95, weight_decay=0.1)
  for name, tx in [("float32", base()),
                   ("8-bit (mu, nu int8)", slimoptax.quantize_state(base(), mu="int8", nu="int8"))]:
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    state = tx.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    types = {n: re.sub(r"\{[^}]*\}", "", t).replace(" ", "") for n, t in
             re.findall(r"^\s*%?([\w.\-]+) = (.+?) [a-z][a-z\-]*\(", compiled.as_text(), re.M)}
    p = jax.tree.map(jnp.copy, params)
    for _ in range(2):
      p, state = compiled(p, state, grads)
    jax.block_until_ready(p)
    with tempfile.TemporaryDirectory() as trace_dir:
      start = time.perf_counter()
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(repeats):
          p, state = compiled(p, state, grads)
        jax.block_until_ready(p)
      wall = (time.perf_counter() - start) / repeats
      trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
      if e.get("ph") == "X" and e.get("name") in types:
        per_op[e["name"]] += e.get("dur", 0) / repeats / 1e3
    print(f"\n{name}: {wall * 1e3:.1f} ms per step (traced, wall clock); loops over "
          f"{sum(per_op.values()):.1f} ms; the {top} costliest:")
    for op, ms in per_op.most_common(top):
      print(f"  {ms:8.2f} ms  {op:32s} {types[op]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--profile-step", action="store_true",
                      help="trace a whole donated AdamW step (float32 and 8-bit) and print its costliest loops")
  parser.add_argument("--layers", type=int, default=2, help="layers of the traced tree (--profile-step)")
  parser.add_argument("--top", type=int, default=8, help="loops printed per step (--profile-step)")
  args = parser.parse_args()
  if args.profile_step:
    profile_step(args.layers, args.repeats, args.top)
    return
  shape = (4096, 2048)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  key = jax.random.PRNGKey(1)
  codes = jnp.asarray(_codecs.codebook("int8"))
  blocks = (shape[0], shape[1] // 256, 256)
  c8 = jax.random.randint(jax.random.PRNGKey(2), shape, 0, 256).astype(jnp.uint8)
  c8u = jax.random.randint(jax.random.PRNGKey(3), shape, 0, 256).astype(jnp.uint8)
  s8 = jnp.ones(blocks[:2])

  def decoded(c, s, codec):
    return _codecs._values_of(c.reshape(blocks), codec) * s[..., None]

  def new_mu(c, s, g):
    return decoded(c, s, "int8") * 0.9 + 0.1 * g.reshape(blocks)

  def update(p, c, cu, s, g):
    m, v = new_mu(c, s, g), decoded(cu, s, "uint8") * 0.95 + 0.05 * g.reshape(blocks) ** 2
    return p - 1e-3 * (m / (jnp.sqrt(v) + 1e-8)).reshape(shape)

  def update_fp32(p, g, m, v):
    return p - 1e-3 * ((m * 0.9 + 0.1 * g) / (jnp.sqrt(v * 0.95 + 0.05 * g * g) + 1e-8))

  cases = {
      "elementwise x * 2 + 1": (jax.jit(lambda x: x * 2 + 1), (x,)),
      "uint8 copy": (jax.jit(lambda c: c + 1), (c8,)),
      "searchsorted (int8 codebook)": (jax.jit(lambda x: jnp.searchsorted(codes, x / jnp.max(jnp.abs(x)))), (x,)),
      "nearest code (bucket tables)": (jax.jit(lambda x: _codecs.nearest_code(x, "int8")), (x,)),
      "block absmax, jnp.max(abs)": (jax.jit(lambda x: jnp.max(jnp.abs(x.reshape(blocks)), -1)), (x,)),
      "block absmax, two-output": (jax.jit(lambda x: _codecs.block_absmax(x.reshape(blocks))), (x,)),
      "quantize int8": (jax.jit(lambda x: slimoptax.quantize(x, "int8").codes), (x,)),
      "random bits (uint16)": (jax.jit(lambda k: jax.random.bits(k, shape, jnp.uint16)), (key,)),
      "stochastic round bf16": (jax.jit(slimoptax.stochastic_round_bf16), (x, key)),
      "8-bit step: new mu + absmax": (jax.jit(lambda c, s, g: _codecs.block_absmax(new_mu(c, s, g))), (c8, s8, x)),
      "8-bit step: encode new mu": (jax.jit(lambda c, s, g: _codecs.nearest_code(
          new_mu(c, s, g) / s[..., None], "int8")), (c8, s8, x)),
      "8-bit step: parameter update": (jax.jit(update), (x, c8, c8u, s8, x)),
      "float32 step: parameter update": (jax.jit(update_fp32), (x, x, x, x)),
  }
  print(f"{jax.default_backend()}, {x.size:,} entries, mean of {args.repeats}")
  for name, (fn, fn_args) in cases.items():
    jax.block_until_ready(fn(*fn_args))
    start = time.perf_counter()
    for _ in range(args.repeats):
      jax.block_until_ready(fn(*fn_args))
    print(f"{name:30s} {(time.perf_counter() - start) / args.repeats * 1e3:8.1f} ms")
  step_temporaries()


if __name__ == "__main__":
  main()
