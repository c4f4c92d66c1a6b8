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


def test_optimizer_consistency_quick_and_report(tmp_path):
  """--quick writes the summary, results and figures with finite numbers; --report rebuilds them from the cells."""
  import math
  out = tmp_path / "optimizer_consistency"
  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
  for extra in ([], ["--report"]):
    proc = subprocess.run([sys.executable, "-m", "experiments.optimizer_consistency", "--quick", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = (out / "summary.md").read_text()
  assert "complete" in summary and "pydoc_data/topics.py" in summary and "Commands" in summary
  res = json.loads((out / "results.json").read_text())
  assert res["complete"] and res["runs_done"] == res["runs_known"] > 0
  assert {p.name for p in out.glob("*.png")} == {"pareto.png", "sparsity.png", "memorization.png"}
  assert list((out / "checkpoints").iterdir())  # orbax checkpoints of the pretrained models
  for pre, per in res["matched"].items():
    assert pre in per and all(math.isfinite(e["forgetting"]["mean"]) for k, e in per.items() if k != "level")
  for pre, e in res["pretrain"].items():
    assert math.isfinite(e["a_loss"]["mean"]) and math.isfinite(e["b_loss"]["mean"])
    assert 0 <= res["sparsity"][pre]["pretrained"]["mean"] <= 1
  for e in res["memorization"].values():
    accs = e["lrs"][e["best_lr"]]["acc"]
    assert all(0 <= v <= 1 for vals in accs.values() for v in vals)
