"""Training with quantized optimizer states: 8-bit / 4-bit blockwise and bf16 with stochastic rounding.

Dettmers et al. ("8-bit Optimizers via Block-wise Quantization", 2022) train
with 8-bit Adam states at the loss of 32-bit Adam. SlimAdam (Kalra et al. 2025)
removes almost all of the second moment, but its first moment stays a full
float32 copy of the parameters; `slimoptax.quantize_state` stores it (and,
for AdamW, the second moment too) in 8 or 4 bits per entry with one scale per
block, or in bf16 with stochastic rounding.

On the main job's model (4-layer d-96 GPT, 800 steps of 16 x 64 tokens, lr 3e-3,
warm-up 60, cosine to lr/10, clip 1, b2 0.95, weight decay 0.1), each
configuration trains from the same initialisations and batches with
``--seeds`` seeds:

* AdamW in float32 (``slim_adamw(compress=None)``, which is ``optax.adamw``),
  with 8-bit first and second moments, and with 4-bit ones;
* SlimAdam (the ``"slimadam"`` preset, Table 3 rules) in float32, with an
  8-bit first moment, a 4-bit one, and a bf16 one with stochastic rounding.

Resumable: each finished configuration is stored in ``runs.json`` and skipped
when the same command runs again. Written: ``results.json`` (every run), ``summary.md`` (final validation loss,
mean and seed range, the gap to the float32 version of the same optimizer, the
optimizer state bytes) and ``final_loss.png``.

Usage::

  python -m experiments.quantized_states            # full (~60 min on 2 CPU cores; resumable)
  python -m experiments.quantized_states --quick    # CI smoke test
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.train import train_lm

# name: (compress, quantize_state keywords or None for float32, its float32 reference)
CONFIGS = {
    "adamw": (None, None, "adamw"),
    "adamw int8": (None, {"mu": "int8", "nu": "int8"}, "adamw"),
    "adamw int4": (None, {"mu": "int4", "nu": "int4"}, "adamw"),
    "slimadam": ("slimadam", None, "slimadam"),
    "slimadam int8": ("slimadam", {"mu": "int8"}, "slimadam"),
    "slimadam int4": ("slimadam", {"mu": "int4"}, "slimadam"),
    "slimadam bf16-sr": ("slimadam", {"mu": "bf16"}, "slimadam"),
}


def parse_args(argv=None):
  p = report.parser(__doc__, "quantized_states", "1-layer d-32 model, 30 steps, 4 configurations, 1 seed")
  p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
  p.add_argument("--seeds", default="0,1,2", help="seeds (initialisation and batch order)")
  report.lm_arguments(p, n_layers=4, d_model=96, n_heads=4, vocab_size=1024, max_bytes=None, steps=800,
                      warmup=60, batch_size=16, lr=3e-3, eval_every=100, eval_batches=64)
  args = p.parse_args(argv)
  if args.quick:
    args.n_layers, args.d_model, args.n_heads, args.vocab_size = 1, 32, 2, 512
    args.max_bytes, args.steps, args.warmup, args.batch_size = 1_500_000, 30, 3, 8
    args.eval_every, args.eval_batches, args.seeds = 15, 2, "0"
    args.configs = "adamw,adamw int8,slimadam,slimadam bf16-sr"
  unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
  if unknown:
    p.error(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
  return report.default_out(args, "quantized_states")


def make_tx(name: str, n_heads: int, *, min_size: int | None = None):
  compress, quant, _ = CONFIGS[name]

  def factory(schedule):
    tx = slimoptax.slim_adamw(schedule, compress=compress, num_heads=n_heads)
    if quant is None:
      return tx
    kw = dict(quant) if min_size is None else {**quant, "min_size": min_size}
    return slimoptax.quantize_state(tx, **kw)

  return factory


def summary_md(res) -> str:
  cfg, m = res["config"], res["model"]
  lines = [f"Model: {m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} heads, vocab {m['vocab_size']}, "
           f"{res['num_params']:,} parameters; {cfg['steps']} steps of {cfg['batch_size']} x {m['seq_len']} "
           f"tokens at lr {cfg['lr']:g}; seeds {cfg['seeds']}; final validation loss on {cfg['eval_batches']} "
           f"batches; quantized: every state leaf of at least {res['min_size']:,} entries (`min_size`).", "",
           "| optimizer | final val loss (mean) | seed range | gap to its float32 version (mean ± half range) "
           "| optimizer state bytes | vs float32 AdamW |", "|---|---|---|---|---|---|"]
  base_bytes = res["runs"].get("adamw", {}).get("opt_state_bytes")
  for name, r in res["runs"].items():
    gap = r.get("gap")
    gap_txt = "—" if gap is None else f"{gap['mean']:+.4f} ± {gap['half_range']:.4f}"
    ratio = f"{r['opt_state_bytes'] / base_bytes:.3f}x" if base_bytes else "—"
    lines.append(f"| {name} | {r['mean']:.4f} | {min(r['losses']):.4f} – {max(r['losses']):.4f} | {gap_txt} | "
                 f"{r['opt_state_bytes']:,} | {ratio} |")
  lines += ["", report.wall_line(res)]
  return "\n".join(lines) + "\n"


def plot(res, path) -> None:
  plt = pyplot()
  names = list(res["runs"])
  fig, ax = plt.subplots(figsize=(7.5, 3.8))
  for i, name in enumerate(names):
    losses = res["runs"][name]["losses"]
    ax.plot([i] * len(losses), losses, "o", alpha=0.6, color="tab:blue" if "adamw" in name else "tab:red")
    ax.plot([i - 0.25, i + 0.25], [np.mean(losses)] * 2, color="black")
  ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
  ax.set_ylabel("final validation loss")
  ax.set_title("Quantized optimizer states: final validation loss per seed (bar: mean)", fontsize=10)
  save(fig, path, dpi=110)


def main(argv=None):
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  seeds = [int(s) for s in args.seeds.split(",")]
  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size, max_bytes=args.max_bytes)
  model_cfg, lm = model.tiny_gpt(args, tokenizer.vocab_size)
  # The quick model is too small for the default 4096-entry threshold: quantize every leaf there.
  min_size = 1 if args.quick else None
  # Resumable: each finished configuration is kept in runs.json, with the settings it was run with.
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "configs")}
  saved_path = out / "runs.json"
  saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
  runs = dict(saved.get("runs", {})) if saved.get("settings") == settings else {}
  for name in args.configs.split(","):
    if name in runs:
      report.say(f"{name:<18} done before (runs.json), kept")
      continue
    losses, curves, state_bytes = [], [], None
    for seed in seeds:
      r = train_lm(lm, make_tx(name, model_cfg.n_heads, min_size=min_size), lr=args.lr, steps=args.steps,
                   warmup=args.warmup, val_tokens=val_tokens, train_tokens=train_tokens,
                   batch_size=args.batch_size, eval_batches=args.eval_batches, eval_every=args.eval_every,
                   seed=seed, norms=False)
      losses.append(float(r["final_val_loss"]))
      curves.append(r["val_curve"])
      state_bytes = r["opt_state_bytes"]
      report.say(f"{name:<18} seed {seed}: val {r['final_val_loss']:.4f} ({r['wall_s']:.0f} s)")
    runs[name] = {"losses": losses, "mean": float(np.mean(losses)), "val_curves": curves,
                  "opt_state_bytes": int(state_bytes)}
    tmp = saved_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "runs": runs}))
    tmp.replace(saved_path)
  runs = {name: runs[name] for name in args.configs.split(",")}
  for name, r in runs.items():
    ref = CONFIGS[name][2]
    if ref != name and ref in runs:
      g = [a - b for a, b in zip(r["losses"], runs[ref]["losses"])]
      r["gap"] = {"per_seed": g, "mean": float(np.mean(g)), "half_range": float((max(g) - min(g)) / 2)}
  res = {"experiment": "quantized_states", "config": vars(args), "model": dataclasses.asdict(model_cfg),
         "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(lm.init(0)))),
         "min_size": min_size or 4096, "runs": runs, "machine": report.machine()}
  plot(res, out / "final_loss.png")
  return report.finish(out, res, summary_md, t_start)


if __name__ == "__main__":
  main()
