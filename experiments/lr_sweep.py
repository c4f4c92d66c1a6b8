"""Learning-rate sweep: Adam vs SlimAdam vs AdaLayer vs AdaLayer+LN+TN vs Adam-mini.

Reproduces, at CPU scale, Fig. 10 (bottom) and Fig. 11 of Kalra et al. (2025),
"When Can You Get Away with Low Memory Adam?":

1. train the small GPT with Adam over a learning-rate grid and take the best
   learning rate lr* (lowest final validation loss);
2. train Adam once more at ``snr_lr_factor * lr*`` (10x smaller, as in §5)
   while tracking the SNR of its second moments, and derive per-layer SlimAdam
   rules from the time-averaged SNR (cutoff 1);
3. train SlimAdam (those rules), AdaLayer, AdaLayer+LN+TN and Adam-mini over
   the same grid, from the same initialisation and the same batches;
4. write ``lr_sweep.png`` (final validation loss vs learning rate),
   ``train_curves.png`` (training loss at a small, the best and the largest
   learning rate), ``results.json`` (every run: final losses, divergence flag,
   curves), ``second_moments.csv`` (second-moment entries kept and saved per
   optimizer), ``rules.json`` / ``rules_table.txt`` and ``summary.md``.

The learning rate is outside the optimizer (``lr_scale`` of
`experiments._lib.train.train`): a grid of N learning rates would otherwise
compile N training steps per optimizer; here the rate is an argument of the
jitted step, so each optimizer compiles once. Otherwise the setting is
`experiments._lib.train.train_lm`'s: the same model, init, batches, global-norm clipping at 1,
linear warmup + cosine decay to lr/10 and ``slim_adamw`` (b2 = 0.95, weight
decay 0.1 on matrices); ``slim_adamw(1.0)`` gives ``-(adam + wd * p)`` and the
step adds ``lr_t`` times it, which is what ``slim_adamw(schedule)`` does.

Usage::

  python -m experiments.lr_sweep                 # full run (~15 min on 2 shared CPU cores)
  python -m experiments.lr_sweep --quick         # CI smoke test (< 1 min)
"""

from __future__ import annotations

import csv
import dataclasses
import math

import jax
import numpy as np
import optax

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import lm_warmup_cosine
from experiments._lib.train import train

OPTIMIZERS = ("adam", "slimadam", "adalayer", "adalayer+ln+tn", "adam-mini")
# Also accepted by --optimizers: "slimadam-table3", SlimAdam with the paper's Table 3 rules (the
# library's "slimadam" preset) instead of rules derived from this model's SNR.
COLORS = {"adam": "black", "slimadam": "tab:red", "adalayer": "tab:blue", "adalayer+ln+tn": "tab:cyan",
          "adam-mini": "tab:green", "slimadam-table3": "tab:orange"}


def parse_args(argv=None):
  p = report.parser(__doc__, "lr_sweep", "tiny model, 2 learning rates, few steps")
  p.add_argument("--lrs", default="1e-3,2e-3,5e-3,1e-2,3e-2", help="comma-separated learning-rate grid")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="comma-separated, Adam first; also 'slimadam-table3' (the paper's Table 3 rules)")
  report.lm_arguments(p, n_layers=2, d_model=64, n_heads=4, vocab_size=1024, max_bytes=4_000_000,
                      steps=300, warmup=30, batch_size=16)
  p.add_argument("--snr-lr-factor", type=float, default=0.1, help="SNR run at this x Adam's best lr")
  report.lm_arguments(p, snr_every=10, cutoff=1.0, eval_every=100, eval_batches=16, log_every=10,
                      seed=0)
  p.add_argument("--noise-seed", type=int, default=1,
                 help="an extra Adam run at lr* with this seed estimates seed-to-seed noise (-1: skip)")
  args = p.parse_args(argv)
  if args.quick:
    args.lrs, args.n_layers, args.d_model, args.n_heads = "3e-3,3e-2", 1, 32, 2
    args.vocab_size, args.max_bytes, args.steps, args.warmup = 512, 1_500_000, 12, 3
    args.snr_every, args.eval_every, args.eval_batches, args.log_every = 3, 12, 2, 3
  return report.default_out(args, "lr_sweep")


# -----------------------------------------------------------------------------
# Training: one jitted step per optimizer, the learning rate is an argument.
# -----------------------------------------------------------------------------


class Trainer:
  """Trains the model with one optimizer at any learning rate (compiled once)."""

  def __init__(self, lm, compress, *, steps, warmup):
    self.lm, self.steps = lm, steps
    self.tx = optax.chain(optax.clip_by_global_norm(1.0),
                          slimoptax.slim_adamw(1.0, compress=compress, num_heads=lm.config.n_heads))
    # The SlimAdam paper's schedule with peak 1: the step multiplies it by the peak learning rate.
    self.schedule = lm_warmup_cosine(1.0, steps, warmup, 0.1)

  def run(self, lr, *, train_tokens, val_batches, batch_size, seed, eval_every, log_every,
          tracker=None):
    hook_steps = [s for s in range(1, self.steps + 1) if tracker.should_measure(s)] if tracker else None
    r = train(self.lm, self.tx, lr_scale=lambda step: lr * float(self.schedule(step - 1)),
              train_tokens=train_tokens, steps=self.steps, batch_size=batch_size, seed=seed,
              val_batches=val_batches, eval_every=eval_every, log_every=log_every,
              stop_on_divergence=True, state_hook=tracker.record if tracker else None,
              state_hook_steps=hook_steps)
    final_val = r["final_val_loss"]
    return {"lr": lr, "seed": seed, "final_val_loss": final_val,
            "final_train_loss": r["final_train_loss"], "diverged": r["diverged"] or not math.isfinite(final_val),
            "wall_s": r["wall_s"], "train_curve": r["train_curve"], "val_curve": r["val_curve"],
            "opt_state": r["opt_state"], "params": r["params"]}


# -----------------------------------------------------------------------------
# Plots and summary.
# -----------------------------------------------------------------------------


def plot_sweep(runs, lrs, path, *, adam_best_lr, snr_lr, saved):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  finite = [r["final_val_loss"] for per in runs.values() for r in per.values() if not r["diverged"]]
  top = max(finite) + 0.05 * (max(finite) - min(finite) + 1e-3) if finite else 1.0
  for name, per in runs.items():
    xs = [lr for lr in lrs if lr in per]
    ys = [per[lr]["final_val_loss"] if not per[lr]["diverged"] else np.nan for lr in xs]
    ax.plot(xs, ys, marker="o", color=COLORS.get(name), label=f"{name} ({saved[name]:.2%} of v saved)")
    bad = [lr for lr in xs if per[lr]["diverged"]]
    if bad:
      ax.plot(bad, [top] * len(bad), "x", color=COLORS.get(name), ms=10)
  ax.axvline(adam_best_lr, color="gray", ls=":", lw=1)
  ax.axvline(snr_lr, color="tab:red", ls="--", lw=0.8, alpha=0.6)
  ax.text(snr_lr, ax.get_ylim()[1], " SlimAdam rules\n derived here", color="tab:red", fontsize=7, va="top")
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("final validation loss")
  ax.set_title("Final validation loss vs learning rate (x: diverged)", fontsize=10)
  ax.legend(fontsize=7)
  save(fig, path, dpi=110)


def plot_curves(runs, lrs_to_show, path):
  plt = pyplot()
  fig, axs = plt.subplots(1, len(lrs_to_show), figsize=(4.6 * len(lrs_to_show), 3.8), squeeze=False)
  for ax, (title, lr) in zip(axs[0], lrs_to_show):
    for name, per in runs.items():
      if lr in per and per[lr]["train_curve"]:
        s, v = zip(*per[lr]["train_curve"])
        ax.plot(s, v, color=COLORS.get(name), label=name, lw=1.2)
    ax.set_title(f"{title}: lr {lr:g}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (mean between log points)")
    ax.legend(fontsize=7)
  save(fig, path, dpi=110)


def summary_md(res) -> str:
  lrs, names = res["lrs"], list(res["runs"])
  lines = [
      f"Model: {res['model']['n_layers']} layers, d {res['model']['d_model']}, {res['model']['n_heads']} heads, "
      f"vocab {res['model']['vocab_size']}, seq {res['model']['seq_len']}, {res['num_params']:,} parameters; "
      f"{res['config']['steps']} steps of batch {res['config']['batch_size']}; Adam's best lr {res['adam_best_lr']:g}; "
      f"SlimAdam rules derived at lr {res['snr_lr']:g} (cutoff {res['config']['cutoff']}).", "",
      "Final validation loss (nan = diverged):", "",
      "| optimizer | v kept | v saved | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
      "|---|---|---|" + "---|" * len(lrs),
  ]
  for n in names:
    cells = []
    for lr in lrs:
      r = res["runs"][n].get(str(lr))
      cells.append("—" if r is None else ("diverged" if r["diverged"] else f"{r['final_val_loss']:.4f}"))
    m = res["second_moments"][n]
    lines.append(f"| {n} | {m['kept']:,} | {m['saved']:.2%} | " + " | ".join(cells) + " |")
  lines += ["", "Gap to Adam at the same learning rate (optimizer minus Adam):", "",
            "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
  for n in names:
    if n == "adam":
      continue
    cells = []
    for lr in lrs:
      a, b = res["runs"]["adam"].get(str(lr)), res["runs"][n].get(str(lr))
      if a is None or b is None:
        cells.append("—")
      elif a["diverged"] or b["diverged"]:
        cells.append("diverged")
      else:
        cells.append(f"{b['final_val_loss'] - a['final_val_loss']:+.4f}")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  if res.get("noise"):
    nz = res["noise"]
    lines += ["", f"Seed noise: Adam at lr {nz['lr']:g}, seed {nz['seed']} vs seed {res['config']['seed']}: "
              f"final validation loss {nz['final_val_loss']:.4f} vs {nz['reference']:.4f} "
              f"(|diff| {abs(nz['final_val_loss'] - nz['reference']):.4f})."]
  lines += ["", report.wall_line(res)]
  return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  lrs = report.floats(args.lrs)
  names = [n for n in args.optimizers.split(",") if n]
  assert names[0] == "adam", "the sweep starts with Adam (its best lr sets the SNR learning rate)"
  say = report.say

  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size, max_bytes=args.max_bytes)
  model_cfg, lm = model.tiny_gpt(args, tokenizer.vocab_size)
  val_batches = data.eval_batches(val_tokens, batch_size=args.batch_size, seq_len=model_cfg.seq_len,
                                    max_batches=args.eval_batches)
  say(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens (BPE {tokenizer.vocab_size}); "
      f"model {model_cfg}")
  run_kw = dict(train_tokens=train_tokens, val_batches=val_batches, batch_size=args.batch_size,
                eval_every=args.eval_every, log_every=args.log_every)
  trainers = {}

  def trainer(name, compress):
    if name not in trainers:
      trainers[name] = Trainer(lm, compress, steps=args.steps, warmup=args.warmup)
    return trainers[name]

  def public(r):
    return {k: v for k, v in r.items() if k not in ("opt_state", "params")}

  runs: dict[str, dict[float, dict]] = {n: {} for n in names}
  # 1. Adam over the grid.
  for lr in lrs:
    r = trainer("adam", None).run(lr, seed=args.seed, **run_kw)
    runs["adam"][lr] = public(r)
    say(f"adam            lr {lr:<8g} val {r['final_val_loss']:.4f}  ({r['wall_s']:.0f}s)")
  ok = [lr for lr in lrs if not runs["adam"][lr]["diverged"]]
  adam_best_lr = min(ok, key=lambda lr: runs["adam"][lr]["final_val_loss"])

  # 2. SNR at a 10x smaller learning rate -> SlimAdam rules.
  snr_lr = args.snr_lr_factor * adam_best_lr
  template = lm.init(args.seed)
  tracker = slimoptax.SNRTracker(template, every=args.snr_every, steps=(1,))
  snr_run = trainer("adam", None).run(snr_lr, seed=args.seed, tracker=tracker, **run_kw)
  rules = slimoptax.derive_rules(tracker.time_average(), args.cutoff, shapes=tracker.shapes)
  rules.to_json(str(out / "rules.json"))
  (out / "rules_table.txt").write_text(
      f"SlimAdam rules derived from Adam at lr {snr_lr:g} ({args.snr_lr_factor:g} x Adam's best lr "
      f"{adam_best_lr:g}), cutoff {args.cutoff}:\n" + rules.table(template) + "\n")
  say(f"SNR run at lr {snr_lr:g}: val {snr_run['final_val_loss']:.4f}\n" + rules.table(template))

  # 3. The other optimizers over the grid.
  compress_of = {"adam": None, "slimadam": rules, "slimadam-table3": "slimadam"}
  for name in names[1:]:
    for lr in lrs:
      r = trainer(name, compress_of.get(name, name)).run(lr, seed=args.seed, **run_kw)
      runs[name][lr] = public(r)
      say(f"{name:<15} lr {lr:<8g} val {r['final_val_loss']:.4f}  ({r['wall_s']:.0f}s)")

  noise = None
  if args.noise_seed >= 0:
    r = trainer("adam", None).run(adam_best_lr, seed=args.noise_seed, **run_kw)
    noise = {"lr": adam_best_lr, "seed": args.noise_seed, "final_val_loss": r["final_val_loss"],
             "reference": runs["adam"][adam_best_lr]["final_val_loss"]}

  # 4. Second moments kept per optimizer (from the optimizer state's shapes).
  second_moments = {}
  for name in names:
    mem = slimoptax.memory_report(jax.eval_shape(trainers[name].tx.init, template), template)
    second_moments[name] = {"kept": mem.entries, "adam": mem.adam_entries, "saved": mem.fraction_saved}
  with open(out / "second_moments.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["optimizer", "second_moment_entries", "adam_entries", "fraction_saved"])
    for n, m in second_moments.items():
      w.writerow([n, m["kept"], m["adam"], f"{m['saved']:.6f}"])

  plot_sweep(runs, lrs, out / "lr_sweep.png", adam_best_lr=adam_best_lr, snr_lr=snr_lr,
             saved={n: m["saved"] for n, m in second_moments.items()})
  shown = []
  for title, lr in [("smallest", lrs[0]), ("Adam's best", adam_best_lr), ("largest", lrs[-1])]:
    if lr not in [l for _, l in shown]:
      shown.append((title, lr))
  plot_curves(runs, shown, out / "train_curves.png")

  res = {
      "experiment": "lr_sweep", "config": vars(args), "model": dataclasses.asdict(model_cfg),
      "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(template))),
      "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
      "lrs": lrs, "adam_best_lr": adam_best_lr, "snr_lr": snr_lr,
      "snr_run": public(snr_run), "rules": rules.as_mapping(), "second_moments": second_moments,
      "runs": {n: {str(lr): r for lr, r in per.items()} for n, per in runs.items()}, "noise": noise,
      "machine": report.machine(),
  }
  return report.finish(out, res, summary_md, t_start)


if __name__ == "__main__":
  main()
