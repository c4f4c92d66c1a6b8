"""Optimizer-model consistency: does finetuning with the pretraining optimizer forget less? (issue 12, item 4).

Liu, Wang, Zhang ("Optimizer-Model Consistency: Full Finetuning with the Same
Optimizer as Pretraining Forgets Less", seed 003) report that full finetuning
with the optimizer used in pretraining gives a better learning-forgetting
trade-off (less forgetting for the same or better new-task loss) than another
optimizer or LoRA (Figs. 1-3), that optimizers leave different activation
sparsity in the inputs of the linear layers (Figs. 4-5), and that Muon tends
to memorise by rote more than AdamW (synthetic task, Figs. 6-7). This script
measures the same three things at the main job's scale:

1. **Pretraining on corpus A** (the standard library's ``.py`` sources, as in
   the main job, without ``pydoc_data/topics.py``, which is corpus B): the main
   job's 4-layer d-96 GPT (vocabulary 1024, context 64, batch 16, 800 steps,
   warm-up 7.5%, cosine to lr/10, clipping at 1, weight decay 0.1), with
   ``attention="dense"`` (four d x d projections, so that LoRA and Muon see
   every attention matrix), trained with AdamW (``slim_adamw(compress=None)``),
   Muon (``slimoptax.muon``, Moonlight RMS scaling so that one rate serves the
   matrices and the AdamW fallback) and SignSGD with momentum 0.9 (Signum,
   ``slimoptax.scale_by_sign``; ``colmax``, `slimoptax.column_max_descent`, is
   available through ``--pretrain``). Each optimizer's learning rate is tuned on
   a factor-2 grid on the final A validation loss averaged over the seeds,
   extended while the best rate sits at an edge (as `experiments.training_length`).
   Every pretrained model is saved with orbax (`slimoptax.checkpoint.save_state`).
2. **Finetuning on corpus B** (English prose every Python has: the text of
   ``pydoc_data/topics.py``, split by topic, tokenized with A's tokenizer) from
   each tuned checkpoint with AdamW, Muon, the pretraining optimizer itself, and
   LoRA of ranks 8 and 32 (AdamW on the adapters, `experiments._lib.lora`), each
   at learning rates that are factors of the tuned pretraining rate (LoRA: of
   AdamW's), with a fresh optimizer state, linear warm-up over 10% of the
   longest run, then a constant rate; B and A validation losses are measured at
   each of ``--ft-steps``, so one run gives one (learning, forgetting) point per
   length. Forgetting = A loss after finetuning - A loss of the checkpoint.
3. **Pareto frontiers** (forgetting vs B loss) per pretraining optimizer, and a
   matched comparison: per seed, the B loss every method reaches (the worst of
   the methods' best B losses) and each method's least forgetting among its
   points at or below it; the table gives its mean over seeds, the gap to the
   pretraining optimizer's own full finetuning, and half the seed-to-seed range.
4. **Activation sparsity** (`slimoptax.diagnostics.record_input_sparsity`: the
   fraction of entries under a tenth of their token's RMS in the input of every
   linear layer) on a fixed A batch at initialisation, after pretraining and
   after finetuning.
5. **Memorization** (synthetic): random 8-token prompts whose 16-token
   continuation is the prompt shifted by one token id (clean), or, for half the
   training examples, that continuation with each token replaced by a random one
   with probability ``--mem-corrupt-p`` (corrupted); a 2-layer d-64 GPT trained
   with AdamW and with Muon (loss on the continuations only). Accuracy = the
   fraction of prompts whose first n greedily generated tokens equal the target,
   vs n, on the clean and corrupted training examples and on held-out prompts.

Every run is a JSON file under ``<out>/cells``, written atomically; rerunning the
same command skips them. ``--report`` writes ``summary.md``, ``results.json`` and
the figures (``pareto.png``, ``sparsity.png``, ``memorization.png``) from the
cells stored so far. One process per output folder (a lock file), and a grid
started with other settings is refused (``config.json``). Checkpoints go to
``runs/optimizer_consistency/checkpoints`` (git-ignored) for the default
``--out``, else to ``<out>/checkpoints``; a missing one is retrained.

Measured cost (the main model on this machine's 2 CPU cores, shared with two other runs, 20-step
timings: AdamW 0.19 s/step, Muon 0.27 s/step): the default grid is 18 pretraining runs of 800 steps plus
~6 from grid extensions (~72 min), 78 finetuning runs of 300 steps with 3 evaluations of A and B each
(~90 min) and 12 memorization runs of 1,500 steps on a 2-layer d-64 model (~5 min): ~3 h on 2 CPU
cores. ``--quick`` takes ~50 s of CPU (60-75 s of wall time with the cores shared).

Usage::

  python -m experiments.optimizer_consistency              # the full grid (~3 h on 2 CPU cores; resumable)
  python -m experiments.optimizer_consistency --report     # summary of the runs done so far
  python -m experiments.optimizer_consistency --quick      # CI smoke test (< 1 min)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import slimoptax
from experiments._lib import cells, data, ladder, lora, model, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import lm_warmup_cosine
from slimoptax.checkpoint import restore_state, save_state

PRETRAIN = ("adamw", "muon", "signsgd", "colmax")
LABELS = {"adamw": "AdamW", "muon": "Muon", "signsgd": "SignSGD (momentum 0.9)", "colmax": "column max descent"}
COLORS = {"adamw": "tab:blue", "muon": "tab:red", "signsgd": "tab:green", "colmax": "tab:purple"}
START_LRS = {"adamw": "1.5e-3,3e-3,6e-3", "muon": "1.5e-3,3e-3,6e-3", "signsgd": "1.5e-4,3e-4,6e-4",
             "colmax": "5e-3,1e-2,2e-2"}
COLMAX_ADAM_RATIO = 0.25  # column max descent's AdamW fallback (embeddings, norms) runs at this fraction of its rate
B_FILE = "pydoc_data/topics.py"
# Every argument that changes a run's numbers: a resumed grid must have been started with the same ones.
_RUN_KEYS = ("pretrain", "seeds", "adamw_lrs", "muon_lrs", "signsgd_lrs", "colmax_lrs", "max_extend", "vocab_size",
             "max_bytes", "n_layers", "d_model", "n_heads", "batch_size", "steps", "warmup_fraction",
             "eval_batches", "final_eval_batches", "ft_methods", "ft_lr_factors", "lora_lr_factors", "ft_steps",
             "ft_warmup_fraction", "b_val_fraction", "sparsity_threshold", "mem_optimizers", "mem_lrs",
             "mem_steps", "mem_train", "mem_heldout", "mem_vocab", "mem_prompt", "mem_length", "mem_corrupt_p",
             "mem_corrupt_frac", "mem_batch", "mem_n_layers", "mem_d_model")


def parse_args(argv=None):
  p = report.parser(__doc__, "optimizer_consistency", "1-layer d-32 model, a few dozen steps, smallest grid")
  p.add_argument("--pretrain", default="adamw,muon,signsgd", help="pretraining optimizers, AdamW first, from "
                 + ", ".join(PRETRAIN))
  p.add_argument("--seeds", default="0,1", help="seeds (initialisation, batch order, LoRA init)")
  for name in PRETRAIN:
    p.add_argument(f"--{name}-lrs", default=START_LRS[name], help=f"{name}'s starting learning-rate grid")
  p.add_argument("--max-extend", type=int, default=3, help="grid extensions per optimizer at most")
  report.lm_arguments(p, vocab_size=1024, max_bytes=None, n_layers=4, d_model=96, n_heads=4, batch_size=16,
                      steps=800, warmup_fraction=0.075, eval_batches=16, final_eval_batches=64)
  p.add_argument("--ft-methods", default="adamw,muon,lora8,lora32",
                 help="finetuning methods (optimizers of --pretrain or lora<rank>); the pretraining optimizer "
                 "itself is always added")
  p.add_argument("--ft-lr-factors", default="0.1,0.3,1", help="full finetuning rates / the tuned pretraining rate")
  p.add_argument("--lora-lr-factors", default="1,3,10", help="LoRA rates / AdamW's tuned pretraining rate")
  p.add_argument("--ft-steps", default="60,150,300", help="finetuning lengths measured (one run to the longest)")
  p.add_argument("--ft-warmup-fraction", type=float, default=0.1)
  p.add_argument("--b-val-fraction", type=float, default=0.1, help="fraction of the B topics held out")
  p.add_argument("--sparsity-threshold", type=float, default=0.1, help="near zero: |x| <= this x token RMS")
  p.add_argument("--mem-optimizers", default="adamw,muon")
  p.add_argument("--mem-lrs", default="1e-3,3e-3,1e-2", help="memorization task: rates tried per optimizer")
  report.lm_arguments(p, mem_steps=1500, mem_train=512, mem_heldout=256, mem_vocab=64, mem_prompt=8,
                      mem_length=16, mem_corrupt_p=0.5, mem_corrupt_frac=0.5, mem_batch=32, mem_n_layers=2,
                      mem_d_model=64)
  p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: see the module docstring)")
  p.add_argument("--report", action="store_true", help="only write the summary of the runs done so far")
  args = p.parse_args(argv)
  default_out = args.out is None
  if args.quick:
    args.n_layers, args.d_model, args.n_heads, args.vocab_size = 1, 32, 2, 512
    args.max_bytes, args.batch_size, args.steps, args.max_extend = 1_500_000, 8, 30, 1
    args.eval_batches, args.final_eval_batches, args.seeds, args.pretrain = 2, 4, "0", "adamw,muon"
    args.adamw_lrs, args.muon_lrs, args.signsgd_lrs = "3e-3,1e-2", "3e-3,1e-2", "1e-3,3e-3"
    args.ft_methods, args.ft_lr_factors, args.lora_lr_factors, args.ft_steps = "adamw,muon,lora8", "0.3", "3", "8,16"
    args.mem_steps, args.mem_train, args.mem_heldout, args.mem_lrs = 40, 64, 32, "3e-3"
    args.mem_n_layers, args.mem_d_model = 1, 32
  args.pretrain_list = [x for x in args.pretrain.split(",") if x]
  args.seed_list = [int(x) for x in args.seeds.split(",") if x]
  args.ft_step_list = sorted(int(x) for x in args.ft_steps.split(",") if x)
  args.mem_list = [x for x in args.mem_optimizers.split(",") if x]
  if args.pretrain_list[:1] != ["adamw"] or any(o not in PRETRAIN for o in args.pretrain_list):
    p.error(f"--pretrain: adamw first, then any of {', '.join(PRETRAIN[1:])}; got {args.pretrain!r}")
  methods = [x for x in args.ft_methods.split(",") if x]
  for m in methods:
    if not (m in args.pretrain_list or (m.startswith("lora") and m[4:].isdigit() and int(m[4:]) > 0)):
      p.error(f"--ft-methods: {m!r} is neither an optimizer of --pretrain nor lora<rank>")
  if any(o not in ("adamw", "muon") for o in args.mem_list) or not args.mem_list:
    p.error(f"--mem-optimizers: adamw and/or muon; got {args.mem_optimizers!r}")
  if not args.seed_list or min(args.seed_list) < 0 or not args.ft_step_list or min(args.ft_step_list) < 1:
    p.error("--seeds: non-negative integers; --ft-steps: positive integers")
  args.ft_method_list = methods
  if args.ckpt_dir is None:
    args.ckpt_dir = (f"runs/optimizer_consistency{'/quick' if args.quick else ''}/checkpoints" if default_out
                     else str(pathlib.Path(args.out) / "checkpoints"))
  return report.default_out(args, "optimizer_consistency")


def methods_for(args, pre: str) -> list[str]:
  """Finetuning methods of a checkpoint: ``--ft-methods`` plus the pretraining optimizer (first)."""
  return [pre] + [m for m in args.ft_method_list if m != pre]


# -----------------------------------------------------------------------------
# Corpora
# -----------------------------------------------------------------------------


def corpus_a(max_bytes: int | None, val_fraction: float = 0.02) -> tuple[list[str], list[str]]:
  """`data.stdlib_corpus` without corpus B's file (the same selection and split rules)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  selected, total = {}, 0
  for rel in data.stdlib_source_files(root=root):
    if rel == B_FILE:
      continue
    text = (root / rel).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
      continue
    size = len(text.encode("utf-8"))
    if max_bytes is not None and total + size > max_bytes and len(selected) >= 2:
      break
    selected[rel], total = text, total + size
  tr, va = data.split_train_val(list(selected), val_fraction=val_fraction)
  return [selected[r] for r in tr], [selected[r] for r in va]


def corpus_b(val_fraction: float) -> tuple[list[str], list[str], dict]:
  """The topics of ``pydoc_data/topics.py`` (English prose of the Python reference), split by topic name."""
  import pydoc_data.topics as topics
  keys = sorted(topics.topics)
  tr, va = data.split_train_val(keys, val_fraction=val_fraction)
  info = {"file": B_FILE, "file_bytes": os.path.getsize(topics.__file__), "topics": len(keys),
          "text_bytes": sum(len(topics.topics[k].encode("utf-8")) for k in keys), "val_topics": len(va)}
  return [topics.topics[k] for k in tr], [topics.topics[k] for k in va], info


# -----------------------------------------------------------------------------
# Optimizers (a learning rate of 1: the step multiplies the update by the rate)
# -----------------------------------------------------------------------------


def base_tx(name: str) -> optax.GradientTransformation:
  if name == "adamw":
    tx = slimoptax.slim_adamw(1.0, compress=None)
  elif name == "muon":
    tx = slimoptax.muon(1.0, weight_decay=0.1, rms_scale="moonlight", adam_weight_decay=0.1)
  elif name == "signsgd":
    tx = ladder.signum(1.0, beta=0.9, weight_decay=0.1, clip_norm=None)
  elif name == "colmax":
    tx = slimoptax.column_max_descent(1.0, momentum=0.9, weight_decay=0.1, adam_learning_rate=COLMAX_ADAM_RATIO,
                                      adam_weight_decay=0.1)
  else:
    raise ValueError(name)
  return optax.chain(optax.clip_by_global_norm(1.0), tx)


def lora_rank(method: str) -> int | None:
  return int(method[4:]) if method.startswith("lora") else None


# -----------------------------------------------------------------------------
# Sparsity
# -----------------------------------------------------------------------------

MODULE_TYPES = (("attn.qkv", ("q_proj", "k_proj", "v_proj")), ("attn.proj", ("o_proj",)), ("mlp.up", ("up",)),
                ("mlp.down", ("down",)))


def sparsity_of(module: nnx.Module, x: np.ndarray, threshold: float) -> dict:
  """Input sparsity of every linear layer on the batch ``x``: per layer, per module type and overall."""
  with slimoptax.diagnostics.record_input_sparsity(threshold):
    _, state = nnx.capture(module, nnx.Intermediate)(jnp.asarray(x))
  per = {k.replace("/base_module", ""): v for k, v in slimoptax.diagnostics.input_sparsity(state).items()}
  per = {k: v for k, v in per.items() if not k.endswith("/lora")}
  types = {}
  for tname, leaves in MODULE_TYPES:
    vals = [v for k, v in per.items() if k.rsplit("/", 1)[-1] in leaves]
    if vals:
      types[tname] = float(np.mean(vals))
  return {"layers": per, "types": types, "mean": float(np.mean(list(per.values()))) if per else float("nan")}


# -----------------------------------------------------------------------------
# The grid
# -----------------------------------------------------------------------------


class Grid:
  """Pretraining, finetuning and memorization runs, each stored as ``<out>/cells/<name>.json``."""

  def __init__(self, args, out: pathlib.Path):
    self.args, self.out = args, out
    self.cells = cells.CellStore(out)
    self.ckpt_dir = pathlib.Path(args.ckpt_dir).absolute()
    self._data, self._lm, self._steps, self._evals, self._loras = None, None, {}, {}, {}
    self._txs, self._params = {}, {}

  # -- data and model ----------------------------------------------------------------------------------------
  def data(self) -> dict:
    if self._data is None:
      a = self.args
      a_train, a_val = corpus_a(a.max_bytes)
      b_train, b_val, b_info = corpus_b(a.b_val_fraction)
      tok = data.train_tokenizer(a_train, a.vocab_size)
      enc = {k: data.encode_corpus(v, tok) for k, v in
             (("a_train", a_train), ("a_val", a_val), ("b_train", b_train), ("b_val", b_val))}
      b_info.update(train_tokens=len(enc["b_train"]), val_tokens=len(enc["b_val"]))
      a_info = {"files": len(a_train) + len(a_val), "bytes": sum(len(t.encode()) for t in a_train + a_val),
                "train_tokens": len(enc["a_train"]), "val_tokens": len(enc["a_val"])}
      self._data = {"tokenizer": tok, **enc, "a_info": a_info, "b_info": b_info}
    return self._data

  def lm(self) -> model.Functional:
    if self._lm is None:
      a = self.args
      cfg = model.gpt_config("tiny", vocab_size=self.data()["tokenizer"].vocab_size, n_layers=a.n_layers,
                             d_model=a.d_model, n_heads=a.n_heads, attention="dense")
      self._lm = model.Functional(cfg)
    return self._lm

  def template(self):
    """The parameters of ``model.init(0)`` (built once: shapes for restoring, the parameter count)."""
    if "template" not in self._params:
      self._params["template"] = self.lm().init(0)
    return self._params["template"]

  def val(self, which: str, count: int | None = None):
    return data.eval_batches(self.data()[f"{which}_val"], batch_size=self.args.batch_size, seq_len=self.lm().seq_len,
                             max_batches=count or self.args.final_eval_batches)

  def fixed_batch(self) -> np.ndarray:
    return self.val("a", 1)[0][0]

  def tx(self, name: str) -> optax.GradientTransformation:
    return self._txs.setdefault(name, base_tx(name))

  def eval_loss(self, loss_fn, params, frozen, batches) -> float:
    key = id(loss_fn)
    if key not in self._evals:
      self._evals[key] = (loss_fn, jax.jit(loss_fn))
    f = self._evals[key][1]
    return float(np.mean([float(f(params, frozen, x, y)) for x, y in batches]))

  # -- cells -------------------------------------------------------------------------------------------------
  def load(self, name: str) -> dict | None:
    return self.cells.load(name)

  def store(self, name: str, record: dict) -> None:
    self.cells.store(name, record)

  # -- pretraining -------------------------------------------------------------------------------------------
  @staticmethod
  def pre_name(opt: str, lr: float, seed: int) -> str:
    return f"pre_{opt}_lr{lr:g}_s{seed}"

  def _pretrain(self, opt: str, lr: float, seed: int) -> dict:
    """``--steps`` of ``opt`` on A from ``model.init(seed)`` (the finetuning runs' compiled step and loop)."""
    a, lm = self.args, self.lm()
    warmup = round(a.warmup_fraction * a.steps)
    factors = np.asarray(jax.vmap(lm_warmup_cosine(1.0, a.steps, warmup, 0.1))(np.arange(a.steps)))
    curve_at = {int(round(a.steps * k / 8)) for k in range(1, 8)}
    evals = {t: [("a_loss", self.val("a", a.eval_batches))] for t in curve_at}
    evals[a.steps] = [("a_loss", self.val("a")), ("b_loss", self.val("b"))]
    return self.loop(self._full_loss(), self.tx(opt), lm.init(seed), None, self.data()["a_train"], seed,
                     lambda t: lr * float(factors[t - 1]), a.steps, evals)

  def loop(self, loss_fn, tx, params, frozen, tokens, seed, lr_of, steps, evals) -> dict:
    """Trains ``params`` (``frozen``: the loss's constants) for ``steps``; evaluates ``evals[step]`` lists.

    Returns ``points`` (one dict per evaluated step: ``steps``, ``train_loss`` since the previous one, the
    named losses), ``params``, ``diverged``, ``wall_s`` and ``seconds_per_step`` (evaluations excluded).
    """
    t0 = time.perf_counter()
    step = self._step(loss_fn, tx)
    state = tx.init(params)
    batches = data.batch_iterator(tokens, batch_size=self.args.batch_size, seq_len=self.lm().seq_len, seed=seed)
    points, pending, diverged, eval_s, t_first = [], [], False, 0.0, None
    for t in range(1, steps + 1):
      x, y = next(batches)
      params, state, loss = step(params, frozen, state, x, y, lr_of(t))
      pending.append(loss)
      if t == 1:
        jax.block_until_ready(loss)
        t_first, eval_first = time.perf_counter(), eval_s
      if t in evals:
        te = time.perf_counter()
        tl = float(np.mean(jax.device_get(pending)))
        pending = []
        if not math.isfinite(tl):
          diverged = True
          break
        pt = {"steps": t, "train_loss": tl}
        pt.update({k: self.eval_loss(loss_fn, params, frozen, b) for k, b in evals[t]})
        points.append(pt)
        eval_s += time.perf_counter() - te
    t_end = time.perf_counter()
    sps = (t_end - t_first - (eval_s - eval_first)) / (steps - 1) if steps > 1 and t_first else float("nan")
    return {"points": points, "params": params, "diverged": diverged, "wall_s": t_end - t0,
            "seconds_per_step": sps}

  def _ckpt_path(self, name: str) -> pathlib.Path:
    return self.ckpt_dir / name

  def _save(self, name: str, params) -> None:
    save_state(ocp.StandardCheckpointer(), self._ckpt_path(name), {"params": params}, force=True)

  def pretrained(self, opt: str, lr: float, seed: int):
    """The checkpoint's parameters (restored with orbax; retrained and saved again if missing)."""
    name = self.pre_name(opt, lr, seed)
    if name in self._params:
      return self._params[name]
    path = self._ckpt_path(name)
    template = self.template()
    if not (path / "_METADATA").exists() and not (path / "_CHECKPOINT_METADATA").exists():
      report.say(f"  {name}: checkpoint {path} missing; retraining it")
      self._save(name, self._pretrain(opt, lr, seed)["params"])
    target = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)}
    return restore_state(ocp.StandardCheckpointer(), path, target)["params"]

  def pre_run(self, opt: str, lr: float, seed: int, *, dry: bool) -> dict | None:
    name = self.pre_name(opt, lr, seed)
    done = self.load(name)
    if done is not None or dry:
      return done
    a, lm = self.args, self.lm()
    report.say(f"  {name}: pretraining {a.steps} steps on A ...")
    r = self._pretrain(opt, lr, seed)
    final = r["points"][-1] if r["points"] and r["points"][-1]["steps"] == a.steps else {}
    a_loss, b_loss = final.get("a_loss", float("nan")), final.get("b_loss", float("nan"))
    diverged = bool(r["diverged"]) or not math.isfinite(a_loss)
    rec = {"kind": "pre", "optimizer": opt, "lr": lr, "seed": seed, "steps": a.steps, "a_loss": a_loss,
           "b_loss": b_loss, "diverged": diverged, "curve": r["points"], "wall_s": r["wall_s"],
           "seconds_per_step": r["seconds_per_step"], "num_params": model.count_params(r["params"]),
           "machine": report.machine()}
    if not diverged:
      self._save(name, r["params"])
      self._params[name] = r["params"]
      rec["checkpoint"] = str(self._ckpt_path(name))
      rec["sparsity"] = sparsity_of(nnx.merge(lm.graphdef, r["params"], lm.rest), self.fixed_batch(),
                                    a.sparsity_threshold)
    self.store(name, rec)
    report.say(f"  {name}: A val {a_loss:.4f}, B val {b_loss:.4f} ({r['wall_s']:.0f} s)")
    return rec

  def init_sparsity(self) -> dict:
    path = self.out / "sparsity_init.json"
    if not path.exists():
      lm = self.lm()
      recs = {s: sparsity_of(nnx.merge(lm.graphdef, lm.init(s), lm.rest), self.fixed_batch(),
                             self.args.sparsity_threshold) for s in self.args.seed_list}
      path.write_text(json.dumps({str(s): v for s, v in recs.items()}, indent=1))
    return json.loads(path.read_text())

  def tune(self, opt: str, *, dry: bool) -> tuple[float | None, dict]:
    """The optimizer's best rate (lowest A loss averaged over the seeds) and every rate tried."""
    return cells.tune_lr(lambda lr, s: self.pre_run(opt, lr, s, dry=dry),
                         report.floats(getattr(self.args, f"{opt}_lrs")), self.args.seed_list,
                         score=lambda r: math.inf if r["diverged"] else r["a_loss"],
                         max_extend=self.args.max_extend, what=opt)

  # -- finetuning --------------------------------------------------------------------------------------------
  def _full_loss(self):
    if "full" not in self._loras:
      lm = self.lm()
      self._loras["full"] = lambda p, frozen, x, y: lm.loss(p, x, y)
    return self._loras["full"]

  def _lora_parts(self, params, rank: int, seed: int):
    """``(loss_fn, adapters, frozen, merge)`` of the checkpoint wrapped in rank-``rank`` LoRA."""
    lm = self.lm()
    module = lora.with_lora(nnx.merge(lm.graphdef, params, lm.rest), rank, rngs=nnx.Rngs(1000 + seed))
    graphdef, adapters, frozen, rest = nnx.split(module, nnx.LoRAParam, nnx.Param, ...)
    key = f"lora{rank}"
    if key not in self._loras:  # one graph per rank: the loss (and its compiled step) serves every checkpoint
      self._loras[key] = (lambda p, fr, x, y: model.cross_entropy_loss(nnx.merge(graphdef, p, fr, rest)(x), y),
                          graphdef, rest)
    loss_fn, graphdef, rest = self._loras[key]
    return loss_fn, nnx.as_pure(adapters), nnx.as_pure(frozen), lambda p, fr: nnx.merge(graphdef, p, fr, rest)

  def _step(self, loss_fn, tx):
    key = (id(loss_fn), id(tx))
    if key not in self._steps:
      @jax.jit
      def step(p, frozen, s, x, y, lr):
        loss, g = jax.value_and_grad(loss_fn)(p, frozen, x, y)
        u, s = tx.update(g, s, p)
        return jax.tree.map(lambda w, d: w + lr * d, p, u), s, loss
      self._steps[key] = (loss_fn, tx, step)
    return self._steps[key][2]

  @staticmethod
  def ft_name(pre: str, seed: int, method: str, lr: float) -> str:
    return f"ft_{pre}_s{seed}_{method}_lr{lr:g}"

  def ft_run(self, pre: str, pre_lr: float, pre_rec: dict, seed: int, method: str, lr: float, *,
             dry: bool) -> dict | None:
    name = self.ft_name(pre, seed, method, lr)
    done = self.load(name)
    if done is not None or dry:
      return done
    a, lm = self.args, self.lm()
    t0 = time.perf_counter()
    params = self.pretrained(pre, pre_lr, seed)
    rank = lora_rank(method)
    if rank is None:
      loss_fn, p, frozen, tx = self._full_loss(), params, None, self.tx(method)
      merge = lambda q, fr: nnx.merge(lm.graphdef, q, lm.rest)  # noqa: E731
    else:
      loss_fn, p, frozen, merge = self._lora_parts(params, rank, seed)
      tx = self.tx("adamw")
    t_max = a.ft_step_list[-1]
    warmup = max(round(a.ft_warmup_fraction * t_max), 1)
    ev = [("a_loss", self.val("a")), ("b_loss", self.val("b"))]
    report.say(f"  {name}: finetuning {t_max} steps on B ...")
    r = self.loop(loss_fn, tx, p, frozen, self.data()["b_train"], 10_000 + seed,
                  lambda t: lr * min(1.0, t / warmup), t_max, {t: ev for t in a.ft_step_list})
    p, diverged = r["params"], r["diverged"]
    points = [{**pt, "forgetting": pt["a_loss"] - pre_rec["a_loss"], "learning": pre_rec["b_loss"] - pt["b_loss"]}
              for pt in r["points"]]
    rec = {"kind": "ft", "pretrain": pre, "pretrain_lr": pre_lr, "seed": seed, "method": method, "lr": lr,
           "warmup": warmup, "points": points, "diverged": diverged, "wall_s": time.perf_counter() - t0,
           "seconds_per_step": r["seconds_per_step"], "machine": report.machine()}
    if not diverged:
      rec["sparsity"] = sparsity_of(merge(p, frozen), self.fixed_batch(), a.sparsity_threshold)
    self.store(name, rec)
    last = points[-1] if points else {}
    report.say(f"  {name}: B {last.get('b_loss', float('nan')):.4f}, forgetting "
               f"{last.get('forgetting', float('nan')):+.4f} ({rec['wall_s']:.0f} s)")
    return rec

  def ft_lrs(self, method: str, tuned: dict) -> list[float]:
    if lora_rank(method) is not None:
      return [tuned["adamw"] * f for f in report.floats(self.args.lora_lr_factors)]
    return [tuned[method] * f for f in report.floats(self.args.ft_lr_factors)]

  # -- memorization ------------------------------------------------------------------------------------------
  def mem_data(self, seed: int) -> dict:
    """Prompts, clean / corrupted continuations (train) and held-out prompts; the same task for every optimizer."""
    a = self.args
    rng = np.random.default_rng(777 + seed)
    n, v, pl, ll = a.mem_train, a.mem_vocab, a.mem_prompt, a.mem_length

    def clean(prompts):
      idx = np.arange(ll) % pl
      return (prompts[:, idx] + 1) % v

    prompts = rng.integers(0, v, (n + a.mem_heldout, pl))
    cont = clean(prompts)
    corrupted = np.zeros(n + a.mem_heldout, bool)
    corrupted[rng.permutation(n)[: round(a.mem_corrupt_frac * n)]] = True
    swap = (rng.random(cont.shape) < a.mem_corrupt_p) & corrupted[:, None]
    cont = np.where(swap, rng.integers(0, v, cont.shape), cont)
    seqs = np.concatenate([prompts, cont], axis=1).astype(np.int32)
    return {"train": seqs[:n], "corrupted": corrupted[:n], "heldout": seqs[n:]}

  def mem_model(self):
    if "mem" not in self._loras:
      a = self.args
      cfg = model.gpt_config("tiny", vocab_size=a.mem_vocab, seq_len=a.mem_prompt + a.mem_length - 1,
                             n_layers=a.mem_n_layers, d_model=a.mem_d_model, n_heads=4 if a.mem_d_model >= 64 else 2,
                             attention="dense")
      lm = model.Functional(cfg)
      pl = a.mem_prompt

      def loss_fn(p, frozen, x, y):
        logp = jax.nn.log_softmax(lm.logits(p, x).astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return nll[:, pl - 1:].mean()  # the continuation's tokens only

      @jax.jit
      def generate(p, prompts):
        """Greedy continuation of the prompts: ``mem_length`` tokens (one compiled loop body)."""
        buf = jnp.zeros((prompts.shape[0], pl + a.mem_length), jnp.int32).at[:, :pl].set(prompts)

        def body(t, buf):
          logits = lm.logits(p, buf[:, :-1])
          nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pl - 1 + t, axis=1, keepdims=False), axis=-1)
          return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), pl + t, axis=1)

        return jax.lax.fori_loop(0, a.mem_length, body, buf)[:, pl:]

      self._loras["mem"] = (lm, loss_fn, generate)
    return self._loras["mem"]

  def mem_run(self, opt: str, lr: float, seed: int, *, dry: bool) -> dict | None:
    name = f"mem_{opt}_lr{lr:g}_s{seed}"
    done = self.load(name)
    if done is not None or dry:
      return done
    a = self.args
    t0 = time.perf_counter()
    lm, loss_fn, generate = self.mem_model()
    d = self.mem_data(seed)
    tx = self._txs.setdefault(f"mem_{opt}", base_tx(opt))
    step = self._step(loss_fn, tx)
    p = lm.init(seed)
    state = tx.init(p)
    warmup = max(round(0.05 * a.mem_steps), 1)
    factors = np.asarray(jax.vmap(lm_warmup_cosine(1.0, a.mem_steps, warmup, 0.1))(np.arange(a.mem_steps)))
    rng = np.random.default_rng(seed)
    losses = []
    for t in range(1, a.mem_steps + 1):
      rows = d["train"][rng.integers(0, len(d["train"]), a.mem_batch)]
      p, state, loss = step(p, None, state, rows[:, :-1], rows[:, 1:], lr * float(factors[t - 1]))
      losses.append(loss)
    losses = np.asarray(jax.device_get(losses))

    def acc(seqs):
      gen = np.asarray(generate(p, jnp.asarray(seqs[:, : a.mem_prompt])))
      match = np.cumprod(gen == seqs[:, a.mem_prompt:], axis=1)
      return [float(v) for v in match.mean(axis=0)] if len(seqs) else []

    c = d["corrupted"]
    rec = {"kind": "mem", "optimizer": opt, "lr": lr, "seed": seed, "steps": a.mem_steps,
           "final_train_loss": float(np.mean(losses[-max(a.mem_steps // 20, 1):])),
           "diverged": not bool(np.isfinite(losses).all()),
           "accuracy": {"clean": acc(d["train"][~c]), "corrupted": acc(d["train"][c]), "heldout": acc(d["heldout"])},
           "wall_s": time.perf_counter() - t0, "machine": report.machine()}
    self.store(name, rec)
    report.say(f"  {name}: train loss {rec['final_train_loss']:.3f}, full-length accuracy clean "
               f"{rec['accuracy']['clean'][-1]:.2f} corrupted {rec['accuracy']['corrupted'][-1]:.2f} held-out "
               f"{rec['accuracy']['heldout'][-1]:.2f} ({rec['wall_s']:.0f} s)")
    return rec

  # -- the whole grid ----------------------------------------------------------------------------------------
  def walk(self, *, dry: bool) -> dict:
    a = self.args
    tuned, tuning, ft, mem = {}, {}, {}, {}
    for opt in a.pretrain_list:
      tuned[opt], tuning[opt] = self.tune(opt, dry=dry)
      if not dry:
        write_report(self, self.walk(dry=True), figures=False)
    if all(tuned[o] is not None for o in a.pretrain_list):
      for seed in a.seed_list:
        for pre in a.pretrain_list:
          pre_rec = tuning[pre][tuned[pre]][seed]
          if pre_rec is None or pre_rec["diverged"]:
            continue
          for method in methods_for(a, pre):
            for lr in self.ft_lrs(method, tuned):
              ft[(pre, seed, method, lr)] = self.ft_run(pre, tuned[pre], pre_rec, seed, method, lr, dry=dry)
          if not dry:
            write_report(self, self.walk(dry=True), figures=False)
    for opt in a.mem_list:
      for lr in report.floats(a.mem_lrs):
        for seed in a.seed_list:
          mem[(opt, lr, seed)] = self.mem_run(opt, lr, seed, dry=dry)
    return {"tuned": tuned, "tuning": tuning, "ft": ft, "mem": mem}


# -----------------------------------------------------------------------------
# Analysis
# -----------------------------------------------------------------------------


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The points not dominated in (B loss, forgetting), both lower-is-better, sorted by B loss."""
  front, best_f = [], math.inf
  for b, f in sorted(p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])):
    if f < best_f:
      front.append((b, f))
      best_f = f
  return front


def _spread(vals: list[float]) -> dict:
  vals = [v for v in vals if math.isfinite(v)]
  if not vals:
    return {"mean": float("nan"), "half_range": float("nan"), "n": 0}
  return {"mean": float(np.mean(vals)), "half_range": float((max(vals) - min(vals)) / 2), "n": len(vals)}


def _matched(pre: str, methods: list[str], per_seed_pts: dict, seeds: list[int]) -> dict:
  """Per seed, the B loss every one of ``methods`` reaches, and each one's least forgetting at or below it."""
  matched = {m: {"forgetting": [], "gap": [], "best_b": []} for m in methods}
  levels = []
  for s in seeds:
    pts = per_seed_pts[s]
    if any(not pareto(pts[m]) for m in methods):
      continue
    level = max(min(b for b, _ in pareto(pts[m])) for m in methods)
    f_at = {m: min(f for b, f in pareto(pts[m]) if b <= level + 1e-9) for m in methods}
    for m in methods:
      matched[m]["forgetting"].append(f_at[m])
      matched[m]["gap"].append(f_at[m] - f_at[pre])
      matched[m]["best_b"].append(min(b for b, _ in pts[m]))
    levels.append(level)
  return {"level": _spread(levels), **{m: {k: _spread(v) for k, v in e.items()} for m, e in matched.items()}}


def analyse(grid: Grid, state: dict) -> dict:
  a = grid.args
  out = {"pretrain": {}, "points": {}, "matched": {}, "sparsity": {}, "memorization": {}}
  for pre in a.pretrain_list:
    best = state["tuned"].get(pre)
    if best is None:
      continue
    recs = [state["tuning"][pre][best][s] for s in a.seed_list]
    out["pretrain"][pre] = {"lr": best, "a_loss": _spread([r["a_loss"] for r in recs]),
                            "b_loss": _spread([r["b_loss"] for r in recs])}
    methods = methods_for(a, pre)
    per_seed_pts = {s: {m: [] for m in methods} for s in a.seed_list}
    mean_pts = {}
    for (p, s, m, lr), r in state["ft"].items():
      if p != pre or r is None:
        continue
      for pt in r["points"]:
        per_seed_pts[s][m].append((pt["b_loss"], pt["forgetting"]))
        mean_pts.setdefault((m, lr, pt["steps"]), []).append((pt["b_loss"], pt["forgetting"]))
    out["points"][pre] = {m: [{"lr": lr, "steps": st, "b_loss": float(np.mean([v[0] for v in vs])),
                               "forgetting": float(np.mean([v[1] for v in vs])), "seeds": len(vs)}
                              for (mm, lr, st), vs in sorted(mean_pts.items()) if mm == m] for m in methods}
    # Matched learning: per seed, the B loss every method reaches; each method's least forgetting there.
    # Once over every method (LoRA's reach sets the level) and once over full finetuning only.
    out["matched"][pre] = _matched(pre, methods, per_seed_pts, a.seed_list)
    out.setdefault("matched_full", {})[pre] = _matched(
        pre, [m for m in methods if lora_rank(m) is None], per_seed_pts, a.seed_list)
    sp = {"pretrained": _spread([r["sparsity"]["mean"] for r in recs if r.get("sparsity")]),
          "types": {t: _spread([r["sparsity"]["types"].get(t, float("nan")) for r in recs if r.get("sparsity")])
                    for t, _ in MODULE_TYPES}, "finetuned": {}}
    for m in methods:
      vals = [r["sparsity"]["mean"] for (p, s, mm, lr), r in state["ft"].items()
              if p == pre and mm == m and r is not None and r.get("sparsity")]
      sp["finetuned"][m] = _spread(vals)
    out["sparsity"][pre] = sp
  for (opt, lr, _seed), r in state["mem"].items():
    if r is None:
      continue
    e = out["memorization"].setdefault(opt, {}).setdefault(f"{lr:g}", {"loss": [], "acc": {}})
    e["loss"].append(r["final_train_loss"])
    for k, v in r["accuracy"].items():
      e["acc"].setdefault(k, []).append(v)
  for opt, per in out["memorization"].items():
    for e in per.values():
      raw = e.pop("acc")
      e["train_loss"] = _spread(e.pop("loss"))
      e["acc"] = {k: [float(x) for x in np.mean(v, axis=0)] for k, v in raw.items() if v and v[0]}
      e["acc_half_range"] = {k: [float(x) for x in (np.max(v, axis=0) - np.min(v, axis=0)) / 2]
                             for k, v in raw.items() if v and v[0]}
    best = min(per, key=lambda lr: per[lr]["train_loss"]["mean"] if math.isfinite(per[lr]["train_loss"]["mean"])
               else math.inf)
    out["memorization"][opt] = {"lrs": per, "best_lr": best}
  return out


# -----------------------------------------------------------------------------
# Summary: results.json, summary.md, figures
# -----------------------------------------------------------------------------


def write_report(grid: Grid, state: dict, *, figures: bool = True) -> None:
  a, out = grid.args, grid.out
  res_an = analyse(grid, state)
  all_recs = [r for per in state["tuning"].values() for s in per.values() for r in s.values()]
  all_recs += list(state["ft"].values()) + list(state["mem"].values())
  done = [r for r in all_recs if r is not None]
  complete = all(v is not None for v in state["tuned"].values()) and bool(state["ft"]) \
      and all(r is not None for r in all_recs)
  d = grid.data()
  cfg = grid.lm().config
  inv = []
  if (out / "invocations.jsonl").exists():
    inv = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines() if line.strip()]
  res = {"experiment": "optimizer_consistency", "complete": complete, "runs_done": len(done),
         "runs_known": len(all_recs), "config": {k: getattr(a, k) for k in _RUN_KEYS},
         "model": {**dataclasses.asdict(cfg), "num_params": model.count_params(grid.template())},
         "corpus_a": d["a_info"], "corpus_b": d["b_info"], "tokenizer": repr(d["tokenizer"]),
         "tuned_lr": state["tuned"],
         "tuning": {o: {f"{lr:g}": {str(s): (None if r is None else r["a_loss"]) for s, r in per.items()}
                        for lr, per in t.items()} for o, t in state["tuning"].items()},
         **res_an, "sparsity_init": grid.init_sparsity(),
         "wall_s_of_runs": float(sum(r["wall_s"] for r in done)), "invocations": inv, "machine": report.machine()}
  with open(out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  (out / "summary.md").write_text(summary_md(res, a))
  if not figures:  # the runs' intermediate reports: the figures are drawn at the end and by --report
    return
  plot_pareto(res, a, out / "pareto.png")
  plot_sparsity(res, a, out / "sparsity.png")
  plot_memorization(res, a, out / "memorization.png")


def _pm(e: dict, fmt: str = "{:+.4f}") -> str:
  if not e or e.get("n", 0) == 0:
    return "—"
  return f"{fmt.format(e['mean'])} ± {e['half_range']:.4f}"


def summary_md(res: dict, a) -> str:
  m, ca, cb = res["model"], res["corpus_a"], res["corpus_b"]
  lines = [f"# Optimizer-model consistency ({'complete' if res['complete'] else 'in progress'}: {res['runs_done']} "
           f"of {res['runs_known']} runs known so far)", "",
           f"- model: GPT, {m['n_layers']} layers, d {m['d_model']}, {m['n_heads']} heads, dense attention, vocab "
           f"{m['vocab_size']}, context {m['seq_len']}, {m['num_params']:,} parameters; {res['tokenizer']}",
           f"- corpus A (pretraining): the standard library's .py sources without {cb['file']}: {ca['files']} files, "
           f"{ca['bytes']:,} bytes, {ca['train_tokens']:,} train / {ca['val_tokens']:,} validation tokens",
           f"- corpus B (finetuning): the prose of {cb['file']} ({cb['file_bytes']:,} bytes on disk, "
           f"{cb['text_bytes']:,} bytes of text in {cb['topics']} topics; {cb['val_topics']} topics held out), "
           f"A's tokenizer: {cb['train_tokens']:,} train / {cb['val_tokens']:,} validation tokens",
           f"- pretraining: {a.steps} steps of {a.batch_size} x {m['seq_len']} tokens, warm-up "
           f"{a.warmup_fraction:.1%}, cosine to lr/10, clip 1, weight decay 0.1; seeds {a.seeds}",
           f"- finetuning: fresh optimizer state, warm-up {a.ft_warmup_fraction:.0%} of {a.ft_step_list[-1]} steps then "
           f"a constant rate, measured at {a.ft_steps} steps; full finetuning at {a.ft_lr_factors} x the method's "
           f"tuned pretraining rate, LoRA (AdamW on the adapters) at {a.lora_lr_factors} x AdamW's", "",
           "Pretraining learning-rate tuning (final A validation loss, mean over seeds (each seed)):", ""]
  for opt, per in res["tuning"].items():
    cells = []
    for lr, vals in sorted(per.items(), key=lambda kv: float(kv[0])):
      vs = list(vals.values())
      cells.append(f"{lr}: " + ("—" if any(v is None for v in vs) else
                                f"{np.mean(vs):.4f} (" + ", ".join(f"{v:.3f}" for v in vs) + ")"))
    best = res["tuned_lr"].get(opt)
    edge = ""
    if best is not None and best in (min(map(float, per)), max(map(float, per))):
      edge = " (at an edge of the grid after the allowed extensions)"
    lines.append(f"- {LABELS[opt]}: {'; '.join(cells)}; best {'—' if best is None else f'{best:g}'}{edge}")
  if res["pretrain"]:
    lines += ["", "| pretraining optimizer | lr | A val loss | B val loss (before finetuning) |", "|---|---|---|---|"]
    for opt, e in res["pretrain"].items():
      lines.append(f"| {LABELS[opt]} | {e['lr']:g} | {_pm(e['a_loss'], '{:.4f}')} | {_pm(e['b_loss'], '{:.4f}')} |")
  for pre, mt in res["matched"].items():
    full = res.get("matched_full", {}).get(pre, {})
    lines += ["", f"Finetuning the {LABELS[pre]} checkpoint. Matched learning: B loss reached by every method "
              f"{_pm(mt['level'], '{:.4f}')} (per seed: the worst of the methods' best B losses); least forgetting "
              "(rise of A loss) at or below it, its difference to finetuning with the pretraining optimizer "
              "(negative: forgets less), and each method's best B loss; then the same over full finetuning only "
              f"(level {_pm(full.get('level'), '{:.4f}')}); mean over seeds ± half the seed range:", "",
              "| finetuning method | forgetting at matched B loss | minus same-optimizer | best B loss | "
              "full finetuning only: forgetting | minus same-optimizer |", "|---|---|---|---|---|---|"]
    for meth in methods_for(a, pre):
      e, f = mt.get(meth, {}), full.get(meth, {})
      tag = " (same as pretraining)" if meth == pre else ""
      lines.append(f"| {meth}{tag} | {_pm(e.get('forgetting'))} | {_pm(e.get('gap'))} | "
                   f"{_pm(e.get('best_b'), '{:.4f}')} | {_pm(f.get('forgetting'))} | {_pm(f.get('gap'))} |")
  if res["sparsity"]:
    init = [v["mean"] for v in res["sparsity_init"].values()]
    lines += ["", f"Input sparsity of the linear layers (fraction of entries with |x| <= {a.sparsity_threshold} x "
              f"the token's RMS, on a fixed A validation batch; at initialisation {np.mean(init):.3f}), mean over "
              "layers and seeds ± half the seed range:", ""]
    types = [t for t, _ in MODULE_TYPES]
    lines += ["| pretraining optimizer | after pretraining | " + " | ".join(types)
              + " | after finetuning, per method (mean over its rates) |",
              "|---|---|" + "---|" * len(types) + "---|"]
    for pre, sp in res["sparsity"].items():
      ft = "; ".join(f"{mm} {_pm(v, '{:.3f}')}" for mm, v in sp["finetuned"].items())
      lines.append(f"| {LABELS[pre]} | {_pm(sp['pretrained'], '{:.3f}')} | "
                   + " | ".join(_pm(sp["types"][t], "{:.3f}") for t in types) + f" | {ft} |")
  if res["memorization"]:
    lines += ["", f"Memorization task: {a.mem_train} training prompts of {a.mem_prompt} random tokens (vocab "
              f"{a.mem_vocab}) with {a.mem_length}-token continuations (clean: the prompt shifted by one id; "
              f"{a.mem_corrupt_frac:.0%} corrupted: each token replaced with probability {a.mem_corrupt_p}), "
              f"{a.mem_heldout} held-out clean prompts, {a.mem_steps} steps of {a.mem_batch}; accuracy = exact "
              "match of the first n greedy tokens, at the rate with the lowest final training loss (mean over seeds):",
              "", "| optimizer | lr | train loss | " + " | ".join(
                  f"{k} n={n}" for k in ("clean", "corrupted", "heldout") for n in _mem_ns(a)) + " |",
              "|---|---|---|" + "---|" * (3 * len(_mem_ns(a)))]
    for opt, e in res["memorization"].items():
      per = e["lrs"][e["best_lr"]]
      cells = [f"{per['acc'][k][n - 1]:.3f}" if per["acc"].get(k) else "—"
               for k in ("clean", "corrupted", "heldout") for n in _mem_ns(a)]
      lines.append(f"| {LABELS[opt]} | {e['best_lr']} | {_pm(per['train_loss'], '{:.4f}')} | " + " | ".join(cells)
                   + " |")
  lines += ["", "Commands that trained the stored runs (and their wall time):", ""]
  lines += [f"- `{i['command']}` ({i['wall_s'] / 60:.1f} min)" for i in res["invocations"]] or ["- (none recorded)"]
  lines += ["", f"Training time of the stored runs: {res['wall_s_of_runs'] / 60:.1f} min; machine: {res['machine']}."]
  return "\n".join(lines) + "\n"


def _mem_ns(a) -> list[int]:
  return sorted({1, max(a.mem_length // 4, 1), max(a.mem_length // 2, 1), a.mem_length})


def plot_pareto(res: dict, a, path) -> None:
  plt = pyplot()
  pres = list(res["points"])
  fig, axs = plt.subplots(1, max(len(pres), 1), figsize=(4.6 * max(len(pres), 1), 4), squeeze=False)
  colors = {"adamw": "tab:blue", "muon": "tab:red", "signsgd": "tab:green", "colmax": "tab:purple"}
  lora_colors = iter(["tab:orange", "tab:brown", "tab:pink", "tab:olive"])
  for ax, pre in zip(axs[0], pres):
    for meth, pts in res["points"][pre].items():
      if meth not in colors:
        colors[meth] = next(lora_colors, "tab:gray")
      xy = [(q["b_loss"], q["forgetting"]) for q in pts]
      if not xy:
        continue
      ax.scatter(*zip(*xy), s=10, alpha=0.35, color=colors[meth])
      front = pareto(xy)
      label = meth + (" (same)" if meth == pre else "")
      ax.plot(*zip(*front), marker="o", ms=4, color=colors[meth], lw=2.2 if meth == pre else 1.2, label=label)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("B validation loss (learning: lower is better)")
    ax.set_ylabel("rise of A validation loss (forgetting)")
    ax.set_title(f"pretrained with {LABELS[pre]}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle("Pareto frontiers of finetuning on B (points: each lr x steps, mean over seeds)", fontsize=10)
  save(fig, path, dpi=110)


def plot_sparsity(res: dict, a, path) -> None:
  plt = pyplot()
  fig, axs = plt.subplots(1, 2, figsize=(11, 4))
  types = [t for t, _ in MODULE_TYPES]
  pres = list(res["sparsity"])
  w = 0.8 / max(len(pres), 1)
  init = res["sparsity_init"]
  init_types = {t: np.mean([v["types"].get(t, np.nan) for v in init.values()]) for t in types}
  axs[0].scatter(range(len(types)), [init_types[t] for t in types], marker="_", s=400, color="black",
                 label="initialisation", zorder=3)
  for i, pre in enumerate(pres):
    sp = res["sparsity"][pre]["types"]
    axs[0].bar(np.arange(len(types)) + (i - (len(pres) - 1) / 2) * w, [sp[t]["mean"] for t in types], w,
               yerr=[sp[t]["half_range"] for t in types], color=COLORS[pre], label=LABELS[pre], capsize=2)
  axs[0].set_xticks(range(len(types)), types)
  axs[0].set_ylabel("input sparsity after pretraining")
  axs[0].legend(fontsize=7)
  methods = sorted({m for sp in res["sparsity"].values() for m in sp["finetuned"]})
  for pre in pres:
    sp = res["sparsity"][pre]
    vals = [sp["pretrained"]["mean"]] + [sp["finetuned"].get(m, {}).get("mean", np.nan) for m in methods]
    axs[1].plot(range(len(vals)), vals, marker="o", color=COLORS[pre], label=f"pretrained with {LABELS[pre]}")
  axs[1].set_xticks(range(len(methods) + 1), ["pretrained"] + [f"FT {m}" for m in methods], rotation=20,
                    fontsize=7)
  axs[1].set_ylabel("mean input sparsity (all linear layers)")
  if axs[1].get_legend_handles_labels()[0]:
    axs[1].legend(fontsize=7)
  fig.suptitle(f"Activation sparsity (|x| <= {a.sparsity_threshold} x token RMS) on a fixed A batch", fontsize=10)
  save(fig, path, dpi=110)


def plot_memorization(res: dict, a, path) -> None:
  plt = pyplot()
  fig, axs = plt.subplots(1, 3, figsize=(13, 3.8))
  for opt, e in res["memorization"].items():
    per = e["lrs"][e["best_lr"]]
    for ax, k in zip(axs, ("clean", "corrupted", "heldout")):
      acc = per["acc"].get(k)
      if acc:
        ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, color=COLORS[opt], label=f"{LABELS[opt]} (lr {e['best_lr']})")
  for ax, k in zip(axs, ("clean training examples", "corrupted training examples", "held-out prompts")):
    ax.set_xlabel("generation length n")
    ax.set_ylabel("exact-match accuracy of the first n tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(k, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle("Memorization vs generation length (synthetic task)", fontsize=10)
  save(fig, path, dpi=110)


# -----------------------------------------------------------------------------
# Main: a lock per output folder, config checked on resume.
# -----------------------------------------------------------------------------


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  out, t_start = report.start(args.out)
  grid = Grid(args, out)
  return cells.run_grid("optimizer_consistency", args, out, _RUN_KEYS, grid.walk, lambda state: write_report(grid, state),
                        argv=argv, t_start=t_start)


if __name__ == "__main__":
  sys.exit(main())
