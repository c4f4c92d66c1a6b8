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

Why a hand-written loop instead of ``nanolm.train``: the learning rate is an
argument of the jitted step, so the grid compiles once. The step is
``nanolm.train``'s (same model, init, batches, clipping at 1, warmup + cosine
to lr/10, AdamW b2 0.95, wd 0.1 on matrices).

Outputs (in --out): snr_vs_lr.png, saved_vs_lr.png, results.json,
summary.md, snr_lr<lr>.csv per learning rate.

Usage::

  python experiments/lr_vs_snr.py            # full run (~10-15 min on 2 shared CPU cores)
  python experiments/lr_vs_snr.py --quick    # CI smoke test (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time

import jax
import numpy as np
import optax
from flax import nnx

from slimoptax import analysis, nanolm
from slimoptax.slim_adam import slim_adamw

GROUPS = {  # depth group (analysis.depth_group) -> display name
    "blocks/*/attn/query/kernel": "Attn.Query", "blocks/*/attn/key/kernel": "Attn.Key",
    "blocks/*/attn/value/kernel": "Attn.Value", "blocks/*/attn/out/kernel": "Attn.Proj",
    "blocks/*/mlp/up/kernel": "MLP.Up", "blocks/*/mlp/down/kernel": "MLP.Down",
    "blocks/*/ln_1/scale": "LN (attn)", "blocks/*/ln_2/scale": "LN (mlp)", "ln_f/scale": "LN (final)",
    "wte/embedding": "Tok.Embd = LM head", "wpe/embedding": "Pos.Embd",
}
# §4.2: at the optimal learning rate, compression-averse (SNR <~ 1) vs amenable (SNR >~ 1) layer types.
PAPER_CLASS = {"Attn.Query": "averse", "Attn.Key": "averse", "MLP.Up": "averse", "LN (attn)": "averse",
               "LN (mlp)": "averse", "LN (final)": "averse", "Tok.Embd = LM head": "averse",
               "Attn.Value": "amenable", "Attn.Proj": "amenable", "MLP.Down": "amenable"}
ROLE_NAMES = ("fan_in", "fan_out", "both")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="output directory (default experiments/results/lr_vs_snr, "
                 "or experiments/results/lr_vs_snr/quick with --quick)")
  p.add_argument("--quick", action="store_true", help="CI smoke test: tiny model, 2 learning rates, few steps")
  p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
  p.add_argument("--cutoffs", default="0.5,1,2,4")
  p.add_argument("--n-layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=64)
  p.add_argument("--n-heads", type=int, default=4)
  p.add_argument("--vocab-size", type=int, default=1024)
  p.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus cap (bounds tokenizer training)")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--snr-every", type=int, default=10)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.quick:
    args.lrs, args.n_layers, args.d_model, args.n_heads = "1e-3,3e-2", 2, 32, 2
    args.vocab_size, args.max_bytes, args.steps, args.warmup = 512, 1_500_000, 20, 4
    args.snr_every, args.eval_batches = 4, 2
  if args.out is None:
    args.out = "experiments/results/lr_vs_snr" + ("/quick" if args.quick else "")
  return args


def make_step(model_cfg, tx):
  """The jitted training step ``(params, opt_state, x, y, lr) -> (params, opt_state, loss)``."""
  graphdef = nnx.split(nanolm.build_model(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)[0]

  def loss_fn(params, x, y):
    return nanolm.cross_entropy_loss(nnx.merge(graphdef, params)(x), y)

  @jax.jit
  def step(params, opt_state, x, y, lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + lr * u, params, updates), opt_state, loss

  return step, jax.jit(loss_fn)


def train_with_snr(lr, *, step, eval_loss, tx, schedule, model_cfg, args, train_tokens, val_batches, tracker):
  params = nnx.as_pure(nnx.state(nanolm.build_model(model_cfg, rngs=nnx.Rngs(args.seed)), nnx.Param))
  opt_state = tx.init(params)
  batches = nanolm.batch_iterator(train_tokens, batch_size=args.batch_size, seq_len=model_cfg.seq_len,
                                  seed=args.seed)
  losses = []
  for s in range(1, args.steps + 1):
    x, y = next(batches)
    params, opt_state, loss = step(params, opt_state, x, y, lr * float(schedule(s - 1)))
    losses.append(loss)
    if tracker.should_measure(s):
      tracker.record(s, opt_state)
  losses = np.asarray(jax.device_get(losses))
  val = float(np.mean(jax.device_get([eval_loss(params, x, y) for x, y in val_batches])))
  return {"final_val_loss": val, "final_train_loss": float(losses[-10:].mean()),
          "diverged": not np.isfinite(losses).all() or not math.isfinite(val)}


def roles_of(name, shape):
  cands = analysis.candidate_axes(name, shape)
  return dict(zip(cands, ROLE_NAMES if len(shape) >= 2 else ("all",)))


def spearman(x, y):
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  return float(np.corrcoef(rx, ry)[0, 1])


# -----------------------------------------------------------------------------
# Plots and summary.
# -----------------------------------------------------------------------------


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def log_y(ax):
  """Log y axis with plain tick labels (0.5, 1, 2 rather than 5x10^-1, 10^0, 2x10^0)."""
  import matplotlib.ticker as mticker
  ax.set_yscale("log")

  def minor(y, _):
    lo, hi = ax.get_ylim()
    mantissa = round(y / 10 ** math.floor(math.log10(y) + 1e-9), 6)
    if hi / lo < 3 or (hi / lo < 100 and mantissa in (2, 5)):
      return f"{y:.3g}"
    return ""

  ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda y, _: f"{y:.3g}"))
  ax.yaxis.set_minor_formatter(mticker.FuncFormatter(minor))


def plot_snr(res, path):
  plt = _plt()
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
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_saved(res, path):
  plt = _plt()
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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  for name, (ok, detail) in res["checks"].items():
    lines.append(f"- {name}: {'yes' if ok else 'no'} ({detail})")
  lines += ["", f"Wall time {res['wall_time_s'] / 60:.1f} min; machine: {res['machine']}."]
  return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lrs = [float(x) for x in args.lrs.split(",")]
  cutoffs = [float(x) for x in args.cutoffs.split(",")]
  say = lambda *a: print(*a, flush=True)  # noqa: E731

  tokenizer, train_tokens, val_tokens = nanolm.prepare_data(vocab_size=args.vocab_size, max_bytes=args.max_bytes)
  model_cfg = nanolm.gpt_config("tiny", n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                                vocab_size=tokenizer.vocab_size)
  val_batches = nanolm.eval_batches(val_tokens, batch_size=args.batch_size, seq_len=model_cfg.seq_len,
                                    max_batches=args.eval_batches)
  say(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; model {model_cfg}")
  tx = optax.chain(optax.clip_by_global_norm(1.0), slim_adamw(1.0))  # AdamW; lr applied in the step
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, args.warmup, args.steps, 0.1)
  step, eval_loss = make_step(model_cfg, tx)
  template = nnx.as_pure(nnx.state(nanolm.build_model(model_cfg, rngs=nnx.Rngs(args.seed)), nnx.Param))

  tables, runs = {}, {}
  for lr in lrs:
    t0 = time.perf_counter()
    tracker = analysis.SNRTracker(template, every=args.snr_every, steps=(1,))
    runs[str(lr)] = train_with_snr(lr, step=step, eval_loss=eval_loss, tx=tx, schedule=schedule,
                                   model_cfg=model_cfg, args=args, train_tokens=train_tokens,
                                   val_batches=val_batches, tracker=tracker)
    tracker.to_csv(str(out / f"snr_lr{lr:g}.csv"))
    tables[lr] = tracker.time_average()
    say(f"lr {lr:<8g} val {runs[str(lr)]['final_val_loss']:.4f} ({time.perf_counter() - t0:.0f}s)")
  shapes = tracker.shapes
  ok = [lr for lr in lrs if not runs[str(lr)]["diverged"]]
  best_lr = min(ok, key=lambda lr: runs[str(lr)]["final_val_loss"])

  # K* per layer type: best depth-averaged axis at the smallest learning rate.
  depth0 = analysis.depth_average(tables[lrs[0]])
  kstar, snr_kstar, trend = {}, {}, {}
  for group in GROUPS:
    if group not in depth0:
      continue
    example = next(n for n in shapes if analysis.depth_group(n)[0] == group)
    roles = roles_of(example, shapes[example])
    axes = max((c for c in depth0[group] if math.isfinite(depth0[group][c])), key=depth0[group].get)
    kstar[group] = {"axes": list(axes), "role": roles[axes]}
    snr_kstar[group] = {}
    for lr in lrs:
      vals = [tables[lr][n][axes] for n in shapes if analysis.depth_group(n)[0] == group]
      snr_kstar[group][str(lr)] = {"mean": float(np.nanmean(vals)), "min": float(np.nanmin(vals)),
                                   "max": float(np.nanmax(vals)), "per_layer": vals}
    means = [snr_kstar[group][str(lr)]["mean"] for lr in lrs]
    trend[group] = {"ratio": means[-1] / means[0], "spearman": spearman(np.log(lrs), means)}

  saved = {}
  for cutoff in cutoffs:
    saved[str(cutoff)] = {}
    for lr in lrs:
      rules = analysis.derive_rules(tables[lr], cutoff, shapes=shapes)
      kept, total = analysis.second_moments_kept(shapes, rules)
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
      "experiment": "lr_vs_snr", "config": vars(args), "model": nanolm.dataclasses.asdict(model_cfg),
      "num_params": int(sum(np.prod(s) for s in shapes.values())), "train_tokens": int(len(train_tokens)),
      "lrs": lrs, "cutoffs": cutoffs, "runs": runs, "best_lr": best_lr, "kstar": kstar, "snr_kstar": snr_kstar,
      "trend": trend, "saved": saved, "classification": classification,
      "checks": {k: (bool(ok_), d) for k, (ok_, d) in checks.items()},
      "time_average": {str(lr): {n: {str(c): v for c, v in per.items()} for n, per in t.items()}
                       for lr, t in tables.items()},
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} {jax.default_backend()}",
  }
  plot_snr(res, out / "snr_vs_lr.png")
  plot_saved(res, out / "saved_vs_lr.png")
  res["wall_time_s"] = time.perf_counter() - t_start
  (out / "summary.md").write_text(summary_md(res))
  with open(out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  say(summary_md(res))
  return res


if __name__ == "__main__":
  main()
