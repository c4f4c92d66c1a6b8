"""Heterogeneous vs homogeneous quadratic (Orvieto & Gower §5, Fig. 6/7, App. D).

Setup (App. D): ``L(w) = 1/2 w^T H w`` in 9 dimensions, ``H`` block-diagonal
with three 3x3 blocks, eigenvalues {1, 2, 3, 99, 100, 101, 4998, 4999, 5000} in both
problems:

* heterogeneous: blocks [1, 2, 3], [99, 100, 101], [4998, 4999, 5000] (each block has
  one scale, the scales differ between blocks, as in a transformer's Hessian);
* homogeneous: blocks [1, 99, 4998], [2, 100, 4999], [3, 101, 5000] (every block
  mixes all scales).

Each block is rotated by its own Haar-random rotation (the eigenvectors of ``A A^T``,
``A`` 3x3 standard Gaussian). Noise: ``X = H^{1/2}`` is a 9x9 design matrix and each
step sees ``b`` of its rows, ``g = (9 / b) X_B^T X_B w`` (unbiased for ``H w``).

Optimizers (the paper's: moving averages 0.95, 10% warm-up then cosine to zero), all from
`experiments._lib.ladder` without weight decay or clipping: SGD with momentum, Signum, Adam
with ``b1 = b2 = 0.95``, and (Fig. 7) Signum with a *fixed* mollifier
``m / sqrt(m^2 + eps)`` (`slimoptax.scale_by_sign(mode="mollified")`). Each is tuned
over a log-spaced learning-rate grid (and ``eps``) for the lowest median final loss
over 10 seeds; a seed draws the initial point ``w_0 ~ N(0, I)`` and the row samples
(the Hessian instance is fixed by ``--problem-seed``).

We also plot the variance term of Prop. 1, ``sigma_k^2 = v_k - m_k^2 = beta
EMA_beta[(m_{k-1} - g_k)^2]`` (read from Adam's state with
`slimoptax.mean_variance_from_adam`), per block, and check it against the recursion
of Thm 4.1, ``sigma_k^2 = beta sigma_{k-1}^2 + beta (1 - beta) (m_{k-1} - g_k)^2``.

Steps, batch size and the grids are not given by the paper; ours are command-line
arguments (defaults: 1000 steps, 3 rows per step).

Usage:
  python -m experiments.heterogeneous_quadratic --quick
  python -m experiments.heterogeneous_quadratic

The training loop is a `jax.lax.scan` over steps, vmapped over the (eps, learning rate, seed)
grid: a 9-dimensional quadratic, not a language model, so not `experiments._lib.train`.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import slimoptax
from experiments._lib import ladder, report
from experiments._lib.plots import pyplot, save
from experiments._lib.schedules import warmup_cosine
from experiments._lib.stats import quartiles

jax.config.update("jax_enable_x64", True)  # losses fall to ~1e-12: keep float64

BLOCKS = {
    "heterogeneous": [[1, 2, 3], [99, 100, 101], [4998, 4999, 5000]],
    "homogeneous": [[1, 99, 4998], [2, 100, 4999], [3, 101, 5000]],
}
BETA = 0.95


# -----------------------------------------------------------------------------
# Problem
# -----------------------------------------------------------------------------


def haar_rotation(rng: np.random.Generator) -> np.ndarray:
  """Eigenvectors of ``A A^T`` (A 3x3 Gaussian): a Haar-random orthogonal matrix (App. D)."""
  a = rng.standard_normal((3, 3))
  return np.linalg.eigh(a @ a.T)[1]


def make_problem(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(H, X = H^{1/2})`` for ``kind`` in `BLOCKS`, block rotations drawn from ``seed``."""
  rng = np.random.default_rng(seed)
  h = np.zeros((9, 9))
  x = np.zeros((9, 9))
  for i, eigs in enumerate(BLOCKS[kind]):
    q = haar_rotation(rng)
    s = slice(3 * i, 3 * i + 3)
    h[s, s] = q @ np.diag(eigs) @ q.T
    x[s, s] = q @ np.diag(np.sqrt(eigs)) @ q.T
  return h, x


# -----------------------------------------------------------------------------
# Optimizers
# -----------------------------------------------------------------------------


def make_tx(method: str, schedule, eps=None) -> optax.GradientTransformation:
  if method == "SGD":
    return ladder.sgd(schedule, beta=BETA)
  if method == "Signum":
    return ladder.signum(schedule, beta=BETA, weight_decay=0.0, clip_norm=None)
  if method == "Adam (b1=b2)":
    return ladder.adam_equal_betas(schedule, beta=BETA, weight_decay=0.0, clip_norm=None)
  if method == "Signum + fixed eps":
    return optax.chain(slimoptax.scale_by_sign(mode="mollified", beta=BETA, eps=eps),
                       optax.scale_by_learning_rate(schedule))
  raise ValueError(method)


METHODS = ("SGD", "Signum", "Adam (b1=b2)", "Signum + fixed eps")


def run(method: str, x: np.ndarray, h: np.ndarray, lr, eps, seed, *, steps: int, batch_size: int,
        record: bool = False):
  """One training run (jit/vmap-friendly). Returns per-step loss, and Adam's (m, sigma^2) if ``record``."""
  x = jnp.asarray(x)
  h = jnp.asarray(h)
  key = jax.random.PRNGKey(seed)
  key, sub = jax.random.split(key)
  w0 = jax.random.normal(sub, (9,), jnp.float64)
  # 10% linear warm-up, then cosine decay to zero (Orvieto & Gower, Fig. 6).
  tx = make_tx(method, warmup_cosine(lr, steps, max(steps // 10, 1), end_value=0.0, dtype=jnp.float64), eps)
  state = tx.init(w0)

  def step(carry, k):
    w, state, sigma2_rec, m_prev = carry
    rows = jax.random.choice(k, 9, (batch_size,), replace=False)
    xb = x[rows]
    g = (9.0 / batch_size) * xb.T @ (xb @ w)
    updates, state = tx.update(g, state, w)
    w = w + updates
    out = {"loss": 0.5 * w @ h @ w}
    if record:
      # Thm 4.1's recursion, run alongside, against v - m^2 read from Adam's state.
      sigma2_rec = BETA * sigma2_rec + BETA * (1 - BETA) * (m_prev - g) ** 2
      mean, var = slimoptax.mean_variance_from_adam(state)
      out.update(m=mean, sigma2=var, sigma2_thm41=sigma2_rec)
      m_prev = mean
    return (w, state, sigma2_rec, m_prev), out

  keys = jax.random.split(key, steps)
  zeros = jnp.zeros(9, jnp.float64)
  _, out = jax.lax.scan(step, (w0, state, zeros, zeros), keys)
  loss0 = 0.5 * w0 @ h @ w0
  out["loss"] = jnp.concatenate([loss0[None], out["loss"]])
  return out


@functools.partial(jax.jit, static_argnames=("method", "steps", "batch_size", "record"))
def run_grid(method, x, h, lrs, eps_grid, seeds, *, steps, batch_size, record=False):
  """`run` over the grid ``eps x lr x seed``: every output gets leading axes ``[E, L, S]``.

  ``x`` and ``h`` are arguments (not constants), so both landscapes share one compilation.
  """
  f = lambda lr, eps, s: run(method, x, h, lr, eps, s, steps=steps, batch_size=batch_size,  # noqa: E731
                             record=record)
  f = jax.vmap(jax.vmap(jax.vmap(f, (None, None, 0)), (0, None, None)), (None, 0, None))
  return f(lrs, eps_grid, seeds)


# -----------------------------------------------------------------------------
# Figures
# -----------------------------------------------------------------------------


def plot_main(curves, variance, path):
  plt = pyplot()
  kinds = list(BLOCKS)
  fig, axes = plt.subplots(3, 2, figsize=(11, 10), sharex=True)
  colors = {"SGD": "C0", "Signum": "C1", "Adam (b1=b2)": "C2", "Signum + fixed eps": "C3"}
  for j, kind in enumerate(kinds):
    ax = axes[0, j]
    for method, c in curves[kind].items():
      q25, q50, q75 = quartiles(c["loss"])
      t = np.arange(len(q50))
      ax.plot(t, q50, color=colors[method], label=f"{method} ({c['label']})",
              ls="--" if method == "Signum + fixed eps" else "-")
      ax.fill_between(t, q25, q75, color=colors[method], alpha=0.2)
    ax.set_yscale("log")
    ax.set_title(f"{kind}: loss (median, 25-75% over {c['loss'].shape[0]} seeds)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    for row, key, ylabel in ((1, "sigma2", "variance term sigma_k^2 = v_k - m_k^2"),
                             (2, "radius", "trust region 1/sqrt(1 + sigma^2/m^2)")):
      ax = axes[row, j]
      v = variance[kind][key]  # [seeds, steps, 3 blocks]
      for b in range(3):
        q25, q50, q75 = quartiles(v[:, :, b])
        t = np.arange(1, len(q50) + 1)
        ax.plot(t, q50, label=f"block {b + 1}: eig {BLOCKS[kind][b]}")
        ax.fill_between(t, q25, q75, alpha=0.2)
      ax.set_yscale("log")
      ax.set_ylabel(ylabel, fontsize=8)
      ax.set_title(f"{kind}: Adam (b1=b2=0.95), block mean", fontsize=9)
      ax.legend(fontsize=7)
      ax.grid(True, alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel("iteration")
  save(fig, path, dpi=90)


def plot_tuning(tuning, path):
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for j, (kind, per_method) in enumerate(tuning.items()):
    ax = axes[j]
    for method, t in per_method.items():
      med = np.asarray(t["median_final_loss"])  # [eps, lr]
      best_e = int(np.argmin(np.nanmin(np.where(np.isfinite(med), med, np.inf), axis=1)))
      ax.plot(t["lrs"], np.where(np.isfinite(med[best_e]) & (med[best_e] < 1e30), med[best_e], np.nan),
              "o-", ms=3,
              label=method + (f" (eps {t['eps_grid'][best_e]:g})" if len(t["eps_grid"]) > 1 else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_title(f"{kind}: median final loss vs lr")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("median final loss (missing: diverged)")
  save(fig, path, dpi=90)


def plot_hessians(problems, path):
  plt = pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 4))
  for ax, (kind, (h, _)) in zip(axes, problems.items()):
    im = ax.imshow(np.log10(np.abs(h) + 1e-3), cmap="viridis")
    ax.set_title(f"{kind}: log10|H_ij|")
    fig.colorbar(im, ax=ax, shrink=0.8)
  save(fig, path, dpi=90)


# -----------------------------------------------------------------------------
# Main
# -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="experiments/results/heterogeneous_quadratic")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=3, help="rows of X per step (of 9)")
  report.lm_arguments(parser, seeds=10, problem_seed=0, num_lrs=25)
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.seeds, args.num_lrs = 200, 3, 6
  out = report.output_dir(args.out)
  t0 = time.perf_counter()

  grids = {  # log-spaced learning rates (SGD is limited by 2 / 5000 ~ 4e-4)
      "SGD": np.logspace(-7, -1, args.num_lrs),
      "Signum": np.logspace(-5, 1, args.num_lrs),
      "Adam (b1=b2)": np.logspace(-5, 1, args.num_lrs),
      "Signum + fixed eps": np.logspace(-5, 1, args.num_lrs),
  }
  eps_grids = {m: [0.0] for m in METHODS}
  eps_grids["Signum + fixed eps"] = [1e-6, 1e-4, 1e-2, 1.0, 1e2] if not args.quick else [1e-2]
  seeds = np.arange(args.seeds)
  problems = {kind: make_problem(kind, args.problem_seed) for kind in BLOCKS}
  kw = dict(steps=args.steps, batch_size=args.batch_size)

  tuning, curves, variance, table = {}, {}, {}, {}
  for kind, (h, x) in problems.items():
    tuning[kind], curves[kind], table[kind] = {}, {}, {}
    for method in METHODS:
      grid = run_grid(method, jnp.asarray(x), jnp.asarray(h), jnp.asarray(grids[method]),
                      jnp.asarray(eps_grids[method]), jnp.asarray(seeds), **kw)
      losses = np.asarray(grid["loss"])  # [eps, lr, seed, step]
      final = np.where(np.isfinite(losses[..., -1]), losses[..., -1], np.inf)
      med = np.median(final, axis=-1)
      e, i = np.unravel_index(np.argmin(med), med.shape)
      lr, eps = float(grids[method][i]), float(eps_grids[method][e])
      tuning[kind][method] = {"lrs": grids[method].tolist(), "eps_grid": eps_grids[method],
                              "median_final_loss": med.tolist(), "best_lr": lr, "best_eps": eps,
                              "best_at_edge": bool(i in (0, len(grids[method]) - 1))}
      loss = losses[e, i]  # [seed, step]
      q25, q50, q75 = np.percentile(np.where(np.isfinite(loss[:, -1]), loss[:, -1], np.inf), [25, 50, 75])
      label = f"lr {lr:.2g}" + (f", eps {eps:g}" if method == "Signum + fixed eps" else "")
      curves[kind][method] = {"loss": loss, "label": label}
      table[kind][method] = {"best_lr": lr, "best_eps": eps if method == "Signum + fixed eps" else None,
                             "final_loss_q25": q25, "final_loss_median": q50, "final_loss_q75": q75,
                             "best_at_edge": tuning[kind][method]["best_at_edge"]}
      print(f"{kind:13s} {method:18s} lr {lr:.3g} eps {eps:g}: final loss median {q50:.3e} "
            f"[{q25:.3e}, {q75:.3e}]", flush=True)
      if method == "Adam (b1=b2)":
        rec = run_grid(method, jnp.asarray(x), jnp.asarray(h), jnp.asarray([lr]), jnp.asarray([0.0]),
                       jnp.asarray(seeds), **kw, record=True)
        m, s2, s2_rec = (np.asarray(rec[k])[0, 0] for k in ("m", "sigma2", "sigma2_thm41"))
        rel_err = float(np.max(np.abs(s2 - s2_rec) / np.maximum(np.abs(s2_rec), 1e-300)))
        block = lambda a: a.reshape(a.shape[0], a.shape[1], 3, 3).mean(-1)  # noqa: E731
        radius = 1.0 / np.sqrt(1.0 + s2 / np.maximum(m ** 2, 1e-300))
        variance[kind] = {"sigma2": block(s2), "radius": block(radius), "thm41_max_rel_err": rel_err}
        print(f"  Thm 4.1 check: max |(v - m^2) - recursion| / recursion = {rel_err:.2e}", flush=True)

  # Claims: heterogeneous gap SGD > Signum > Adam; homogeneous gap much smaller.
  summary_rows = []
  for kind in BLOCKS:
    t = table[kind]
    summary_rows.append({
        "landscape": kind,
        **{f"{m} median": t[m]["final_loss_median"] for m in METHODS},
        "SGD / Adam": t["SGD"]["final_loss_median"] / t["Adam (b1=b2)"]["final_loss_median"],
        "Signum / Adam": t["Signum"]["final_loss_median"] / t["Adam (b1=b2)"]["final_loss_median"],
    })
  wall = time.perf_counter() - t0
  summary = {
      "experiment": "heterogeneous_quadratic", "args": vars(args), "beta": BETA, "blocks": BLOCKS,
      "hessians": {k: p[0].tolist() for k, p in problems.items()},
      "table": table, "tuning": tuning, "summary": summary_rows,
      "thm41_max_rel_err": {k: variance[k]["thm41_max_rel_err"] for k in variance},
      "median_curves": {k: {m: np.median(c["loss"], axis=0)[:: max(args.steps // 200, 1)].tolist()
                            for m, c in curves[k].items()} for k in curves},
      "wall_time_s": wall,
  }
  (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
  plot_main(curves, variance, out / "quadratic_losses_variance.png")
  plot_tuning(tuning, out / "quadratic_lr_tuning.png")
  plot_hessians(problems, out / "quadratic_hessians.png")

  lines = ["| landscape | method | best lr | final loss median | 25% | 75% |", "|---|---|---|---|---|---|"]
  for kind in BLOCKS:
    for m in METHODS:
      r = table[kind][m]
      tuned = f"{r['best_lr']:.3g}" + (f" (eps {r['best_eps']:g})" if r["best_eps"] is not None else "")
      tuned += " (edge)" if r["best_at_edge"] else ""
      lines.append(f"| {kind} | {m} | {tuned} | {r['final_loss_median']:.3e} | "
                   f"{r['final_loss_q25']:.3e} | {r['final_loss_q75']:.3e} |")
  lines += ["", "| landscape | SGD / Adam (median final loss) | Signum / Adam |", "|---|---|---|"]
  for r in summary_rows:
    lines.append(f"| {r['landscape']} | {r['SGD / Adam']:.3g} | {r['Signum / Adam']:.3g} |")
  lines += ["", "Thm 4.1 / Prop. 1 check (max relative error of v - m^2 against the recursion): " +
            ", ".join(f"{k} {v['thm41_max_rel_err']:.1e}" for k, v in variance.items())]
  report.write_tables(out, lines, wall)
  return summary


if __name__ == "__main__":
  main()
