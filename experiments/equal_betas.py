"""Adam with beta1 = beta2 (Orvieto & Gower, Fig. 2/3, Takeaway 2), at CPU scale.

Orvieto & Gower's claims (160M LM, 200 Adam runs over (lr, beta1, beta2)):

* Takeaway 2(a): for each beta1, ``beta2 = beta1`` is optimal or near-optimal (within
  ~0.3 perplexity of the best beta2, Fig. 3);
* Takeaway 2(b): the optimal betas are correlated (higher beta1 -> higher best beta2),
  and loss grows as the two betas move apart.

Here: a (beta1, beta2) grid of `experiments._lib.ladder.adamw` (weight decay 0.1, global
clipping 1, eps 1e-8, bias correction; the paper's setting) on the small GPT of
`experiments._lib.model`, each cell at two learning rates, ``lr0 / sqrt(2)`` and
``lr0 * sqrt(2)``, around ``lr0`` = Adam's best learning rate in the ladder run
(``experiments/results/optimizer_ladder/results.json``, where Adam had ``b1 = b2 =
0.95``; ``--lr`` overrides). Using two rates that bracket ``lr0`` instead of ``lr0``
itself keeps the equal-beta cells from being favoured by a rate tuned for them. The
cell's score is its better rate. The (0.95, 0.95) cell is trained twice more from
other initialisations, to size the seed-to-seed noise.

The betas follow the paper's grid ``beta = 1 - kappa (1 - 0.9)``: beta1 with kappa in
{1, 1/2, 1/4}, beta2 with kappa in {1, 1/2, 1/4, 1/8} (the paper's runs also went to
kappa = 1/32 and 4; cut here to fit the compute). All cells train together (`experiments._lib.ladder.train_sweep`: one vmapped step, same
initialisation and batches).

Usage:
  python -m experiments.equal_betas --quick
  python -m experiments.equal_betas                    # 3 x 4 betas x 2 rates, one initialisation
  python -m experiments.equal_betas --lr-factors 0.7071067811865476 --init-seeds 0 1 2 \
      --out experiments/results/equal_betas/seeds      # one rate, three initialisations
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from experiments._lib import data, ladder, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.stats import ppl, spearman

BETA1 = [0.9, 0.95, 0.975]
BETA2 = [0.9, 0.95, 0.975, 0.9875]
NOISE_SEEDS = [1, 2]  # extra initialisations of the (0.95, 0.95) cell


def ladder_adam_lr(path: pathlib.Path) -> float | None:
  """Adam's best learning rate from the ladder run's results.json, if present."""
  if not path.exists():
    return None
  return float(json.loads(path.read_text())["results"]["Adam"]["best_lr"])


def plot_heatmaps(losses, b1s, b2s, lrs, noise_std, path):
  """Final validation loss per (beta1, beta2): best of the two rates, and each rate."""
  plt = pyplot()
  best = np.nanmin(losses, axis=0)
  panels = [("best rate per cell", best)] + [(f"lr {lr:.3g}", losses[k]) for k, lr in enumerate(lrs)]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
  finite = best[np.isfinite(best)]
  vmin, vmax = float(finite.min()), float(np.nanmax(np.where(np.isfinite(losses), losses, np.nan)))
  for ax, (title, z) in zip(axes, panels):
    im = ax.imshow(np.where(np.isfinite(z), z, np.nan), cmap="viridis_r", vmin=vmin, vmax=vmax,
                   origin="lower", aspect="auto")
    ax.set_xticks(range(len(b2s)), [f"{b:g}" for b in b2s])
    ax.set_yticks(range(len(b1s)), [f"{b:g}" for b in b1s])
    ax.set_xlabel("beta2")
    ax.set_ylabel("beta1")
    ax.set_title(title, fontsize=10)
    for i, b1 in enumerate(b1s):
      row = z[i]
      for j, b2 in enumerate(b2s):
        v = row[j]
        txt = "div" if not np.isfinite(v) else f"{v:.3f}"
        bold = np.isfinite(v) and v == np.nanmin(row)
        ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                color="white" if np.isfinite(v) and v > vmin + 0.6 * (vmax - vmin) else "black",
                fontweight="bold" if bold else "normal")
        if b1 == b2:
          ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
  fig.subplots_adjust(wspace=0.3)
  fig.colorbar(im, ax=axes, shrink=0.8, label="final validation loss")
  fig.suptitle(f"Adam final val loss; red boxes: beta1 = beta2; bold: best beta2 per row; "
               f"seed-to-seed std: {noise_std:.3f}", fontsize=10)
  fig.savefig(path, dpi=90, bbox_inches="tight")
  plt.close(fig)


def plot_gaps(best, b1s, b2s, noise_std, path):
  """Fig. 3 style: per beta1, gap of each beta2 to the row's best; and loss vs beta mismatch."""
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, b1 in enumerate(b1s):
    gap = best[i] - np.nanmin(best[i])
    axes[0].plot(range(len(b2s)), np.where(np.isfinite(gap), gap, np.nan), "o-", label=f"beta1 {b1:g}")
    if b1 in b2s:
      j = b2s.index(b1)
      axes[0].plot([j], [gap[j]], "s", ms=11, mfc="none", mec="red")
  axes[0].axhspan(0, 2 * noise_std, color="grey", alpha=0.2, label="2 x seed std")
  axes[0].set_xticks(range(len(b2s)), [f"{b:g}" for b in b2s])
  axes[0].set_xlabel("beta2")
  axes[0].set_ylabel("val loss - best of row")
  axes[0].set_title("Gap to the best beta2 (red squares: beta1 = beta2)")
  axes[0].legend(fontsize=8)
  axes[0].grid(True, alpha=0.3)
  mismatch, loss = [], []
  for i, b1 in enumerate(b1s):
    for j, b2 in enumerate(b2s):
      if np.isfinite(best[i, j]):
        mismatch.append(abs(math.log((1 - b1) / (1 - b2)) / math.log(2)))
        loss.append(best[i, j])
  axes[1].scatter(mismatch, loss)
  axes[1].set_xlabel("|log2((1 - beta1) / (1 - beta2))|  (0: equal betas)")
  axes[1].set_ylabel("final val loss (best rate)")
  axes[1].set_title("Loss vs beta mismatch")
  axes[1].grid(True, alpha=0.3)
  save(fig, path, dpi=90)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="experiments/results/equal_betas")
  parser.add_argument("--ladder-results", default="experiments/results/optimizer_ladder/results.json")
  parser.add_argument("--lr", type=float, default=None, help="centre rate lr0 (default: ladder's Adam)")
  report.lm_arguments(parser, steps=200, batch_size=16, n_layers=2, d_model=64, vocab_size=512,
                      max_bytes=None, eval_every=50, final_eval_batches=24)
  parser.add_argument("--seed", type=int, default=0, help="batch order (and init, see --init-seeds)")
  parser.add_argument("--lr-factors", type=float, nargs="*", default=[2 ** -0.5, 2 ** 0.5],
                      help="rates tried per cell, as multiples of lr0")
  parser.add_argument("--init-seeds", type=int, nargs="*", default=None,
                      help="train every cell from each of these initialisations (default: --seed, "
                           "plus two extra initialisations of the (0.95, 0.95) cell for the noise)")
  parser.add_argument("--replot", action="store_true", help="redraw the figures from OUT/results.json")
  args = parser.parse_args(argv)
  if args.replot:
    out = pathlib.Path(args.out)
    r = json.loads((out / "results.json").read_text())
    grid, best = np.asarray(r["grid_final_val_loss"], float), np.asarray(r["best_over_lrs"], float)
    plot_heatmaps(grid, r["beta1"], r["beta2"], r["lrs"], r["noise_std"], out / "betas_heatmap.png")
    plot_gaps(best, r["beta1"], r["beta2"], r["noise_std"], out / "betas_gap.png")
    return r
  b1s, b2s = list(BETA1), list(BETA2)
  if args.quick:
    args.steps, args.max_bytes, args.eval_every, args.final_eval_batches = 6, 1_500_000, 3, 2
    args.n_layers, args.d_model = 1, 32  # compilation dominates the smoke test
    b1s, b2s = [0.9, 0.95], [0.9, 0.95]
  out = report.output_dir(args.out)
  t0 = time.perf_counter()
  say = report.say

  lr0 = args.lr or ladder_adam_lr(pathlib.Path(args.ladder_results))
  lr_source = "--lr" if args.lr else ("ladder results" if lr0 else "default 4e-3 (no ladder results)")
  lr0 = lr0 or 4e-3
  lrs = [lr0 * f for f in args.lr_factors]
  seeds = args.init_seeds or [args.seed]
  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size,
                                                          max_bytes=args.max_bytes)
  lm = model.Functional(model.gpt_config("tiny", n_layers=args.n_layers, d_model=args.d_model,
                                         vocab_size=tokenizer.vocab_size))
  num_params = model.count_params(lm.init(0))

  cells = [(lr, b1, b2, sd) for lr in lrs for b1 in b1s for b2 in b2s for sd in seeds]
  if len(seeds) == 1 and 0.95 in b1s and 0.95 in b2s:
    cells += [(lrs[0], 0.95, 0.95, sd) for sd in NOISE_SEEDS]
  say(f"lr0 = {lr0:g} ({lr_source}); rates {lrs}; init seeds {seeds}; {len(cells)} models x "
      f"{args.steps} steps; model {num_params:,} params")
  run = ladder.train_sweep(
      lm, "adam", {},
      {"lr": [c[0] for c in cells], "b1": [c[1] for c in cells], "b2": [c[2] for c in cells]},
      init_seeds=[c[3] for c in cells], train_tokens=train_tokens, val_tokens=val_tokens,
      steps=args.steps, batch_size=args.batch_size, warmup=max(1, args.steps // 10), seed=args.seed,
      eval_every=args.eval_every, eval_batches=2 if args.quick else 4,
      final_eval_batches=args.final_eval_batches, name="adam grid", log=say)
  final = np.asarray([v if math.isfinite(v) else np.nan for v in run["final_val_loss"]])

  # per_seed[lr, beta1, beta2, seed]; cells are scored by their mean over seeds.
  per_seed = np.full((len(lrs), len(b1s), len(b2s), len(seeds)), np.nan)
  extra = []
  for (lr, b1, b2, sd), v in zip(cells, final):
    if sd in seeds:
      per_seed[lrs.index(lr), b1s.index(b1), b2s.index(b2), seeds.index(sd)] = v
    else:
      extra.append(float(v))
  grid = per_seed.mean(axis=-1)
  best_k = np.argmin(np.where(np.isnan(grid), np.inf, grid), axis=0)  # best rate per cell
  best = np.where(np.isnan(grid).all(axis=0), np.nan, np.nanmin(np.where(np.isnan(grid), np.inf, grid), axis=0))
  if len(seeds) > 1:  # seed-to-seed std per cell, averaged over cells
    replicate = []
    noise_std = float(np.nanmean(np.nanstd(per_seed, axis=-1, ddof=1)))
  else:
    replicate = ([float(grid[0, b1s.index(0.95), b2s.index(0.95)])] + extra) if extra else []
    noise_std = float(np.nanstd(replicate, ddof=1)) if len(replicate) > 1 else float("nan")

  rows = []
  for i, b1 in enumerate(b1s):
    j_best = int(np.nanargmin(best[i]))
    eq = best[i, b2s.index(b1)] if b1 in b2s else float("nan")
    paired = None
    if len(seeds) > 1 and b1 in b2s:  # equal cell minus the row's best cell, seed by seed
      j_eq = b2s.index(b1)
      d = (per_seed[best_k[i, j_eq], i, j_eq] - per_seed[best_k[i, j_best], i, j_best])
      paired = {"mean": float(np.mean(d)), "se": float(np.std(d, ddof=1) / math.sqrt(len(d))),
                "per_seed": d.tolist()}
    rows.append({"beta1": b1, "best_beta2": b2s[j_best], "best_loss": float(best[i, j_best]),
                 "paired_gap": paired,
                 "equal_loss": float(eq), "equal_gap": float(eq - best[i, j_best]),
                 "equal_gap_ppl": ppl(eq) - ppl(float(best[i, j_best])),
                 "equal_rank": int(np.argsort(np.argsort(np.where(np.isnan(best[i]), np.inf, best[i])))[b2s.index(b1)] + 1)
                 if b1 in b2s else None})
  i_all, j_all = np.unravel_index(np.nanargmin(best), best.shape)
  mism = [(abs(math.log((1 - b1) / (1 - b2))), best[i, j]) for i, b1 in enumerate(b1s)
          for j, b2 in enumerate(b2s) if np.isfinite(best[i, j])]
  rho = spearman([m for m, _ in mism], [v for _, v in mism]) if len(mism) > 2 else float("nan")
  best_b2_rank_corr = spearman(b1s, [r["best_beta2"] for r in rows]) if len(rows) > 2 else float("nan")
  wall = time.perf_counter() - t0

  summary = {
      "experiment": "equal_betas", "args": vars(args), "machine": report.machine(), "num_params": num_params,
      "tokens_seen": args.steps * args.batch_size * lm.seq_len, "lr0": lr0, "lr0_source": lr_source,
      "lrs": lrs, "beta1": b1s, "beta2": b2s, "init_seeds": seeds, "grid_final_val_loss": grid.tolist(),
      "per_seed_final_val_loss": per_seed.tolist(),
      "best_over_lrs": best.tolist(), "rows": rows,
      "overall_best": {"beta1": b1s[i_all], "beta2": b2s[j_all], "loss": float(best[i_all, j_all])},
      "replicates_095": [float(v) for v in replicate], "noise_std": noise_std,
      "spearman_loss_vs_mismatch": rho, "spearman_beta1_vs_best_beta2": best_b2_rank_corr,
      "val_curves": run["val_curve"], "cells": cells, "seconds_per_step_all_models": run["seconds_per_step"],
      "wall_time_s": wall,
  }
  (out / "results.json").write_text(json.dumps(summary, indent=1))
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["lr", "beta1", "beta2", "init_seed", "final_val_loss", "final_val_ppl"])
    for (lr, b1, b2, s), v in zip(cells, final):
      w.writerow([lr, b1, b2, s, v, ppl(v)])
  plot_heatmaps(grid, b1s, b2s, lrs, noise_std, out / "betas_heatmap.png")
  plot_gaps(best, b1s, b2s, noise_std, out / "betas_gap.png")

  lines = [f"Final validation loss, best of the rates {', '.join(f'{lr:.3g}' for lr in lrs)}"
           + (f", mean over init seeds {seeds}" if len(seeds) > 1 else "")
           + " (rows beta1, columns beta2; * = beta1 = beta2):", "",
           "| beta1 \\ beta2 | " + " | ".join(f"{b:g}" for b in b2s) + " |",
           "|---|" + "---|" * len(b2s)]
  for i, b1 in enumerate(b1s):
    lines.append(f"| {b1:g} | " + " | ".join(
        ("div" if not np.isfinite(best[i, j]) else f"{best[i, j]:.4f}") + ("*" if b1 == b2 else "")
        for j, b2 in enumerate(b2s)) + " |")
  lines += ["", "| beta1 | best beta2 | best loss | loss at beta2 = beta1 | gap (loss) | gap (ppl) | rank of beta2 = beta1 |",
            "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['beta1']:g} | {r['best_beta2']:g} | {r['best_loss']:.4f} | {r['equal_loss']:.4f} | "
                 f"{r['equal_gap']:.4f} | {r['equal_gap_ppl']:.2f} | {r['equal_rank']} of {len(b2s)} |")
  if len(seeds) > 1:
    lines += ["", "Paired gap (loss at beta2 = beta1 minus the row's best cell, same init seed): " + "; ".join(
        f"beta1 {r['beta1']:g}: {r['paired_gap']['mean']:+.4f} +- {r['paired_gap']['se']:.4f} (s.e.)"
        for r in rows if r["paired_gap"]),
        f"Seed-to-seed std per cell (mean over cells): {noise_std:.4f}"]
  else:
    lines += ["", f"Seed-to-seed noise at (0.95, 0.95), lr {lrs[0]:.3g}: losses "
              f"{', '.join(f'{v:.4f}' for v in replicate)}; std {noise_std:.4f}"]
  lines += [
            f"Overall best: beta1 {b1s[i_all]:g}, beta2 {b2s[j_all]:g}, loss {best[i_all, j_all]:.4f}",
            f"Spearman(loss, |log((1-b1)/(1-b2))|) = {rho:.3f}; Spearman(beta1, best beta2) = {best_b2_rank_corr:.3f}"]
  report.write_tables(out, lines, wall)
  return summary


if __name__ == "__main__":
  main()
