"""Benchmark: one jitted optimizer step of every slimoptax transform against its optax peer.

GPT-2-small-shaped Flax parameter tree (124.4M parameters at 12 layers: d 768,
12 heads, vocab 50304, tied embedding, no biases; DenseGeneral attention
kernels), random gradients, one jitted ``update`` + ``apply_updates`` step with
the parameters and optimizer state donated. Rows are timed in groups (a peer
and the rows compared with it) in one process, interleaved over the repeats so
that every row of a group sees the same machine load; only one group's states
are alive at a time.

Per row: median and min step time, the ratio of medians to the row's peer (a
quantized row: to its float32 version), compile time and optimizer-state
bytes. With ``--peak-gbps`` (the memory's peak bandwidth, GB/s), also the
fraction of the bandwidth bound each plain step reaches: the least traffic a
step can have (parameters read and written, gradients read, optimizer state
read and written: ``3 P + 2 S`` bytes) over the peak, divided by the median
step time. Sophia rows are timed twice, on a step with a Hessian refresh and on one
without; their objective is a small causal transformer on the same parameters
(``--sophia-tokens`` tokens of one sequence). Shampoo and SOAP rows likewise, on
a step that refreshes the preconditioner (Shampoo: the roots by ``eigh``; SOAP:
the eigenbases by one power iteration and a QR) and on one that does not; the
``count`` in the state is set to pick which (`with_count`). Their refresh
step's ratio is taken to the peer's plain step where the peer has no refresh.

Shampoo / SOAP group (``shampoo_soap``), multiply-adds per step of one ``(m, n)``
matrix (a kernel of order k with sizes d_i and N entries: per preconditioned
axis i, ``N d_i`` for a statistic or a mode product, ``d_i^3`` for a
factorization; axes longer than ``max_precond_dim`` = 10000, such as the
embedding's vocabulary axis, are left alone):

* ``optax.adamw``: ~10 m n elementwise, no matrix products.
* ``slimoptax.muon``: 5 Newton-Schulz iterations of ``X X^T``, ``A^2``, ``B X``
  (m <= n): ~5 (2 m^2 n + m^3).
* ``slimoptax.shampoo`` (Adam graft), plain step: statistics ``L += G G^T``,
  ``R += G^T G``: m^2 n + m n^2; preconditioning ``L^{-1/4} G R^{-1/4}``:
  m^2 n + m n^2; with the graft's elementwise Adam. Refresh step, in addition:
  ``eigh`` of L and R, ~c (m^3 + n^3) with c ~ 4-10 (LAPACK / cuSOLVER with
  eigenvectors), and the root ``V diag(w^{-1/4}) V^T``: m^3 + n^3.
* ``slimoptax.soap``, plain step: statistics m^2 n + m n^2 (EMA); the gradient
  rotated into the bases ``Q_L^T G Q_R`` and Adam's direction rotated back:
  2 (m^2 n + m n^2). Refresh step, in addition: per factor the estimated
  eigenvalues ``diag(Q^T L Q)`` (2 m^3), the power iteration ``L Q`` (m^3) and
  its QR (~(4/3) m^3, Householder with Q formed): ~4.3 (m^3 + n^3); the first
  moment rotated back and into the new bases: 2 (m^2 n + m n^2). (Its first
  call, an ``eigh`` per factor, is once per run and not timed.)

State, in float32 entries: Shampoo 2 (m^2 + n^2) (statistics and roots) + 2 m n
(graft moments); SOAP 2 (m^2 + n^2) (statistics and bases) + 2 m n (Adam in the
bases).

Usage:
  python benchmarks/bench_all.py [--repeats 10] [--layers 12] [--only adamw,sophia]
      [--json out.json]

``--only`` takes group names (``adamw``, ``adafactor``, ``muon``, ``sophia``,
``sign``, ``other``, ``quantized``, ``shampoo_soap``) or row names; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import slimoptax

LR = 3e-4
ADAM = dict(b1=0.9, b2=0.95, weight_decay=0.1)
SOPHIA_EVERY = 10
PRECOND_EVERY = 10  # Shampoo's root / SOAP's basis refresh (both libraries' SOAP default)


# --------------------------------------------------------------------------
# Parameters, objective and steps.
# --------------------------------------------------------------------------


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


def _norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * scale


def gpt2_loss(params, tokens):
  """Next-token cross-entropy of a pre-norm causal transformer on ``params`` (`gpt2_params`)."""
  t = tokens.shape[-1]
  x = params["wte"]["embedding"][tokens] + params["wpe"]["embedding"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(len(params["blocks"])):
    blk = params["blocks"][str(i)]
    h = _norm(x, blk["ln_1"]["scale"])
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, blk["attn"][n]["kernel"]) for n in ("query", "key", "value"))
    att = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    x = x + jnp.einsum("bhts,bshk,hkd->btd", att, v, blk["attn"]["out"]["kernel"])
    h = _norm(x, blk["ln_2"]["scale"])
    x = x + jax.nn.gelu(h @ blk["mlp"]["up"]["kernel"]) @ blk["mlp"]["down"]["kernel"]
  logits = _norm(x, params["ln_f"]["scale"]) @ params["wte"]["embedding"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def make_step(tx, objective=None):
  """``(params, state, grads) -> (params, state)``, jitted, params and state donated.

  With an ``objective`` (``(params, tokens) -> loss``) the step takes the tokens
  too and passes ``obj_fn`` to ``update`` (Sophia's Hessian refresh).
  """
  if objective is None:
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
  else:
    def step(params, state, grads, tokens):
      updates, state = tx.update(grads, state, params, obj_fn=lambda p: objective(p, tokens))
      return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def with_count(state, count):
  """``state`` with every ``count`` field set to ``count`` (decides Sophia's / Shampoo's / SOAP's refresh).

  Each field gets its own buffer: the step donates the state, and one buffer in
  two fields (SOAP's chain has three counts) would be donated twice.
  """
  def one(path, x):
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
      return jnp.asarray(count, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(one, state)


# --------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  """One optimizer of the table.

  Attributes:
    name: the row's label.
    group: rows timed together (interleaved); the first row of a group is its peer.
    make: ``params -> GradientTransformation``.
    peer: the row its ratio is taken to (``None``: the group's first row).
    sophia: time a refresh step and a plain step (needs the objective).
    refresh_every: time a refresh step (``count % refresh_every == 0``) and a
      plain step, without an objective (Shampoo, SOAP).
    refresh_kind: the refresh step's label in the table.
  """

  name: str
  group: str
  make: Callable[[Any], Any]
  peer: str | None = None
  sophia: bool = False
  refresh_every: int | None = None
  refresh_kind: str = "Hessian refresh"

  @property
  def every(self) -> int | None:
    """Steps between refreshes (``None``: every step is alike)."""
    return SOPHIA_EVERY if self.sophia else self.refresh_every


def _adamw(_):
  return optax.adamw(LR, **ADAM, mask=slimoptax.default_weight_decay_mask)


def _slim(compress):
  return lambda _: slimoptax.slim_adamw(LR, **ADAM, compress=compress)


def _quantized(base, **kw):
  return lambda p: slimoptax.quantize_state(base(p), **kw)


def _muon_optax(params):
  # The same matrices (slimoptax's views) for both; the rest goes to optax's AdamW.
  return optax.contrib.muon(0.02, muon_weight_dimension_numbers=slimoptax.matrix_dims(params))


def rows() -> list[Row]:
  out = [
      Row("optax.adamw", "adamw", _adamw),
      Row('slim_adamw("slimadam")', "adamw", _slim("slimadam")),
      Row('slim_adamw("adam-mini")', "adamw", _slim("adam-mini")),
      Row('slim_adamw("adalayer")', "adamw", _slim("adalayer")),
      Row("slim_adamw(compress=None)", "adamw", _slim(None)),
      Row("optax.adafactor", "adafactor", lambda _: optax.adafactor(LR)),
      Row("scale_by_adafactor + lr", "adafactor",
          lambda _: optax.chain(slimoptax.scale_by_adafactor(), optax.scale_by_learning_rate(LR))),
      Row("optax.contrib.muon", "muon", _muon_optax),
      Row("slimoptax.muon", "muon", lambda _: slimoptax.muon(0.02, adam_learning_rate=LR)),
      Row("optax.contrib.sophia", "sophia", lambda _: optax.contrib.sophia(LR), sophia=True),
      Row("slimoptax.sophia", "sophia", lambda _: slimoptax.sophia(LR), sophia=True),
      Row("optax.adamw (reference)", "sophia", _adamw, peer="optax.adamw (reference)"),
      Row("optax.signum", "sign", lambda _: optax.signum(LR, beta=0.9)),
      Row('scale_by_sign("signum") + lr', "sign", lambda _: optax.chain(
          slimoptax.scale_by_sign(mode="signum", beta=0.9), optax.scale_by_learning_rate(LR))),
      Row("optax.sign_sgd", "sign", lambda _: optax.sign_sgd(LR), peer="optax.sign_sgd"),
      Row('scale_by_sign("signsgd") + lr', "sign", lambda _: optax.chain(
          slimoptax.scale_by_sign(mode="signsgd"), optax.scale_by_learning_rate(LR)),
          peer="optax.sign_sgd"),
      # Kronecker-factored preconditioners against AdamW (and Muon, the other matrix method);
      # FLOPs per step in the module docstring.
      Row("optax.adamw (shampoo_soap)", "shampoo_soap", _adamw),
      Row("slimoptax.muon (shampoo_soap)", "shampoo_soap",
          lambda _: slimoptax.muon(0.02, adam_learning_rate=LR)),
      Row("slimoptax.shampoo", "shampoo_soap",
          lambda _: slimoptax.shampoo(LR, precondition_frequency=PRECOND_EVERY),
          refresh_every=PRECOND_EVERY, refresh_kind="root refresh (eigh)"),
      Row("slimoptax.soap", "shampoo_soap",
          lambda _: slimoptax.soap(LR, ADAM["b1"], ADAM["b2"], weight_decay=ADAM["weight_decay"],
                                   precondition_frequency=PRECOND_EVERY),
          refresh_every=PRECOND_EVERY, refresh_kind="basis refresh (QR)"),
  ]
  # Transforms without an optax peer, against AdamW: column max descent (seed 003's Algorithm 2; its
  # embeddings and norms through AdamW) and AdaVar (Orvieto & Gower's generalised Adam, eq. 12).
  out += [
      Row("optax.adamw (other)", "other", _adamw),
      Row("column_max_descent", "other", lambda _: slimoptax.column_max_descent(
          LR, adam_learning_rate=LR, adam_b1=ADAM["b1"], adam_b2=ADAM["b2"],
          adam_weight_decay=ADAM["weight_decay"])),
      Row("scale_by_adavar + lr", "other", lambda _: optax.chain(
          slimoptax.scale_by_adavar(), optax.scale_by_learning_rate(LR))),
  ]
  # Quantized states, against their float32 versions (timed in the same group).
  out += [
      Row("optax.adamw (fp32)", "quantized", _adamw, peer="optax.adamw (fp32)"),
      Row('slim_adamw("slimadam") (fp32)', "quantized", _slim("slimadam"),
          peer='slim_adamw("slimadam") (fp32)'),
      Row("8-bit AdamW (mu, nu int8)", "quantized", _quantized(_adamw, mu="int8", nu="int8"),
          peer="optax.adamw (fp32)"),
      Row("8-bit SlimAdam (mu int8)", "quantized", _quantized(_slim("slimadam"), mu="int8"),
          peer='slim_adamw("slimadam") (fp32)'),
      Row("SlimAdam, mu bf16 (SR)", "quantized", _quantized(_slim("slimadam"), mu="bf16"),
          peer='slim_adamw("slimadam") (fp32)'),
  ]
  return out


def select(all_rows: list[Row], only: str | None) -> list[Row]:
  """The rows named by ``--only`` (groups or row names), with the peers they need."""
  if not all_rows or not only:
    return all_rows
  wanted = {w for w in only.split(",") if w}
  known = {r.group for r in all_rows} | {r.name for r in all_rows}
  unknown = wanted - known
  if unknown:
    raise SystemExit(f"--only: unknown {sorted(unknown)}; known: {sorted(known)}")
  keep = {r.name for r in all_rows if r.group in wanted or r.name in wanted}
  keep |= {peer_of(r, all_rows) for r in all_rows if r.name in keep}
  return [r for r in all_rows if r.name in keep]


def peer_of(row: Row, all_rows: list[Row]) -> str:
  return row.peer or next(r.name for r in all_rows if r.group == row.group)


# --------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def time_group(group: list[Row], params0, grads, tokens, repeats: int) -> dict[str, dict]:
  """Compiles every row of a group, then times them interleaved over ``repeats`` rounds."""
  runs = {}
  for row in group:
    tx = row.make(params0)
    params = jax.tree.map(jnp.copy, params0)
    state = tx.init(params)
    state_bytes = slimoptax.tree_bytes(state)
    param_bytes = slimoptax.tree_bytes(params)
    step = make_step(tx, gpt2_loss if row.sophia else None)
    args = (params, state, grads) + ((tokens,) if row.sophia else ())
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    if row.every:
      # Warm-up on a plain step; count 1 is never a refresh (nor SOAP's initializing call 0).
      state = with_count(state, 1)
    params, state = compiled(params, state, grads, *((tokens,) if row.sophia else ()))
    jax.block_until_ready(params)
    runs[row.name] = dict(row=row, compiled=compiled, params=params, state=state, compile_s=compile_s,
                          state_bytes=state_bytes, traffic_bytes=3 * param_bytes + 2 * state_bytes,
                          times=[], refresh_times=[])
  for r in range(repeats):
    for run in runs.values():
      every = run["row"].every
      if every:
        # A plain step (count 1 mod k) and a refresh step (count 0 mod k).
        extra = (tokens,) if run["row"].sophia else ()
        for count, key in ((every * r + 1, "times"), (every * (r + 1), "refresh_times")):
          state = with_count(run["state"], count)
          (run["params"], run["state"]), dt = _timed(run["compiled"], run["params"], state, grads,
                                                     *extra)
          run[key].append(dt)
      else:
        (run["params"], run["state"]), dt = _timed(run["compiled"], run["params"], run["state"], grads)
        run["times"].append(dt)
  out = {}
  for name, run in runs.items():
    res = dict(group=run["row"].group, median_step_s=statistics.median(run["times"]),
               min_step_s=min(run["times"]), compile_s=run["compile_s"], state_bytes=run["state_bytes"],
               traffic_bytes=run["traffic_bytes"], times_s=run["times"])
    if run["refresh_times"]:
      res.update(refresh_median_step_s=statistics.median(run["refresh_times"]),
                 refresh_min_step_s=min(run["refresh_times"]), refresh_times_s=run["refresh_times"])
    out[name] = res
  return out


def markdown(results: dict[str, dict], all_rows: list[Row], peak_gbps: float | None = None) -> str:
  bound = peak_gbps is not None
  lines = ["| optimizer | step | median | min | ratio to peer | peer | compile | optimizer state bytes |"
           + (" bandwidth bound |" if bound else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if bound else "")]
  for row in all_rows:
    if row.name not in results:
      continue
    r = results[row.name]
    peer = peer_of(row, all_rows)
    kinds = [("plain" if "refresh_median_step_s" in r else "", "")]
    if "refresh_median_step_s" in r:
      kinds.append((row.refresh_kind, "refresh_"))
    for kind, prefix in kinds:
      # A peer without refresh steps (AdamW): the refresh step against its plain step.
      base = results[peer].get(f"{prefix}median_step_s", results[peer]["median_step_s"])
      ratio = "" if peer == row.name or base is None else f"{r[f'{prefix}median_step_s'] / base:.3f}"
      line = (f"| `{row.name}` | {kind} | {r[f'{prefix}median_step_s'] * 1e3:.1f} ms | "
              f"{r[f'{prefix}min_step_s'] * 1e3:.1f} ms | {ratio} | "
              f"{'' if peer == row.name else '`' + peer + '`'} | {r['compile_s']:.2f} s | "
              f"{r['state_bytes']:,} |")
      if bound:  # plain steps only: a refresh's traffic is not the optimizer's state alone
        line += f" {r['bandwidth_fraction']:.3f} |" if not prefix else " |"
      lines.append(line)
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--only", default=None, help="comma-separated groups or row names")
  parser.add_argument("--sophia-tokens", type=int, default=16)
  parser.add_argument("--json", default=None, help="write the results here")
  parser.add_argument("--list", action="store_true", help="print the groups and rows, then exit")
  parser.add_argument("--peak-gbps", type=float, default=None,
                      help="the memory's peak bandwidth in GB/s: adds each plain step's fraction of the bound")
  args = parser.parse_args()
  if args.peak_gbps is not None and not args.peak_gbps > 0:
    raise SystemExit(f"--peak-gbps: a bandwidth in GB/s above 0, got {args.peak_gbps}")

  all_rows = rows()
  if args.list:
    for row in all_rows:
      print(f"{row.group:10s} {row.name}")
    return
  if not hasattr(slimoptax, "quantize_state"):
    print("note: slimoptax.quantize_state is not available in this version; skipping the quantized rows")
    all_rows = [r for r in all_rows if r.group != "quantized"]
  chosen = select(all_rows, args.only)
  params0 = gpt2_params(jax.random.PRNGKey(0), layers=args.layers)
  grads = gpt2_params(jax.random.PRNGKey(1), layers=args.layers)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, args.sophia_tokens), 0, 50304)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  device = (f"{jax.devices()[0].device_kind} ({jax.default_backend()}), "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
            f"{jax.device_count()} device(s)")
  print(f"device: {device}; jax {jax.__version__}, optax {optax.__version__}; "
        f"{args.layers} layers, {n_params:,} params", flush=True)

  results: dict[str, dict] = {}
  for group in dict.fromkeys(r.group for r in chosen):
    members = [r for r in chosen if r.group == group]
    t0 = time.perf_counter()
    results.update(time_group(members, params0, grads, tokens, args.repeats))
    print(f"group {group}: {len(members)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
  for row in chosen:
    r = results[row.name]
    if args.peak_gbps:
      r["bandwidth_bound_s"] = r["traffic_bytes"] / (args.peak_gbps * 1e9)
      r["bandwidth_fraction"] = r["bandwidth_bound_s"] / r["median_step_s"]
    peer = peer_of(row, chosen)
    if peer != row.name:
      r = results[row.name]
      r["peer"] = peer
      r["ratio_to_peer"] = r["median_step_s"] / results[peer]["median_step_s"]
      if "refresh_median_step_s" in r:
        r["refresh_ratio_to_peer"] = r["refresh_median_step_s"] / results[peer].get(
            "refresh_median_step_s", results[peer]["median_step_s"])
      if results[peer]["state_bytes"]:
        r["state_bytes_ratio_to_peer"] = r["state_bytes"] / results[peer]["state_bytes"]
  table = markdown(results, chosen, args.peak_gbps)
  print(table)
  if args.json:
    out = dict(device=device, jax=jax.__version__, optax=optax.__version__, layers=args.layers,
               params=n_params, repeats=args.repeats, peak_gbps=args.peak_gbps, sophia_tokens=args.sophia_tokens,
               sophia_update_every=SOPHIA_EVERY, precondition_every=PRECOND_EVERY, date=datetime.date.today().isoformat(),
               rows={name: r for name, r in results.items()}, table=table)
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
