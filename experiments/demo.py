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

`main` checks every argument and the installed extras first (exit 2 naming the
flag or the package), writes into ``<out>.incomplete-<pid>`` and renames that to
``<out>`` only once the run is complete (an existing non-empty ``<out>`` needs
``--overwrite`` and is replaced only then); Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import os
import signal

if __name__ == "__main__":
  # Ctrl-C while JAX is being imported or the arguments checked: one line, exit 130. Installed even when the
  # launcher ignores SIGINT (``cmd &`` in a script), which would otherwise swallow it; `main` takes over.
  def _interrupted_early(signum, frame):
    os.write(2, b"interrupted before the run started; no outputs written\n")
    os._exit(130)

  signal.signal(signal.SIGINT, _interrupted_early)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

import slimoptax  # noqa: E402
from experiments._lib import data, model, report  # noqa: E402
from experiments._lib.plots import pyplot, save  # noqa: E402
from experiments._lib.train import train_lm  # noqa: E402


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


_OUTPUTS = ("rules.json", "rules_depth.json", "rules_table.txt", "snr_trajectories.png", "snr_depth.png", "snr.csv",
            "loss_curves.png", "summary.json", "summary.md")

_HELP = {
    "model": "GPT size preset ({choices}); --n-layers and --d-model override its sizes",
    "n_layers": "transformer blocks",
    "d_model": "model width (a multiple of the preset's head count)",
    "vocab_size": "BPE vocabulary size, end-of-text token included (256: raw bytes, no tokenizer)",
    "max_bytes": "cap on the corpus size in bytes (bounds tokenizer training; none: the whole corpus)",
    "steps": "training steps of each compared optimizer (more than --warmup)",
    "snr_steps": "steps of the small-learning-rate Adam run that measures SNR (more than --warmup)",
    "batch_size": "sequences per batch (each as long as the preset's context: 64 tokens for tiny)",
    "lr": "peak learning rate of the compared runs",
    "snr_lr_factor": "the SNR run's learning rate is this times --lr",
    "warmup": "linear learning-rate warm-up steps of every run (then a cosine decay to 0.1 x the peak)",
    "cutoff": "SNR cutoff of the rules: an axis is averaged when its SNR exceeds it",
    "snr_every": "measure SNR every this many steps of the SNR run",
    "eval_every": "validation loss every this many steps",
    "eval_batches": "validation batches per evaluation",
    "seed": "seed of the initialisation and the batch order",
    "optimizers": "comma-separated optimizers to compare, from: {choices} (slimadam: the derived rules)",
}

_POSITIVE = ("n_layers", "d_model", "steps", "snr_steps", "batch_size", "snr_every", "eval_every", "eval_batches",
             "max_bytes")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
  full, quick = getattr(DemoConfig(), name), getattr(QUICK, name)
  show = lambda v: "none" if v is None else ",".join(v) if isinstance(v, tuple) else str(v)
  return f"default {show(full)}" + (f"; {show(quick)} with --quick" if quick != full else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True,
                      help="output folder (required). The run is written to the sibling <out>.incomplete-<pid> "
                           "and renamed to <out> only when it completes, so an interrupted or failed run leaves "
                           "that incomplete folder and never a partial <out>. An existing non-empty <out> is "
                           "refused unless --overwrite")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing <out> holding an earlier demo run; it is kept untouched until "
                           "the new run completes, then deleted (default: refuse)")
  parser.add_argument("--quick", action="store_true",
                      help="one-minute smoke run: tiny 2-layer d-64 model, vocab 512, 1.5 MB of corpus, 120 "
                           "steps (the second default of each option below)")
  choices = {"model": ", ".join(sorted(model.PRESETS)), "optimizers": ",".join(slimoptax.PRESETS)}
  for field in dataclasses.fields(DemoConfig):
    text = _HELP[field.name].format(choices=choices.get(field.name, "")) + f" ({_default_text(field.name)})"
    if field.name == "optimizers":
      parser.add_argument("--optimizers", default=None, metavar="NAMES", help=text)
    else:
      kind = float if field.type in ("float",) else int if field.type in ("int",) else str
      if field.name == "max_bytes":
        kind = int
      parser.add_argument(_flag(field.name), type=kind, default=None, metavar=field.name.upper(), help=text)
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (default: show them)")


def config_from_args(args) -> DemoConfig:
  base = QUICK if args.quick else DemoConfig()
  overrides = {}
  for field in dataclasses.fields(DemoConfig):
    value = getattr(args, field.name, None)
    if value is not None:
      overrides[field.name] = tuple(value.split(",")) if field.name == "optimizers" else value
  return dataclasses.replace(base, **overrides)


def validate_config(parser: argparse.ArgumentParser, config: DemoConfig) -> None:
  """``parser.error`` (exit 2, naming the flag) for a setting the run would fail on, before any work."""
  for name in _POSITIVE:
    value = getattr(config, name)
    if value is not None and value < 1:
      parser.error(f"{_flag(name)} must be a positive integer, got {value}")
  if config.warmup < 0:
    parser.error(f"--warmup must be >= 0, got {config.warmup}")
  for name in ("steps", "snr_steps"):
    if getattr(config, name) <= config.warmup:
      parser.error(f"{_flag(name)} ({getattr(config, name)}) must be more than --warmup ({config.warmup}): "
                   "the learning-rate schedule needs steps after the warm-up")
  for name in ("lr", "snr_lr_factor"):
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
      parser.error(f"{_flag(name)} must be a finite number > 0, got {value}")
  if not (math.isfinite(config.cutoff) and config.cutoff >= 0):
    parser.error(f"--cutoff must be a finite number >= 0, got {config.cutoff}")
  if config.seed < 0:
    parser.error(f"--seed must be >= 0, got {config.seed}")
  if config.vocab_size < 256:
    parser.error(f"--vocab-size must be 256 (bytes) or more, got {config.vocab_size}")
  if config.model not in model.PRESETS:
    parser.error(f"--model {config.model!r} is unknown; choose from {', '.join(sorted(model.PRESETS))}")
  try:
    model.gpt_config(config.model, vocab_size=config.vocab_size, n_layers=config.n_layers, d_model=config.d_model)
  except ValueError as e:
    parser.error(f"--d-model / --model: {e}")
  names = config.optimizers
  unknown = [n for n in names if n not in slimoptax.PRESETS]
  if not names or unknown:
    parser.error(f"--optimizers: unknown name{'s' if len(unknown) > 1 else ''} "
                 f"{', '.join(repr(n) for n in unknown) or repr('')}; known: {', '.join(slimoptax.PRESETS)}")
  if len(set(names)) != len(names):
    parser.error(f"--optimizers lists a name twice: {','.join(names)}")


def _replaceable(name: str) -> bool:
  return name in _OUTPUTS or (name.startswith("log_") and name.endswith(".jsonl"))


def main(argv: list[str] | None = None) -> int:
  """Validates every argument, runs the demo into a staging folder, renames it to ``--out`` when complete.

  Returns 0, or 130 after Ctrl-C (one line on stderr naming the incomplete folder).
  """
  parser = argparse.ArgumentParser(
      prog="python -m experiments.demo",
      description="SNR -> rules -> Adam vs SlimAdam/Adam-mini/AdaLayer on the Python standard library's source",
      epilog="Ctrl-C (SIGINT, honoured even where the launcher ignores it) stops the run with one line: the "
             "partial outputs stay in <out>.incomplete-<pid>, an earlier <out> is untouched. Exit codes: 0 "
             "done, 2 bad arguments or missing packages (nothing run), 130 interrupted.")
  add_arguments(parser)
  args = parser.parse_args(argv)
  config = config_from_args(args)
  validate_config(parser, config)
  progress = not args.no_progress
  report.require_packages(parser, ["matplotlib"] + (["tokenizers"] if config.vocab_size != 256 else [])
                          + (["tqdm"] if progress else []))
  staged = report.stage_output(parser, args.out, overwrite=args.overwrite, replaceable=_replaceable)
  with report.InterruptGuard() as guard:
    try:
      run_demo(staged.staging, config, progress=progress)
      if guard.interrupted:  # a Ctrl-C that something on the way caught: still an interrupted run
        raise KeyboardInterrupt
      with guard.deferred():
        staged.commit()
    except BaseException as e:
      if not (isinstance(e, KeyboardInterrupt) or guard.interrupted):
        print(f"demo failed; partial outputs in {staged.staging} (incomplete)", file=sys.stderr, flush=True)
        raise
      print(f"interrupted; partial outputs in {staged.staging} (incomplete)", file=sys.stderr, flush=True)
      return 130
  if guard.interrupted:
    print(f"interrupted after the run completed; outputs in {staged.final} (complete)", file=sys.stderr, flush=True)
    return 130
  report.say(f"wrote {staged.final}")
  return 0


if __name__ == "__main__":
  code = main()
  if code == 130:
    # Leave without interpreter teardown: JAX/XLA threads cut off mid-compilation can crash it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  sys.exit(code)
