"""SlimAdam's gap to Adam as training gets longer (Kalra et al. 2025, the paper's central claim).

The paper reports that SlimAdam matches Adam at Adam's optimal learning rate
while saving ~98% of the second moments (GPT-small, 10k steps of 1,280
sequences). The main job (`experiments.demo`: 4-layer d-96 GPT, 800 steps of
16 x 64 tokens) ends with a visible gap. This experiment measures the gap of
every compressed optimizer to Adam as a function of training length:

1. SlimAdam rules derived as in the main job: Adam at lr 3e-4 (``--snr-lr``)
   for 500 steps, SNR every 20 steps, cutoff 1 (one set of rules per model);
2. for each length T (default 800, 2400, 7200 steps on the main job's model,
   and 7200 on a larger 6-layer d-128 model): Adam's learning rate tuned on a
   factor-2 grid on the final loss averaged over the seeds, extended while
   the best rate sits at an edge, so
   the optimum is inside;
3. at that rate, every optimizer with every seed (``--seeds``, each seed
   sets the initialisation and the batch order): Adam, SlimAdam with the
   derived rules, SlimAdam with the paper's Table 3 rules (the ``"slimadam"``
   preset), Adam-mini and AdaLayer;
4. the gap of each optimizer is its final validation loss (on the whole
   validation split: 45 contiguous batches of 16 x 64, 46,080 tokens, as
   ``--final-eval-batches 64`` caps at what there is; the curves use the first
   16, the main job's evaluation) minus Adam's at the same seed; the table
   gives the mean over seeds and, beside it, half the seed-to-seed range of
   that gap.

The schedule is the main job's at every length: linear warm-up over 7.5% of
the steps (60 of 800), cosine decay to a tenth of the peak, global-norm
clipping at 1, ``slim_adamw`` (b2 0.95, weight decay 0.1 on matrices). The
learning rate is an argument of the jitted step, so each optimizer compiles
once per model.

Resumable: each finished run is one JSON file under ``<out>/cells``, written
atomically; rerunning the same command skips them (a run cut off in the middle
is restarted from its first step). ``summary.md``, ``results.json`` and
``gap_vs_steps.png`` are rewritten after every run, and ``--report`` writes them
from the runs done so far without training. One process per output folder at a
time (a lock file holds its pid): on this CPU a second concurrent process
slows both to a third of their speed.

Usage::

  python -m experiments.training_length              # the full grid (~4-5 h on 2 CPU cores)
  python -m experiments.training_length --report     # summary of the runs done so far
  python -m experiments.training_length --quick      # CI smoke test (< 1 min)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys

import jax
import numpy as np
import optax

import slimoptax
from experiments._lib import cells, data, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import lm_warmup_cosine
from experiments._lib.train import train

OPTIMIZERS = ("adam", "slimadam", "slimadam-table3", "adam-mini", "adalayer")
COMPRESS = {"adam": None, "slimadam-table3": "slimadam", "adam-mini": "adam-mini", "adalayer": "adalayer"}
LABELS = {"adam": "Adam", "slimadam": "SlimAdam (derived rules)", "slimadam-table3": "SlimAdam (Table 3 rules)",
          "adam-mini": "Adam-mini", "adalayer": "AdaLayer"}
COLORS = {"slimadam": "tab:red", "slimadam-table3": "tab:orange", "adam-mini": "tab:green", "adalayer": "tab:blue"}
# Every argument that changes a run's numbers: a resumed grid must have been started with the same ones.
_RUN_KEYS = ("lengths", "large_steps", "seeds", "lrs", "vocab_size", "max_bytes", "batch_size", "warmup_fraction",
             "n_layers", "d_model", "n_heads", "large_n_layers", "large_d_model", "large_n_heads", "snr_lr",
             "snr_steps", "snr_warmup", "snr_every", "cutoff", "eval_batches", "final_eval_batches", "max_extend", "optimizers")


def parse_args(argv=None):
  p = report.parser(__doc__, "training_length", "1-layer d-32 model, 12 and 24 steps, 3 optimizers")
  p.add_argument("--lengths", default="800,2400,7200", help="training lengths (steps) on the main model")
  p.add_argument("--large-steps", type=int, default=7200,
                 help="training length of the larger model (0: no larger model)")
  p.add_argument("--seeds", default="0,1", help="seeds of every compared run (Adam is tuned on their mean)")
  p.add_argument("--lrs", default="1.5e-3,3e-3,6e-3",
                 help="Adam's starting grid on the main model (extended by factors of 2 past an edge)")
  p.add_argument("--max-extend", type=int, default=3, help="grid extensions per length at most")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="compared optimizers, Adam first")
  report.lm_arguments(p, n_layers=4, d_model=96, n_heads=4, large_n_layers=6, large_d_model=128, large_n_heads=4,
                      vocab_size=1024, max_bytes=None, batch_size=16, warmup_fraction=0.075, snr_lr=3e-4,
                      snr_steps=500, snr_warmup=60, snr_every=20, cutoff=1.0, eval_batches=16, final_eval_batches=64)
  p.add_argument("--report", action="store_true", help="only write the summary of the runs done so far")
  p.add_argument("--no-progress", action="store_true", help="accepted for symmetry with the demo (no bars here)")
  args = p.parse_args(argv)
  if args.quick:
    args.lengths, args.large_steps, args.lrs, args.optimizers = "12,24", 24, "3e-3,1e-2", "adam,slimadam,adalayer"
    args.n_layers, args.d_model, args.n_heads = 1, 32, 2
    args.large_n_layers, args.large_d_model, args.large_n_heads = 2, 32, 2
    args.vocab_size, args.max_bytes, args.batch_size = 512, 1_500_000, 8
    args.snr_steps, args.snr_warmup, args.snr_every, args.max_extend = 12, 2, 3, 1
    args.eval_batches, args.final_eval_batches = 2, 4
  args.lengths_list = [int(x) for x in args.lengths.split(",") if x]
  args.seed_list = [int(x) for x in args.seeds.split(",") if x]
  args.optimizer_list = [x for x in args.optimizers.split(",") if x]
  if args.optimizer_list[:1] != ["adam"] or any(n not in OPTIMIZERS for n in args.optimizer_list):
    p.error(f"--optimizers: Adam first, then any of {', '.join(OPTIMIZERS[1:])}; got {args.optimizers!r}")
  if not args.lengths_list or min(args.lengths_list) < 10 or args.large_steps < 0:
    p.error(f"--lengths / --large-steps: steps of at least 10; got {args.lengths!r}, {args.large_steps}")
  if not args.seed_list or min(args.seed_list) < 0:
    p.error(f"--seeds: non-negative integers; got {args.seeds!r}")
  return report.default_out(args, "training_length")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid."""

  model: str  # "main" or "large"
  optimizer: str
  lr: float
  seed: int
  steps: int

  @property
  def name(self) -> str:
    return f"{self.model}_T{self.steps}_{self.optimizer}_lr{self.lr:g}_s{self.seed}"


class Grid:
  """The runs of the experiment, each trained once and stored as ``<out>/cells/<name>.json``."""

  def __init__(self, args, out: pathlib.Path):
    self.args, self.out = args, out
    self.cells = cells.CellStore(out)
    self._data = None
    self._models, self._txs, self._rules = {}, {}, {}

  # -- data, models, optimizers ------------------------------------------------------------------------------
  def data(self):
    if self._data is None:
      tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=self.args.vocab_size,
                                                              max_bytes=self.args.max_bytes)
      self._data = tokenizer, train_tokens, val_tokens
    return self._data

  def lm(self, which: str) -> model.Functional:
    if which not in self._models:
      a = self.args
      sizes = dict(n_layers=a.n_layers, d_model=a.d_model, n_heads=a.n_heads) if which == "main" else dict(
          n_layers=a.large_n_layers, d_model=a.large_d_model, n_heads=a.large_n_heads)
      cfg = model.gpt_config("tiny", vocab_size=self.data()[0].vocab_size, **sizes)
      self._models[which] = model.Functional(cfg)
    return self._models[which]

  def tx(self, which: str, optimizer: str) -> optax.GradientTransformation:
    """Clipping, then ``slim_adamw`` with a learning rate of 1 (the step multiplies by the schedule)."""
    key = (which, optimizer)
    if key not in self._txs:
      compress = self.rules(which) if optimizer == "slimadam" else COMPRESS[optimizer]
      self._txs[key] = optax.chain(optax.clip_by_global_norm(1.0), slimoptax.slim_adamw(
          1.0, compress=compress, num_heads=self.lm(which).config.n_heads))
    return self._txs[key]

  def val_batches(self, which: str, count: int | None = None):
    return data.eval_batches(self.data()[2], batch_size=self.args.batch_size, seq_len=self.lm(which).seq_len,
                             max_batches=count or self.args.eval_batches)

  def final_loss(self, which: str, params) -> float:
    """Validation loss on the first ``--final-eval-batches`` batches (the curves use ``--eval-batches``)."""
    loss = self.__dict__.setdefault("_loss_fns", {}).setdefault(which, jax.jit(self.lm(which).loss))
    batches = self.val_batches(which, self.args.final_eval_batches)
    return float(np.mean([float(loss(params, x, y)) for x, y in batches]))

  # -- cells -----------------------------------------------------------------------------------------------
  def load(self, name: str) -> dict | None:
    return self.cells.load(name)

  def store(self, name: str, record: dict) -> None:
    self.cells.store(name, record)

  def run(self, cell: Cell, *, dry: bool = False) -> dict | None:
    """The run's record, trained first if it is not stored (``dry``: None instead)."""
    done = self.load(cell.name)
    if done is not None or dry:
      return done
    a, lm = self.args, self.lm(cell.model)
    warmup = round(a.warmup_fraction * cell.steps)
    factors = np.asarray(jax.vmap(lm_warmup_cosine(1.0, cell.steps, warmup, 0.1))(np.arange(cell.steps)))
    report.say(f"  {cell.name}: {cell.steps} steps (warm-up {warmup}) ...")
    r = train(lm, self.tx(cell.model, cell.optimizer), lr_scale=lambda s: cell.lr * float(factors[s - 1]),
              train_tokens=self.data()[1], steps=cell.steps, batch_size=a.batch_size, seed=cell.seed,
              val_batches=self.val_batches(cell.model), eval_every=max(cell.steps // 8, 1),
              log_every=max(cell.steps // 40, 1), stop_on_divergence=True)
    final = self.final_loss(cell.model, r["params"]) if not r["diverged"] else float("nan")
    record = {**dataclasses.asdict(cell), "warmup": warmup, "final_val_loss": final,
              f"final_val_loss_{a.eval_batches}_batches": r["final_val_loss"],
              "final_train_loss": r["final_train_loss"], "diverged": bool(r["diverged"] or not math.isfinite(final)),
              "val_curve": r["val_curve"], "train_curve": r["train_curve"], "wall_s": r["wall_s"],
              "seconds_per_step": r["seconds_per_step"], "num_params": r["num_params"],
              "second_moments": self.second_moments(cell.model, cell.optimizer), "machine": report.machine()}
    self.store(cell.name, record)
    report.say(f"  {cell.name}: val {final:.4f} ({r['wall_s']:.0f} s)")
    write_report(self, self.walk(dry=True))
    return record

  def second_moments(self, which: str, optimizer: str) -> dict | None:
    """Second-moment entries kept and saved (None for derived rules not derived yet)."""
    if optimizer == "slimadam" and which not in self._rules and not (self.out / f"rules_{which}.json").exists():
      return None
    template = self.lm(which).init(0)
    mem = slimoptax.memory_report(jax.eval_shape(self.tx(which, optimizer).init, template), template)
    return {"kept": int(mem.entries), "adam": int(mem.adam_entries), "saved": float(mem.fraction_saved)}

  def rules(self, which: str) -> slimoptax.Rules:
    """The model's SlimAdam rules, derived as in the main job (stored as ``rules_<model>.json``)."""
    if which not in self._rules:
      path = self.out / f"rules_{which}.json"
      if not path.exists():
        a, lm = self.args, self.lm(which)
        template = lm.init(0)
        tracker = slimoptax.SNRTracker(template, every=a.snr_every, steps=(1,))
        factors = np.asarray(jax.vmap(lm_warmup_cosine(1.0, a.snr_steps, a.snr_warmup, 0.1))(
            np.arange(a.snr_steps)))
        report.say(f"  SNR run ({which}): Adam at lr {a.snr_lr:g} for {a.snr_steps} steps")
        train(lm, self.tx(which, "adam"), lr_scale=lambda s: a.snr_lr * float(factors[s - 1]),
              train_tokens=self.data()[1], steps=a.snr_steps, batch_size=a.batch_size, seed=0,
              eval_at_start=False, state_hook=tracker.record,
              state_hook_steps=[s for s in range(1, a.snr_steps + 1) if tracker.should_measure(s)])
        rules = slimoptax.derive_rules(tracker.time_average(), a.cutoff, shapes=tracker.shapes)
        (self.out / f"rules_{which}_table.txt").write_text(
            f"SlimAdam rules of the {which} model, derived from Adam at lr {a.snr_lr:g} ({a.snr_steps} steps), "
            f"cutoff {a.cutoff}:\n" + rules.table(template) + "\n")
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        rules.to_json(str(tmp))
        os.replace(tmp, path)
      self._rules[which] = slimoptax.Rules.from_json(str(path))
    return self._rules[which]

  # -- the grid ----------------------------------------------------------------------------------------------
  def points(self) -> list[tuple[str, int]]:
    pts = [("main", t) for t in self.args.lengths_list]
    return pts + ([("large", self.args.large_steps)] if self.args.large_steps else [])

  def start_grid(self, which: str, steps: int, tuned: dict) -> list[float]:
    if which == "main" or ("main", steps) not in tuned or tuned[("main", steps)] is None:
      return sorted(report.floats(self.args.lrs))
    best = tuned[("main", steps)]  # a larger model: the main model's rate and half of it
    return [best / 2, best]

  def tune(self, which: str, steps: int, tuned: dict, *, dry: bool) -> tuple[float | None, dict]:
    """Adam's best learning rate at this point (lowest final loss averaged over ``--seeds``); every rate tried.

    At a rate on the edge of stability one seed can land far from another (measured: 0.35 nats apart at
    800 steps, lr 6e-3), so the rate is tuned on the mean of all seeds, not on one.
    """
    return cells.tune_lr(lambda lr, s: self.run(Cell(which, "adam", lr, s, steps), dry=dry),
                         self.start_grid(which, steps, tuned), self.args.seed_list,
                         score=lambda r: math.inf if r["diverged"] else r["final_val_loss"],
                         max_extend=self.args.max_extend, what=f"Adam ({which}, {steps} steps)")

  def walk(self, *, dry: bool) -> dict:
    """Runs (or, ``dry``, only reads) the whole grid in order; returns what is known."""
    tuned, tuning, runs = {}, {}, {}
    for which, steps in self.points():
      best, tried = self.tune(which, steps, tuned, dry=dry)
      tuned[(which, steps)], tuning[(which, steps)] = best, tried
      if best is None:
        continue
      for seed in self.args.seed_list:
        for opt in self.args.optimizer_list:
          runs[(which, steps, opt, seed)] = self.run(Cell(which, opt, best, seed, steps), dry=dry)
    return {"tuned": tuned, "tuning": tuning, "runs": runs}


# -----------------------------------------------------------------------------
# Summary: tables, figure, results.json
# -----------------------------------------------------------------------------


def gaps(state: dict, args) -> dict:
  """``{(model, steps): {optimizer: {...}}}``: per-seed gaps to Adam, their mean and half-range."""
  out = {}
  for (which, steps), best in state["tuned"].items():
    if best is None:
      continue
    per = {}
    adam = {s: state["runs"].get((which, steps, "adam", s)) for s in args.seed_list}
    adam = {s: r["final_val_loss"] for s, r in adam.items() if r is not None and not r["diverged"]}
    for opt in args.optimizer_list:
      vals = {s: state["runs"].get((which, steps, opt, s)) for s in args.seed_list}
      losses = {s: (float("nan") if r["diverged"] else r["final_val_loss"]) for s, r in vals.items() if r}
      g = [losses[s] - adam[s] for s in losses if s in adam]
      entry = {"losses": losses, "seed_gaps": g, "complete": len(g) == len(args.seed_list)}
      if g:
        mean_adam = float(np.mean([adam[s] for s in losses if s in adam]))
        entry.update(gap=float(np.mean(g)), half_range=float((max(g) - min(g)) / 2),
                     rel_gap=float(np.mean(g)) / mean_adam, loss=float(np.mean(list(losses.values()))))
      per[opt] = entry
    out[(which, steps)] = per
  return out


def write_report(grid: Grid, state: dict) -> None:
  args, out = grid.args, grid.out
  table = gaps(state, args)
  tuning_runs = [r for t in state["tuning"].values() for per in t.values() for r in per.values()]
  other_runs = [r for (w, t, o, s), r in state["runs"].items() if o != "adam"]
  total, done = len(tuning_runs) + len(other_runs), sum(1 for r in tuning_runs + other_runs if r)
  complete = all(b is not None for b in state["tuned"].values()) and len(state["tuned"]) == len(grid.points()) \
      and all(r is not None for r in state["runs"].values())
  models = {}
  for which in ("main", "large"):
    if any(w == which for w, _ in grid.points()):
      cfg = grid.lm(which).config
      models[which] = {**dataclasses.asdict(cfg), "num_params": model.count_params(grid.lm(which).init(0))}
  saved = {w: {o: grid.second_moments(w, o) for o in args.optimizer_list} for w in models}
  res = {"experiment": "training_length", "complete": complete, "runs_done": done, "runs_known": total,
         "config": {k: getattr(args, k) for k in _RUN_KEYS}, "models": models, "second_moments": saved,
         "adam_lr": {f"{w}_T{t}": b for (w, t), b in state["tuned"].items()},
         "tuning": {f"{w}_T{t}": {f"{lr:g}": {str(s): (None if r is None else r["final_val_loss"])
                                              for s, r in per.items()} for lr, per in tried.items()}
                    for (w, t), tried in state["tuning"].items()},
         "gaps": {f"{w}_T{t}": per for (w, t), per in table.items()},
         "wall_s_of_runs": sum(r["wall_s"] for r in tuning_runs + other_runs if r),
         "machine": report.machine()}
  with open(out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  (out / "summary.md").write_text(summary_md(res, args))
  plot_gaps(table, args, out / "gap_vs_steps.png")


def _fmt_gap(e: dict) -> str:
  if "gap" not in e:
    return "—"
  flag = "" if e["complete"] else " (partial)"
  return f"{e['gap']:+.4f} ± {e['half_range']:.4f} ({e['rel_gap']:+.2%}){flag}"


def summary_md(res: dict, args) -> str:
  lines = [f"# SlimAdam's gap to Adam vs training length ({'complete' if res['complete'] else 'in progress'}: "
           f"{res['runs_done']} of {res['runs_known']} runs known so far)", ""]
  for which, m in res["models"].items():
    lines.append(f"- {which} model: {m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} heads, vocab "
                 f"{m['vocab_size']}, context {m['seq_len']}, {m['num_params']:,} parameters; second moments "
                 "saved: " + ", ".join(f"{o} {v['saved']:.2%}" for o, v in res["second_moments"][which].items() if v))
  lines += [f"- batch {args.batch_size} x context, warm-up {args.warmup_fraction:.1%} of the steps, cosine to "
            f"lr/10, clip 1, b2 0.95, wd 0.1; seeds {args.seeds}; rules derived at lr {args.snr_lr:g} "
            f"({args.snr_steps} steps, cutoff {args.cutoff})", "",
            "Adam's learning-rate tuning (final validation loss: mean over the seeds (each seed)):", ""]

  def mean_of(per):
    vals = list(per.values())
    if any(v is None for v in vals):
      return "—"
    return f"{np.mean(vals):.4f} (" + ", ".join(f"{v:.3f}" for v in vals) + ")"

  for key, tried in res["tuning"].items():
    best = res["adam_lr"].get(key)
    cells = ", ".join(f"{lr}: {mean_of(per)}" for lr, per in sorted(tried.items(), key=lambda kv: float(kv[0])))
    edge = ""
    if best is not None and float(best) in (min(map(float, tried)), max(map(float, tried))):
      edge = " (at an edge of the grid after the allowed extensions)"
    lines.append(f"- {key}: {cells}; best {'—' if best is None else f'{best:g}'}{edge}")
  lines += ["", f"Gap to Adam at Adam's tuned learning rate: mean over seeds of (optimizer - Adam) final validation "
            f"loss (first {args.final_eval_batches} validation batches at most: the whole split here), ± half the seed-to-seed range of that gap, (relative to Adam's loss):", ""]
  keys = list(res["gaps"])
  lines += ["| optimizer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  adam_row = []
  for k in keys:
    e = res["gaps"][k].get("adam", {})
    ls = list(e.get("losses", {}).values())
    adam_row.append("—" if not ls else f"{np.mean(ls):.4f} ± {(max(ls) - min(ls)) / 2:.4f} (loss)")
  lines.append("| adam | " + " | ".join(adam_row) + " |")
  for opt in args.optimizer_list[1:]:
    lines.append(f"| {opt} | " + " | ".join(_fmt_gap(res["gaps"][k].get(opt, {})) for k in keys) + " |")
  lines += ["", f"Training time of the runs: {res['wall_s_of_runs'] / 60:.1f} min; machine: {res['machine']}."]
  return "\n".join(lines) + "\n"


def plot_gaps(table: dict, args, path) -> None:
  plt = pyplot()
  fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
  for opt in args.optimizer_list[1:]:
    for which, marker, fill in (("main", "o", None), ("large", "s", "none")):
      pts = sorted((t, e[opt]) for (w, t), e in table.items() if w == which and "gap" in e.get(opt, {}))
      if not pts:
        continue
      ts = [t for t, _ in pts]
      for ax, key, scale in ((axs[0], "gap", 1.0), (axs[1], "rel_gap", 100.0)):
        ys = [e[key] * scale for _, e in pts]
        err = [e["half_range"] * scale * (e[key] / e["gap"] if e["gap"] else 1.0) for _, e in pts]
        ax.errorbar(ts, ys, yerr=err, marker=marker, mfc=fill, capsize=3, color=COLORS.get(opt),
                    ls="-" if which == "main" else "none",
                    label=f"{LABELS[opt]}" + (" (larger model)" if which == "large" else ""))
  ticks = sorted({t for _, t in table})
  for ax, ylabel in ((axs[0], "gap to Adam (nats)"), (axs[1], "gap to Adam (% of Adam's loss)")):
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training steps")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axs[1].axhline(0.1, color="gray", ls=":", lw=1)
  axs[1].text(axs[1].get_xlim()[0], 0.1, " paper: +0.1%", fontsize=7, va="bottom", color="gray")
  fig.suptitle("Final validation loss gap to Adam at Adam's tuned learning rate (bars: half the seed range)",
               fontsize=10)
  save(fig, path, dpi=110)


# -----------------------------------------------------------------------------
# Main: a lock per output folder, config checked on resume.
# -----------------------------------------------------------------------------


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  grid = Grid(args, out)
  return cells.run_grid("training_length", args, out, _RUN_KEYS, grid.walk, lambda state: write_report(grid, state),
                        argv=argv, t_start=t_start)


if __name__ == "__main__":
  sys.exit(main())
