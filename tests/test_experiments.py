"""Every experiment script's --quick mode runs and writes its raw results (CI smoke test).

Each runs as ``python -m experiments.<name>`` from the repository root, as documented; the demo
has its own test (tests/test_demo.py).
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.py")
                     if not p.name.startswith("_") and p.stem != "demo")


@pytest.mark.parametrize("script", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_quick(script, tmp_path):
  out = tmp_path / script.stem
  proc = subprocess.run([sys.executable, "-m", f"experiments.{script.stem}", "--quick", "--out", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT,
                        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  pngs = list(out.rglob("*.png"))
  raw = list(out.rglob("*.json")) + list(out.rglob("*.csv"))
  assert pngs and raw, f"{script.stem} wrote no figure or no raw results"
  for path in pngs:
    assert path.read_bytes()[:4] == b"\x89PNG"
  for path in out.rglob("*.json"):
    json.loads(path.read_text())
