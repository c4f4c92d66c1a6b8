"""Executes the notebooks in `notebooks/` and checks numbers they print against independent references.

Each notebook runs top to bottom in a fresh `python3` kernel (nbclient) started from *this* interpreter: a
private kernelspec written into a temporary directory points at `sys.executable`, so a fresh CI virtual
environment uses its own packages whatever kernelspecs the machine has; the test also asks the kernel for
`sys.prefix`. The kernel inherits the environment: `JAX_PLATFORMS=cpu` (tests/conftest.py), a temporary
`SLIMOPTAX_CACHE` for the tokenizer and `SLIMOPTAX_REPO`, the repository root, where the notebooks find the
experiment helpers (`experiments._lib`). Each notebook's working directory is a temporary directory.

One test per notebook (execution dominates; one test keeps pytest-xdist from running a notebook twice).
"""

import ast
import csv
import json
import math
import os
import pathlib
import re
import sys

import nbformat
import numpy as np
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
_PROBE = "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)\nprint('KERNEL_EXECUTABLE=' + sys.executable)"


def _kernel_manager(tmp: pathlib.Path) -> KernelManager:
  """A KernelManager for a `python3` kernelspec that runs this interpreter (`sys.executable`)."""
  kernels = tmp / "kernels"
  write_kernel_spec(path=str(kernels / "python3"))  # argv: [sys.executable, "-m", "ipykernel_launcher", ...]
  spec_manager = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
  assert spec_manager.get_kernel_spec("python3").argv[0] == sys.executable
  return KernelManager(kernel_name="python3", kernel_spec_manager=spec_manager)


def _execute(name: str, tmp_path: pathlib.Path, monkeypatch) -> tuple[nbformat.NotebookNode, str, pathlib.Path]:
  """Runs notebooks/<name> in a fresh kernel; returns (executed notebook, its stdout, working directory)."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
  work = tmp_path / "work"
  work.mkdir()
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("SLIMOPTAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("SLIMOPTAX_REPO", str(REPO))
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": str(work)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      errors = [o for o in cell.outputs if o.output_type == "error"]
      assert not errors, f"{name} cell {i}: {errors[0].ename}: {errors[0].evalue}"
  stdout = "".join(o.text for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")
  # The kernel ran this interpreter, not whatever `python` a machine-wide kernelspec names.
  assert _number(stdout, r"KERNEL_PREFIX=(.*)", str) == sys.prefix
  assert _number(stdout, r"KERNEL_EXECUTABLE=(.*)", str) == sys.executable
  return nb, stdout, work


def _number(text: str, pattern: str, kind=float):
  match = re.search(pattern, text)
  assert match, f"no line matching {pattern!r} in the notebook's output:\n{text[-3000:]}"
  return kind(match.group(1).strip())


def _images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for o in cell.outputs)


# --------------------------------------------------------------------------
# The notebooks as stored: Colab-ready, outputs cleared.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart.ipynb", "snr_walkthrough.ipynb", "transforms_tour.ipynb"])
def test_notebook_is_clean_and_colab_ready(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
  install = nb.cells[1]
  assert install.cell_type == "code"
  assert 'importlib.util.find_spec("slimoptax") is None' in install.source and "%pip install" in install.source
  platform = nb.cells[2].source
  assert 'os.environ.setdefault("JAX_PLATFORMS", "cpu")' in platform and "if not USE_ACCELERATOR" in platform
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not cleared"


# --------------------------------------------------------------------------
# quickstart.ipynb
# --------------------------------------------------------------------------


def _slimadam_kept_closed_form(c: dict) -> int:
  """Second moments the "slimadam" preset (Table 3) keeps for a tied-embedding GPT (experiments._lib), by hand.

  Per block: query/key averaged over fan_in (keep H*hd = d each), value over fan_out (keep d), attention out
  over fan_out (keep H*hd = d), MLP up over fan_out (keep d), MLP down over fan_out (keep 4d), two LayerNorm
  scales kept whole (2d): 11d. Token / position embeddings keep one per row (V, T); ln_f keeps d.
  """
  d = c["d_model"]
  return c["vocab_size"] + c["seq_len"] + c["n_layers"] * 11 * d + d


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
  import jax
  import optax
  from flax import nnx

  import slimoptax
  from experiments._lib import model as lm_model

  nb, out, _ = _execute("quickstart.ipynb", tmp_path, monkeypatch)
  config = json.loads(_number(out, r"model config: (\{.*\})", str))
  assert config["tie_embeddings"] and config["attention"] == "mha"

  # Fraction of second moments saved: printed vs a memory report computed here from shapes alone...
  printed = _number(out, r"fraction of second moments saved: ([0-9.]+)")
  model = nnx.eval_shape(lambda: lm_model.GPT(lm_model.GPTConfig(**config), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  tx = slimoptax.slim_adamw(1e-3, compress="slimadam")
  report = slimoptax.memory_report(jax.eval_shape(tx.init, params), params)
  assert printed == pytest.approx(report.fraction_saved, abs=1e-6)
  # ... and vs Table 3 worked out by hand.
  total = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  assert report.adam_entries == total
  assert printed == pytest.approx(1 - _slimadam_kept_closed_form(config) / total, abs=1e-6)
  adam_report = slimoptax.memory_report(jax.eval_shape(optax.adamw(1e-3).init, params), params)
  assert adam_report.fraction_saved == 0.0
  assert _number(out, r"second moments: ([0-9,]+) ->", lambda s: int(s.replace(",", ""))) == total

  # GPT-2 small: ~0.12% kept (README).
  assert _number(out, r"keeps [0-9,]+ second moments \(([0-9.]+)%\)") == pytest.approx(0.123, abs=0.001)

  # Both optimizers learned (loss well below log(vocab) = loss at init) and ended close to each other.
  adam = _number(out, r"optax\.adamw\s+train loss [0-9.]+\s+validation loss ([0-9.]+)")
  slim = _number(out, r'slim_adamw\("slimadam"\)\s+train loss [0-9.]+\s+validation loss ([0-9.]+)')
  for loss in (adam, slim):
    assert math.isfinite(loss) and loss < math.log(config["vocab_size"]) - 0.5
  assert abs(slim - adam) < 0.5

  # With compress=None, slim_adamw is optax.adamw.
  assert _number(out, r"compress=None\)\| = ([0-9.e+-]+)") < 1e-6
  assert _images(nb) >= 1


# --------------------------------------------------------------------------
# snr_walkthrough.ipynb
# --------------------------------------------------------------------------


def _rules_by_hand(csv_path: pathlib.Path, cutoff: float = 1.0, depth: bool = False) -> dict[str, tuple]:
  """SlimAdam's selection rule (Kalra et al. §5) applied to the raw SNR measurements, without slimoptax.

  Mean SNR over the measured steps (non-finite values left out) per parameter and candidate; optionally
  averaged over layers (the layer index in ``blocks/<i>/`` replaced by ``*``); matrices take the candidate with
  the highest mean above the cutoff, vectors and matrices with no candidate above it get ``()``.
  """
  series, shapes = {}, {}
  with open(csv_path, newline="") as f:
    for row in csv.DictReader(f):
      shapes[row["key"]] = ast.literal_eval(row["shape"])
      series.setdefault(row["key"], {}).setdefault(ast.literal_eval(row["compress_dims"]), []).append(
          float(row["snr"]))
  mean = lambda xs: float(np.mean([x for x in xs if math.isfinite(x)])) if any(map(math.isfinite, xs)) else math.nan
  table = {k: {axes: mean(v) for axes, v in per.items()} for k, per in series.items()}
  if depth:
    grouped, group_shapes = {}, {}
    for k, per in table.items():
      g = re.sub(r"^blocks/\d+/", "blocks/*/", k)
      group_shapes[g] = shapes[k]
      for axes, v in per.items():
        grouped.setdefault(g, {}).setdefault(axes, []).append(v)
    table = {g: {axes: mean(v) for axes, v in per.items()} for g, per in grouped.items()}
    shapes = group_shapes
  out = {}
  for k, per in table.items():
    passing = [(v, axes) for axes, v in per.items() if math.isfinite(v) and v > cutoff]
    out[k] = max(passing)[1] if len(shapes[k]) >= 2 and passing else ()
  return out, shapes


@pytest.mark.slow
def test_snr_walkthrough(tmp_path, monkeypatch):
  nb, out, work = _execute("snr_walkthrough.ipynb", tmp_path, monkeypatch)
  folder = work / "snr_walkthrough_out"
  assert {"rules.json", "rules_depth.json", "snr.csv", "snr_trajectories.png", "snr_depth.png"} <= {
      p.name for p in folder.iterdir()}

  # The saved rules are SlimAdam's selection rule applied to the saved measurements.
  for depth, filename in ((False, "rules.json"), (True, "rules_depth.json")):
    expected, shapes = _rules_by_hand(folder / "snr.csv", depth=depth)
    saved = {r["label"]: tuple(r["axes"]) for r in json.loads((folder / filename).read_text())["rules"]}
    assert saved == expected, filename
  # Rules were derived from real measurements: most matrices are compressed, and at least 2 kinds of axes.
  per_layer, shapes = _rules_by_hand(folder / "snr.csv")
  matrices = [k for k, s in shapes.items() if len(s) >= 2]
  assert sum(bool(per_layer[k]) for k in matrices) >= len(matrices) // 2

  # Second moments saved by the per-layer rules: printed vs counted by hand from the shapes and the rules.
  kept = sum(math.prod(s for i, s in enumerate(shapes[k]) if i not in per_layer[k]) for k in shapes)
  total = sum(math.prod(s) for s in shapes.values())
  printed = _number(out, r"derived per layer\s+validation loss [0-9.]+\s+second moments\s+[0-9,]+ of [0-9,]+ \(saved ([0-9.]+)\)")
  assert printed == pytest.approx(1 - kept / total, abs=1e-6)
  assert _number(out, r"adam\s+validation loss [0-9.]+\s+second moments\s+[0-9,]+ of [0-9,]+ \(saved ([0-9.]+)\)") == 0.0

  # Training with the rules works and stays near Adam.
  losses = {name: _number(out, rf"  {name}\s+validation loss ([0-9.]+) ")
            for name in ("adam", "derived per layer", "derived depth-averaged")}
  for name, loss in losses.items():
    assert math.isfinite(loss) and loss < 6.0, (name, loss)
    assert abs(loss - losses["adam"]) < 0.5, (name, loss)
  assert _images(nb) >= 3


# --------------------------------------------------------------------------
# transforms_tour.ipynb
# --------------------------------------------------------------------------


def _adam_numpy(grads: np.ndarray, beta: float = 0.95, eps: float = 1e-8) -> np.ndarray:
  """Bias-corrected Adam directions with b1 = b2 = beta, in float64 numpy."""
  m = v = np.zeros_like(grads[0], dtype=np.float64)
  out = []
  for k, g in enumerate(grads.astype(np.float64), start=1):
    m = beta * m + (1 - beta) * g
    v = beta * v + (1 - beta) * g * g
    out.append((m / (1 - beta**k)) / (np.sqrt(v / (1 - beta**k)) + eps))
  return np.stack(out)


@pytest.mark.slow
def test_transforms_tour(tmp_path, monkeypatch):
  nb, out, work = _execute("transforms_tour.ipynb", tmp_path, monkeypatch)
  checks = np.load(work / "transforms_tour_checks.npz")

  # Newton-Schulz (quintic, 5 steps): singular values of the output within [0.68, 1.13]...
  s = np.linalg.svd(checks["ns_output"].astype(np.float64), compute_uv=False)
  assert 0.68 <= s.min() and s.max() <= 1.13
  assert _number(out, r"quintic NS, 5 steps: singular values in \[([0-9.]+),") == pytest.approx(s.min(), abs=1e-3)
  assert _number(out, r"quintic NS, 5 steps: singular values in \[[0-9.]+, ([0-9.]+)\]") == pytest.approx(s.max(), abs=1e-3)
  # ... equal to the quintic polynomial applied 5 times to G's normalized singular values, with G's singular
  # vectors (the iteration is a matrix polynomial: it changes singular values only).
  G = checks["ns_input"].astype(np.float64)
  u, s_in, vt = np.linalg.svd(G, full_matrices=False)
  x = s_in / np.linalg.norm(G)
  for _ in range(5):
    x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
  np.testing.assert_allclose(u.T @ checks["ns_output"] @ vt.T, np.diag(x), atol=2e-3)
  assert _number(out, r"cubic NS, 30 steps: max \|s - 1\| = ([0-9.e+-]+)") < 1e-3

  # Hutchinson vs the exact Hessian diagonal of 0.5 x^T A x, i.e. diag(A): within 5 standard deviations of
  # the Rademacher estimator, std_i = sqrt(sum_{j != i} A_ij^2 / probes).
  A = checks["hutchinson_A"].astype(np.float64)
  h = checks["hutchinson_estimate"].astype(np.float64)
  probes = int(checks["hutchinson_probes"])
  exact = np.diag(A)
  std = np.sqrt(((A**2).sum(axis=1) - exact**2) / probes)
  assert np.all(np.abs(h - exact) <= 5 * std + 1e-4), (h, exact, std)
  assert np.max(np.abs(h - exact) / exact) < 0.05
  printed = _number(out, rf"dense A, +{probes} probes: max relative error vs exact diag\(A\) = ([0-9.]+)")
  assert printed == pytest.approx(np.max(np.abs(h - exact) / exact), abs=1e-4)
  assert _number(out, r"diagonal A, 1 probe: max \|h - diag\(A\)\| = ([0-9.e+-]+)") < 1e-5

  # AdaVar (gamma = tau = beta, bias-corrected) = Adam with b1 = b2 = beta, against a numpy Adam.
  np.testing.assert_allclose(checks["adavar_updates"], _adam_numpy(checks["adavar_grads"]), atol=1e-5)
  assert _number(out, r"Adam\(b1 = b2 = 0\.95\), \d+ steps: max \|difference\| = ([0-9.e+-]+)") < 1e-5

  # Adafactor on a rank-1 g: the factored second moment is exact, so the first step is sign(g).
  np.testing.assert_allclose(checks["adafactor_u"], np.sign(checks["adafactor_g"]), atol=1e-5)

  # Sign methods: SignSGD outputs signs; mollified Signum reaches Signum as eps -> 0.
  assert _number(out, r"SignSGD: fraction of entries in \{-1, \+1\}: ([0-9.]+)") == 1.0
  assert _number(out, r"mollified Signum, eps=1e-16: max \|d - signum d\| = ([0-9.e+-]+)") < 1e-6

  # Every model trained: each run's final loss is finite and below the loss at init (log 256 = 5.55).
  finals = re.findall(r"^(.+): train loss ([0-9.]+) \(first 10 steps\) -> ([0-9.naif]+) \(last 20 steps\)$", out,
                      flags=re.MULTILINE)
  names = {name for name, _, _ in finals}
  for expected in ("adamw", "adafactor", "signum", "adavar", "ladder sgd", "muon", "sophia"):
    assert any(n.startswith(expected) for n in names), (expected, names)
  for name, _, last in finals:
    assert math.isfinite(float(last)) and float(last) < math.log(256), (name, last)
  assert 0.0 < _number(out, r"Sophia win rate .*: ([0-9.]+)") <= 1.0
  assert _images(nb) >= 1
