"""Writes reference trajectories of the official SOAP optimizer (Vyas et al., 2024).

Not run by the tests or CI: its output, ``soap_official.npz`` beside this file,
is committed. It needs PyTorch and the authors' ``soap.py`` (github.com/
nikhilvyas/SOAP at commit `SOAP_COMMIT`, sha256 `SOAP_PY_SHA256`), which is
imported at run time from ``--soap-dir`` (a checkout of that repository, any
folder holding that ``soap.py``, or a bare git directory of the repository, read
at that commit) and never stored here. In a fresh environment::

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch numpy
  git clone https://github.com/nikhilvyas/SOAP /tmp/SOAP
  git -C /tmp/SOAP checkout a1e553530fde97d0e6b307d7c82ac6d38b072340
  /tmp/torchenv/bin/python tests/reference/generate_soap_official.py --soap-dir /tmp/SOAP

What it does: the parameters of `PARAMS` (float32 initial values) are stepped
`STEPS` times by ``soap.SOAP`` with ``p.grad`` set to a fixed seeded sequence of
gradients (Gaussian around a fixed per-tensor mean, per-row scales, rounded to
float16 so that they are stored exactly in half the bytes), once per case of
`CASES`: `BASE` with a few hyperparameters changed. Every parameter has its
own SOAP state, so parameters can be compared one by one. ``max_precond_dim``
is 8 in every case, so the 12-row axis of ``tall`` is never preconditioned.
``conv`` is ``(2, 3, 6)`` so that ``merge_dims`` merges it to ``(6, 6)`` (both
merge branches are exercised: ``2*3`` is merged, ``6*6 > 8`` starts a new
group; ``tall`` takes the branch of a lone axis above the limit).

Cases run in float32, as users do, except ``default_f64``: the default case
with float64 parameters, ``torch.set_default_dtype(torch.float64)`` (the GG
matrices are allocated in the default dtype, see note 14) and the eigh / QR of
the preconditioner kept in float64 (the official code computes them in float32
whatever the parameter dtype; `eigh_in_param_dtype` lifts that for this one
case so that it is a tight reference).

File contents (``np.load(..., allow_pickle=False)``): ``meta`` a JSON string
(optimizer, source, commit, sha256 of soap.py, torch and numpy versions, seed,
steps, the parameters, and per case every SOAP hyperparameter, the dtypes, the
recorded steps and per parameter the preconditioner layout and eigengap
diagnostics, see `run_case`); ``init/<p>`` the initial parameter ``p``
(float32); ``grads/<p>`` its gradients ``(STEPS, *shape)`` (float16, exact: cast
them to the parameter dtype); ``<case>/traj/<p>`` the parameter after every
step, ``(STEPS, *shape)``, row ``t - 1`` after step ``t``; and the SOAP state
after each step of ``meta["cases"][case]["state_steps"]``, stacked on a first
axis: ``<case>/exp_avg/<p>`` (as stored: in the eigenbasis of the Q recorded
with it, see note 4; ``project_back`` it with that Q for a sign-independent
comparison, note 15), ``<case>/exp_avg_sq/<p>``
and, for each preconditioned (merged) axis ``i``, ``<case>/GG<i>/<p>`` and
``<case>/Q<i>/<p>`` ``(n, d_i, d_i)``. Arrays are in the case dtype.

Behaviour of the official ``soap.py`` (line numbers of that file at
`SOAP_COMMIT`) that a reimplementation must match. ``t`` counts ``step()``
calls, ``k`` is ``state["step"]``.

1. First call (no ``"Q"`` in the state, 139-153): ``exp_avg``, ``exp_avg_sq``
   are zeros (133-137), the GG matrices zeros (220-234); ``update_preconditioner``
   folds the gradient into GG and computes ``Q`` by eigh (149-152, 300-301);
   then ``continue`` (153): the parameter does not move, no weight decay, the
   moments stay zero and ``k`` stays 0 (130; the increment, 163, is skipped).
   The first gradient only ever enters GG. From call ``t >= 2`` on, ``k = t - 1``
   after the increment at 163, and every ``k`` below is that one.
2. GG update (268-298), after the parameter update of every call: for each
   preconditioned axis ``i`` of the (possibly merged) gradient,
   ``GG_i.lerp_(G_(i) G_(i)^T, 1 - sb)``, i.e. ``GG_i <- sb GG_i + (1 - sb) outer``,
   the outer product contracting every other axis (283-287, 292-297), no bias
   correction, from zeros (so ``GG_i = (1 - sb) outer`` after call 1).
   ``sb = shampoo_beta`` if ``shampoo_beta >= 0`` else ``betas[1]`` (145; -1 is
   the default, 52), fixed in the state at the first call (238). 1-D: ``g g^T``
   (277).
3. Projection (240-266): for each axis in order, ``tensordot(x, Q_i, [[0], [0]])``
   (``Q_i^T`` on axis 0, which then becomes the last axis) or, for an axis
   without a preconditioner, a cyclic permutation (258-259): after all axes the
   order is back and ``x'`` is ``x`` times ``Q_i^T`` along every preconditioned
   axis ``i`` (``Q_L^T G Q_R`` in 2-D). Back projection (309-334) contracts
   ``[[0], [1]]``: ``Q_i`` along every axis (``Q_L G Q_R^T``).
4. Calls ``t >= 2`` (155-210): ``g' = project(g)`` with the current Q (157);
   ``m <- b1 m + (1 - b1) g'``, ``v <- b2 v + (1 - b2) g'^2`` (167-168): both
   moments live in the eigenbasis; no re-projection of m before use (176).
5. ``denom = sqrt(v) + eps`` (170): eps is added to the square root of the
   *uncorrected* v. Bias correction (179-182), with ``k = t - 1``:
   ``step_size = lr * sqrt(1 - b2^k) / (1 - b1^k)``, folded into the step size
   (Adam's "efficient" form: eps is not bias corrected). ``correct_bias=False``:
   ``step_size = lr``.
6. ``u = project_back(m / denom)`` (186); with ``normalize_grads``,
   ``u <- u / (1e-30 + sqrt(mean(u^2)))`` over the whole parameter tensor
   (189-190), before the step size; ``p <- p - step_size u`` (192).
7. Weight decay (203-204): after the update, on the *updated* parameter,
   ``p <- p - lr wd p`` (decoupled, scaled by ``lr`` alone: no bias-correction
   factor, not ``step_size``); not applied on the first call.
8. After the update (207-210, 268-307): ``m <- project_back(m)`` with the old Q
   (273-274); GG update with the current gradient (note 2); if ``k > 0`` and
   ``k % precondition_frequency == 0`` the QR refresh (302-303); then
   ``m <- project(m)`` with the (new) Q (306-307). So m is taken to the
   parameter basis and back on every call ``t >= 2``, a float round trip even
   when Q is unchanged, and the refreshes happen on calls
   ``t = f + 1, 2f + 1, ...`` (``f = precondition_frequency``), with GG already
   holding that call's gradient; that call's update used the old Q.
9. First Q (``get_orthogonal_matrix``, 337-370), on call 1 only, never again:
   ``eigh(GG_i + 1e-30 I)`` (361; retried in float64 if it raises, 362-364),
   columns flipped to descending eigenvalues (365). It runs in float32: non
   float32 GG are cast by ``.float()`` (346-350) and Q cast back (367-368).
10. QR refresh (``get_orthogonal_matrix_QR``, 373-430), for each preconditioned
    axis ``i`` in order: ``est = diag(Q_i^T GG_i Q_i)`` (412), ``idx =
    argsort(est, descending)`` (413); ``v`` is re-ordered along axis ``i`` by
    ``idx`` (414; on the merged view with ``merge_dims``, 402-405, reshaped back
    423-427): v is only permuted, never rotated into the new basis; ``Q_i[:,
    idx]`` (415); ``Q_i <- qr(GG_i @ Q_i[:, idx]).Q`` (416-417: one power
    iteration, torch's reduced Householder QR, no sign normalisation). Also in
    float32 (388-397) whatever the dtype.
11. Axes above ``max_precond_dim`` (strictly: ``sh > max_precond_dim``, 231,
    282, 291): GG and Q entries are ``[]``, no outer product is accumulated and
    the projection only cycles the axis (identity along it), 258-259, 326-327;
    the refresh skips them (409-411).
12. 1-D parameters (221-225, 275-277): one ``n x n`` GG iff ``precondition_1d``
    and ``n <= max_precond_dim``, else ``GG = Q = [[]]``: then SOAP is Adam in
    the form of note 5, with the first gradient skipped (note 1). They are
    never merged (the 1-D test on the raw gradient comes first, 221, 275).
13. ``merge_dims`` (79-106, applied at 227-228, 279-280, 245-248, 314-317,
    402-403): greedy left to right: ``c = 1``; for each axis ``s``: if ``c s >
    max_precond_dim``, emit ``c`` and restart with ``c = s`` if ``c > 1``, else
    emit ``s`` and keep ``c = 1``; otherwise ``c <- c s``; at the end emit ``c`` if
    ``c > 1`` or nothing was emitted. Size-1 axes vanish; a tensor can merge to
    1-D and is then preconditioned whatever ``precondition_1d`` (the 1-D test
    looks at the unmerged gradient). 4-D ``channels_last`` is permuted to NCHW
    first (84-85). Projections reshape back to the parameter shape (261-265,
    329-333), so every state tensor except GG/Q has the parameter's shape.
14. GG is allocated with ``torch.zeros(d, d)`` in the *default* dtype (225, 234):
    a float64 parameter under the float32 default fails in ``lerp_`` ("expected
    dtype float for `end` but got dtype double", checked with torch 2.13).
15. The parameter update is invariant to the signs of the columns of Q (m and
    the update change sign together, v does not); the stored ``exp_avg`` and
    ``Q`` are not: compare them up to column signs, or compare ``exp_avg``
    projected back with its Q.
16. Degenerate first eigenbases: GG after call 1 is ``(1 - sb) G_(i) G_(i)^T``,
    of rank at most the product of the other axes. For ``kernel`` (6, 4) the
    6 x 6 GG has rank 4, with ``precondition_1d`` the 4 x 4 GG of ``bias`` rank 1
    (and ``merge_dims`` of a (5, 3, 2) tensor, (5, 6), would give a 6 x 6 of
    rank 5, hence ``conv`` is (2, 3, 6)). The eigenvectors of the (numerically)
    zero eigenvalues are then set by rounding inside eigh, and they matter for
    every later step (v is elementwise in that basis; the QR power iteration
    starts from it). Such parameters are flagged ``init_degenerate`` in the
    meta; replay them from the recorded state after step 1 (Q of
    ``state_steps[0] == 1``), after which everything is determined up to
    rounding and column signs. ``init_min_rel_eigengap`` and
    ``refresh_min_rel_gap`` (the smallest gap of the sorted ``est`` of note 10,
    relative to the largest) say how well separated the rest is.

Checked when the file was written: a float64 numpy replay of notes 1-13 with Q
of step 1 taken from the file reproduces ``default_f64`` to 1e-15 and every
float32 case to 1.0e-6 (max abs, all parameters, all steps). Computing that
first Q with numpy's eigh instead agrees as well for every parameter not flagged
``init_degenerate`` (at most 2.3e-6 in float32, 1e-15 in float64) but differs by
1e-3 to 2e-2 for the flagged ones (``kernel``; ``bias`` with ``precondition_1d``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import pathlib
import subprocess
import tempfile

import numpy as np
import torch

OUT_DIR = pathlib.Path(__file__).resolve().parent
OUT_NAME = "soap_official.npz"
SOAP_REPO = "nikhilvyas/SOAP"
SOAP_COMMIT = "a1e553530fde97d0e6b307d7c82ac6d38b072340"
SOAP_PY_SHA256 = "9e9021335ad02371584622fa256e73fe75f3eb74446a8d8a216e956534148f6b"

STEPS = 30
SEED = 20250417
DEGENERATE_GAP = 1e-6  # relative eigengap below which the first eigenbasis is ill-defined

# (name, shape). Each parameter has its own SOAP state.
PARAMS = [
    ("kernel", (6, 4)),  # rectangular: the 6 x 6 GG has rank 4 after step 1 (note 16)
    ("square", (5, 5)),  # both GG full rank after step 1
    ("conv", (2, 3, 6)),  # 3-D; merge_dims (max 8) -> (6, 6)
    ("bias", (4,)),  # 1-D: Adam unless precondition_1d
    ("tall", (12, 3)),  # 12 > max_precond_dim: only the 3 x 3 GG
]

# Every keyword of soap.SOAP.__init__ (47-62); cases change a few of them.
BASE = {"lr": 1e-2, "betas": [0.95, 0.95], "shampoo_beta": -1.0, "eps": 1e-8,
        "weight_decay": 0.01, "precondition_frequency": 5, "max_precond_dim": 8,
        "merge_dims": False, "precondition_1d": False, "normalize_grads": False,
        "data_format": "channels_first", "correct_bias": True}

# (case name, hyperparameters changed from BASE, dtype).
CASES = [
    ("default", {}, "float32"),
    ("default_f64", {}, "float64"),
    ("shampoo_beta", {"shampoo_beta": 0.9}, "float32"),
    ("precondition_1d", {"precondition_1d": True}, "float32"),
    ("merge_dims", {"merge_dims": True}, "float32"),
    ("normalize_grads", {"normalize_grads": True}, "float32"),
    ("no_correct_bias", {"correct_bias": False}, "float32"),
    ("weight_decay", {"weight_decay": 0.5}, "float32"),
]


def state_steps(freq: int) -> list[int]:
  """Steps after which the state is recorded: 1 (GG and Q only), 2 (first moments), the last before the
  first QR refresh, that refresh (call ``freq + 1``, note 8) and the last step."""
  return sorted({1, 2, freq, freq + 1, STEPS})


def load_soap(soap_dir: str, tmp: pathlib.Path):
  """The official module: ``soap.py`` of a folder, or of `SOAP_COMMIT` in a bare git directory."""
  path = pathlib.Path(soap_dir)
  path = path if path.name == "soap.py" else path / "soap.py"
  if not path.exists() and (path.parent / "HEAD").exists():  # a bare clone / mirror
    source = subprocess.run(["git", "--git-dir", str(path.parent), "show", f"{SOAP_COMMIT}:soap.py"],
                            check=True, capture_output=True).stdout
    path = tmp / "soap.py"
    path.write_bytes(source)
  source = path.read_bytes()
  digest = hashlib.sha256(source).hexdigest()
  assert digest == SOAP_PY_SHA256, f"{path}: sha256 {digest}, need soap.py at {SOAP_COMMIT}"
  spec = importlib.util.spec_from_file_location("official_soap", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, digest


def initial_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
  out = {}
  for name, shape in PARAMS:
    fan_in = shape[0] if len(shape) > 1 else 4
    out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  return out


def gradients(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """``(STEPS, *shape)`` float16: a fixed mean plus Gaussian noise, times per-row and per-tensor scales."""
  out = {}
  for name, shape in PARAMS:
    scale = np.exp(rng.normal(0.0, 0.5))  # per tensor, then per row (first axis)
    scale = scale * np.exp(rng.normal(0.0, 0.5, size=shape[:1] + (1,) * (len(shape) - 1)))
    mean = 0.5 * rng.standard_normal(shape)
    g = (mean + rng.standard_normal((STEPS,) + shape)) * scale
    out[name] = g.astype(np.float16)
  return out


@contextlib.contextmanager
def eigh_in_param_dtype(dtype: torch.dtype):
  """For float64: default dtype float64 (GG are allocated in it, 225/234) and ``Tensor.float()`` a no-op on
  float64 tensors, so that ``get_orthogonal_matrix`` / ``_QR`` (346-350, 388-397) stay in float64."""
  if dtype != torch.float64:
    yield
    return
  original_float, original_default = torch.Tensor.float, torch.get_default_dtype()
  torch.Tensor.float = lambda self, *a, **k: (
      self if self.dtype == torch.float64 else original_float(self, *a, **k))
  torch.set_default_dtype(torch.float64)
  try:
    yield
  finally:
    torch.Tensor.float = original_float
    torch.set_default_dtype(original_default)


def _np(x: torch.Tensor) -> np.ndarray:
  return x.detach().cpu().numpy().copy()


def rel_gaps(values: np.ndarray) -> float | None:
  """Smallest gap between consecutive sorted values, relative to the largest |value|."""
  v = np.sort(np.asarray(values, np.float64))[::-1]
  if v.size < 2:
    return None
  return float(np.min(v[:-1] - v[1:]) / max(abs(v[0]), 1e-300))


def run_case(official, hp: dict, dtype_name: str, init: dict, grads: dict) -> tuple[dict, dict]:
  dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  np_dtype = {"float32": np.float32, "float64": np.float64}[dtype_name]
  names = [n for n, _ in PARAMS]
  params = {n: torch.nn.Parameter(torch.tensor(init[n].astype(np_dtype))) for n in names}
  opt = official.SOAP(
      list(params.values()), lr=hp["lr"], betas=tuple(hp["betas"]), shampoo_beta=hp["shampoo_beta"],
      eps=hp["eps"], weight_decay=hp["weight_decay"], precondition_frequency=hp["precondition_frequency"],
      max_precond_dim=hp["max_precond_dim"], merge_dims=hp["merge_dims"],
      precondition_1d=hp["precondition_1d"], normalize_grads=hp["normalize_grads"],
      data_format=hp["data_format"], correct_bias=hp["correct_bias"])
  record = state_steps(hp["precondition_frequency"])
  arrays = {f"traj/{n}": [] for n in names}
  per_param = {n: {"refresh_calls": [], "refresh_min_rel_gap": []} for n in names}
  counters = []
  for t in range(1, STEPS + 1):
    q_before = {n: [None if len(q) == 0 else _np(q).astype(np.float64) for q in opt.state[p]["Q"]]
                for n, p in params.items() if "Q" in opt.state[p]}
    for n, p in params.items():
      p.grad = torch.tensor(grads[n][t - 1].astype(np_dtype))
    with eigh_in_param_dtype(dtype):
      opt.step()
    for n, p in params.items():
      arrays[f"traj/{n}"].append(_np(p))
      st = opt.state[p]
      if t == 1:
        merged = opt.merge_dims(p.grad, hp["max_precond_dim"]) if hp["merge_dims"] and p.dim() > 1 else p
        per_param[n]["merged_shape"] = list(merged.shape)
        per_param[n]["preconditioned"] = [len(gg) > 0 for gg in st["GG"]]
        gaps = [None if len(gg) == 0 else rel_gaps(np.linalg.eigvalsh(_np(gg).astype(np.float64)))
                for gg in st["GG"]]
        per_param[n]["init_min_rel_eigengap"] = gaps
        per_param[n]["init_degenerate"] = any(g is not None and g < DEGENERATE_GAP for g in gaps)
      elif st["step"] % st["precondition_frequency"] == 0 and any(len(gg) for gg in st["GG"]):
        # the QR refresh (302-303) ran on this call
        per_param[n]["refresh_calls"].append(t)
        per_param[n]["refresh_min_rel_gap"].append(
            [None if q is None else rel_gaps(np.diag(q.T @ _np(gg).astype(np.float64) @ q))
             for q, gg in zip(q_before[n], st["GG"])])
    if t in record:
      counters.append(int(opt.state[params[names[0]]]["step"]))
      for n, p in params.items():
        st = opt.state[p]
        for key, value in (("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"])):
          arrays.setdefault(f"{key}/{n}", []).append(_np(value))
        for i, (gg, q) in enumerate(zip(st["GG"], st["Q"])):
          if len(gg):
            arrays.setdefault(f"GG{i}/{n}", []).append(_np(gg))
            arrays.setdefault(f"Q{i}/{n}", []).append(_np(q))
  out = {}
  for key, values in arrays.items():
    stacked = np.stack(values)
    assert stacked.dtype == np_dtype, (key, stacked.dtype)
    out[key] = stacked
  meta = {"hyperparameters": hp, "dtype": dtype_name,
          "eigh_qr_dtype": dtype_name,  # official: float32 always; float64 only via eigh_in_param_dtype
          "state_steps": record, "state_step_counter": counters, "params": per_param}
  return out, meta


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--soap-dir", required=True,
                      help=(f"a checkout of github.com/{SOAP_REPO} at {SOAP_COMMIT[:7]}, a folder holding its soap.py, "
                            "or a bare git directory of it"))
  parser.add_argument("--out", default=str(OUT_DIR / OUT_NAME))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    official, digest = load_soap(args.soap_dir, pathlib.Path(tmp))
  torch.manual_seed(0)
  torch.set_num_threads(1)
  rng = np.random.default_rng(SEED)
  init, grads = initial_params(rng), gradients(rng)
  arrays = {}
  for name, _ in PARAMS:
    arrays[f"init/{name}"], arrays[f"grads/{name}"] = init[name], grads[name]
  cases = {}
  for case, overrides, dtype_name in CASES:
    hp = {**BASE, **overrides}
    case_arrays, cases[case] = run_case(official, hp, dtype_name, init, grads)
    arrays.update({f"{case}/{k}": v for k, v in case_arrays.items()})
  meta = {
      "optimizer": "soap.SOAP", "source": f"github.com/{SOAP_REPO}", "commit": SOAP_COMMIT,
      "soap_py_sha256": digest, "torch": torch.__version__, "numpy": np.__version__,
      "generator": "tests/reference/generate_soap_official.py", "seed": SEED, "steps": STEPS,
      "params": [{"name": n, "shape": list(s)} for n, s in PARAMS], "base": BASE,
      "case_order": [c[0] for c in CASES], "cases": cases,
      "degenerate_gap": DEGENERATE_GAP,
      "note": ("traj row t-1 is after step t; state arrays stacked over state_steps; exp_avg is stored in the "
               "eigenbasis of the Q recorded with it; GG<i>/Q<i> only for preconditioned axes "
               "of the merged shape (see merged_shape, preconditioned); gradients float16, exact"),
  }
  arrays["meta"] = np.array(json.dumps(meta, indent=1, sort_keys=True))
  out = pathlib.Path(args.out)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
  main()
