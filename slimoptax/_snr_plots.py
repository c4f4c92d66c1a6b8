"""Plots of an SNR analysis (`slimoptax.snr`): SNR trajectories and SNR by depth.

matplotlib is imported here only (it is in the ``experiments`` extra), and
without pyplot, so a notebook's global backend is left alone; ``import
slimoptax`` does not load this module.

Reference: Kalra et al., When Can You Get Away with Low Memory Adam?, 2025
(Fig. 2: SNR trajectories; App. H: depth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from slimoptax._snr import SNRTable, depth_group


def _subplots(rows: int, cols: int, *, figsize):
  """A figure and its axes grid without pyplot (no global backend switch in notebooks)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize)
  axs = fig.subplots(rows, cols, squeeze=False)
  return fig, axs


def plot_trajectories(history, path: str, *, names: Sequence[str] | None = None, max_panels: int = 12) -> None:
  """PNG: SNR_K vs step, one panel per parameter, one line per candidate K."""
  if names is None:
    # One parameter per layer-type group (the first layer), as in the paper's Fig. 2.
    seen, names = set(), []
    for n in history:
      group, _ = depth_group(n)
      if group not in seen:
        seen.add(group)
        names.append(n)
  names = list(names)[:max_panels]
  cols = min(4, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axs = _subplots(rows, cols, figsize=(4 * cols, 3 * rows))
  for ax, name in zip(axs.flat, names):
    for c, pts in history[name].items():
      if pts:
        steps, vals = zip(*pts)
        ax.plot(steps, vals, marker=".", label=f"K={c}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  for ax in list(axs.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle("SNR_K of Adam's second moments (dashed: cutoff 1)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_depth(table: SNRTable, path: str) -> None:
  """PNG: time-averaged SNR vs layer index, one panel per layer-type group."""
  from matplotlib.ticker import MaxNLocator

  groups: dict[str, dict[tuple[int, ...], list[tuple[int, float]]]] = {}
  for name, per in table.items():
    group, idx = depth_group(name)
    if idx is None:
      continue
    for c, v in per.items():
      groups.setdefault(group, {}).setdefault(tuple(c), []).append((idx, v))
  groups = {g: per for g, per in groups.items() if any(len(c) for c in per)}
  if not groups:
    groups = {"(no layered parameters)": {}}
  cols = min(4, len(groups))
  rows = math.ceil(len(groups) / cols)
  fig, axs = _subplots(rows, cols, figsize=(4 * cols, 3 * rows))
  for ax, (group, per) in zip(axs.flat, groups.items()):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for c, pts in per.items():
      pts = sorted(pts)
      ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", label=f"K={c}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(group, fontsize=8)
    ax.set_xlabel("layer")
    if per:
      ax.legend(fontsize=7)
  for ax in list(axs.flat)[len(groups):]:
    ax.axis("off")
  fig.suptitle("time-averaged SNR_K by depth")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


__all__ = ["plot_depth", "plot_trajectories"]
