"""SOAP, Shampoo and slim SOAP against AdamW and Muon on the small GPT, at equal steps and equal wall-clock.

Vyas et al. ("SOAP: Improving and Stabilizing Shampoo using Adam", seed 002)
report that SOAP needs 40% fewer iterations and 35% less wall-clock time than
AdamW to reach AdamW's final loss at 360M and 660M parameters. This script
measures the same comparison at the main job's scale (the 4-layer d-96 GPT of
`experiments.training_length`: vocabulary 1024, context 64, batch 16, 800
steps, warm-up 7.5%, cosine to lr/10, global clipping at 1, weight decay 0.1 on
the ``ndim >= 2`` parameters), on the standard library's sources:

* ``adamw``: `slimoptax.slim_adamw` with ``compress=None`` (b1 0.9, b2 0.95);
* ``muon``: `slimoptax.muon` (Moonlight RMS scaling, AdamW 0.1 decay on the rest);
* ``shampoo``: `slimoptax.shampoo` (EMA statistics, beta 0.95, roots refreshed
  every 10 steps, Adam grafting with b1 0.9, b2 0.95);
* ``soap``: `slimoptax.soap` (the official defaults b1 = b2 = 0.95, bases
  refreshed every 10 steps; its decay as the official code's);
* ``slim_soap``: `slimoptax.precondition_in_eigenbasis` around
  `slimoptax.scale_by_slim_adam` with the SlimAdam Table 3 axes
  (``compress="slimadam"``: the rotated second moment averaged as SlimAdam
  averages Adam's), b1 = b2 = 0.95, refreshed every 10 steps, then optax's
  decoupled decay and the rate.

Three comparisons, each optimizer at its own tuned rate:

1. **Equal steps**: each optimizer's learning rate is tuned on a factor-2
   grid on the final validation loss averaged over ``--seeds`` (at a rate on
   the edge of stability one seed can land far from another: AdamW at 6e-3
   gave 3.61 and 3.97 with seeds 0 and 1 here), extended while the best sits at
   an edge (`experiments._lib.cells.tune_lr`). Final validation loss, gap to
   AdamW, half the seed-to-seed range.
2. **Fewer iterations**: the second-order methods rerun for
   ``--short-fraction`` of the steps (0.6: SOAP's claimed 40% saving), with
   the whole schedule compressed, at the tuned rate: does SOAP in 60% of the
   steps reach AdamW's loss?
3. **Equal wall-clock**: each optimizer rerun for the steps that take AdamW's
   800-step time at its time per step, so a slower step buys fewer steps. The
   times per step are measured once, in one process, in interleaved rounds
   (``--timing-rounds`` rounds of ``--timing-steps`` steps of every optimizer,
   the order rotated each round, median over rounds), so other load on the
   machine slows every optimizer alike; the runs' own timings (kept in their
   cells) come from different moments and are not compared.
4. **SOAP at its claimed wall-clock**: SOAP rerun for the steps that take
   ``CLAIMED_WALLCLOCK`` (65%) of AdamW's time at the measured times per
   step, the schedule compressed to them: does it reach AdamW's loss in 35%
   less time?

Every run is a JSON file under ``<out>/cells`` (`experiments._lib.cells`);
rerunning the same command skips them; ``--report`` writes ``summary.md``,
``results.json`` and ``curves.png`` from the cells stored so far.

Usage::

  python -m experiments.soap_shampoo               # the full grid (resumable)
  python -m experiments.soap_shampoo --report      # summary of the runs done so far
  python -m experiments.soap_shampoo --quick       # CI smoke test (< 2 min)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np
import optax

import slimoptax
from experiments._lib import cells, data, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import lm_warmup_cosine
from experiments._lib.train import compiled_step, train

OPTIMIZERS = ("adamw", "muon", "shampoo", "soap", "slim_soap")
SECOND_ORDER = ("shampoo", "soap", "slim_soap")
LABELS = {"adamw": "AdamW", "muon": "Muon", "shampoo": "Shampoo (Adam graft)", "soap": "SOAP",
          "slim_soap": "slim SOAP (SlimAdam in the eigenbasis)"}
COLORS = {"adamw": "tab:blue", "muon": "tab:red", "shampoo": "tab:green", "soap": "tab:purple",
          "slim_soap": "tab:orange"}
PRECOND_EVERY = 10
CLAIMED_WALLCLOCK = 0.65  # SOAP's claim: AdamW's final loss in 35% less wall-clock
_RUN_KEYS = ("optimizers", "seeds", "lrs", "max_extend", "vocab_size", "max_bytes", "n_layers", "d_model", "n_heads",
             "batch_size", "steps", "warmup_fraction", "short_fraction", "eval_batches", "final_eval_batches")
_TIMING_KEYS = ("timing_rounds", "timing_steps")  # stored in the timing cell, not in config.json


def parse_args(argv=None):
  p = report.parser(__doc__, "soap_shampoo", "1-layer d-32 model, 16 steps, AdamW, SOAP and slim SOAP at one rate")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="compared optimizers, AdamW first")
  p.add_argument("--seeds", default="0,1,2", help="seeds of every tuning and tuned run (tuned on their mean)")
  p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="every optimizer's starting grid (extended past an edge)")
  p.add_argument("--max-extend", type=int, default=3, help="grid extensions per optimizer at most")
  p.add_argument("--short-fraction", type=float, default=0.6,
                 help="fewer-iterations runs of the second-order methods: this fraction of --steps")
  report.lm_arguments(p, n_layers=4, d_model=96, n_heads=4, vocab_size=1024, max_bytes=None, batch_size=16,
                      steps=800, warmup_fraction=0.075, eval_batches=16, final_eval_batches=64)
  p.add_argument("--timing-rounds", type=int, default=7, help="interleaved timing rounds (median taken)")
  p.add_argument("--timing-steps", type=int, default=2 * PRECOND_EVERY,
                 help="steps of each optimizer per timing round (a multiple of the refresh interval)")
  p.add_argument("--report", action="store_true", help="only write the summary of the runs done so far")
  args = p.parse_args(argv)
  if args.quick:
    args.n_layers, args.d_model, args.n_heads, args.vocab_size = 1, 32, 2, 512
    args.max_bytes, args.batch_size, args.steps, args.max_extend = 1_500_000, 8, 16, 0
    args.seeds, args.lrs, args.eval_batches, args.final_eval_batches = "0", "1e-2", 2, 4
    args.optimizers = "adamw,soap,slim_soap"
    args.timing_rounds, args.timing_steps = 2, PRECOND_EVERY
  args.optimizer_list = [x for x in args.optimizers.split(",") if x]
  args.seed_list = [int(x) for x in args.seeds.split(",") if x]
  if args.optimizer_list[:1] != ["adamw"] or any(o not in OPTIMIZERS for o in args.optimizer_list):
    p.error(f"--optimizers: adamw first, then any of {', '.join(OPTIMIZERS[1:])}; got {args.optimizers!r}")
  if not args.seed_list or min(args.seed_list) < 0:
    p.error(f"--seeds: non-negative integers; got {args.seeds!r}")
  if not 0 < args.short_fraction <= 1 or args.steps < 10:
    p.error("--short-fraction in (0, 1], --steps >= 10")
  if args.timing_rounds < 1 or args.timing_steps < 1 or args.timing_steps % PRECOND_EVERY:
    p.error(f"--timing-rounds >= 1 and --timing-steps a positive multiple of {PRECOND_EVERY} (the refresh "
            f"interval, so every round holds the same refreshes); got {args.timing_rounds}, {args.timing_steps}")
  return report.default_out(args, "soap_shampoo")


def make_tx(name: str, lr: float, steps: int, warmup: int, num_heads: int) -> optax.GradientTransformation:
  """Global clipping at 1, then the optimizer on the warm-up + cosine schedule peaking at ``lr``."""
  sched = lm_warmup_cosine(lr, steps, warmup, 0.1)
  decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  if name == "adamw":
    tx = slimoptax.slim_adamw(sched, compress=None)
  elif name == "muon":
    tx = slimoptax.muon(sched, weight_decay=0.1, rms_scale="moonlight", adam_weight_decay=0.1)
  elif name == "shampoo":
    tx = slimoptax.shampoo(sched, weight_decay=0.1, mask=decay, beta=0.95, precondition_frequency=PRECOND_EVERY,
                           b1=0.9, b2=0.95)
  elif name == "soap":
    tx = slimoptax.soap(sched, weight_decay=0.1, mask=decay, precondition_frequency=PRECOND_EVERY)
  elif name == "slim_soap":
    inner = slimoptax.scale_by_slim_adam(b1=0.95, b2=0.95, compress="slimadam", num_heads=num_heads)
    tx = optax.chain(slimoptax.precondition_in_eigenbasis(inner, beta=0.95, precondition_frequency=PRECOND_EVERY),
                     optax.add_decayed_weights(0.1, decay), optax.scale_by_learning_rate(sched))
  else:
    raise ValueError(name)
  return optax.chain(optax.clip_by_global_norm(1.0), tx)


@dataclasses.dataclass(frozen=True)
class Cell:
  optimizer: str
  lr: float
  seed: int
  steps: int
  kind: str  # "tune" (part of the grid or a tuned seed), "short", "wallclock", "claim"

  @property
  def name(self) -> str:
    return f"{self.kind}_{self.optimizer}_T{self.steps}_lr{self.lr:g}_s{self.seed}"


class Grid:
  """The experiment's runs, each trained once and stored as ``<out>/cells/<name>.json``."""

  def __init__(self, args, out: pathlib.Path):
    self.args, self.out, self.cells = args, out, cells.CellStore(out)
    self._data, self._lm, self._loss = None, None, None

  def data(self):
    if self._data is None:
      self._data = data.prepare_data(vocab_size=self.args.vocab_size, max_bytes=self.args.max_bytes)
    return self._data

  def lm(self) -> model.Functional:
    if self._lm is None:
      a = self.args
      self._lm = model.Functional(model.gpt_config("tiny", vocab_size=self.data()[0].vocab_size,
                                                   n_layers=a.n_layers, d_model=a.d_model, n_heads=a.n_heads))
    return self._lm

  def val(self, count: int):
    return data.eval_batches(self.data()[2], batch_size=self.args.batch_size, seq_len=self.lm().seq_len,
                             max_batches=count)

  def run(self, cell: Cell, *, dry: bool) -> dict | None:
    done = self.cells.load(cell.name)
    if done is not None or dry:
      return done
    a, lm = self.args, self.lm()
    warmup = round(a.warmup_fraction * cell.steps)
    report.say(f"  {cell.name}: {cell.steps} steps ...")
    tx = make_tx(cell.optimizer, cell.lr, cell.steps, warmup, lm.config.n_heads)
    r = train(lm, tx, train_tokens=self.data()[1], steps=cell.steps, batch_size=a.batch_size, seed=cell.seed,
              val_batches=self.val(a.eval_batches), eval_every=max(cell.steps // 8, 1),
              log_every=max(cell.steps // 40, 1), stop_on_divergence=True)
    if self._loss is None:
      self._loss = jax.jit(lm.loss)
    final = float("nan") if r["diverged"] else float(np.mean(
        [float(self._loss(r["params"], x, y)) for x, y in self.val(a.final_eval_batches)]))
    rec = {**dataclasses.asdict(cell), "warmup": warmup, "final_val_loss": final,
           "diverged": bool(r["diverged"] or not math.isfinite(final)), "val_curve": r["val_curve"],
           "wall_s": r["wall_s"], "compile_s": r["compile_s"], "seconds_per_step": r["seconds_per_step"],
           "num_params": r["num_params"], "opt_state_bytes": int(r["opt_state_bytes"]), "machine": report.machine()}
    self.cells.store(cell.name, rec)
    report.say(f"  {cell.name}: val {final:.4f} ({r['wall_s']:.0f} s, {r['seconds_per_step'] * 1e3:.0f} ms/step)")
    return rec

  def timing(self, tuned: dict[str, float], *, dry: bool) -> dict | None:
    """Seconds per step of every tuned optimizer, measured in interleaved rounds in this process."""
    a = self.args
    name = f"timing_T{a.steps}"
    done = self.cells.load(name)
    if done is not None or dry or not tuned:  # called once every tuning is finished
      return done
    lm = self.lm()
    x, y = (jax.numpy.asarray(v) for v in self.val(1)[0])
    states = {}
    for opt, lr in tuned.items():
      tx = make_tx(opt, lr, a.steps, round(a.warmup_fraction * a.steps), lm.config.n_heads)
      step, params = compiled_step(lm, tx), lm.init(0)
      carry = (params, tx.init(params))
      for _ in range(PRECOND_EVERY + 1):  # compile, then one refresh interval
        carry = step(*carry, x, y, None, None)[:2]
      jax.block_until_ready(carry)
      states[opt] = (step, carry)
    report.say(f"  {name}: {a.timing_rounds} interleaved rounds of {a.timing_steps} steps ...")
    rounds = {opt: [] for opt in tuned}
    order = list(tuned)
    for r in range(a.timing_rounds):
      for opt in order[r % len(order):] + order[:r % len(order)]:
        step, carry = states[opt]
        t0 = time.perf_counter()
        for _ in range(a.timing_steps):
          carry = step(*carry, x, y, None, None)[:2]
        jax.block_until_ready(carry)
        rounds[opt].append((time.perf_counter() - t0) / a.timing_steps)
        states[opt] = (step, carry)
    rec = {"seconds_per_step": {o: float(np.median(v)) for o, v in rounds.items()}, "rounds": rounds,
           "tuned_lr": tuned, **{k: getattr(a, k) for k in _TIMING_KEYS}, "machine": report.machine()}
    self.cells.store(name, rec)
    report.say("  " + name + ": " + ", ".join(f"{o} {1e3 * v:.0f} ms" for o, v in rec["seconds_per_step"].items()))
    return rec

  def walk(self, *, dry: bool) -> dict:
    a = self.args
    tuned, tuning, runs = {}, {}, {}
    for opt in a.optimizer_list:  # 1. equal steps (tuned on the mean over the seeds)
      best, tried = cells.tune_lr(lambda lr, s: self.run(Cell(opt, lr, s, a.steps, "tune"), dry=dry),
                                  report.floats(a.lrs), a.seed_list, score=lambda r: math.inf if r["diverged"]
                                  else r["final_val_loss"], max_extend=a.max_extend, what=opt)
      tuned[opt], tuning[opt] = best, tried
      if best is not None:
        runs[("steps", opt)] = tried[best]
    short = max(10, round(a.short_fraction * a.steps))
    for opt in a.optimizer_list:  # 2. fewer iterations
      if opt in SECOND_ORDER and tuned.get(opt) is not None:
        runs[("short", opt)] = {s: self.run(Cell(opt, tuned[opt], s, short, "short"), dry=dry) for s in a.seed_list}
    timing = self.timing({o: tuned[o] for o in a.optimizer_list if tuned.get(o) is not None}, dry=dry)
    sps = {opt: None if timing is None else timing["seconds_per_step"].get(opt) for opt in a.optimizer_list}
    for opt in a.optimizer_list[1:]:  # 3. equal wall-clock (needs every tuned run's timing)
      if tuned.get(opt) is not None and sps.get("adamw") and sps.get(opt):
        n = max(10, round(a.steps * sps["adamw"] / sps[opt]))
        runs[("wallclock", opt)] = {s: self.run(Cell(opt, tuned[opt], s, n, "wallclock"), dry=dry)
                                    for s in a.seed_list}
    if tuned.get("soap") is not None and sps.get("adamw") and sps.get("soap"):  # 4. SOAP's claimed time
      n = max(10, round(CLAIMED_WALLCLOCK * a.steps * sps["adamw"] / sps["soap"]))
      runs[("claim", "soap")] = {s: self.run(Cell("soap", tuned["soap"], s, n, "claim"), dry=dry)
                                 for s in a.seed_list}
    return {"tuned": tuned, "tuning": tuning, "runs": runs, "seconds_per_step": sps, "short_steps": short}


# -----------------------------------------------------------------------------
# Summary
# -----------------------------------------------------------------------------


def _losses(per_seed: dict | None) -> list[float] | None:
  if not per_seed or any(r is None for r in per_seed.values()):
    return None
  return [math.inf if r["diverged"] else r["final_val_loss"] for r in per_seed.values()]


def _stat(vals: list[float]) -> dict:
  return {"mean": float(np.mean(vals)), "half_range": float((max(vals) - min(vals)) / 2), "each": vals}


def analyse(state: dict, args) -> dict:
  runs = state["runs"]
  adam = _losses(runs.get(("steps", "adamw")))
  res = {"experiment": "soap_shampoo", "tuned_lr": state["tuned"], "seconds_per_step": state["seconds_per_step"],
         "short_steps": state["short_steps"], "comparisons": {}, "machine": report.machine(),
         "tuning": {o: {f"{lr:g}": {str(s): None if r is None else r["final_val_loss"] for s, r in per.items()}
                        for lr, per in tried.items()} for o, tried in state["tuning"].items()}}
  for (kind, opt), per in runs.items():
    ls = _losses(per)
    if ls is None:
      continue
    e = {"loss": _stat(ls), "steps": next(iter(per.values()))["steps"],
         "opt_state_bytes": next(iter(per.values()))["opt_state_bytes"]}
    if adam is not None and len(adam) == len(ls):
      e["gap_to_adamw"] = _stat([x - y for x, y in zip(ls, adam)])  # paired by seed
    res["comparisons"].setdefault(kind, {})[opt] = e
  known = [r for tried in state["tuning"].values() for per in tried.values() for r in per.values()]
  known += [r for per in runs.values() for r in per.values()]
  res["runs_done"] = sum(r is not None for r in known)
  res["complete"] = all(r is not None for r in known) and all(v is not None for v in state["tuned"].values()) \
      and all(("steps", o) in runs for o in args.optimizer_list) \
      and all(v is not None for v in state["seconds_per_step"].values()) \
      and all(("wallclock", o) in runs for o in args.optimizer_list[1:]) \
      and all(("short", o) in runs for o in args.optimizer_list if o in SECOND_ORDER) \
      and ("soap" not in args.optimizer_list or ("claim", "soap") in runs)
  res["wall_s_of_runs"] = sum(r["wall_s"] for r in {id(r): r for r in known if r}.values())
  return res


def _pm(e: dict | None, fmt: str = "{:+.4f}") -> str:
  return "—" if not e else f"{fmt.format(e['mean'])} ± {e['half_range']:.4f}"


def summary_md(res: dict, args) -> str:
  lines = [f"# SOAP, Shampoo, slim SOAP vs AdamW and Muon ({'complete' if res['complete'] else 'in progress'}: "
           f"{res['runs_done']} runs done)", "",
           f"- model: {args.n_layers} layers, d {args.d_model}, {args.n_heads} heads, vocab {args.vocab_size}; batch "
           f"{args.batch_size}, {args.steps} steps, warm-up {args.warmup_fraction:.1%}, cosine to lr/10, clip 1, "
           f"wd 0.1; seeds {args.seeds}; machine: {res['machine']}", "",
           "Learning-rate tuning (final validation loss, mean over the seeds):", ""]
  for opt, tried in res["tuning"].items():
    cells_ = ", ".join(f"{lr}: " + ("—" if None in per.values() else f"{np.mean(list(per.values())):.4f}")
                       for lr, per in sorted(tried.items(), key=lambda kv: float(kv[0])))
    best = res["tuned_lr"].get(opt)
    edge = "" if best is None or best not in (min(map(float, tried)), max(map(float, tried))) else " (at an edge)"
    lines.append(f"- {opt}: {cells_}; best {'—' if best is None else f'{best:g}'}{edge}")
  titles = {"steps": f"Equal steps ({args.steps})",
            "short": f"Fewer iterations ({res['short_steps']} steps, {args.short_fraction:.0%} of AdamW's)",
            "wallclock": "Equal wall-clock (the steps that take AdamW's time at each one's measured time per step)",
            "claim": f"SOAP at its claimed wall-clock ({CLAIMED_WALLCLOCK:.0%} of AdamW's time)"}
  for kind, title in titles.items():
    rows = res["comparisons"].get(kind, {})
    if not rows:
      continue
    lines += ["", f"## {title}", "", "| optimizer | steps | s/step | final val loss | gap to AdamW's "
              f"{args.steps}-step loss | state bytes |", "|---|---|---|---|---|---|"]
    for opt, e in rows.items():
      sps = res["seconds_per_step"].get(opt)
      lines.append(f"| {LABELS[opt]} | {e['steps']} | {'—' if sps is None else f'{sps:.3f}'} | "
                   f"{_pm(e['loss'], '{:.4f}')} | {_pm(e.get('gap_to_adamw'))} | {e['opt_state_bytes']:,} |")
  lines += ["", "Losses: mean over seeds ± half the seed-to-seed range; gaps paired by seed. s/step: the "
            "interleaved timing (every optimizer in the same rounds of one process, median over rounds).",
            f"Training time of the runs: {res['wall_s_of_runs'] / 60:.1f} min."]
  return "\n".join(lines) + "\n"


def plot_curves(state: dict, args, path) -> None:
  plt = pyplot()
  fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
  for (kind, opt), per in state["runs"].items():
    if kind != "steps" or any(r is None for r in per.values()):
      continue
    for i, r in enumerate(per.values()):
      pts = [(s, v) for s, v in r["val_curve"] if s > 0 and math.isfinite(v)]
      if not pts:
        continue
      steps, vals = zip(*pts)
      sps = state["seconds_per_step"].get(opt) or float("nan")
      for ax, xs in ((axs[0], steps), (axs[1], [s * sps for s in steps])):
        ax.plot(xs, vals, color=COLORS[opt], alpha=0.8, lw=1, label=LABELS[opt] if i == 0 else None)
  for ax, xlabel in ((axs[0], "steps"), (axs[1], "seconds (steps x measured time per step)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle("Validation loss at each optimizer's tuned rate (every seed)", fontsize=10)
  save(fig, path, dpi=110)


def write_report(grid: Grid, state: dict) -> None:
  res = analyse(state, grid.args)
  res["config"] = {k: getattr(grid.args, k) for k in _RUN_KEYS}
  with open(grid.out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  (grid.out / "summary.md").write_text(summary_md(res, grid.args))
  plot_curves(state, grid.args, grid.out / "curves.png")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  grid = Grid(args, out)
  return cells.run_grid("soap_shampoo", args, out, _RUN_KEYS, grid.walk, lambda state: write_report(grid, state),
                        argv=argv, t_start=t_start)


if __name__ == "__main__":
  sys.exit(main())
