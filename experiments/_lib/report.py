"""What every experiment script does around its loop: arguments, output folder, results files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

__all__ = ["INSTALL_EXTRAS", "InterruptGuard", "StagedOutput", "check_lines", "default_out", "finish", "floats",
           "parser", "require_packages", "stage_output", "start", "lm_arguments", "machine", "output_dir", "say",
           "wall_line", "write_tables"]


def say(*args: Any) -> None:
  """``print`` that flushes (the scripts' progress lines, also when piped to a log)."""
  print(*args, flush=True)


def machine() -> str:
  """The machine, for the results: architecture, CPU count, jax version and backend."""
  return (f"{platform.machine()}, {os.cpu_count()} CPUs (shared), jax {jax.__version__} "
          f"backend {jax.default_backend()}")


_LM_HELP = {"max_bytes": "corpus cap (bounds tokenizer training)"}


def lm_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
  """Adds ``--n-layers``, ``--d-model``, ... (one per keyword, with its default and its type).

  Example: ``lm_arguments(p, n_layers=2, d_model=64, steps=300, lr=1e-3)``.
  """
  for name, default in defaults.items():
    kind = type(default) if default is not None else int
    parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=_LM_HELP.get(name))


def output_dir(path: str | os.PathLike) -> pathlib.Path:
  """The output folder, created if needed."""
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  return out


def floats(text: str) -> list[float]:
  """``"1e-3,3e-3"`` -> ``[0.001, 0.003]`` (comma-separated command-line grids)."""
  return [float(x) for x in text.split(",")]


def finish(out: pathlib.Path, res: dict, summary_md: Callable[[dict], str], t_start: float) -> dict:
  """Sets ``res["wall_time_s"]``, writes ``summary.md`` (``summary_md(res)``) and ``results.json``."""
  res["wall_time_s"] = time.perf_counter() - t_start
  summary = summary_md(res)
  (out / "summary.md").write_text(summary)
  with open(out / "results.json", "w") as f:
    json.dump(res, f, indent=1)
  say(summary)
  return res


def check_lines(checks: dict) -> list[str]:
  """``- claim: yes (detail)`` lines of a summary, one per ``{claim: (ok, detail)}``."""
  return [f"- {name}: {'yes' if ok else 'no'} ({detail})" for name, (ok, detail) in checks.items()]


def wall_line(res: dict) -> str:
  """The last line of a summary: wall time and machine."""
  return f"Wall time {res['wall_time_s'] / 60:.1f} min; machine: {res['machine']}."


def write_tables(out: pathlib.Path, lines: list[str], wall: float) -> None:
  """Writes ``tables.md`` into ``out`` and prints it with the wall time."""
  (out / "tables.md").write_text("\n".join(lines) + "\n")
  say("\n".join(lines))
  say(f"wall time {wall:.0f}s; wrote {out}")


def parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
  """An argument parser with ``--out`` (default: `default_out`) and ``--quick`` (the CI smoke test)."""
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--out", default=None, help=f"output directory (default experiments/results/{name}, "
                 f"or experiments/results/{name}/quick with --quick)")
  p.add_argument("--quick", action="store_true", help=f"CI smoke test: {quick_help}")
  return p


def default_out(args: argparse.Namespace, name: str) -> argparse.Namespace:
  """Fills ``args.out`` when not given: ``experiments/results/<name>`` (``.../quick`` with ``--quick``)."""
  if args.out is None:
    args.out = f"experiments/results/{name}" + ("/quick" if args.quick else "")
  return args


def start(out: str | os.PathLike) -> tuple[pathlib.Path, float]:
  """The output folder (created) and the start time of the run."""
  return output_dir(out), time.perf_counter()


# -----------------------------------------------------------------------------
# Up-front checks, staged output folders and Ctrl-C (used by the demo)
# -----------------------------------------------------------------------------

INSTALL_EXTRAS = "pip install -e '.[experiments]'"


def require_packages(p: argparse.ArgumentParser, packages: Iterable[str]) -> None:
  """``p.error(...)`` (exit 2) naming the missing ones of ``packages`` and the install command.

  Each package is imported (not just looked up), so a broken install counts as missing.
  """
  missing = []
  for name in packages:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    p.error(f"missing package{'s' if len(missing) > 1 else ''} {', '.join(missing)} (the 'experiments' "
            f"extra); install it with: {INSTALL_EXTRAS}")


@dataclasses.dataclass
class StagedOutput:
  """A run folder written as ``staging`` and renamed to ``final`` only by `commit`.

  ``staging`` is the sibling ``<final>.incomplete-<pid>``: an interrupted or failed
  run leaves it (clearly incomplete) and never touches ``final``.
  """

  final: pathlib.Path
  staging: pathlib.Path

  def commit(self) -> pathlib.Path:
    """Renames ``staging`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    aside = None
    if os.path.lexists(self.final):
      aside = _free_sibling(self.final, "replaced")
      os.rename(self.final, aside)
    os.rename(self.staging, self.final)
    if aside is not None:
      shutil.rmtree(aside)
    return self.final


def _free_sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
  base = path.parent / f"{path.name}.{tag}-{os.getpid()}"
  candidate, i = base, 0
  while os.path.lexists(candidate):
    i += 1
    candidate = base.with_name(f"{base.name}-{i}")
  return candidate


def stage_output(p: argparse.ArgumentParser, path: str | os.PathLike, *, overwrite: bool = False,
                 replaceable: Callable[[str], bool] | None = None, flag: str = "--out") -> StagedOutput:
  """Checks the output folder argument and creates its staging folder; errors go to ``p.error``.

  Refused (exit 2, naming ``flag``): an existing file or symlink; a folder with
  files in it unless ``overwrite`` (then also one holding a name that
  ``replaceable`` rejects: never replace what is not a run's output); a parent
  that cannot be created or written (checked by creating the staging folder).
  """
  out = pathlib.Path(path)
  if not out.name or out.name in (".", ".."):
    p.error(f"{flag} {str(path)!r}: give a folder name (e.g. runs/demo)")
  if out.is_symlink():
    p.error(f"{flag} {str(out)!r} is a symlink; give the folder itself")
  if out.exists() and not out.is_dir():
    p.error(f"{flag} {str(out)!r} is an existing file, not a folder; choose another path")
  if out.is_dir():
    try:
      entries = sorted(e.name for e in out.iterdir())
    except OSError as e:
      p.error(f"{flag} {str(out)!r} cannot be read: {e.strerror or e}")
    if entries and not overwrite:
      p.error(f"{flag} {str(out)!r} already exists and is not empty; pass --overwrite to replace it "
              f"(once the new run completes) or choose another folder")
    foreign = [e for e in entries if replaceable is not None and not replaceable(e)]
    if foreign:
      p.error(f"{flag} {str(out)!r} holds files that are not this script's outputs ({', '.join(foreign[:3])}"
              f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it even with --overwrite")
  ancestor = out.parent
  while not ancestor.exists() and ancestor != ancestor.parent:
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    p.error(f"{flag} {str(out)!r}: {str(ancestor)!r} is a file, not a folder")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _free_sibling(out, "incomplete")
    staging.mkdir()
  except OSError as e:
    p.error(f"{flag} {str(out)!r}: cannot create folders in {str(out.parent)!r} "
            f"({e.strerror or e}); choose a writable location")
  return StagedOutput(final=out, staging=staging)


class InterruptGuard:
  """Context manager owning SIGINT for a run: Ctrl-C is recorded and raised, never lost.

  The first Ctrl-C sets `interrupted` and raises ``KeyboardInterrupt`` (inside
  `deferred`, it is only recorded). A second one ends the process at once
  (``os._exit(130)``), so a hung clean-up cannot keep the process alive. In a
  thread other than the main one (where handlers cannot be set) it does nothing.
  """

  def __init__(self):
    self.count = 0
    self._defer = 0
    self._previous = None

  @property
  def interrupted(self) -> bool:
    return self.count > 0

  def _handler(self, signum, frame):
    self.count += 1
    if self.count > 1:
      try:
        sys.stdout.flush()
      finally:
        os.write(2, b"interrupted again; exiting now\n")
        os._exit(130)
    if not self._defer:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """Within it, a (first) Ctrl-C is only recorded: for steps that must not be cut in half."""
    self._defer += 1
    try:
      yield
    finally:
      self._defer -= 1

  def __enter__(self) -> InterruptGuard:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
