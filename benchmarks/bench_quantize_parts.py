"""Where a quantized-state step spends its time: the codec pieces against one elementwise pass.

Times, on one (4096, 2048) float32 array (8.4M entries), jitted: an elementwise ``x * 2 + 1``, the
nearest-code search of the int8 encoder (``jnp.searchsorted`` over the sorted codebook), the whole int8
`slimoptax.quantize`, 16 random bits per entry (``jax.random.bits``) and the bf16 stochastic rounding.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/bench_quantize_parts.py [--repeats 3]
"""

import argparse
import time

import jax
import jax.numpy as jnp

import slimoptax
from slimoptax import _codecs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  shape = (4096, 2048)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  key = jax.random.PRNGKey(1)
  codes = jnp.asarray(_codecs.codebook("int8"))
  cases = {
      "elementwise x * 2 + 1": (jax.jit(lambda x: x * 2 + 1), (x,)),
      "searchsorted (int8 codebook)": (jax.jit(lambda x: jnp.searchsorted(codes, x / jnp.max(jnp.abs(x)))), (x,)),
      "quantize int8": (jax.jit(lambda x: slimoptax.quantize(x, "int8").codes), (x,)),
      "random bits (uint16)": (jax.jit(lambda k: jax.random.bits(k, shape, jnp.uint16)), (key,)),
      "stochastic round bf16": (jax.jit(slimoptax.stochastic_round_bf16), (x, key)),
  }
  print(f"{jax.default_backend()}, {x.size:,} entries, mean of {args.repeats}")
  for name, (fn, fn_args) in cases.items():
    jax.block_until_ready(fn(*fn_args))
    start = time.perf_counter()
    for _ in range(args.repeats):
      jax.block_until_ready(fn(*fn_args))
    print(f"{name:30s} {(time.perf_counter() - start) / args.repeats * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
