"""Plotting helpers shared by the experiments (matplotlib imported lazily, Agg backend)."""

from __future__ import annotations

import math

__all__ = ["finish_panels", "log_y", "pyplot", "save"]


def pyplot():
  """``matplotlib.pyplot`` with the non-interactive Agg backend (imported on first use)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def log_y(ax) -> None:
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


def save(fig, path, *, dpi: int = 100, tight: bool = True) -> None:
  """``fig.tight_layout()`` (if ``tight``), ``fig.savefig(path, dpi=dpi)``, then closes the figure."""
  if tight:
    fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)


def finish_panels(fig, axs, used: int, title: str, path, *, dpi: int = 100) -> None:
  """Small tick labels and a legend on the first ``used`` panels, the rest hidden; title; `save`."""
  panels = list(axs.flat)
  for ax in panels[:used]:
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
  for ax in panels[used:]:
    ax.axis("off")
  fig.suptitle(title, fontsize=10)
  save(fig, path, dpi=dpi)
