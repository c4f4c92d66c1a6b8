"""Larger learning rates reduce compressibility (Kalra et al. 2025, §4.2, Fig. 8 / Fig. 24, Fig. 10 top).

Trains the small GPT with Adam over a learning-rate grid while
`slimoptax.SNRTracker` measures SNR_K of the second moments (K = fan_in,
fan_out, both; eq. 3), averages it over time (eq. 4) and then:

* Fig. 8: for each layer type, the time-averaged SNR along its best axis K*
  (the axis with the highest depth-averaged SNR at the smallest learning rate,
  kept fixed across learning rates), mean over depth and min-max spread over
  depth, vs learning rate;
* Fig. 10 (top): the fraction of second moments that per-layer rules derived
  at each learning rate would save (`derive_rules` + `second_moments_kept`),
  for several SNR cutoffs.

The claim: SNR decreases as the learning rate grows, so fewer second moments
can be averaged.

The learning rate is outside the optimizer (``lr_scale`` of
`experiments._lib.train.train`), an argument of the jitted step, so the grid
compiles once. Otherwise the setting is `experiments._lib.train.train_lm`'s
(same model, init, batches, clipping at 1, warmup + cosine
to lr/10, AdamW b2 0.95, wd 0.1 on matrices).

Outputs (in --out): snr_vs_lr.png, saved_vs_lr.png, results.json,
summary.md, snr_lr<lr>.csv per learning rate.

Usage::

  python -m experiments.lr_vs_snr            # full run (~10-15 min on 2 shared CPU cores)
  python -m experiments.lr_vs_snr --quick    # CI smoke test (< 1 min)
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import optax

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import log_y, pyplot, save
from experiments._lib.schedules import lm_warmup_cosine
from experiments._lib.stats import spearman
from experiments._lib.train import train

GROUPS = model.LAYER_TYPE_NAMES  # depth group (slimoptax.depth_group) -> display name
# §4.2: at the optimal learning rate, compression-averse (SNR <~ 1) vs amenable (SNR >~ 1) layer types.
PAPER_CLASS = {"Attn.Query": "averse", "Attn.Key": "averse", "MLP.Up": "averse", "LN (attn)": "averse",
               "LN (mlp)": "averse", "LN (final)": "averse", "Tok.Embd = LM head": "averse",
               "Attn.Value": "amenable", "Attn.Proj": "amenable", "MLP.Down": "amenable"}


def parse_args(argv=None):
  p = report.parser(__doc__, "lr_vs_snr", "tiny model, 2 learning rates, few steps")
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
  p.add_argument("--cutoffs", default="0.5,1,2,4")
  report.lm_arguments(p, n_layers=4, d_model=64, n_heads=4, vocab_size=1024, max_bytes=4_000_000,
                      steps=500, warmup=50, batch_size=16, snr_every=10, eval_batches=16, seed=0)
  args = p.parse_args(argv)
  if args.quick:
    args.lrs, args.n_layers, args.d_model, args.n_heads = "1e-3,3e-2", 2, 32, 2
    args.vocab_size, args.max_bytes, args.steps, args.warmup = 512, 1_500_000, 20, 4
    args.snr_every, args.eval_batches = 4, 2
  return report.default_out(args, "lr_vs_snr")


def train_with_snr(lr, *, lm, tx, schedule, args, train_tokens, val_batches, tracker):
  """Adam at peak rate ``lr`` (outside the optimizer: one compilation for the grid), SNR tracked."""
  r = train(lm, tx, lr_scale=lambda step: lr * float(schedule(step - 1)), train_tokens=train_tokens,
            steps=args.steps, batch_size=args.batch_size, seed=args.seed, val_batches=val_batches,
            eval_at_start=False, state_hook=tracker.record,
            state_hook_steps=[s for s in range(1, args.steps + 1) if tracker.should_measure(s)])
  losses, val = r["train_losses"], r["final_val_loss"]
  return {"final_val_loss": val, "final_train_loss": float(losses[-10:].mean()),
          "diverged": not np.isfinite(losses).all() or not math.isfinite(val)}


# -----------------------------------------------------------------------------
# Plots and summary.
# -----------------------------------------------------------------------------


def plot_snr(res, path):
  plt = pyplot()
  lrs, groups = res["lrs"], res["kstar"]
  cols = 4
  rows = math.ceil((len(groups) + 1) / cols)
  fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
  for ax, (group, info) in zip(axs.flat, groups.items()):
    mean = [res["snr_kstar"][group][str(lr)]["mean"] for lr in lrs]
    lo = [res["snr_kstar"][group][str(lr)]["min"] for lr in lrs]
    hi = [res["snr_kstar"][group][str(lr)]["max"] for lr in lrs]
    ax.plot(lrs, mean, marker="o", color="tab:blue")
    ax.fill_between(lrs, lo, hi, color="tab:blue", alpha=0.2)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.axvline(res["best_lr"], color="black", ls=":", lw=0.8)
    ax.set_xscale("log")
    log_y(ax)
    ax.set_title(f"{GROUPS[group]}: K*={info['role']} {tuple(info['axes'])}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("learning rate", fontsize=8)
  ax = list(axs.flat)[len(groups)]
  ax.plot(lrs, [res["runs"][str(lr)]["final_val_loss"] for lr in lrs], marker="o", color="black")
  ax.axvline(res["best_lr"], color="black", ls=":", lw=0.8)
  ax.set_xscale("log")
  ax.set_title("final validation loss (Adam)", fontsize=8)
  ax.tick_params(labelsize=7)
  ax.set_xlabel("learning rate", fontsize=8)
  for ax in list(axs.flat)[len(groups) + 1:]:
    ax.axis("off")
  fig.suptitle("time-averaged SNR along K* vs learning rate (line: mean over depth, band: min-max over depth; "
               "dotted: best lr)", fontsize=9)
  save(fig, path, dpi=100)


def plot_saved(res, path):
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 4))
  for cutoff in res["cutoffs"]:
    ax.plot(res["lrs"], [res["saved"][str(cutoff)][str(lr)] for lr in res["lrs"]], marker="o",
            label=f"cutoff {cutoff:g}")
  ax.axvline(res["best_lr"], color="black", ls=":", lw=0.8)
  ax.set_xscale("log")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("learning rate of the SNR run")
  ax.set_ylabel("fraction of second moments saved")
  ax.set_title("second moments saved by per-layer SNR rules", fontsize=10)
  ax.legend(fontsize=8)
  save(fig, path, dpi=110)


def summary_md(res):
  c, lrs = res["config"], res["lrs"]
  lines = [
      f"Model: GPT, {c['n_layers']} layers, d {c['d_model']}, {c['n_heads']} heads, vocab {res['model']['vocab_size']}, "
      f"seq {res['model']['seq_len']}, tied embeddings, Mitchell init, {res['num_params']:,} parameters; Adam "
      f"(b2 0.95, wd 0.1), {c['steps']} steps of batch {c['batch_size']} per learning rate (warmup {c['warmup']}, "
      f"cosine to lr/10); SNR every {c['snr_every']} steps + step 1.", "",
      "Time-averaged SNR along K* (mean over depth [min, max]); K* = best depth-averaged axis at lr "
      f"{lrs[0]:g}:", "",
      "| layer type | K* | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | ratio last/first | Spearman rho |",
      "|---|---|" + "---|" * len(lrs) + "---|---|",
  ]
  for group, info in res["kstar"].items():
    cells = []
    for lr in lrs:
      s = res["snr_kstar"][group][str(lr)]
      cells.append(f"{s['mean']:.3g}" + (f" [{s['min']:.3g}, {s['max']:.3g}]" if s["min"] != s["max"] else ""))
    t = res["trend"][group]
    lines.append(f"| {GROUPS[group]} | {info['role']} | " + " | ".join(cells) +
                 f" | {t['ratio']:.3g} | {t['spearman']:+.2f} |")
  lines += ["", "Final validation loss (Adam): " + ", ".join(
      f"lr {lr:g}: {res['runs'][str(lr)]['final_val_loss']:.4f}" for lr in lrs) + f"; best lr {res['best_lr']:g}.",
      "", "Fraction of second moments saved by per-layer rules derived at each learning rate:", "",
      "| cutoff | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
  for cutoff in res["cutoffs"]:
    lines.append(f"| {cutoff:g} | " + " | ".join(f"{res['saved'][str(cutoff)][str(lr)]:.2%}" for lr in lrs) + " |")
  lines += ["", f"§4.2 classification at the best learning rate ({res['best_lr']:g}): paper vs measured "
            "(SNR along K*, depth mean):", "", "| layer type | paper | SNR | measured |", "|---|---|---|---|"]
  for group, row in res["classification"].items():
    lines.append(f"| {GROUPS[group]} | {row['paper']} | {row['snr']:.3g} | {row['measured']} |")
  lines += ["", "Claim checks:", ""]
  lines += report.check_lines(res["checks"]) + ["", report.wall_line(res)]
  return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  lrs = report.floats(args.lrs)
  cutoffs = report.floats(args.cutoffs)
  say = report.say

  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size, max_bytes=args.max_bytes)
  model_cfg, lm = model.tiny_gpt(args, tokenizer.vocab_size)
  val_batches = data.eval_batches(val_tokens, batch_size=args.batch_size, seq_len=model_cfg.seq_len,
                                    max_batches=args.eval_batches)
  say(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; model {model_cfg}")
  tx = optax.chain(optax.clip_by_global_norm(1.0), slimoptax.slim_adamw(1.0))  # AdamW; lr applied in the step
  schedule = lm_warmup_cosine(1.0, args.steps, args.warmup, 0.1)
  template = lm.init(args.seed)

  tables, runs = {}, {}
  for lr in lrs:
    t0 = time.perf_counter()
    tracker = slimoptax.SNRTracker(template, every=args.snr_every, steps=(1,))
    runs[str(lr)] = train_with_snr(lr, lm=lm, tx=tx, schedule=schedule, args=args, train_tokens=train_tokens,
                                   val_batches=val_batches, tracker=tracker)
    tracker.to_csv(str(out / f"snr_lr{lr:g}.csv"))
    tables[lr] = tracker.time_average()
    say(f"lr {lr:<8g} val {runs[str(lr)]['final_val_loss']:.4f} ({time.perf_counter() - t0:.0f}s)")
  shapes = tracker.shapes
  ok = [lr for lr in lrs if not runs[str(lr)]["diverged"]]
  best_lr = min(ok, key=lambda lr: runs[str(lr)]["final_val_loss"])

  # K* per layer type: best depth-averaged axis at the smallest learning rate.
  depth0 = slimoptax.depth_average(tables[lrs[0]])
  kstar, snr_kstar, trend = {}, {}, {}
  for group in GROUPS:
    if group not in depth0:
      continue
    example = next(n for n in shapes if slimoptax.depth_group(n)[0] == group)
    roles = model.candidate_roles(tracker.candidates[example], shapes[example])
    axes = max((c for c in depth0[group] if math.isfinite(depth0[group][c])), key=depth0[group].get)
    kstar[group] = {"axes": list(axes), "role": roles[axes]}
    snr_kstar[group] = {}
    for lr in lrs:
      vals = [tables[lr][n][axes] for n in shapes if slimoptax.depth_group(n)[0] == group]
      snr_kstar[group][str(lr)] = {"mean": float(np.nanmean(vals)), "min": float(np.nanmin(vals)),
                                   "max": float(np.nanmax(vals)), "per_layer": vals}
    means = [snr_kstar[group][str(lr)]["mean"] for lr in lrs]
    trend[group] = {"ratio": means[-1] / means[0], "spearman": spearman(np.log(lrs), means)}

  saved = {}
  for cutoff in cutoffs:
    saved[str(cutoff)] = {}
    for lr in lrs:
      rules = slimoptax.derive_rules(tables[lr], cutoff, shapes=shapes)
      kept, total = slimoptax.second_moments_kept(shapes, rules)
      saved[str(cutoff)][str(lr)] = 1 - kept / total

  classification = {}
  for group in kstar:
    if GROUPS[group] in PAPER_CLASS:
      s = snr_kstar[group][str(best_lr)]["mean"]
      classification[group] = {"paper": PAPER_CLASS[GROUPS[group]], "snr": s,
                               "measured": "amenable" if s > 1 else "averse"}

  decreasing = [g for g, t in trend.items() if t["spearman"] < 0 and t["ratio"] < 1]
  s1 = [saved["1.0"][str(lr)] for lr in lrs] if "1.0" in saved else None
  checks = {
      "SNR(K*) decreases with the learning rate (Spearman rho < 0 and SNR(lr_max) < SNR(lr_min))": (
          len(decreasing) >= 0.8 * len(trend),
          f"{len(decreasing)} of {len(trend)} layer types: " + ", ".join(GROUPS[g] for g in decreasing)),
      "the §4.2 classification at the best learning rate matches": (
          all(r["paper"] == r["measured"] for r in classification.values()),
          f"{sum(r['paper'] == r['measured'] for r in classification.values())} of {len(classification)} match"),
  }
  if s1 is not None:
    checks["fewer second moments can be saved at larger learning rates (cutoff 1)"] = (
        spearman(np.log(lrs), s1) < 0 and s1[-1] < s1[0],
        ", ".join(f"lr {lr:g}: {x:.2%}" for lr, x in zip(lrs, s1)))

  res = {
      "experiment": "lr_vs_snr", "config": vars(args), "model": dataclasses.asdict(model_cfg),
      "num_params": int(sum(np.prod(s) for s in shapes.values())), "train_tokens": int(len(train_tokens)),
      "lrs": lrs, "cutoffs": cutoffs, "runs": runs, "best_lr": best_lr, "kstar": kstar, "snr_kstar": snr_kstar,
      "trend": trend, "saved": saved, "classification": classification,
      "checks": {k: (bool(ok_), d) for k, (ok_, d) in checks.items()},
      "time_average": {str(lr): {n: {str(c): v for c, v in per.items()} for n, per in t.items()}
                       for lr, t in tables.items()},
      "machine": report.machine(),
  }
  plot_snr(res, out / "snr_vs_lr.png")
  plot_saved(res, out / "saved_vs_lr.png")
  return report.finish(out, res, summary_md, t_start)


if __name__ == "__main__":
  main()
