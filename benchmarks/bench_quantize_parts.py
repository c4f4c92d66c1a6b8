"""Where a quantized-state step spends its time: the codec pieces against one elementwise pass.

Usage:
  JAX_PLATFORMS=cpu python benchmarks/bench_quantize_parts.py
"""
import time

import jax
import jax.numpy as jnp

import slimoptax
from slimoptax import _quantize as q

x = jax.random.normal(jax.random.PRNGKey(0), (4096, 2048))
cb = jnp.asarray(q.codebook("int8"))
f_ss = jax.jit(lambda x: jnp.searchsorted(cb, x / jnp.max(jnp.abs(x))))
f_q = jax.jit(lambda x: slimoptax.quantize(x, "int8").codes)
f_sr = jax.jit(lambda x, k: slimoptax.stochastic_round_bf16(x, k))
f_bits = jax.jit(lambda k: jax.random.bits(k, (4096, 2048), jnp.uint16))
f_base = jax.jit(lambda x: x * 2 + 1)
for name, f, a in (("base", f_base, (x,)), ("searchsorted", f_ss, (x,)), ("quantize int8", f_q, (x,)),
                   ("bits", f_bits, (jax.random.PRNGKey(1),)), ("sr bf16", f_sr, (x, jax.random.PRNGKey(1)))):
  jax.block_until_ready(f(*a)); t = time.perf_counter()
  for _ in range(3): jax.block_until_ready(f(*a))
  print(f"{name:15s} {(time.perf_counter()-t)/3*1e3:8.1f} ms  (8.4M entries)")
