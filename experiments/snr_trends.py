"""SNR trends of Adam's second moments per layer type (Kalra et al. 2025, §3.1-3.2, Fig. 2-3, Table 3).

Trains a small GPT (Flax NNX, Mitchell init, tied embeddings) with Adam at a
small learning rate while `slimoptax.SNRTracker` measures, every few steps,

  SNR_K(V) = E_K' [ (E_K V)^2 / Var_K V ]                      (eq. 3)

of every second-moment tensor V for K = fan_in, fan_out and both, then averages
over time (eq. 4) and over depth (App. H), and reports which axis each layer
type prefers and the rule it would get (best K if its SNR exceeds the cutoff,
else none), next to Table 3 of the paper.

Axis conventions (Flax layouts, as in `slimoptax.axis_roles`):
Dense kernels are (fan_in, fan_out); attention query/key/value kernels are
(d, H, hd) with fan_in = (0,), fan_out = (1, 2) (heads stacked in fan_out);
the attention output kernel is (H, hd, d) with fan_in = (0, 1) (heads stacked
in fan_in), fan_out = (2,); the tied Embed table is (vocab, d) with "fan_in" =
the token axis 0 and "fan_out" = the embedding axis 1. "Compress along K" means
averaging the second moment over the axes K (one value kept per index of the
other axes). Table 3's "Token embedding fan_out" and "LM head fan_in" both
mean the embedding axis, i.e. axis 1 of the tied (vocab, d) table.

Outputs (in --out): snr_trajectories.png (Fig. 2), snr_depth.png (Fig. 3),
snr.csv (every measurement), rules.json / rules_depth.json, results.json and
summary.md (the tables).

Usage::

  python -m experiments.snr_trends            # full run (~6 min on 2 shared CPU cores)
  python -m experiments.snr_trends --quick    # CI smoke test (< 1 min)
"""

from __future__ import annotations

import dataclasses
import math

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import finish_panels, log_y, pyplot
from experiments._lib.train import train_lm

# Display names and Table 3 of the paper, per depth group (see slimoptax.depth_group).
GROUPS = {
    "blocks/*/attn/query/kernel": ("Attn.Query", "fan_in"),
    "blocks/*/attn/key/kernel": ("Attn.Key", "fan_in"),
    "blocks/*/attn/value/kernel": ("Attn.Value", "fan_out"),
    "blocks/*/attn/out/kernel": ("Attn.Proj", "fan_out"),
    "blocks/*/mlp/up/kernel": ("MLP.Up", "fan_out*"),
    "blocks/*/mlp/down/kernel": ("MLP.Down", "fan_out"),
    "blocks/*/ln_1/scale": ("LN (attn)", "none"),
    "blocks/*/ln_2/scale": ("LN (mlp)", "none"),
    "ln_f/scale": ("LN (final)", "none"),
    "wte/embedding": ("Tok.Embd = LM head (tied)", "fan_out"),
    "wpe/embedding": ("Pos.Embd", None),
}
ROLE_COLORS = {"fan_in": "tab:blue", "fan_out": "tab:orange", "both": "tab:green", "all": "tab:purple"}


def parse_args(argv=None):
  p = report.parser(__doc__, "snr_trends", "tiny model, few steps")
  report.lm_arguments(p, n_layers=4, d_model=96, n_heads=4, vocab_size=1024, max_bytes=4_000_000,
                      steps=1000, warmup=100, batch_size=16)
  p.add_argument("--lr", type=float, default=1e-3, help="a small learning rate (the paper: 10x below optimal)")
  report.lm_arguments(p, snr_every=10, cutoff=1.0, eval_every=250, eval_batches=16, seed=0)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.n_layers, args.d_model, args.n_heads, args.vocab_size = 2, 32, 2, 512
    args.max_bytes, args.steps, args.warmup, args.snr_every = 1_500_000, 30, 5, 5
    args.eval_every, args.eval_batches = 30, 2
  return report.default_out(args, "snr_trends")


def role_names(candidates, path, shape):
  """Names of the SNRTracker candidates (``tracker.candidates``) of one parameter, in its order."""
  return model.candidate_roles(candidates[path], shape)


def rule_name(axes, names):
  return "none" if not axes else names[tuple(axes)]


def fmt(x):
  return "nan" if not math.isfinite(x) else (f"{x:.3g}" if x < 1000 else f"{x:.3e}")


# -----------------------------------------------------------------------------
# Plots.
# -----------------------------------------------------------------------------


def plot_trajectories(tracker, names, path, *, title):
  """Fig. 2: SNR_K vs step for one parameter per layer type."""
  plt = pyplot()
  cols = 4
  rows = math.ceil(len(names) / cols)
  fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
  for ax, name in zip(axs.flat, names):
    roles = role_names(tracker.candidates, name, tracker.shapes[name])
    for c, pts in tracker.history[name].items():
      steps, vals = zip(*pts)
      ax.plot(steps, vals, color=ROLE_COLORS[roles[c]], label=f"{roles[c]} {c}", lw=1.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    log_y(ax)
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
  finish_panels(fig, axs, len(names), title, path)


def plot_depth(table, shapes, candidates, path, *, title):
  """Fig. 3: time-averaged SNR_K vs layer index, one panel per layer type."""
  plt = pyplot()
  groups = {}
  for name, per in table.items():
    group, idx = slimoptax.depth_group(name)
    if idx is not None:
      groups.setdefault(group, []).append((idx, name, per))
  order = [g for g in GROUPS if g in groups]
  cols = 4
  rows = math.ceil(len(order) / cols)
  fig, axs = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
  for ax, group in zip(axs.flat, order):
    items = sorted(groups[group])
    roles = role_names(candidates, items[0][1], shapes[items[0][1]])
    for c, role in roles.items():
      ax.plot([i for i, _, _ in items], [per[c] for _, _, per in items], marker="o",
              color=ROLE_COLORS[role], label=f"{role} {c}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    log_y(ax)
    ax.set_title(f"{GROUPS[group][0]} ({group})", fontsize=8)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_xticks([i for i, _, _ in items])
  finish_panels(fig, axs, len(order), title, path)


# -----------------------------------------------------------------------------
# Tables.
# -----------------------------------------------------------------------------


def type_rows(depth_table, group_shapes, candidates, rules_depth, cutoff):
  """One row per layer type: depth-averaged SNR per axis, preference, rule, Table 3."""
  rules = dict(rules_depth.as_mapping())
  rows = []
  for group, (display, paper) in GROUPS.items():
    if group not in depth_table:
      continue
    per = depth_table[group]
    roles = role_names(candidates, group.replace("*", "0"), group_shapes[group])
    snrs = {roles[c]: v for c, v in per.items()}
    best_c = max((c for c in per if math.isfinite(per[c])), key=per.get, default=None)
    preferred = roles[best_c] if best_c is not None else "nan"
    rule = rule_name(rules.get(group), roles)
    # Vectors (norm scales) are never compressed by SlimAdam (§5): no preference to compare.
    vector = len(group_shapes[group]) < 2
    match = None if paper is None or vector else (preferred == paper.rstrip("*"))
    rows.append({"group": group, "layer_type": display, "snr": snrs, "preferred": preferred,
                 "rule": rule, "table3": paper, "preferred_matches_table3": match,
                 "rule_matches_table3": None if paper is None else rule == paper.rstrip("*")})
  return rows


def layer_rows(table, shapes, candidates, rules):
  mapping = rules.as_mapping()
  rows = []
  for name, per in table.items():
    roles = role_names(candidates, name, shapes[name])
    best_c = max((c for c in per if math.isfinite(per[c])), key=per.get, default=None)
    rows.append({"param": name, "shape": list(shapes[name]), "snr": {roles[c]: v for c, v in per.items()},
                 "preferred": roles[best_c] if best_c is not None else "nan",
                 "rule": rule_name(mapping.get(name), roles)})
  return rows


def summary_md(res):
  c = res["config"]
  lines = [
      f"Model: GPT, {c['n_layers']} layers, d {c['d_model']}, {c['n_heads']} heads, vocab "
      f"{res['model']['vocab_size']}, seq {res['model']['seq_len']}, tied embeddings, Mitchell init; "
      f"{res['num_params']:,} parameters. Adam (b2 0.95, wd 0.1) at lr {c['lr']:g}, {c['steps']} steps of "
      f"batch {c['batch_size']} (warmup {c['warmup']}, cosine to lr/10), SNR every {c['snr_every']} steps "
      f"(+ step 1): {res['num_measurements']} measurements. Final validation loss {res['final_val_loss']:.4f}.",
      "",
      "Time- and depth-averaged SNR per layer type; 'preferred' = axis with the highest SNR, 'rule' = "
      f"preferred axis if its SNR > {c['cutoff']:g} else none (vectors: never compressed):",
      "",
      "| layer type | SNR fan_in | SNR fan_out | SNR both | preferred | rule | Table 3 | preferred = Table 3 |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in res["type_rows"]:
    s = r["snr"]
    cells = [fmt(s["fan_in"]), fmt(s["fan_out"]), fmt(s["both"])] if "fan_in" in s else [
        f"all: {fmt(s['all'])}", "", ""]
    match = "n/a" if r["preferred_matches_table3"] is None else ("yes" if r["preferred_matches_table3"] else "**no**")
    if "all" in s:
      match = "n/a (vector)"
    lines.append(f"| {r['layer_type']} | " + " | ".join(cells) +
                 f" | {r['preferred']} | {r['rule']} | {r['table3'] or 'not in Table 3'} | {match} |")
  lines += ["", "Note: for the tied (vocab, d) table fan_in = token axis 0 and fan_out = embedding axis 1.", "",
            "Per layer (time-averaged SNR, rule from the per-layer table):", "",
            "| parameter | shape | SNR fan_in | SNR fan_out | SNR both | preferred | rule |",
            "|---|---|---|---|---|---|---|"]
  for r in res["layer_rows"]:
    s = r["snr"]
    cells = [fmt(s["fan_in"]), fmt(s["fan_out"]), fmt(s["both"])] if "fan_in" in s else [
        f"all: {fmt(s['all'])}", "", ""]
    lines.append(f"| {r['param']} | {tuple(r['shape'])} | " + " | ".join(cells) + f" | {r['preferred']} | {r['rule']} |")
  k = res["kept"]
  lines += ["", f"Second moments kept by the derived rules: per-layer {k['per_layer']:.2%}, depth-averaged "
            f"{k['depth_averaged']:.2%}, Table 3 preset ('slimadam') {k['slimadam_preset']:.2%} of Adam's.", "",
            "Claim checks:", ""]
  lines += report.check_lines(res["checks"]) + ["", report.wall_line(res)]
  return "\n".join(lines) + "\n"


def claim_checks(depth_table, group_shapes, candidates):
  """Qualitative claims of §3.1.1 on the depth-averaged SNRs."""
  d = depth_table
  role = lambda g: {v: d[g][c] for c, v in role_names(candidates, g.replace("*", "0"), group_shapes[g]).items()}
  q, k, v, o = (role(f"blocks/*/attn/{n}/kernel") for n in ("query", "key", "value", "out"))
  wte = role("wte/embedding")
  best = lambda s: max(x for x in s.values() if math.isfinite(x))
  checks = {
      "Tok.Embd/LM head: SNR along the token axis < 1 and < SNR along the embedding axis":
          (wte["fan_in"] < 1 and wte["fan_in"] < wte["fan_out"],
           f"token {fmt(wte['fan_in'])}, embedding {fmt(wte['fan_out'])}"),
      "Key & Query: SNR along fan_out (heads stacked) < SNR along fan_in":
          (q["fan_out"] < q["fan_in"] and k["fan_out"] < k["fan_in"],
           f"query fan_out {fmt(q['fan_out'])} vs fan_in {fmt(q['fan_in'])}; key {fmt(k['fan_out'])} vs "
           f"{fmt(k['fan_in'])}"),
      "Value & Proj: SNR along fan_out > SNR along fan_in":
          (v["fan_out"] > v["fan_in"] and o["fan_out"] > o["fan_in"],
           f"value {fmt(v['fan_out'])} vs {fmt(v['fan_in'])}; proj {fmt(o['fan_out'])} vs {fmt(o['fan_in'])}"),
      "Value & Proj more compressible than Key & Query (best-axis SNR)":
          (min(best(v), best(o)) > max(best(q), best(k)),
           f"value {fmt(best(v))}, proj {fmt(best(o))}, query {fmt(best(q))}, key {fmt(best(k))}"),
  }
  return {k_: (bool(ok), det) for k_, (ok, det) in checks.items()}


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  say = report.say

  tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=args.vocab_size, max_bytes=args.max_bytes)
  model_cfg, lm = model.tiny_gpt(args, tokenizer.vocab_size)
  say(f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens; model {model_cfg}")

  template = lm.init(args.seed)
  tracker = slimoptax.SNRTracker(template, every=args.snr_every, steps=(1,))
  hook_steps = [s for s in range(1, args.steps + 1) if tracker.should_measure(s)]
  (out / "train_log.jsonl").unlink(missing_ok=True)
  run = train_lm(
      lm, lambda sched: slimoptax.slim_adamw(sched, compress=None),  # plain AdamW (b2 0.95, wd 0.1)
      train_tokens=train_tokens, val_tokens=val_tokens, steps=args.steps, batch_size=args.batch_size,
      lr=args.lr, warmup=args.warmup, seed=args.seed, eval_every=args.eval_every,
      eval_batches=args.eval_batches, state_hook=tracker.record, state_hook_steps=hook_steps,
      log_path=out / "train_log.jsonl", progress=not args.no_progress)
  say(f"final validation loss {run['final_val_loss']:.4f} ({run['seconds_per_step'] * 1e3:.0f} ms/step)")

  table = tracker.time_average()
  depth_table = slimoptax.depth_average(table)
  group_shapes = {slimoptax.depth_group(n)[0]: s for n, s in tracker.shapes.items()}
  rules = slimoptax.derive_rules(table, args.cutoff, shapes=tracker.shapes)
  rules_depth = slimoptax.derive_rules(depth_table, args.cutoff, shapes=group_shapes)
  rules.to_json(str(out / "rules.json"))
  rules_depth.to_json(str(out / "rules_depth.json"))
  tracker.to_csv(str(out / "snr.csv"))

  mid = args.n_layers // 2
  panels = [g.replace("*", str(mid)) for g in GROUPS]
  panels = [p for p in panels if p in tracker.shapes]
  plot_trajectories(tracker, panels, out / "snr_trajectories.png",
                    title=f"SNR_K of Adam's second moments (block {mid} and non-block params), lr {args.lr:g}; "
                          "dashed: cutoff 1")
  plot_depth(table, tracker.shapes, tracker.candidates, out / "snr_depth.png",
             title=f"time-averaged SNR_K vs depth, Adam lr {args.lr:g}, {args.steps} steps")

  kept = lambda r: (lambda k: k[0] / k[1])(slimoptax.second_moments_kept(tracker.shapes, r))
  res = {
      "experiment": "snr_trends", "config": vars(args), "model": dataclasses.asdict(model_cfg),
      "num_params": run["num_params"], "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
      "final_val_loss": run["final_val_loss"], "seconds_per_step": run["seconds_per_step"],
      "num_measurements": len(hook_steps),
      "val_curve": [(r["step"], r["val_loss"]) for r in run["history"] if "val_loss" in r],
      "time_average": {n: {str(c): v for c, v in per.items()} for n, per in table.items()},
      "depth_average": {n: {str(c): v for c, v in per.items()} for n, per in depth_table.items()},
      "type_rows": type_rows(depth_table, group_shapes, tracker.candidates, rules_depth, args.cutoff),
      "layer_rows": layer_rows(table, tracker.shapes, tracker.candidates, rules),
      "rules": rules.as_mapping(), "rules_depth": rules_depth.as_mapping(),
      "kept": {"per_layer": kept(rules), "depth_averaged": kept(rules_depth),
               "slimadam_preset": kept(slimoptax.preset("slimadam"))},
      "checks": claim_checks(depth_table, group_shapes, tracker.candidates),
      "machine": report.machine(),
  }
  return report.finish(out, res, summary_md, t_start)


if __name__ == "__main__":
  main()
