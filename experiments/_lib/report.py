"""What every experiment script does around its loop: arguments, output folder, results files."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["check_lines", "default_out", "finish", "floats", "parser", "start", "lm_arguments", "machine", "output_dir", "say", "wall_line", "write_tables"]


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
