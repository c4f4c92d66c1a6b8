"""Resumable experiment grids: one JSON file per finished run, a lock, the settings checked on resume.

An experiment stores every finished run ("cell") as ``<out>/cells/<name>.json``,
written atomically (`CellStore`), so an interrupted grid resumes where it
stopped and a rerun skips what is done. One process trains an output folder at
a time (`take_lock`), and a grid is only resumed with the settings it was
started with (`check_config`). `run_grid` is the ``main`` they share: check
the settings, train under the lock, log the invocation, write the report.
`tune_lr` is the learning-rate search the experiments share: a grid extended
by a factor 2 while the best rate (on the mean over seeds) sits at an edge.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from experiments._lib import report


class CellStore:
  """Finished runs as ``<out>/cells/<name>.json``."""

  def __init__(self, out: pathlib.Path):
    self.dir = pathlib.Path(out) / "cells"
    self.dir.mkdir(parents=True, exist_ok=True)

  def load(self, name: str) -> dict | None:
    """A finished run's record, or None. An unreadable file is moved aside (``.corrupt-*``), said, and rerun."""
    path = self.dir / f"{name}.json"
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      aside = path.with_suffix(f".corrupt-{int(time.time())}")
      os.replace(path, aside)
      report.say(f"warning: {path} is unreadable ({e}); moved to {aside.name}, the run is redone")
      return None

  def store(self, name: str, record: dict) -> None:
    """Writes ``record`` atomically (a temporary file, then `os.replace`)."""
    path = self.dir / f"{name}.json"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def take_lock(out: pathlib.Path) -> pathlib.Path:
  """``<out>/run.lock`` holding this process's id; exits naming the other process if one holds it.

  A lock left by a process that is gone is taken over.
  """
  lock = pathlib.Path(out) / "run.lock"
  while True:
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(lock.read_text().strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and pid != os.getpid() and pid_alive(pid):
        sys.exit(f"error: {out} is being trained by process {pid} ({lock}); wait for it or stop it")
      lock.unlink(missing_ok=True)  # a stale lock of a process that is gone
      continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return lock


def check_config(args, out: pathlib.Path, keys: Sequence[str]) -> None:
  """Writes ``<out>/config.json`` (the ``keys`` of ``args``), or exits naming the flags that differ from it."""
  path = pathlib.Path(out) / "config.json"
  mine = {k: getattr(args, k) for k in keys}
  if path.exists():
    theirs = json.loads(path.read_text())
    diff = [k for k in keys if theirs.get(k) != mine[k]]
    if diff:
      sys.exit(f"error: {out} holds a grid started with other settings ("
               + ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {mine[k]!r} now" for k in diff)
               + "); use the same flags to resume it or another --out")
  else:
    path.write_text(json.dumps(mine, indent=1))


def run_grid(experiment: str, args, out: pathlib.Path, keys: Sequence[str], walk: Callable[..., dict],
             write_report: Callable[[dict], None], *, argv: Sequence[str], t_start: float) -> int:
  """An experiment's ``main``: train the missing cells under the lock (unless ``args.report``), then report.

  Args:
    experiment: the module name under ``experiments`` (for the logs).
    args: the parsed flags; ``args.report`` only rebuilds the report from the stored cells.
    out: the output folder (cells, lock, ``config.json``, ``invocations.jsonl``, the report).
    keys: the flags a resumed grid must share with the one that started it (`check_config`).
    walk: ``walk(dry=...)``: trains the missing cells (``dry=False``) or only gathers the stored ones.
    write_report: writes ``summary.md`` and the rest from the gathered state.
    argv: the command line, recorded with each training invocation's wall time.
    t_start: when the invocation started (``time.perf_counter()``).

  Returns:
    0 (the exit status).
  """
  check_config(args, out, keys)
  if not args.report:
    lock = take_lock(out)
    try:
      report.say(f"{experiment}: grid in {out} (finished runs are kept; rerun the same command to resume)")
      walk(dry=False)
    finally:
      with open(pathlib.Path(out) / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"command": " ".join([f"python -m experiments.{experiment}", *argv]),
                            "wall_s": time.perf_counter() - t_start,
                            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
      lock.unlink(missing_ok=True)
  write_report(walk(dry=True))
  report.say((pathlib.Path(out) / "summary.md").read_text())
  report.say(f"wall time of this invocation {(time.perf_counter() - t_start) / 60:.1f} min; wrote {out}")
  return 0


def tune_lr(run: Callable[[float, int], dict | None], lrs: Iterable[float], seeds: Sequence[int], *,
            score: Callable[[dict], float], max_extend: int, what: str) -> tuple[float | None, dict]:
  """The rate with the lowest mean ``score`` over ``seeds``, the grid extended while the best is at an edge.

  Args:
    run: ``(lr, seed) -> record`` (None: not run yet, e.g. a dry walk).
    lrs: the starting grid.
    seeds: every rate is run with each seed; rates are compared on the mean (at a rate on the edge of
      stability one seed can land far from another).
    score: a record's loss (``math.inf`` for a diverged run).
    max_extend: factor-2 extensions at most (the best may still sit at an edge after them).
    what: the optimizer, named in the error when every rate diverged.

  Returns:
    ``(best, tried)``: ``best`` None while a run is missing; ``tried[lr][seed]`` the records.
  """
  lrs, tried, best = sorted(lrs), {}, None
  for _ in range(max_extend + 1):
    for lr in lrs:
      if lr not in tried:
        tried[lr] = {s: run(lr, s) for s in seeds}
    if any(r is None for per in tried.values() for r in per.values()):
      return None, tried
    means = {lr: float(np.mean([score(r) for r in per.values()])) for lr, per in tried.items()}
    ok = {lr: v for lr, v in means.items() if math.isfinite(v)}
    if not ok:
      raise RuntimeError(f"{what} diverged at every learning rate of {sorted(tried)}")
    best, grid = min(ok, key=ok.get), sorted(tried)
    if best == grid[0]:
      lrs = grid + [grid[0] / 2]
    elif best == grid[-1]:
      lrs = grid + [grid[-1] * 2]
    else:
      return best, tried
  return best, tried
