"""Small statistics shared by the experiment tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["finite_or_nan", "kendall_tau", "ppl", "quartiles", "spearman"]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ranks by ``argsort``; no tie correction)."""
  rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
  return float(np.corrcoef(rx, ry)[0, 1])


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
  """Kendall's tau between two score lists (no ties expected)."""
  n, s = len(a), 0
  for i in range(n):
    for j in range(i + 1, n):
      s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
  return float(s / (n * (n - 1) / 2))


def quartiles(a: np.ndarray, axis=0) -> np.ndarray:
  """25/50/75% percentiles; a diverged run (inf/NaN) counts as +inf, returned as NaN (a gap)."""
  q = np.percentile(np.where(np.isfinite(a), a, np.inf), [25, 50, 75], axis=axis)
  return np.where(np.isfinite(q), q, np.nan)


def ppl(loss: float) -> float:
  """Perplexity ``exp(loss)``; ``inf`` for a diverged (non-finite or huge) loss."""
  return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")


def finite_or_nan(x: float) -> float:
  return float(x) if math.isfinite(x) else float("nan")
