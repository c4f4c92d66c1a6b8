"""The training loop of every experiment: one jitted step, evaluation, logs and hooks.

`train` trains a language model (an `experiments._lib.model.Functional`) on a
token stream with an optax transformation. One loop serves every experiment:

* a plain run (`train_lm` builds the SlimAdam paper's setting: global-norm
  clipping to 1, then the optimizer on ``optax.warmup_cosine_decay_schedule``);
* a learning rate outside the optimizer (``lr_scale``): the step adds
  ``lr_scale(step) * u`` to the parameters, with the rate an argument of the
  jitted step, so a learning-rate grid compiles once (``tx`` built with a
  learning rate of 1);
* traced hyperparameters (``tx`` a function ``hparams -> GradientTransformation``
  and ``hparams`` a dict of scalars), so runs with other rates or lengths reuse
  the compiled step;
* ``num_models`` models in lock-step (``hparams`` of K values each, one per
  model, optionally ``init_seeds``): one ``jax.vmap``-ed step over the stacked
  parameters, same batches for all; the arithmetic per model is that of K
  separate runs;
* an objective hook (``objective=True``): ``tx.update`` also gets ``obj_fn``
  (the batch loss as a function of the parameters) and ``logits_fn``, which
  `slimoptax.sophia` needs for its Hessian estimates;
* a state hook (``state_hook(step, opt_state)`` at ``state_hook_steps``, e.g.
  `slimoptax.SNRTracker.record`);
* evaluation on fixed validation batches, JSON-lines logs, per-parameter norms.

Compiled steps are cached on the model per transformation (and per flag), so
calling `train` again with the same ``tx`` object does not recompile.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments._lib import data as data_lib
from experiments._lib.model import Functional
from experiments._lib.schedules import lm_warmup_cosine
from slimoptax import tree_bytes
from slimoptax._tree import named_leaves

__all__ = ["compiled_step", "sweep_log_fn", "train", "train_lm"]

TxLike = optax.GradientTransformation | Callable[[dict[str, jax.Array]], optax.GradientTransformation]


def _leaf_norms(tree: Any) -> dict[str, jax.Array]:
  return {path: jnp.linalg.norm(x.astype(jnp.float32).ravel()) for path, x in named_leaves(tree)}


def _tx_of(tx: TxLike, hparams: Any) -> optax.GradientTransformation:
  return tx if isinstance(tx, optax.GradientTransformation) else tx(hparams)


def compiled_step(model: Functional, tx: TxLike, *, vmap: bool = False, objective: bool = False,
                  external_lr: bool = False, norms: bool = False) -> Callable:
  """The jitted step ``(params, opt_state, x, y, hparams, lr) -> (params, opt_state, loss, norms)``.

  Args:
    model: the model.
    tx: a transformation, or ``hparams -> transformation`` (built inside the step).
    vmap: params, states and hparams carry a leading model axis (same batch for all).
    objective: pass ``obj_fn`` / ``logits_fn`` of the batch to ``tx.update``.
    external_lr: the new parameters are ``params + lr * updates`` (``lr`` an argument).
    norms: also return per-parameter L2 norms of the gradient, the new weights and the update.

  Returns:
    The step, cached on ``model`` for this ``tx`` and these flags.
  """
  cache = model.__dict__.setdefault("_compiled_steps", {})
  key = (id(tx), vmap, objective, external_lr, norms)
  if key in cache:
    return cache[key][1]

  def one(params, opt_state, hparams, lr, x, y):
    loss, grads = jax.value_and_grad(model.loss)(params, x, y)
    t = _tx_of(tx, hparams)
    if objective:
      updates, opt_state = t.update(
          grads, opt_state, params,
          obj_fn=lambda p: model.loss(p, x, y),  # e.g. Sophia-H: Hessian-vector products
          logits_fn=lambda p: model.logits(p, x))  # e.g. Sophia-G: sampled-label gradients
    else:
      updates, opt_state = t.update(grads, opt_state, params)
    if external_lr:
      new_params = jax.tree.map(lambda p, u: p + lr * u, params, updates)
    else:
      new_params = optax.apply_updates(params, updates)
    leaf_norms = None
    if norms:
      leaf_norms = {"grad": _leaf_norms(grads), "weight": _leaf_norms(new_params),
                    "update": _leaf_norms(updates)}
    return new_params, opt_state, loss, leaf_norms

  @jax.jit
  def step(params, opt_state, x, y, hparams, lr):
    if vmap:
      return jax.vmap(one, in_axes=(0, 0, 0, None, None, None))(params, opt_state, hparams, lr, x, y)
    return one(params, opt_state, hparams, lr, x, y)

  cache[key] = (tx, step)  # the reference keeps id(tx) from being reused
  return step


def _eval_fn(model: Functional, vmap: bool) -> Callable:
  """``(params, x, y) -> loss`` (K losses when vmapped), jitted once per model."""
  cache = model.__dict__.setdefault("_eval_fns", {})
  if vmap not in cache:
    cache[vmap] = jax.jit(jax.vmap(model.loss, in_axes=(0, None, None)) if vmap else model.loss)
  return cache[vmap]


def _hook_step_set(state_hook_steps: int | Iterable[int] | None, steps: int) -> frozenset[int]:
  if state_hook_steps is None:
    return frozenset()
  if isinstance(state_hook_steps, int):
    return frozenset(range(state_hook_steps, steps + 1, state_hook_steps))
  return frozenset(state_hook_steps)


def _to_host(x: np.ndarray) -> float | list[float]:
  return float(x) if np.ndim(x) == 0 else np.asarray(x).tolist()


def train(
    model: Functional,
    tx: TxLike,
    *,
    train_tokens: np.ndarray,
    steps: int,
    batch_size: int,
    seed: int = 0,
    init_seed: int | None = None,
    hparams: dict[str, Any] | None = None,
    num_models: int | None = None,
    init_seeds: Sequence[int] | None = None,
    objective: bool = False,
    lr_scale: Callable[[int], float] | None = None,
    val_batches: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    final_val_batches: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    eval_every: int | None = None,
    eval_at_start: bool = True,
    log_every: int | None = None,
    norms: bool = False,
    norm_log_every: int | None = None,
    schedule: Callable[[int], Any] | None = None,
    stop_on_divergence: bool = False,
    state_hook: Callable[[int, Any], None] | None = None,
    state_hook_steps: int | Iterable[int] | None = None,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
  """Trains ``model`` (or ``num_models`` copies in lock-step) for ``steps`` updates.

  Batches are ``data.batch_iterator(train_tokens, seed=seed)``; the parameters
  are ``model.init(init_seed)`` (default ``seed``), or, with ``num_models``,
  ``model.init(s)`` for each of ``init_seeds`` (default ``seed`` for all),
  stacked.

  Records (JSON-serializable dicts) are made at step 0 (if ``eval_at_start``),
  every ``log_every`` steps (default: ``eval_every``), on eval steps, on
  norm-log steps and at the last step, with ``step``, ``train_loss`` (mean over
  the steps since the previous record; a list of K with ``num_models``),
  ``lr`` (``schedule(step - 1)``, if a ``schedule`` is given), ``grad_norm``
  (with ``norms``), ``val_loss`` (eval steps: step 0, every ``eval_every``, the
  last step on ``final_val_batches``), ``norms`` (norm-log steps: ``{path:
  {"grad", "weight", "update"}}`` L2 norms of the raw gradient, the parameter
  after the update and the applied update) and ``wall_time``. They go to
  ``log_fn``, to ``log_path`` (JSON lines, appended) and to
  ``result["history"]``.

  Args:
    model: the model as pure functions (`experiments._lib.model.Functional`).
    tx: the transformation, or ``hparams -> transformation`` (built in the step).
    train_tokens: 1-D training token stream.
    steps, batch_size: number of updates and sequences per batch.
    seed: batch order (and the initialisation unless ``init_seed`` / ``init_seeds``).
    init_seed: initialisation of a single model.
    hparams: traced hyperparameters handed to ``tx``; K values each with ``num_models``.
    num_models: train this many models in lock-step (one vmapped step).
    init_seeds: per-model initialisation seeds (``num_models`` values).
    objective: give ``tx.update`` the batch's ``obj_fn`` and ``logits_fn`` (Sophia).
    lr_scale: ``step -> rate``; the step adds ``rate * u`` to the parameters
      (``tx`` then has a learning rate of 1).
    val_batches: validation batches of the intermediate evaluations (none: NaN losses).
    final_val_batches: validation batches of the last evaluation (default ``val_batches``).
    eval_every: evaluate every this many steps (None: only at the end).
    eval_at_start: evaluate (and record) at step 0.
    log_every: training-loss record every this many steps.
    norms: compute per-parameter norms in the step (``grad_norm`` in the records).
    norm_log_every: put per-parameter norms in the record every this many steps.
    schedule: the learning-rate schedule, for the records' ``lr``.
    stop_on_divergence: stop at the first record with a non-finite training loss.
    state_hook: ``state_hook(step, opt_state)`` after the update of each step
      in ``state_hook_steps`` (step 0: before training); ``opt_state`` is the
      whole (pure) optax state of ``tx``.
    state_hook_steps: an int ``k`` (every ``k`` steps) or a collection of steps.
    log_fn, log_path: where the records also go.
    progress: show a tqdm progress bar.

  Returns:
    A dict with ``final_val_loss`` (a float, K floats with ``num_models``),
    ``final_train_loss``, ``history``, ``val_curve`` (``[(step, loss)]``),
    ``train_curve`` (``[(step, mean train loss)]``, one per record after step
    0), ``train_losses`` (every step's loss, ``[steps]`` or ``[steps, K]``),
    ``diverged``, ``steps_done``, ``wall_s``, ``compile_s`` (start to the end
    of step 1), ``seconds_per_step`` (after step 1, evaluation excluded),
    ``num_params``, ``param_bytes``, ``opt_state_bytes`` and the final
    ``params`` and ``opt_state``.
  """
  t_start = time.perf_counter()
  vmapped = num_models is not None
  norms = norms or norm_log_every is not None
  if vmapped:
    init_seeds = [seed] * num_models if init_seeds is None else list(init_seeds)
    if len(init_seeds) != num_models:
      raise ValueError(f"init_seeds has {len(init_seeds)} values for {num_models} models")
    per_seed = {s: model.init(s) for s in sorted(set(init_seeds))}
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_seed[s] for s in init_seeds])
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in (hparams or {}).items()}
    opt_state = jax.vmap(lambda p, h: _tx_of(tx, h).init(p))(params, hp)
  else:
    params = model.init(seed if init_seed is None else init_seed)
    hp = hparams
    opt_state = _tx_of(tx, hp).init(params)
  step_fn = compiled_step(model, tx, vmap=vmapped, objective=objective,
                          external_lr=lr_scale is not None, norms=norms)
  eval_fn = _eval_fn(model, vmapped)
  final_val_batches = val_batches if final_val_batches is None else final_val_batches
  log_every = log_every or eval_every
  hook_steps = _hook_step_set(state_hook_steps, steps) if state_hook is not None else frozenset()
  batches = data_lib.batch_iterator(train_tokens, batch_size=batch_size, seq_len=model.seq_len, seed=seed)

  history: list[dict[str, Any]] = []
  val_curve: list[tuple[int, Any]] = []
  train_curve: list[tuple[int, Any]] = []
  log_file = open(log_path, "a") if log_path is not None else None
  eval_s = 0.0

  def emit(record):
    history.append(record)
    if log_fn is not None:
      log_fn(record)
    if log_file is not None:
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()

  def evaluate(p, batch_list):
    nonlocal eval_s
    if not batch_list:
      return float("nan")
    t0 = time.perf_counter()
    loss = np.mean(np.stack(jax.device_get([eval_fn(p, x, y) for x, y in batch_list])), axis=0)
    eval_s += time.perf_counter() - t0
    return _to_host(loss)

  if eval_at_start:
    val = evaluate(params, val_batches)
    val_curve.append((0, val))
    record = {"step": 0}
    if schedule is not None:
      record["lr"] = float(schedule(0))
    record.update(val_loss=val, wall_time=time.perf_counter() - t_start)
    emit(record)
  if 0 in hook_steps:
    state_hook(0, opt_state)

  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm
      bar = tqdm(total=steps, dynamic_ncols=True)
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
      bar = None
  losses, pending = [], []
  train_loss, val_loss = float("nan"), (val_curve[-1][1] if val_curve else float("nan"))
  compile_s, t_loop, eval_before_loop, diverged, step = 0.0, None, 0.0, False, 0
  try:
    for step in range(1, steps + 1):
      x, y = next(batches)
      lr = None if lr_scale is None else lr_scale(step)
      params, opt_state, loss, leaf_norms = step_fn(params, opt_state, x, y, hp, lr)
      losses.append(loss)
      pending.append(loss)
      if step == 1:
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - t_start
        t_loop, eval_before_loop = time.perf_counter(), eval_s
      if step in hook_steps:
        state_hook(step, opt_state)
      is_last = step == steps
      do_eval = is_last or (eval_every is not None and step % eval_every == 0)
      do_norms = norm_log_every is not None and (step % norm_log_every == 0 or is_last)
      do_log = do_eval or do_norms or (log_every is not None and step % log_every == 0)
      if bar is not None:
        bar.update(1)
      if not do_log:
        continue
      # Steps are dispatched asynchronously: wait for them here, so that their time counts as training
      # (seconds_per_step), not as the evaluation / logging below.
      jax.block_until_ready(loss)
      t0 = time.perf_counter()
      train_loss = _to_host(np.mean(np.stack(jax.device_get(pending)), axis=0))
      pending = []
      train_curve.append((step, train_loss))
      eval_s += time.perf_counter() - t0
      record = {"step": step, "train_loss": train_loss}
      if schedule is not None:
        record["lr"] = float(schedule(step - 1))
      host_norms = jax.device_get(leaf_norms) if norms else None
      if norms:
        record["grad_norm"] = float(np.sqrt(sum(float(g) ** 2 for g in host_norms["grad"].values())))
      if stop_on_divergence and not vmapped and not math.isfinite(train_loss):
        diverged = True
        record["wall_time"] = time.perf_counter() - t_start
        emit(record)
        break
      if do_eval:
        val_loss = evaluate(params, final_val_batches if is_last else val_batches)
        val_curve.append((step, val_loss))
        record["val_loss"] = val_loss
      if do_norms:
        record["norms"] = {path: {kind: float(host_norms[kind][path]) for kind in ("grad", "weight", "update")}
                           for path in host_norms["grad"]}
      record["wall_time"] = time.perf_counter() - t_start
      emit(record)
      if bar is not None:
        bar.set_postfix(train_loss=f"{np.mean(train_loss):.3f}", val_loss=f"{np.mean(val_loss):.3f}")
  finally:
    if bar is not None:
      bar.close()
    if log_file is not None:
      log_file.close()

  t_end = time.perf_counter()
  loop_s = t_end - t_loop - (eval_s - eval_before_loop) if t_loop is not None else float("nan")
  one_params = jax.tree.map(lambda a: a[0], params) if vmapped else params
  return {
      "final_val_loss": float("nan") if diverged else val_loss,
      "final_train_loss": train_loss,
      "history": history,
      "val_curve": val_curve,
      "train_curve": train_curve,
      "train_losses": np.asarray(jax.device_get(losses)),
      "diverged": diverged,
      "steps_done": step,
      "wall_s": t_end - t_start,
      "compile_s": compile_s,
      "seconds_per_step": loop_s / (steps - 1) if steps > 1 else float("nan"),
      "num_params": int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(one_params))),
      "param_bytes": tree_bytes(one_params),
      "opt_state_bytes": tree_bytes(opt_state),
      "params": params,
      "opt_state": opt_state,
  }


def train_lm(
    model: Functional,
    tx_factory: Callable[[optax.Schedule], optax.GradientTransformation],
    *,
    lr: float,
    steps: int,
    warmup: int = 0,
    clip_norm: float | None = 1.0,
    final_lr_fraction: float = 0.1,
    val_tokens: np.ndarray,
    batch_size: int,
    eval_batches: int | None = 20,
    eval_every: int = 100,
    log_every: int = 10,
    **kwargs: Any,
) -> dict[str, Any]:
  """`train` in the SlimAdam paper's setting (Kalra et al. 2025, App. B).

  The learning rate warms up linearly from 0 to ``lr`` over ``warmup`` steps
  and then follows a cosine decay to ``lr * final_lr_fraction`` at ``steps``
  (``optax.warmup_cosine_decay_schedule``); the transformation is
  ``optax.chain(optax.clip_by_global_norm(clip_norm), tx_factory(schedule))``
  (weight decay, if any, is ``tx_factory``'s business). Evaluation on the
  first ``eval_batches`` contiguous validation batches at step 0, every
  ``eval_every`` steps and at the end; per-parameter norms are computed in the
  step (``grad_norm`` in every record). ``kwargs`` go to `train`.
  """
  schedule = lm_warmup_cosine(lr, steps, warmup, final_lr_fraction)
  clip = optax.clip_by_global_norm(clip_norm) if clip_norm is not None else optax.identity()
  val_batches = data_lib.eval_batches(val_tokens, batch_size=batch_size, seq_len=model.seq_len,
                                      max_batches=eval_batches)
  kwargs.setdefault("norms", True)
  result = train(model, optax.chain(clip, tx_factory(schedule)), steps=steps, batch_size=batch_size,
                 val_batches=val_batches, eval_every=eval_every, log_every=log_every, schedule=schedule,
                 **kwargs)
  result["schedule"] = schedule
  return result


def sweep_log_fn(name: str, steps: int, log: Callable[[str], None] = print) -> Callable[[dict], None]:
  """A ``log_fn`` printing each evaluation of K models: every model's loss and the best."""

  def log_fn(record):
    if "val_loss" not in record or record["step"] == 0:
      return
    val = np.asarray(record["val_loss"])
    best = np.nanmin(np.where(np.isfinite(val), val, np.nan)) if np.isfinite(val).any() else float("nan")
    log(f"  [{name}] step {record['step']:4d}/{steps}  val loss per model "
        f"{' '.join(f'{v:.3f}' for v in val)}  (best {best:.3f}, {record['wall_time']:.0f}s)")

  return log_fn

