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


def _panels(series: dict, path: str, *, xlabel: str, title: str, marker: str,
            integer_x: bool = False) -> None:
  """One log-scale panel per entry of ``series`` (``{panel: {candidate: [(x, snr)]}}``), cutoff 1 dashed."""
  from matplotlib.ticker import MaxNLocator

  cols = min(4, len(series))
  rows = math.ceil(len(series) / cols)
  fig, axs = _subplots(rows, cols, figsize=(4 * cols, 3 * rows))
  for ax, (name, per) in zip(axs.flat, series.items()):
    if integer_x:
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for c, pts in per.items():
      if pts:
        xs, vals = zip(*sorted(pts))
        ax.plot(xs, vals, marker=marker, label=f"K={c}")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(name, fontsize=8)
    ax.set_xlabel(xlabel)
    if per:
      ax.legend(fontsize=7)
  for ax in list(axs.flat)[len(series):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


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
  _panels({n: history[n] for n in names}, path, xlabel="step", marker=".",
          title="SNR_K of Adam's second moments (dashed: cutoff 1)")


def plot_depth(table: SNRTable, path: str) -> None:
  """PNG: time-averaged SNR vs layer index, one panel per layer-type group."""
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
  _panels(groups, path, xlabel="layer", marker="o", integer_x=True,
          title="time-averaged SNR_K by depth")


__all__ = ["plot_depth", "plot_trajectories"]
