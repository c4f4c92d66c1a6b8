"""Vocabulary size vs compressibility of the token dimension (Kalra et al. 2025, §4.1, Fig. 7, App. G).

The two-layer model ``lm_head(wte(tokens))`` (`experiments._lib.model.EmbedHeadLM`, no tying)
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
gradient clipping 1 (`experiments._lib.train.train_lm`'s default).

Outputs (in --out): vocab_snr.png (Fig. 7 + App. G), snr_trajectories.png,
results.json, summary.md, snr_v<V>.csv per vocabulary.

Usage::

  python -m experiments.vocab_snr            # full run (~7 min on 2 shared CPU cores, tokenizers cached)
  python -m experiments.vocab_snr --quick    # CI smoke test (< 1 min)
"""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
from flax import nnx

import slimoptax
from experiments._lib import data, model, report
from experiments._lib.plots import log_y, pyplot, save
from experiments._lib.stats import spearman
from experiments._lib.train import train_lm
from slimoptax._tree import named_leaves

# Axes of each parameter, by meaning (Flax layouts: Embed (vocab, d), Dense kernel (d, vocab)).
AXES = {"wte/embedding": {"token": (0,), "embed": (1,)}, "lm_head/kernel": {"token": (1,), "embed": (0,)}}
COMPRESSIONS = {
    "embed": "both layers averaged along the embedding axis (one v per token)",
    "token": "both layers averaged along the token axis (one v per embedding dim)",
}


def parse_args(argv=None):
  p = report.parser(__doc__, "vocab_snr", "2 vocabularies, few steps")
  p.add_argument("--vocab-sizes", default="256,512,1024,2048,4096")
  report.lm_arguments(p, max_bytes=4_000_000, d_model=32, seq_len=64, steps=600, warmup=60,
                      batch_size=16)
  p.add_argument("--lr", type=float, default=3e-2,
                 help="best of 3e-3/1e-2/3e-2 for V=1024 in a 400-step probe (short runs need a large lr)")
  report.lm_arguments(p, b2=0.999, weight_decay=1e-4, snr_every=10, eval_every=200, eval_batches=16,
                      seed=0)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    args.vocab_sizes, args.max_bytes, args.d_model = "256,512", 1_500_000, 16
    args.steps, args.warmup, args.snr_every, args.eval_every, args.eval_batches = 30, 5, 5, 30, 2
  return report.default_out(args, "vocab_snr")


def build_model(vocab_size, args):
  """EmbedHeadLM with the paper's init: wte ~ N(0, 1), head ~ N(0, 1/d)."""
  cfg = model.EmbedHeadConfig(vocab_size=vocab_size, d_model=args.d_model, seq_len=args.seq_len)
  lm = model.EmbedHeadLM(cfg, rngs=nnx.Rngs(args.seed))
  k_embd, k_head = jax.random.split(jax.random.key(args.seed))
  lm.wte.embedding[...] = jax.random.normal(k_embd, (vocab_size, args.d_model))
  lm.lm_head.kernel[...] = jax.random.normal(k_head, (args.d_model, vocab_size)) / math.sqrt(args.d_model)
  return lm


def compression_rules(kind):
  """Explicit integer axes for both layers (None: Adam)."""
  if kind == "adam":
    return None
  return slimoptax.Rules([("^" + re.escape(p) + "$", p, ax[kind]) for p, ax in AXES.items()], name=kind)


def token_stats(tokens, vocab_size):
  counts = np.bincount(np.asarray(tokens, np.int64), minlength=vocab_size)
  freq = np.sort(counts)[::-1] / counts.sum()
  return {"unseen_tokens": int((counts == 0).sum()),
          "tokens_seen_lt_10_times": int((counts < 10).sum()),
          "frac_mass_in_rarest_half": float(freq[vocab_size // 2:].sum())}


# -----------------------------------------------------------------------------
# Plots and summary.
# -----------------------------------------------------------------------------


def plot_main(res, path):
  plt = pyplot()
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
  save(fig, path, dpi=100)


def plot_trajectories(res, path):
  """App. G, Fig. 29: both layers, token and embedding axes, all vocabularies."""
  plt = pyplot()
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
  save(fig, path, dpi=100)


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
  lines += report.check_lines(res["checks"]) + ["", report.wall_line(res)]
  return "\n".join(lines) + "\n"


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
  out, t_start = report.start(args.out)
  say = report.say

  per_vocab = {}
  for vocab in [int(v) for v in args.vocab_sizes.split(",")]:
    t0 = time.perf_counter()
    tokenizer, train_tokens, val_tokens = data.prepare_data(vocab_size=vocab, max_bytes=args.max_bytes)
    V = tokenizer.vocab_size
    say(f"V={V}: {len(train_tokens):,} train / {len(val_tokens):,} val tokens (data {time.perf_counter() - t0:.0f}s)")
    template = nnx.state(build_model(V, args), nnx.Param)
    tracker = slimoptax.SNRTracker(template, every=args.snr_every, steps=(1,),
                                  candidates={p: list(ax.values()) for p, ax in AXES.items()})
    hook_steps = [s for s in range(1, args.steps + 1) if tracker.should_measure(s)]
    # The same SNRs over the tokens that occur in the training stream only: BPE vocabularies all
    # contain the 256-byte alphabet, most of which never occurs in (ASCII) Python source.
    seen = np.flatnonzero(np.bincount(np.asarray(train_tokens, np.int64), minlength=V) > 0)
    seen_snr = jax.jit(lambda w, h: {
        "wte/embedding": {"token": slimoptax.snr(w[seen], (0,)), "embed": slimoptax.snr(w[seen], (1,))},
        "lm_head/kernel": {"token": slimoptax.snr(h[:, seen], (1,)), "embed": slimoptax.snr(h[:, seen], (0,))}})
    seen_history = []

    def hook(step, state):
      tracker.record(step, state)
      nu = dict(named_leaves(slimoptax.find_second_moment(state, template)))
      seen_history.append(jax.device_get(seen_snr(nu["wte/embedding"], nu["lm_head/kernel"])))

    final, seconds = {}, {}
    for kind in ("adam", *COMPRESSIONS):
      rules = compression_rules(kind)
      run = train_lm(
          model.Functional(build_model(V, args)),
          lambda sched, rules=rules: slimoptax.slim_adamw(sched, b2=args.b2, weight_decay=args.weight_decay, compress=rules),
          train_tokens=train_tokens, val_tokens=val_tokens, steps=args.steps, batch_size=args.batch_size,
          lr=args.lr, warmup=args.warmup, seed=args.seed, eval_every=args.eval_every,
          eval_batches=args.eval_batches, progress=not args.no_progress,
          state_hook=hook if kind == "adam" else None,
          state_hook_steps=hook_steps if kind == "adam" else None)
      final[kind], seconds[kind] = run["final_val_loss"], run["wall_s"]
      say(f"  {kind:<6} val {run['final_val_loss']:.4f} ({run['wall_s']:.0f}s)")
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
         "machine": report.machine()}
  res["checks"] = claim_checks(res)
  plot_main(res, out / "vocab_snr.png")
  plot_trajectories(res, out / "snr_trajectories.png")
  return report.finish(out, res, summary_md, t_start)


if __name__ == "__main__":
  main()
