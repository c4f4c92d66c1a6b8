"""Vocabulary size vs compressibility of the token dimension (Kalra et al. 2025, §4.1, Fig. 7, App. G).

The two-layer model ``lm_head(wte(tokens))`` (`nanolm.EmbedHeadLM`, no tying)
is trained on the same corpus tokenized with byte-level BPE vocabularies of
increasing size (256 = raw bytes). Growing the vocabulary adds rarer tokens,
i.e. a heavier tail of the token distribution. For each vocabulary:

1. Adam, with `SNRTracker` measuring SNR_K of the second moments of the
   embedding table ``wte`` (vocab, d) and the head kernel ``lm_head`` (d, vocab)
   along the token axis (wte: 0, head: 1) and the embedding axis (wte: 1,
   head: 0);
2. Adam with second moments averaged along the embedding axis of both layers
   (one value per token, the SlimAdam choice) and along the token axis of both
   (one value per embedding dimension), given as explicit integer axes
   (`slimoptax.Rules`); ΔL = L(compressed) - L(Adam), as in Fig. 7 (right).

The paper's claims: SNR along the token axis decreases as the vocabulary
grows; compressing the token axis costs more at large vocabularies, while the
embedding axis stays compressible.

Setup as App. B.2 where it fits a CPU: init wte ~ N(0, 1), head ~ N(0, 1/d),
b1 0.9, b2 0.999, eps 1e-8, weight decay 1e-4, warmup + cosine decay to lr/10,
gradient clipping 1 (nanolm.train's default).

Outputs (in --out): vocab_snr.png (Fig. 7 + App. G), snr_trajectories.png,
results.json, summary.md, snr_v<V>.csv per vocabulary.

Usage::

  python experiments/vocab_snr.py            # full run (~7 min on 2 shared CPU cores, tokenizers cached)
  python experiments/vocab_snr.py --quick    # CI smoke test (< 1 min)
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
from flax import nnx

from slimoptax import analysis, labels, nanolm
from slimoptax.slim_adam import slim_adamw

# Axes of each parameter, by meaning (Flax layouts: Embed (vocab, d), Dense kernel (d, vocab)).
AXES = {"wte/embedding": {"token": (0,), "embed": (1,)}, "lm_head/kernel": {"token": (1,), "embed": (0,)}}
COMPRESSIONS = {
    "embed": "both layers averaged along the embedding axis (one v per token)",
    "token": "both layers averaged along the token axis (one v per embedding dim)",
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=None, help="output directory (default experiments/results/vocab_snr, "
                 "or experiments/results/vocab_snr/quick with --quick)")
  p.add_argument("--quick", action="store_true", help="CI smoke test: 2 vocabularies, few steps")
  p.add_argument("--vocab-sizes", default="256,512,1024,2048,4096")
  p.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus cap (bounds tokenizer training)")
  p.add_argument("--d-model", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--warmup", type=int, default=60)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-2,
                 help="best of 3e-3/1e-2/3e-2 for V=1024 in a 400-step probe (short runs need a large lr)")
  p.add_argument("--b2", type=float, default=0.999)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--snr-every", type=int, default=10)
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.vocab_sizes, args.max_bytes, args.d_model = "256,512", 1_500_000, 16
    args.steps, args.warmup, args.snr_every, args.eval_every, args.eval_batches = 30, 5, 5, 30, 2
  if args.out is None:
    args.out = "experiments/results/vocab_snr" + ("/quick" if args.quick else "")
  return args


def build_model(vocab_size, args):
  """EmbedHeadLM with the paper's init: wte ~ N(0, 1), head ~ N(0, 1/d)."""
  cfg = nanolm.EmbedHeadConfig(vocab_size=vocab_size, d_model=args.d_model, seq_len=args.seq_len)
  model = nanolm.EmbedHeadLM(cfg, rngs=nnx.Rngs(args.seed))
  k_embd, k_head = jax.random.split(jax.random.key(args.seed))
  model.wte.embedding[...] = jax.random.normal(k_embd, (vocab_size, args.d_model))
  model.lm_head.kernel[...] = jax.random.normal(k_head, (args.d_model, vocab_size)) / math.sqrt(args.d_model)
  return model


def compression_rules(kind):
  """Explicit integer axes for both layers (None: Adam)."""
  if kind == "adam":
    return None
  return labels.Rules([(labels.exact_pattern(p), p, ax[kind]) for p, ax in AXES.items()], name=kind)


def token_stats(tokens, vocab_size):
  counts = np.bincount(np.asarray(tokens, np.int64), minlength=vocab_size)
  freq = np.sort(counts)[::-1] / counts.sum()
  return {"unseen_tokens": int((counts == 0).sum()),
          "tokens_seen_lt_10_times": int((counts < 10).sum()),
          "frac_mass_in_rarest_half": float(freq[vocab_size // 2:].sum())}


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


def plot_main(res, path):
  plt = _plt()
  vocabs = [int(v) for v in res["per_vocab"]]
  per = res["per_vocab"]
  cmap = plt.get_cmap("viridis")
  fig, axs = plt.subplots(1, 3, figsize=(15, 4.2))
  # (left) SNR trajectory of the head along the token axis (Fig. 7 left).
  for i, v in enumerate(vocabs):
    s, x = zip(*per[str(v)]["trajectories"]["lm_head/kernel"]["token"])
    axs[0].plot(s, x, color=cmap(i / max(len(vocabs) - 1, 1)), label=f"V={v}")
  log_y(axs[0])
  axs[0].set_xlabel("step")
  axs[0].set_ylabel("SNR along the token axis")
  axs[0].set_title("LM head: SNR_token vs step", fontsize=10)
  axs[0].axhline(1.0, color="gray", ls="--", lw=0.8)
  axs[0].legend(fontsize=7)
  # (middle) time-averaged SNR vs vocab.
  styles = {("lm_head/kernel", "token"): ("tab:red", "-", "head, token axis"),
            ("wte/embedding", "token"): ("tab:red", "--", "embedding, token axis"),
            ("lm_head/kernel", "embed"): ("tab:blue", "-", "head, embedding axis"),
            ("wte/embedding", "embed"): ("tab:blue", "--", "embedding, embedding axis")}
  for (p, a), (color, ls, label) in styles.items():
    axs[1].plot(vocabs, [per[str(v)]["snr_time_avg"][p][a] for v in vocabs], color=color, ls=ls, marker="o",
                label=label)
  for p, ls, label in (("lm_head/kernel", "-", "head"), ("wte/embedding", "--", "embedding")):
    axs[1].plot(vocabs, [per[str(v)]["snr_seen_tokens_time_avg"][p]["token"] for v in vocabs], color="tab:orange",
                ls=ls, marker="s", ms=4, label=f"{label}, token axis, seen tokens only")
  axs[1].set_xscale("log", base=2)
  log_y(axs[1])
  axs[1].set_xlabel("vocabulary size")
  axs[1].set_ylabel("time-averaged SNR")
  axs[1].set_title("time-averaged SNR vs vocabulary size", fontsize=10)
  axs[1].axhline(1.0, color="gray", ls=":", lw=0.8)
  lo, hi = axs[1].get_ylim()
  axs[1].set_ylim(lo, hi * 20)  # room for the legend above the lines
  axs[1].legend(fontsize=6, ncol=2, loc="upper center")
  # (right) loss gap vs vocab (Fig. 7 right).
  for kind, color in (("embed", "tab:blue"), ("token", "tab:red")):
    axs[2].plot(vocabs, [per[str(v)]["delta_loss"][kind] for v in vocabs], color=color, marker="o",
                label=f"K = {kind} axis (both layers)")
  axs[2].axhline(0.0, color="gray", lw=0.8)
  axs[2].set_xscale("log", base=2)
  axs[2].set_xlabel("vocabulary size")
  axs[2].set_ylabel("ΔL = L(compressed) − L(Adam)")
  axs[2].set_title("final validation loss gap to Adam", fontsize=10)
  axs[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_trajectories(res, path):
  """App. G, Fig. 29: both layers, token and embedding axes, all vocabularies."""
  plt = _plt()
  vocabs = [int(v) for v in res["per_vocab"]]
  cmap = plt.get_cmap("viridis")
  fig, axs = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
  for row, p in enumerate(AXES):
    for col, a in enumerate(("token", "embed")):
      ax = axs[row, col]
      for i, v in enumerate(vocabs):
        s, x = zip(*res["per_vocab"][str(v)]["trajectories"][p][a])
        ax.plot(s, x, color=cmap(i / max(len(vocabs) - 1, 1)), label=f"V={v}")
      log_y(ax)
      ax.axhline(1.0, color="gray", ls="--", lw=0.8)
      ax.set_title(f"{p}: SNR along the {a} axis {AXES[p][a]}", fontsize=9)
      ax.legend(fontsize=6)
      if row == 1:
        ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_md(res):
  c = res["config"]
  lines = [
      f"Model: EmbedHeadLM (embedding + linear head, untied), d {c['d_model']}, seq {c['seq_len']}; Adam "
      f"(b2 {c['b2']}, wd {c['weight_decay']}) at lr {c['lr']:g}, {c['steps']} steps of batch {c['batch_size']} "
      f"(warmup {c['warmup']}, cosine to lr/10); corpus: first {c['max_bytes']:,} bytes of the Python stdlib "
      "source, one BPE tokenizer per vocabulary size (256 = bytes).", "",
      "| vocab | train tokens | never-seen tokens | seen < 10x | SNR head token | SNR embd token | "
      "SNR head embed | SNR embd embed | SNR head token (seen only) | SNR embd token (seen only) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for v, r in res["per_vocab"].items():
    s, ss, ts = r["snr_time_avg"], r["snr_seen_tokens_time_avg"], r["token_stats"]
    lines.append(
        f"| {v} | {r['train_tokens']:,} | {ts['unseen_tokens']} | {ts['tokens_seen_lt_10_times']} | "
        f"{s['lm_head/kernel']['token']:.3g} | {s['wte/embedding']['token']:.3g} | "
        f"{s['lm_head/kernel']['embed']:.3g} | {s['wte/embedding']['embed']:.3g} | "
        f"{ss['lm_head/kernel']['token']:.3g} | {ss['wte/embedding']['token']:.3g} |")
  lines += ["", "| vocab | L Adam | L embed-axis | L token-axis | ΔL embed-axis | ΔL token-axis |",
            "|---|---|---|---|---|---|"]
  for v, r in res["per_vocab"].items():
    f_, d = r["final_val_loss"], r["delta_loss"]
    lines.append(f"| {v} | {f_['adam']:.4f} | {f_['embed']:.4f} | {f_['token']:.4f} | {d['embed']:+.4f} | "
                 f"{d['token']:+.4f} |")
  lines += ["", "SNR: eq. 4 time average over the Adam run ('seen only': over the tokens that occur in the "
            "training stream). Token axis: wte axis 0, head axis 1; embedding axis: wte axis 1, head axis 0. "
            "ΔL = L(compressed) - L(Adam), final validation loss in nats per token (each vocabulary has its "
            "own tokenization, so L is comparable only within a row).", "",
            "Claim checks:", ""]
  for name, (ok, detail) in res["checks"].items():
    lines.append(f"- {name}: {'yes' if ok else 'no'} ({detail})")
  lines += ["", f"Wall time {res['wall_time_s'] / 60:.1f} min; machine: {res['machine']}."]
  return "\n".join(lines) + "\n"


def spearman(x, y):
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  return float(np.corrcoef(rx, ry)[0, 1])


def claim_checks(res):
  vocabs = [int(v) for v in res["per_vocab"]]
  per = res["per_vocab"]
  checks = {}
  for p, name in (("lm_head/kernel", "head"), ("wte/embedding", "embedding")):
    ys = [per[str(v)]["snr_time_avg"][p]["token"] for v in vocabs]
    rho = spearman(vocabs, ys)
    checks[f"{name}: SNR along the token axis decreases with vocabulary size"] = (
        rho < 0 and ys[-1] < ys[0],
        f"Spearman rho {rho:+.2f}; " + ", ".join(f"V={v}: {y:.3g}" for v, y in zip(vocabs, ys)))
    ys = [per[str(v)]["snr_seen_tokens_time_avg"][p]["token"] for v in vocabs]
    rho = spearman(vocabs, ys)
    checks[f"{name}: SNR along the token axis over seen tokens only decreases with vocabulary size"] = (
        rho < 0 and ys[-1] < ys[0],
        f"Spearman rho {rho:+.2f}; " + ", ".join(f"V={v}: {y:.3g}" for v, y in zip(vocabs, ys)))
  dt = [per[str(v)]["delta_loss"]["token"] for v in vocabs]
  de = [per[str(v)]["delta_loss"]["embed"] for v in vocabs]
  checks["token-axis compression hurts more at larger vocabulary (ΔL_token grows)"] = (
      spearman(vocabs, dt) > 0 and dt[-1] > dt[0],
      f"Spearman rho {spearman(vocabs, dt):+.2f}; " + ", ".join(f"V={v}: {d:+.4f}" for v, d in zip(vocabs, dt)))
  checks["at the largest vocabulary, token-axis compression hurts more than embedding-axis compression"] = (
      dt[-1] > de[-1], f"ΔL_token {dt[-1]:+.4f} vs ΔL_embed {de[-1]:+.4f} at V={vocabs[-1]}")
  return {k: (bool(ok), d) for k, (ok, d) in checks.items()}


# -----------------------------------------------------------------------------
# Main.
# -----------------------------------------------------------------------------


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  say = lambda *a: print(*a, flush=True)  # noqa: E731

  per_vocab = {}
  for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
    t0 = time.perf_counter()
    tokenizer, train_tokens, val_tokens = nanolm.prepare_data(vocab_size=vocab, max_bytes=args.max_bytes)
    V = tokenizer.vocab_size
    say(f"V={V}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens (data {time.perf_counter() - t0:.0f}s)")
    template = nnx.state(build_model(V, args), nnx.Param)
    tracker = analysis.SNRTracker(template, every=args.snr_every, steps=(1,),
                                  candidates={p: list(ax.values()) for p, ax in AXES.items()})
    hook_steps = [s for s in range(1, args.steps + 1) if tracker.should_measure(s)]
    # The same SNRs over the tokens that occur in the training stream only: BPE vocabularies all
    # contain the 256-byte alphabet, most of which never occurs in (ASCII) Python source.
    seen = np.flatnonzero(np.bincount(np.asarray(train_tokens, np.int64), minlength=V) > 0)
    seen_snr = jax.jit(lambda w, h: {
        "wte/embedding": {"token": analysis.snr(w[seen], (0,)), "embed": analysis.snr(w[seen], (1,))},
        "lm_head/kernel": {"token": analysis.snr(h[:, seen], (1,)), "embed": analysis.snr(h[:, seen], (0,))}})
    seen_history = []

    def hook(step, state):
      tracker.record(step, state)
      nu = dict(labels.named_leaves(analysis.find_second_moment(state, template)))
      seen_history.append(jax.device_get(seen_snr(nu["wte/embedding"], nu["lm_head/kernel"])))

    final, seconds = {}, {}
    for kind in ("adam", *COMPRESSIONS):
      rules = compression_rules(kind)
      run = nanolm.train(
          build_model(V, args),
          lambda sched, rules=rules: slim_adamw(sched, b2=args.b2, weight_decay=args.weight_decay, compress=rules),
          train_tokens=train_tokens, val_tokens=val_tokens, steps=args.steps, batch_size=args.batch_size,
          lr=args.lr, warmup=args.warmup, seed=args.seed, eval_every=args.eval_every,
          eval_batches=args.eval_batches, progress=not args.no_progress,
          state_hook=hook if kind == "adam" else None,
          state_hook_steps=hook_steps if kind == "adam" else None)
      final[kind], seconds[kind] = run["final_val_loss"], run["wall_time"]
      say(f"  {kind:<6} val {run['final_val_loss']:.4f} ({run['wall_time']:.0f}s)")
    tracker.to_csv(str(out / f"snr_v{V}.csv"))
    avg = tracker.time_average()
    name_of = {p: {ax: n for n, ax in axes.items()} for p, axes in AXES.items()}
    per_vocab[str(V)] = {
        "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
        "token_stats": token_stats(train_tokens, V),
        "snr_time_avg": {p: {name_of[p][c]: v for c, v in per.items()} for p, per in avg.items()},
        "snr_seen_tokens_time_avg": {p: {a: float(np.nanmean([float(h[p][a]) for h in seen_history]))
                                         for a in ("token", "embed")} for p in AXES},
        "num_seen_tokens": int(len(seen)),
        "trajectories": {p: {name_of[p][c]: pts for c, pts in per.items()} for p, per in tracker.history.items()},
        "final_val_loss": final, "delta_loss": {k: final[k] - final["adam"] for k in COMPRESSIONS},
        "run_wall_s": seconds,
    }
    s = per_vocab[str(V)]["snr_time_avg"]
    say(f"  SNR token axis: head {s['lm_head/kernel']['token']:.3g}, embd {s['wte/embedding']['token']:.3g}; "
        f"ΔL embed {per_vocab[str(V)]['delta_loss']['embed']:+.4f}, token {per_vocab[str(V)]['delta_loss']['token']:+.4f}")

  res = {"experiment": "vocab_snr", "config": vars(args), "per_vocab": per_vocab,
         "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} {jax.default_backend()}"}
  res["checks"] = claim_checks(res)
  plot_main(res, out / "vocab_snr.png")
  plot_trajectories(res, out / "snr_trajectories.png")
  res["wall_time_s"] = time.perf_counter() - t_start
  (out / "summary.md").write_text(summary_md(res))
  with open(out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  say(summary_md(res))
  return res


if __name__ == "__main__":
  main()
