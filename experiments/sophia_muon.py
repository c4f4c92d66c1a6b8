"""Sophia and Muon against AdamW on the small GPT, at equal steps and at equal wall-clock.

Muon (Jordan et al.) orthogonalizes the momentum of the
hidden matrices by a 5-step Newton–Schulz iteration (Jordan et al.: ~1.35x faster
NanoGPT speedrun; FLOP overhead ``T m / B``); Sophia steps by the clipped ratio of
momentum to an EMA of a Hessian-diagonal estimate refreshed every ``k = 10`` steps
(Liu et al.: ~2x fewer steps than AdamW on GPT-2). Here, on the ~0.14M-parameter GPT of
`experiments._lib.model` (Python stdlib source), we compare

* AdamW: `experiments._lib.ladder.adamw` (b1 0.9, b2 0.95, weight decay 0.1);
* Muon: `slimoptax.muon` (momentum 0.95, Nesterov, quintic Newton–Schulz, 5 steps,
  Jordan's shape scale, no weight decay on the matrices) on the hidden matrices; the
  embeddings and norms go through its AdamW fallback at AdamW's tuned learning rate
  (weight decay 0.1);
* Sophia-H: `slimoptax.sophia` (Hutchinson, gamma 0.01, b1 0.965, b2 0.99, k 10,
  weight decay 0.2);
* Sophia-G: `slimoptax.sophia(estimator="gnb")` (Gauss–Newton–Bartlett, gamma 0.05);

all behind global-norm clipping to 1, with 10% warm-up and cosine decay to 1e-5.

1. *Equal steps*: each optimizer is tuned over a small learning-rate grid at ``--steps``.
2. *Wall time per step*: measured for each optimizer in interleaved rounds (so load
   changes on the shared machine hit all optimizers alike); median over rounds.
3. *Equal wall-clock*: the budget is AdamW's ``steps x seconds/step``; every other
   optimizer gets ``budget / its seconds per step`` steps (its schedule stretched to
   that length) at its tuned learning rate.

Every run goes through `experiments._lib.train.train` with its objective hook
(``objective=True``: ``tx.update`` gets the batch loss ``obj_fn`` and ``logits_fn``, which
`slimoptax.sophia` needs), with the learning rates and the run length as traced
hyperparameters (one compilation per optimizer).

A learning rate that is best at the edge of its grid is followed by one more rate beyond
it (``--max-extend``). ``--resume`` reuses the runs in ``OUT/results.json``;
``--extra-seeds`` retrains every optimizer at its tuned rate from other initialisations.

Usage:
  python -m experiments.sophia_muon --quick
  python -m experiments.sophia_muon --max-extend 2 --extra-seeds 1 2     # full (~15-20 min)
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import slimoptax
from experiments._lib import data, ladder, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import warmup_cosine
from experiments._lib.stats import finite_or_nan, ppl
from experiments._lib.train import compiled_step, train

# Learning-rate grids (peak rates). Muon's grid is for the matrices; its AdamW fallback uses
# AdamW's tuned rate. AdamW's grid is centred on Adam's best rate in the ladder pilot (2e-3);
# Muon's brackets Jordan's default 0.02; Sophia's brackets Signum's best rate (its update is a
# per-coordinate clipped ratio, sign-like where the curvature estimate is small).
GRIDS = {
    "AdamW": [1e-3, 2e-3, 4e-3],
    "Muon": [0.01, 0.03, 0.1],
    "Sophia-H": [1e-3, 3e-3, 1e-2],
    "Sophia-G": [1e-3, 3e-3, 1e-2],
}


def build_tx(name: str, hp: dict) -> optax.GradientTransformationExtraArgs:
  """The optimizer ``name``; ``hp`` holds traced ``lr``, ``adam_lr``, ``steps``, ``warmup``."""
  sched = warmup_cosine(hp["lr"], hp["steps"], hp["warmup"])
  if name == "AdamW":
    tx = ladder.adamw(sched, b1=0.9, b2=0.95, clip_norm=None)
  elif name == "Muon":
    tx = slimoptax.muon(sched, beta=0.95, weight_decay=0.0,
                        adam_learning_rate=warmup_cosine(hp["adam_lr"], hp["steps"], hp["warmup"]),
                        adam_b1=0.9, adam_b2=0.95, adam_weight_decay=0.1)
  elif name == "Sophia-H":
    tx = slimoptax.sophia(sched, estimator="hutchinson", track_win_rate=True)
  elif name == "Sophia-G":
    tx = slimoptax.sophia(sched, estimator="gnb", track_win_rate=True)
  else:
    raise ValueError(name)
  return optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(1.0), tx))


class Trainer:
  """One model structure; one compiled step per optimizer (hyperparameters are its arguments)."""

  def __init__(self, cfg, *, train_tokens, val_tokens, batch_size, final_eval_batches, eval_batches):
    self.lm, self.batch_size = model.Functional(cfg), batch_size
    self.train_tokens = train_tokens
    self.short_val = data.eval_batches(val_tokens, batch_size=batch_size, seq_len=cfg.seq_len,
                                       max_batches=eval_batches)
    self.full_val = data.eval_batches(val_tokens, batch_size=batch_size, seq_len=cfg.seq_len,
                                      max_batches=final_eval_batches)
    self.tx = {}

  def make_tx(self, name):
    """``hparams -> transformation`` of ``name``, one object per optimizer (so one compilation)."""
    return self.tx.setdefault(name, functools.partial(build_tx, name))

  def hparams(self, lr, adam_lr, steps):
    return {k: jnp.asarray(v, jnp.float32) for k, v in
            dict(lr=lr, adam_lr=adam_lr, steps=steps, warmup=max(1, steps // 10)).items()}

  def train(self, name, lr, adam_lr, steps, *, seed=0, init_seed=None, eval_every=50, log=print):
    """Trains one model; returns final val loss, curves and the loop's own seconds/step.

    ``seed`` sets the batch order and, unless ``init_seed`` is given, the initialisation.
    The objective hook hands Sophia the batch loss (Hessian-vector products) and logits.
    """
    run = train(self.lm, self.make_tx(name), hparams=self.hparams(lr, adam_lr, steps), objective=True,
                train_tokens=self.train_tokens, steps=steps, batch_size=self.batch_size, seed=seed,
                init_seed=init_seed, val_batches=self.short_val, final_val_batches=self.full_val,
                eval_every=eval_every)
    curve = [(s, finite_or_nan(v)) for s, v in run["val_curve"]]
    final = curve[-1][1]
    # Sophia: fraction of coordinates whose last step was not clipped (the paper: 0.1-0.5).
    win_rate = float(slimoptax.sophia_win_rate(run["opt_state"])) if name.startswith("Sophia") else None
    log(f"  {name:8s} lr {lr:<8.3g} {steps:4d} steps: final val loss {final:.4f} "
        f"(ppl {ppl(final):.2f}), {run['wall_s']:.0f}s" + (f", win rate {win_rate:.3f}" if win_rate is not None else ""))
    return {"final_val_loss": final, "val_curve": curve, "wall_s": run["wall_s"], "win_rate": win_rate,
            "loop_seconds_per_step": run["seconds_per_step"]}

  def time_steps(self, names, lrs, adam_lr, *, rounds, steps_per_round, log=print):
    """Median seconds/step per optimizer, measured in interleaved rounds (compiled first)."""
    states = {}
    batches = data.batch_iterator(self.train_tokens, batch_size=self.batch_size,
                                  seq_len=self.lm.seq_len, seed=123)
    batch_list = [next(batches) for _ in range(steps_per_round)]
    step_of = {name: compiled_step(self.lm, self.make_tx(name), objective=True) for name in names}
    for name in names:
      hp = self.hparams(lrs[name], adam_lr, 1000)
      params = self.lm.init(0)
      states[name] = [params, build_tx(name, hp).init(params), hp]
      out = step_of[name](*states[name][:2], *batch_list[0], hp, None)  # compile / warm up
      jax.block_until_ready(out)
    times = {name: [] for name in names}
    for r in range(rounds):
      for name in (names if r % 2 == 0 else names[::-1]):
        params, opt_state, hp = states[name]
        t0 = time.perf_counter()
        for x, y in batch_list:
          params, opt_state, loss, _ = step_of[name](params, opt_state, x, y, hp, None)
        jax.block_until_ready(loss)
        times[name].append((time.perf_counter() - t0) / steps_per_round)
        states[name][:2] = [params, opt_state]
    med = {n: float(np.median(t)) for n, t in times.items()}
    log("  seconds/step (median of %d interleaved rounds of %d steps): %s" % (
        rounds, steps_per_round, ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in med.items())))
    return med, times


def plot(results, timing, equal_time, names, path):
  plt = pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for name in names:
    r = results[name]
    runs = r["runs"]
    lrs = sorted(runs)
    axes[0].plot(lrs, [runs[lr]["final_val_loss"] for lr in lrs], "o-", label=name)
    s, v = zip(*runs[r["best_lr"]]["val_curve"])
    axes[1].plot(s, v, label=f"{name} (lr {r['best_lr']:g})")
    e = equal_time[name]
    s, v = zip(*e["val_curve"])
    axes[2].plot(np.asarray(s) * timing[name], v,
                 label=f"{name}: {e['steps']} steps x {timing[name] * 1e3:.0f} ms")
  axes[0].set_xscale("log")
  axes[0].set_xlabel("peak learning rate (Muon: matrices)")
  axes[0].set_ylabel("final validation loss")
  axes[0].set_title("Learning-rate grids (equal steps)")
  axes[1].set_xlabel("step")
  axes[1].set_title("Equal steps: validation loss")
  axes[2].set_xlabel("estimated wall-clock (s) = step x measured s/step")
  axes[2].set_title("Equal wall-clock budget: validation loss")
  for ax in axes:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  lo = min(r["best_val_loss"] for r in results.values())
  for ax in axes[1:]:
    ax.set_ylim(lo - 0.1, lo + 2.0)
  axes[1].set_ylabel("validation loss")
  save(fig, path, dpi=90)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="experiments/results/sophia_muon")
  report.lm_arguments(parser, steps=200, batch_size=16, n_layers=2, d_model=64, vocab_size=512,
                      max_bytes=None, eval_every=50, final_eval_batches=24)
  parser.add_argument("--optimizers", nargs="*", default=list(GRIDS))
  report.lm_arguments(parser, timing_rounds=6, timing_steps=10, seed=0)
  parser.add_argument("--max-extend", type=int, default=1,
                      help="extend a grid beyond an edge optimum at most this often")
  parser.add_argument("--resume", action="store_true",
                      help="reuse the runs in OUT/results.json (same settings)")
  parser.add_argument("--extra-seeds", type=int, nargs="*", default=[],
                      help="also train every optimizer at its tuned rate from these initialisations")
  args = parser.parse_args(argv)
  grids = {n: list(GRIDS[n]) for n in args.optimizers}
  if args.quick:
    args.steps, args.max_bytes, args.eval_every, args.final_eval_batches = 6, 1_500_000, 3, 2
    args.n_layers, args.d_model = 1, 32  # compilation dominates the smoke test
    args.timing_rounds, args.timing_steps, args.max_extend = 2, 2, 0
    grids = {n: [g[1]] for n, g in grids.items()}
  out = report.output_dir(args.out)
  t0 = time.perf_counter()
  say = report.say
  names = list(grids)
  assert names[0] == "AdamW", "AdamW comes first: Muon's fallback and the time budget use it"

  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size,
                                                          max_bytes=args.max_bytes)
  cfg = model.gpt_config("tiny", n_layers=args.n_layers, d_model=args.d_model,
                         vocab_size=tokenizer.vocab_size)
  trainer = Trainer(cfg, train_tokens=train_tokens, val_tokens=val_tokens, batch_size=args.batch_size,
                    final_eval_batches=args.final_eval_batches, eval_batches=2 if args.quick else 4)
  num_params = model.count_params(trainer.lm.init(0))
  tokens_per_step = args.batch_size * cfg.seq_len
  say(f"model {num_params:,} params; {args.steps} steps x {tokens_per_step} tokens; optimizers {names}")
  train = functools.partial(trainer.train, seed=args.seed, eval_every=args.eval_every, log=say)

  # 1. Equal steps, each optimizer tuned over its grid; an optimum at the grid's edge is followed
  #    by one more rate beyond it (same spacing), at most --max-extend times.
  previous = {}
  if args.resume and (out / "results.json").exists():
    prev = json.loads((out / "results.json").read_text())
    keys = ("steps", "batch_size", "n_layers", "d_model", "vocab_size", "max_bytes", "eval_every",
            "final_eval_batches", "seed")
    if all(prev["args"].get(k) == getattr(args, k) for k in keys):
      previous = prev["equal_steps"]
      for n, r in previous.items():  # results written before "adam_lr" was recorded
        r.setdefault("adam_lr", None if n == "AdamW" else previous["AdamW"]["best_lr"])
      say(f"resume: reusing the equal-steps runs of {sorted(previous)}")
  finite = lambda v: v if math.isfinite(v) else math.inf  # noqa: E731
  results, adam_lr = {}, None
  for name in names:
    runs = {}
    old = previous.get(name)
    if old and old.get("adam_lr") == adam_lr:  # Muon's runs depend on AdamW's tuned rate
      runs = {float(lr): v for lr, v in old["runs"].items()}
    todo = [lr for lr in grids[name] if lr not in runs]
    say(f"[equal steps] {name}: lrs {grids[name]}" + (f" (new: {todo})" if runs else ""))
    for lr in todo:
      runs[lr] = train(name, lr, adam_lr if adam_lr else lr, args.steps)
    for _ in range(args.max_extend):
      lrs = sorted(runs)
      best_lr = min(lrs, key=lambda lr: finite(runs[lr]["final_val_loss"]))
      if len(lrs) < 2 or best_lr not in (lrs[0], lrs[-1]):
        break
      new_lr = lrs[0] ** 2 / lrs[1] if best_lr == lrs[0] else lrs[-1] ** 2 / lrs[-2]
      say(f"  {name}: best rate {best_lr:g} at the edge, adding {new_lr:.3g}")
      runs[new_lr] = train(name, new_lr, adam_lr if adam_lr else new_lr, args.steps)
    lrs = sorted(runs)
    runs = {lr: runs[lr] for lr in lrs}
    best_lr = min(lrs, key=lambda lr: finite(runs[lr]["final_val_loss"]))
    results[name] = {"runs": runs, "best_lr": best_lr, "best_val_loss": runs[best_lr]["final_val_loss"],
                     "best_at_edge": len(lrs) > 1 and best_lr in (lrs[0], lrs[-1]),
                     "adam_lr": adam_lr}
    if name == "AdamW":
      adam_lr = best_lr

  # 2. Seconds per step, interleaved (reused on --resume when the tuned rates did not change).
  reuse = bool(previous) and prev.get("seconds_per_step") and all(
      prev["equal_steps"].get(n, {}).get("best_lr") == results[n]["best_lr"] for n in names) and all(
      n in prev.get("equal_wall_clock", {}) for n in names)
  if reuse:
    timing, timing_raw = prev["seconds_per_step"], prev["seconds_per_step_rounds"]
    say("[timing] reused: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in timing.items()))
  else:
    say("[timing]")
    timing, timing_raw = trainer.time_steps(names, {n: results[n]["best_lr"] for n in names}, adam_lr,
                                            rounds=args.timing_rounds, steps_per_round=args.timing_steps,
                                            log=say)

  # 3. Equal wall-clock: AdamW's budget.
  budget = args.steps * timing["AdamW"]
  equal_time = {}
  for name in names:
    steps = max(2, int(round(budget / timing[name])))
    if reuse:
      equal_time[name] = prev["equal_wall_clock"][name]
      continue
    if steps == args.steps:
      run = results[name]["runs"][results[name]["best_lr"]]
    else:
      say(f"[equal wall-clock] {name}: {steps} steps in AdamW's {budget:.1f}s budget")
      run = train(name, results[name]["best_lr"], adam_lr, steps)
    equal_time[name] = {"steps": steps, **run}

  # 4. Seed check: every optimizer at its tuned rate from other initialisations (same batches).
  seed_check = {}
  if args.extra_seeds:
    say(f"[seed check] init seeds {args.extra_seeds} at the tuned rates, {args.steps} steps")
    for name in names:
      r = results[name]
      runs = [r["runs"][r["best_lr"]]] + [
          train(name, r["best_lr"], adam_lr, args.steps, init_seed=sd) for sd in args.extra_seeds]
      finals = [x["final_val_loss"] for x in runs]
      seed_check[name] = {"init_seeds": [args.seed] + list(args.extra_seeds), "final_val_loss": finals,
                          "mean": float(np.mean(finals)), "std": float(np.std(finals, ddof=1)),
                          "win_rate": [x.get("win_rate") for x in runs]}

  # FLOP-style overhead of Muon at this size (slides: T m / B).
  muon_overhead = {
      f"{r}x{c}": slimoptax.muon_flop_overhead(r, c, tokens_per_step)
      for r, c in [(cfg.d_model, 3 * cfg.d_model), (cfg.d_model, cfg.d_model),
                   (cfg.d_model, 4 * cfg.d_model), (4 * cfg.d_model, cfg.d_model)]}
  wall = time.perf_counter() - t0
  summary = {
      "experiment": "sophia_muon", "args": vars(args), "machine": report.machine(), "num_params": num_params,
      "tokens_per_step": tokens_per_step, "grids": grids,
      "equal_steps": {n: {"best_lr": r["best_lr"], "best_val_loss": r["best_val_loss"], "adam_lr": r["adam_lr"],
                          "best_ppl": ppl(r["best_val_loss"]), "best_at_edge": r["best_at_edge"],
                          "runs": {str(lr): v for lr, v in r["runs"].items()}} for n, r in results.items()},
      "seconds_per_step": timing, "seconds_per_step_rounds": timing_raw, "budget_s": budget,
      "equal_wall_clock": equal_time, "seed_check": seed_check,
      "muon_flop_overhead_per_matrix": muon_overhead,
      "wall_time_s": wall,
  }
  (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["optimizer", "setting", "lr", "steps", "final_val_loss", "final_val_ppl", "seconds_per_step"])
    for n, r in results.items():
      for lr, v in r["runs"].items():
        w.writerow([n, "equal_steps", lr, args.steps, v["final_val_loss"], ppl(v["final_val_loss"]), timing[n]])
      e = equal_time[n]
      w.writerow([n, "equal_wall_clock", r["best_lr"], e["steps"], e["final_val_loss"],
                  ppl(e["final_val_loss"]), timing[n]])
  plot(results, timing, equal_time, names, out / "sophia_muon.png")

  lines = [f"| optimizer | lr grid | best lr | val loss @ {args.steps} steps | ppl | s/step (ms) | "
           f"rel. to AdamW | steps in AdamW's {budget:.1f}s | val loss @ equal time | ppl |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for n in names:
    r, e = results[n], equal_time[n]
    lines.append(
        f"| {n} | {', '.join(f'{v:.3g}' for v in r['runs'])} | {r['best_lr']:.3g}{' (edge)' if r['best_at_edge'] else ''} | "
        f"{r['best_val_loss']:.4f} | {ppl(r['best_val_loss']):.2f} | {timing[n] * 1e3:.1f} | "
        f"{timing[n] / timing['AdamW']:.2f}x | {e['steps']} | {e['final_val_loss']:.4f} | {ppl(e['final_val_loss']):.2f} |")
  lines += ["", "Per learning rate (final val loss at equal steps): " + "; ".join(
      f"{n}: " + ", ".join(f"{lr:g} -> {v['final_val_loss']:.4f}" for lr, v in r["runs"].items())
      for n, r in results.items()),
  ] + ([
      "", f"Seed check at equal steps ({args.steps}), tuned rates, init seeds {[args.seed] + list(args.extra_seeds)} "
      "(same batches):", "", "| optimizer | final val loss per seed | mean | std | Sophia win rate |",
      "|---|---|---|---|---|"] + [
      f"| {n} | {', '.join(f'{v:.4f}' for v in c['final_val_loss'])} | {c['mean']:.4f} | {c['std']:.4f} | "
      + (", ".join(f"{w:.3f}" for w in c["win_rate"] if w is not None) or "-") + " |"
      for n, c in seed_check.items()] if seed_check else []) + [
            "", "Muon FLOP overhead T m / B per matrix at this size (5 NS steps, B = %d tokens): %s" % (
                tokens_per_step, ", ".join(f"{k}: {v:.1%}" for k, v in muon_overhead.items()))]
  report.write_tables(out, lines, wall)
  return summary


if __name__ == "__main__":
  main()
