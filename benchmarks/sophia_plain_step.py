"""Why a Sophia step without a Hessian refresh costs more than an AdamW step: copies and the win-rate count.

Times one jitted, donated ``update`` + ``apply_updates`` step that does *not*
refresh the curvature (the count is kept off multiples of ``update_every``),
for ``optax.adamw``, ``optax.contrib.sophia``, ``slimoptax.sophia`` (its
default ordering: step ``t`` uses the ``h`` of before the refresh, as optax)
and ``slimoptax.sophia(fresh_estimate=True)`` (Algorithm 3's ordering: the
refreshed ``h`` is used at once), interleaved over the repeats, and counts the
parameter-sized ``copy`` instructions of each compiled step (XLA's HLO after
optimization). The objective is ``sum(tanh(x W))`` per matrix: the refresh
branch only has to exist, it never runs in the timed steps.

Usage:
  python benchmarks/sophia_plain_step.py [--layers 4] [--shape 1024,2048] [--repeats 9]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import slimoptax


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4, help="number of matrices")
  ap.add_argument("--shape", default="1024,2048", help="shape of each matrix")
  ap.add_argument("--repeats", type=int, default=9)
  a = ap.parse_args()
  shape = tuple(int(s) for s in a.shape.split(","))
  params = {f"l{i}": {"kernel": jnp.full(shape, 0.01)} for i in range(a.layers)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  x = jnp.ones((4, shape[0]))

  def loss(p):
    return sum(jnp.sum(jnp.tanh(x @ v["kernel"])) for v in p.values())

  rows = {"optax.adamw": (optax.adamw(1e-3), False),
          "optax.contrib.sophia": (optax.contrib.sophia(1e-3), True),
          "slimoptax.sophia": (slimoptax.sophia(1e-3), True),
          "slimoptax.sophia(fresh_estimate=True)": (slimoptax.sophia(1e-3, fresh_estimate=True), True),
          "slimoptax.sophia(track_win_rate=False)": (slimoptax.sophia(1e-3, track_win_rate=False), True),
          "slimoptax.sophia(fresh_estimate=True, track_win_rate=False)": (
              slimoptax.sophia(1e-3, fresh_estimate=True, track_win_rate=False), True)}
  live, copies = {}, {}
  for name, (tx, sophia) in rows.items():
    def step(p, s, g, tx=tx, sophia=sophia):
      u, s = tx.update(g, s, p, **(dict(obj_fn=loss) if sophia else {}))
      return optax.apply_updates(p, u), s
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads).compile()
    text = compiled.as_text()
    entry = text[text.index("ENTRY"):]
    copies[name] = entry.count(f"f32[{','.join(map(str, shape))}]{{1,0}} copy(")
    p, s = compiled(p, s, grads)  # count 0: the refresh; every later timed step is a plain one
    jax.block_until_ready(p)
    live[name] = [compiled, p, s]
  times = {name: [] for name in rows}
  for _ in range(a.repeats):  # fewer than update_every (10) steps: none refreshes
    for name in rows:
      compiled, p, s = live[name]
      t = time.perf_counter()
      p, s = compiled(p, s, grads)
      jax.block_until_ready(p)
      times[name].append(time.perf_counter() - t)
      live[name] = [compiled, p, s]
  base = statistics.median(times["optax.adamw"])
  n = a.layers * shape[0] * shape[1]
  print(f"{a.layers} matrices {shape} ({n:,} parameters); {platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, optax {optax.__version__}; median of {a.repeats} plain steps")
  print(f"{'transform':62s} {'median':>10s} {'ratio':>7s} {'param-sized copies':>19s}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"{name:62s} {med * 1e3:8.1f}ms {med / base:7.2f} {copies[name]:19d}")


if __name__ == "__main__":
  main()
