"""Why a Sophia step without a Hessian refresh costs more than an AdamW step: copies and the win-rate count.

Times one jitted, donated ``update`` + ``apply_updates`` step that does *not*
refresh the curvature (the count is kept off multiples of ``update_every``),
for ``optax.adamw``, ``optax.contrib.sophia``, ``slimoptax.sophia`` (its
default ordering: step ``t`` uses the ``h`` of before the refresh, as optax),
``slimoptax.sophia(fresh_estimate=True)`` (Algorithm 3's ordering: the
refreshed ``h`` is used at once) and both with ``track_win_rate=True``,
interleaved over the repeats, and counts the parameter-sized ``copy``
instructions in every computation of each compiled step (XLA's HLO after
optimization). The objective is ``sum(tanh(x W))`` per matrix: the refresh
branch only has to exist, it never runs in the timed steps. With
``--grads-in-step`` the step computes the gradient of that objective itself, as
a training step does, so that the gradient is a temporary of the step whose
memory XLA can reuse (a passed-in gradient cannot be).

With ``--arrangements`` it times, instead, one matrix's plain step written out
in ``jax.numpy`` in four arrangements (no library code), to show what the
ordering costs on this backend: ``official`` (the direction reads the old ``h``
after the conditional), ``official, direction first`` (the direction computed
before the conditional and passed through it, as `slimoptax.sophia` does: XLA
copies nothing but keeps the direction as a temporary across the conditional),
``fresh`` (the direction reads the conditional's ``h``) and AdamW; it prints the
parameter-sized copies and the temporary bytes of each compiled step
(``memory_analysis``).

Usage:
  python benchmarks/sophia_plain_step.py [--layers 4] [--shape 1024,2048] [--repeats 9] [--grads-in-step]
  python benchmarks/sophia_plain_step.py --arrangements [--shape 1024,2048] [--repeats 9]
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
  ap.add_argument("--arrangements", action="store_true",
                  help="time one matrix's plain step in four arrangements written in jax.numpy")
  ap.add_argument("--grads-in-step", action="store_true",
                  help="compute the gradient inside the step, as a training step does (a temporary that "
                       "XLA may reuse), instead of passing it in")
  a = ap.parse_args()
  shape = tuple(int(s) for s in a.shape.split(","))
  if a.arrangements:
    return arrangements(shape, a.repeats)
  params = {f"l{i}": {"kernel": jnp.full(shape, 0.01)} for i in range(a.layers)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  x = jnp.ones((4, shape[0]))

  def loss(p):
    return sum(jnp.sum(jnp.tanh(x @ v["kernel"])) for v in p.values())

  rows = {"optax.adamw": (optax.adamw(1e-3), False),
          "optax.contrib.sophia": (optax.contrib.sophia(1e-3), True),
          "slimoptax.sophia": (slimoptax.sophia(1e-3), True),
          "slimoptax.sophia(fresh_estimate=True)": (slimoptax.sophia(1e-3, fresh_estimate=True), True),
          "slimoptax.sophia(track_win_rate=True)": (slimoptax.sophia(1e-3, track_win_rate=True), True),
          "slimoptax.sophia(fresh_estimate=True, track_win_rate=True)": (
              slimoptax.sophia(1e-3, fresh_estimate=True, track_win_rate=True), True)}
  live, copies = {}, {}
  for name, (tx, sophia) in rows.items():
    def step(p, s, g, tx=tx, sophia=sophia):
      if a.grads_in_step:  # the gradient of the objective at p, 1e-3 of it: a temporary of the step
        g = jax.tree.map(lambda d: 1e-3 * d, jax.grad(loss)(p))
      u, s = tx.update(g, s, p, **(dict(obj_fn=loss) if sophia else {}))
      return optax.apply_updates(p, u), s
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads).compile()
    text = compiled.as_text()
    copies[name] = text.count(f"f32[{','.join(map(str, shape))}]{{1,0}} copy(")  # in every computation
    p, s = compiled(p, s, grads)  # count 0: the refresh
    jax.block_until_ready(p)
    live[name] = [lambda c, compiled=compiled: compiled(*c, grads), (p, s)]
  # Every row takes the same steps; one whose count would refresh (a multiple of update_every, 10) is run
  # untimed, so every timed step is a plain one.
  times = _interleaved(live, a.repeats, untimed=lambda done: done % 10 == 0)
  base = statistics.median(times["optax.adamw"])
  n = a.layers * shape[0] * shape[1]
  print(f"{a.layers} matrices {shape} ({n:,} parameters); {platform.machine()}, {jax.devices()[0].platform}, "
        f"jax {jax.__version__}, optax {optax.__version__}; median of {a.repeats} plain steps"
        + ("; gradient computed in the step" if a.grads_in_step else ""))
  print(f"{'transform':62s} {'median':>10s} {'ratio':>7s} {'param-sized copies':>19s}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"{name:62s} {med * 1e3:8.1f}ms {med / base:7.2f} {copies[name]:19d}")


def _interleaved(live: dict, repeats: int, untimed=lambda done: False) -> dict[str, list[float]]:
  """Seconds of ``repeats`` steps of each row, the rows interleaved.

  ``live`` maps a row to ``[step, carry]`` (``step(carry) -> carry``, one step already taken); a step
  for which ``untimed(steps taken so far)`` holds is run first, untimed.
  """
  times, done = {name: [] for name in live}, {name: 1 for name in live}
  for _ in range(repeats):
    for name, (step, carry) in live.items():
      if untimed(done[name]):
        carry = jax.block_until_ready(step(carry))
        done[name] += 1
      t = time.perf_counter()
      carry = jax.block_until_ready(step(carry))
      times[name].append(time.perf_counter() - t)
      live[name][1], done[name] = carry, done[name] + 1
  return times


def arrangements(shape: tuple[int, int], repeats: int) -> None:
  """One matrix, ``(w, h, m)`` donated; b1 0.9, b2 0.99, clip 1, refresh every 10 steps (none timed)."""
  x = jnp.ones((4, shape[0]))

  def estimate(w):  # a Hutchinson-style product: u * (H u) with u = w
    return w * jax.jvp(jax.grad(lambda v: jnp.sum(jnp.tanh(x @ v))), (w,), (w,))[1]

  def direction(m, h):
    return jnp.clip(m / jnp.maximum(h, 1e-12), -1.0, 1.0)

  def official(w, h, m, g, count):
    new_h = jax.lax.cond(count % 10 == 0, lambda w, h: 0.99 * h + 0.01 * estimate(w), lambda w, h: h, w, h)
    m = 0.9 * m + 0.1 * g
    return w - 1e-3 * direction(m, h), new_h, m

  def official_direction_first(w, h, m, g, count):
    m = 0.9 * m + 0.1 * g
    u = direction(m, h)
    new_h, u = jax.lax.cond(count % 10 == 0, lambda h, u, w: (0.99 * h + 0.01 * estimate(w), u),
                            lambda h, u, w: (h, jax.lax.optimization_barrier(u)), h, u, w)
    return w - 1e-3 * u, new_h, m

  def fresh(w, h, m, g, count):
    new_h = jax.lax.cond(count % 10 == 0, lambda w, h: 0.99 * h + 0.01 * estimate(w), lambda w, h: h, w, h)
    m = 0.9 * m + 0.1 * g
    return w - 1e-3 * direction(m, new_h), new_h, m

  def adamw(w, v, m, g, count):
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
    return w - 1e-3 * (m / (jnp.sqrt(v) + 1e-8) + 0.1 * w), v, m

  rows = {"official (as optax)": official, "official, direction first": official_direction_first,
          "fresh (Algorithm 3)": fresh, "AdamW": adamw}
  g, count = jnp.full(shape, 1e-3), jnp.int32(1)
  live, info = {}, {}
  for name, fn in rows.items():
    state = [jnp.full(shape, v) for v in (0.01, 1.0, 0.0)]
    compiled = jax.jit(fn, donate_argnums=(0, 1, 2)).lower(*state, g, count).compile()
    text = compiled.as_text()
    info[name] = (text.count(f"f32[{shape[0]},{shape[1]}]{{1,0}} copy("),  # in every computation
                  compiled.memory_analysis().temp_size_in_bytes)
    live[name] = [lambda c, compiled=compiled: list(compiled(*c, g, count)), list(compiled(*state, g, count))]
  times = _interleaved(live, repeats)  # the count stays 1: no step refreshes
  base = statistics.median(times["AdamW"])
  print(f"one {shape} matrix; {platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"median of {repeats} plain steps")
  print(f"{'arrangement':26s} {'median':>10s} {'ratio':>7s} {'copies':>7s} {'temporaries':>12s}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"{name:26s} {med * 1e3:8.2f}ms {med / base:7.2f} {info[name][0]:7d} {info[name][1] / 2**20:9.1f} MiB")


if __name__ == "__main__":
  main()
