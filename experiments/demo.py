"""The demo: measure SNR, derive SlimAdam rules, compare with Adam at a fraction of the memory.

Run from the repository root::

  python -m experiments.demo --out runs/demo            # ~10-15 min on two CPU cores
  python -m experiments.demo --out runs/demo --quick    # one-minute smoke run

Steps (Kalra et al. 2025, §3 and §5, at small scale on the embedded corpus):

1. train a small GPT with Adam at a *small* learning rate (``snr_lr_factor`` x
   the target one) while an `SNRTracker` measures SNR_K of the second moments;
2. derive rules with cutoff 1.0, per layer and depth-averaged (App. H);
3. train Adam, SlimAdam (the derived rules), Adam-mini and AdaLayer at the
   target learning rate from the same initialisation and batches;
4. write ``rules.json``, ``rules_depth.json``, ``rules_table.txt``,
   ``snr_trajectories.png``, ``snr_depth.png``, ``snr.csv``,
   ``loss_curves.png``, ``summary.json``, ``summary.md`` and per-run JSON-lines
   logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import jax

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.train import train_lm


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo run (defaults: ~10-15 minutes on two CPU cores)."""

  model: str = "tiny"
  n_layers: int = 4
  d_model: int = 96
  vocab_size: int = 1024
  max_bytes: int | None = None
  steps: int = 800
  snr_steps: int = 500
  batch_size: int = 16
  lr: float = 3e-3
  snr_lr_factor: float = 0.1
  warmup: int = 60
  cutoff: float = 1.0
  snr_every: int = 20
  eval_every: int = 100
  eval_batches: int = 16
  seed: int = 0
  optimizers: tuple[str, ...] = ("adam", "slimadam", "adam-mini", "adalayer")


QUICK = DemoConfig(model="tiny", n_layers=2, d_model=64, vocab_size=512, max_bytes=1_500_000, steps=120, snr_steps=80,
                   batch_size=8, warmup=10, snr_every=10, eval_every=40, eval_batches=4)


def _compress_for(name: str, rules):
  return {"adam": None, "slimadam": rules}.get(name, name)


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), *, progress: bool = True) -> dict[str, Any]:
  """Runs the demo and writes its outputs to ``out_dir``; returns the summary dict."""
  out = report.output_dir(out_dir)
  t_start = time.perf_counter()
  say = report.say

  say(f"[1/4] data: Python stdlib source, BPE vocab {config.vocab_size}")
  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=config.vocab_size,
                                                          max_bytes=config.max_bytes)
  model_cfg = model.gpt_config(config.model, vocab_size=tokenizer.vocab_size, n_layers=config.n_layers,
                               d_model=config.d_model)
  lm = model.Functional(model_cfg)
  say(f"      {len(train_tokens):,} train / {len(val_tokens):,} val tokens; model {config.model}: "
      f"{model_cfg}")

  def train(name, compress, lr, steps, **kw):
    return train_lm(
        lm, lambda sched: slimoptax.slim_adamw(sched, compress=compress, num_heads=model_cfg.n_heads),
        train_tokens=train_tokens, val_tokens=val_tokens, steps=steps, batch_size=config.batch_size,
        lr=lr, warmup=config.warmup, seed=config.seed, eval_every=config.eval_every,
        eval_batches=config.eval_batches, log_path=out / f"log_{name}.jsonl", progress=progress, **kw)

  # 1. SNR of Adam's second moments at a small learning rate.
  snr_lr = config.lr * config.snr_lr_factor
  say(f"[2/4] Adam at lr {snr_lr:g} for {config.snr_steps} steps, tracking SNR every {config.snr_every}")
  template = lm.init(config.seed)
  tracker = slimoptax.SNRTracker(template, every=config.snr_every, steps=(1,))
  (out / "log_snr_adam.jsonl").unlink(missing_ok=True)
  snr_run = train("snr_adam", None, snr_lr, config.snr_steps,
                  state_hook=lambda step, state: tracker.record(step, state),
                  state_hook_steps=sorted(s for s in range(1, config.snr_steps + 1) if tracker.should_measure(s)))

  # 2. Rules.
  table = tracker.time_average()
  rules = slimoptax.derive_rules(table, config.cutoff, shapes=tracker.shapes)
  depth_table = slimoptax.depth_average(table)
  group_shapes = {slimoptax.depth_group(n)[0]: s for n, s in tracker.shapes.items()}
  rules_depth = slimoptax.derive_rules(depth_table, config.cutoff, shapes=group_shapes)
  rules.to_json(str(out / "rules.json"))
  rules_depth.to_json(str(out / "rules_depth.json"))
  tracker.to_csv(str(out / "snr.csv"))
  tracker.plot_trajectories(str(out / "snr_trajectories.png"))
  tracker.plot_depth(str(out / "snr_depth.png"))
  with open(out / "rules_table.txt", "w") as f:
    f.write("Per-layer rules (cutoff %.2f), derived at lr %g:\n" % (config.cutoff, snr_lr))
    f.write(rules.table(template) + "\n\nDepth-averaged rules:\n" + rules_depth.table(template) + "\n")
  say("[3/4] derived rules:\n" + rules.table(template))

  # 3. Compare optimizers at the target learning rate.
  runs = {}
  for name in config.optimizers:
    compress = _compress_for(name, rules)
    (out / f"log_{name}.jsonl").unlink(missing_ok=True)
    say(f"[4/4] {name} at lr {config.lr:g} for {config.steps} steps")
    result = train(name, compress, config.lr, config.steps)
    mem = slimoptax.memory_report(result["opt_state"], template)
    runs[name] = {
        "final_val_loss": result["final_val_loss"],
        "final_train_loss": result["final_train_loss"],
        "second_moment_entries": mem.entries,
        "second_moments_saved": mem.fraction_saved,
        "opt_state_bytes": result["opt_state_bytes"],
        "seconds_per_step": result["seconds_per_step"],
        "val_curve": [(r["step"], r["val_loss"]) for r in result["history"] if "val_loss" in r],
        "train_curve": [(r["step"], r["train_loss"]) for r in result["history"] if "train_loss" in r],
    }
    say(f"      val loss {result['final_val_loss']:.4f}; second moments saved "
        f"{mem.fraction_saved:.2%}")

  _plot_losses(runs, out / "loss_curves.png")
  summary = {
      "config": dataclasses.asdict(config),
      "model": dataclasses.asdict(model_cfg),
      "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
                 f"jax backend {jax.default_backend()}",
      "num_params": snr_run["num_params"],
      "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
      "snr_run_final_val_loss": snr_run["final_val_loss"],
      "rules_kept_fraction": {
          "per_layer": _kept_fraction(template, rules),
          "depth_averaged": _kept_fraction(template, rules_depth)},
      "runs": {k: {kk: vv for kk, vv in v.items() if not kk.endswith("_curve")} for k, v in runs.items()},
      "wall_time_s": time.perf_counter() - t_start,
  }
  with open(out / "summary.json", "w") as f:
    json.dump(summary, f, indent=2)
  (out / "summary.md").write_text(_summary_md(summary))
  say(_summary_md(summary))
  return summary


def _kept_fraction(params, rules) -> float:
  kept, total = slimoptax.second_moments_kept(model.param_paths(params), rules)
  return kept / total


def _summary_md(summary) -> str:
  lines = [
      "# slimoptax demo summary", "",
      f"model: {summary['model']['n_layers']} layers, d {summary['model']['d_model']}, "
      f"{summary['model']['n_heads']} heads, vocab {summary['model']['vocab_size']}, "
      f"{summary['num_params']:,} parameters; machine: {summary['machine']}; wall time "
      f"{summary['wall_time_s'] / 60:.1f} min", "",
      f"rules derived at lr {summary['config']['lr'] * summary['config']['snr_lr_factor']:g} keep "
      f"{summary['rules_kept_fraction']['per_layer']:.2%} of second moments (depth-averaged: "
      f"{summary['rules_kept_fraction']['depth_averaged']:.2%})", "",
      "| optimizer | final val loss | second moments kept | saved vs Adam | optimizer state bytes |",
      "|---|---|---|---|---|",
  ]
  for name, r in summary["runs"].items():
    lines.append(f"| {name} | {r['final_val_loss']:.4f} | {r['second_moment_entries']:,} | "
                 f"{r['second_moments_saved']:.2%} | {r['opt_state_bytes']:,} |")
  return "\n".join(lines) + "\n"


def _plot_losses(runs, path) -> None:
  plt = pyplot()
  fig, axs = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in runs.items():
    if r["train_curve"]:
      s, v = zip(*r["train_curve"])
      axs[0].plot(s, v, label=name)
    if r["val_curve"]:
      s, v = zip(*r["val_curve"])
      axs[1].plot(s, v, marker="o", label=name)
  for ax, title in zip(axs, ("train loss", "validation loss")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
  save(fig, path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--quick", action="store_true", help="one-minute smoke run (tiny model, few steps)")
  for field in dataclasses.fields(DemoConfig):
    if field.name == "optimizers":
      parser.add_argument("--optimizers", default=None, help="comma-separated subset of "
                          "adam,slimadam,adam-mini,adalayer,adalayer+ln+tn")
    else:
      kind = float if field.type in ("float",) else int if field.type in ("int",) else str
      if field.name == "max_bytes":
        kind = int
      parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None)
  parser.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> DemoConfig:
  base = QUICK if args.quick else DemoConfig()
  overrides = {}
  for field in dataclasses.fields(DemoConfig):
    value = getattr(args, field.name, None)
    if value is not None:
      overrides[field.name] = tuple(value.split(",")) if field.name == "optimizers" else value
  return dataclasses.replace(base, **overrides)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.demo",
      description="SNR -> rules -> Adam vs SlimAdam/Adam-mini/AdaLayer on the Python standard library's source")
  add_arguments(parser)
  args = parser.parse_args(argv)
  run_demo(args.out, config_from_args(args), progress=not args.no_progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())
