"""Sharded optimizer states on an 8-device ('data', 'model') = (2, 4) CPU mesh.

The flag that gives JAX 8 host devices must be set before JAX starts, and this
pytest process already started it with one; so `tests/_sharded_worker.py` runs
in two subprocesses (half of the transform matrix each) and reports, per
transform: the parameters after a few sharded steps against the unsharded
(single-device) run, the sharding of every state leaf, a sharded orbax
checkpoint resumed bit-identically, and (for a few) a pmap data-parallel loop
against the single-device full-batch run. The spec logic itself
(`reduced_spec`, `param_index`) is also checked here directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import slimoptax
from slimoptax import sharding as sh
from tests import _sharded_worker as w
from tests.conftest import REPO

WORKER_TIMEOUT_S = 900
# Sharded reductions sum in another order; parameters are O(1) after 4 steps of lr 1e-2.
PARAM_ATOL = 1e-5


def _worker_env() -> dict:
  env = dict(os.environ)
  # Compile faster (tiny programs); the references these runs are compared with
  # either run in the same process or are compared with a tolerance.
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                               w.FAST_XLA_FLAGS]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return w.once_per_run(tmp_path_factory, "sharded", _run_workers)


def _run_workers(out_dir) -> dict:
  """Runs the worker in two processes (the machine has two cores), merges their reports."""
  names = [c.name for c in w.CASES]
  halves = [names[0::2], names[1::2] + ["docs"]]
  procs = []
  for i, half in enumerate(halves):
    out = out_dir / f"part{i}.json"
    log = open(out_dir / f"part{i}.log", "w")
    procs.append((out, log, subprocess.Popen(
        [sys.executable, "-m", "tests._sharded_worker", str(out), *half],
        cwd=REPO, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)))
  merged: dict = {"cases": {}, "skipped": {}, "seconds": {}}
  for out, log, proc in procs:
    try:
      proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
    if proc.returncode != 0 or not out.exists():
      text = open(log.name).read()[-4000:]
      pytest.fail(f"sharded worker failed (rc={proc.returncode}):\n{text}")
    part = json.loads(out.read_text())
    assert part["device_count"] == 8, part.get("error")
    for key in ("cases", "skipped", "seconds"):
      merged[key].update(part[key])
    if "docs" in part:
      merged["docs"] = part["docs"]
    merged["params"] = part["params"]
  return merged


def _case_result(results, case):
  res = results["cases"].get(case.name)
  assert res is not None, f"{case.name} did not run: {results['skipped'].get(case.name)}"
  assert "error" not in res, res["error"]
  return res


def _param_of(leaf_path: str, params: dict) -> str | None:
  """The parameter whose path ends a state leaf's path (longest match)."""
  hits = [p for p in params if leaf_path == p or leaf_path.endswith("/" + p)]
  return max(hits, key=len) if hits else None


@pytest.mark.parametrize("case", w.case_params())
def test_sharded_training_equals_unsharded(results, case):
  res = _case_result(results, case)
  assert res["reference_single_device"]
  assert res["params_on_mesh"]
  assert res["max_param_diff"] < PARAM_ATOL, res["max_param_diff"]


@pytest.mark.parametrize("case", w.case_params())
def test_every_state_leaf_lives_on_the_mesh_with_the_expected_spec(results, case):
  res = _case_result(results, case)
  params = results["params"]
  assert res["state"], "no state leaves reported"
  for leaf in res["state"]:
    where = f"{case.name}: {leaf['path']} {leaf['shape']}"
    assert leaf["is_jax_array"], where
    assert leaf["on_mesh"] and leaf["init_on_mesh"] and leaf["n_devices"] == 8, where
    # The state is born with its sharding (init_sharded) and keeps it through training.
    assert leaf["init_spec"] == leaf["expected_spec"] == leaf["spec"], (where, leaf)
    # Independent of the library: the rule read off the parameter specs.
    spec = leaf["spec"] + [None] * (len(leaf["shape"]) - len(leaf["spec"]))
    param = _param_of(leaf["path"], params)
    if param is None:  # count, PRNG key, win rate: replicated
      assert all(e is None for e in spec), where
      continue
    p_shape, p_spec = params[param]["shape"], params[param]["spec"]
    if leaf["shape"] == p_shape:  # moments the parameter's size: the parameter's spec
      assert spec == p_spec + [None] * (len(p_shape) - len(p_spec)), where
    for size, entry in zip(leaf["shape"], spec):
      if size == 1:  # an averaged / reduced dimension is never split
        assert entry is None, where
    # Whatever is kept is a mesh axis the parameter itself used.
    assert {e for e in spec if e is not None} <= {e for e in p_spec if e is not None}, where


# Hand-written specs of the compressed and factored state leaves (parameter specs in
# tests/_sharded_worker.PARAM_SPECS: up (16, 64) is P('data', 'model'), down (64, 16)
# P('model', 'data'), q/k/v (16, 4, 4) P(None, 'model', None), wte (32, 16) P('model', None)).
EXPECTED_SPECS = {
    "slim_adamw-slimadam": {
        "0/count": [],
        "0/mu/params/block_0/up/kernel": ["data", "model"],
        "0/nu/params/block_0/up/kernel": ["data", None],  # (16, 1): averaged over the 'model' axis
        "0/nu/params/block_0/down/kernel": ["model", None],
        "0/nu/params/block_0/attn/query/kernel": [None, "model", None],  # (1, 4, 4): fan_in
        "0/nu/params/block_0/attn/value/kernel": [None, None, None],  # (16, 1, 1): fan_out
        "0/nu/params/wte/embedding": ["model", None],
    },
    "slim_adamw-adam-mini": {
        "0/nu/params/block_0/attn/query/kernel": [None, "model", None],  # (1, 4, 1): per head
        "0/nu/params/block_0/up/kernel": [None, "model"],  # (1, 64): per output neuron
    },
    "slim_adamw-adalayer": {
        "0/nu/params/block_0/up/kernel": [None, None],
        "0/nu/params/block_0/ln_1/scale": [None],
    },
    "adafactor-largest": {
        "0/0/v_row/params/block_0/up/kernel": ["data"],  # (16,): the column axis removed
        "0/0/v_col/params/block_0/up/kernel": ["model"],  # (64,)
        "0/0/v_row/params/block_0/down/kernel": ["data"],  # (64, 16): rows = axis 1
        "0/0/v_col/params/block_0/down/kernel": ["model"],
        "0/0/v/params/block_0/ln_1/scale": ["model"],
    },
    "adafactor-fan-b1": {
        # (16, 4) from (16, 4, 4): which 4 was removed cannot be read from the
        # shapes, so the 'model' entry is dropped rather than guessed.
        "0/0/v_row/params/block_0/attn/query/kernel": [None, None],
        "0/0/v_col/params/block_0/attn/query/kernel": ["model", None],  # (4, 4)
        "0/3/ema/params/block_0/attn/query/kernel": [None, "model", None],
    },
    "muon": {
        "inner_states/adam/inner_state/0/nu/params/wte/embedding": ["model", None],
        "inner_states/muon/inner_state/0/mu/params/block_0/up/kernel": ["data", "model"],
    },
    "hutchinson": {
        "0/h/params/block_0/up/kernel": ["data", None],
        "0/key": [],
        "0/win_rate": [],
    },
    "sophia": {"0/h/params/block_0/up/kernel": ["data", "model"]},
    # Per-axis factors (d_i, d_i): no copy of the parameter tree, so replicated (whole on
    # every device), also for an axis the parameter shards (q's heads, up's 'model' axis);
    # the graft's / inner Adam's moments follow the parameter.
    "shampoo": {
        "0/stats/params/block_0/up/kernel/1": [],  # R (64, 64) of up (16, 64) P('data', 'model')
        "0/roots/params/block_0/up/kernel/0": [],
        "0/stats/params/block_0/attn/query/kernel/1": [],  # the head axis, sharded on 'model'
        "0/mu/params/block_0/up/kernel": ["data", "model"],
        "0/nu/params/block_0/attn/query/kernel": [None, "model", None],
    },
    "soap": {
        "0/stats/params/block_0/attn/query/kernel/1": [],
        "0/bases/params/block_0/attn/query/kernel/1": [],
        "0/inner/mu/params/block_0/attn/query/kernel": [None, "model", None],
        "0/inner/nu/params/block_0/up/kernel": ["data", "model"],
        "1/count": [],
    },
}


@pytest.mark.parametrize("case", w.case_params([c for c in w.CASES if c.name in EXPECTED_SPECS]))
def test_hand_written_specs(results, case):
  res = _case_result(results, case)
  got = {leaf["path"]: leaf["spec"] for leaf in res["state"]}
  for path, spec in EXPECTED_SPECS[case.name].items():
    assert path in got, (path, sorted(got))
    assert got[path] == spec, (path, got[path], spec)


@pytest.mark.parametrize("case", w.case_params([c for c in w.CASES if c.pmap]))
def test_pmap_data_parallel_equals_full_batch(results, case):
  res = _case_result(results, case)["pmap"]
  assert "error" not in res, res.get("error")
  assert res["n"] == 8 and res["replicas_equal"]
  assert res["max_param_diff"] < PARAM_ATOL, res["max_param_diff"]


@pytest.mark.parametrize("case", w.case_params())
def test_sharded_checkpoint_resumes_bit_identically(results, case):
  res = _case_result(results, case)["checkpoint"]
  assert res["restored_shardings_match"]
  assert res["params_bitwise_equal"] and res["state_bitwise_equal"], res


# ---------------------------------------------------------------------------
# The spec rule, in this (one-device) process.
# ---------------------------------------------------------------------------

MESH = types.SimpleNamespace(shape={"data": 2, "model": 4})


@pytest.mark.parametrize("leaf,param,spec,expected", [
    ((16, 64), (16, 64), P("data", "model"), P("data", "model")),  # same shape: same spec
    ((16, 1), (16, 64), P("data", "model"), P("data", None)),  # averaged axis dropped
    ((1, 1), (16, 64), P("data", "model"), P(None, None)),
    ((16,), (16, 64), P("data", "model"), P("data")),  # factored: column removed
    ((64,), (16, 64), P("data", "model"), P("model")),  # factored: row removed
    ((16, 4), (16, 4, 4), P(None, "model", None), P(None, None)),  # ambiguous removal
    ((4, 4), (16, 4, 4), P(None, "model", None), P("model", None)),
    ((2, 3), (16, 64), P("data", "model"), P(None, None)),  # no reading: replicated
    ((1, 4, 1), (16, 16), P(None, "model"), P(None, None, None)),  # a Reshaped view
    ((), (16,), P("model"), P()),
    ((6, 8), (6, 8), P(("data", "model"), None), P(None, None)),  # 6 not divisible by 8
    ((8, 8), (8, 8), P(("data", "model"),), P(("data", "model"), None)),  # short spec padded
])
def test_reduced_spec(leaf, param, spec, expected):
  assert sh.reduced_spec(leaf, param, spec, MESH) == expected


def test_reduced_spec_rejects_a_spec_longer_than_the_parameter():
  with pytest.raises(ValueError, match="'w'.*rank 1"):
    sh.reduced_spec((4,), (4,), P("data", None), MESH, path="w")


def _ab(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _index(state, params) -> dict:
  """``{state leaf path: parameter index or -1}``."""
  idx = sh.param_index(state, params)
  idx = jax.tree.map(lambda i: -1 if i is None else i, idx, is_leaf=lambda x: x is None)
  return dict(slimoptax._tree.named_leaves(idx))


def test_param_index_finds_parameter_copies():
  params = {"a": {"kernel": _ab(4, 8)}, "b": _ab(8), "count": _ab(3)}
  tx = slimoptax.muon(1e-2, dims=lambda p: {"a": {"kernel": optax.contrib.MuonDimensionNumbers(0, 1)},
                                            "b": None, "count": None})
  state = jax.eval_shape(tx.init, params)
  named = _index(state, params)
  order = [p for p, _ in slimoptax._tree.named_leaves(params)]  # a/kernel, b, count
  assert named["inner_states/muon/inner_state/0/mu/a/kernel"] == order.index("a/kernel")
  assert named["inner_states/adam/inner_state/0/nu/b"] == order.index("b")
  # A parameter called "count" is not confused with the step counters.
  assert named["inner_states/adam/inner_state/0/count"] == -1
  assert named["inner_states/adam/inner_state/0/mu/count"] == order.index("count")


def test_param_index_through_inject_hyperparams_and_multisteps():
  params = {"w": _ab(4, 8)}
  tx = optax.MultiSteps(optax.inject_hyperparams(slimoptax.slim_adamw)(1e-2, compress="adalayer"), 2)
  state = jax.eval_shape(tx.init, params)
  named = _index(state, params)
  assert named["acc_grads/w"] == 0
  assert named["inner_opt_state/inner_state/0/nu/w"] == 0
  assert named["inner_opt_state/hyperparams/learning_rate"] == -1
  assert named["mini_step"] == -1


def test_state_shardings_errors_name_the_parameter():
  params = {"w": _ab(4, 8), "b": _ab(8)}
  tx = slimoptax.slim_adamw(1e-2)
  with pytest.raises(ValueError, match="PartitionSpec for 'b'.*mesh="):
    sh.state_shardings(tx, params, {"w": P(), "b": P()})
  with pytest.raises(ValueError, match="param_shardings.*without an entry.*'b'"):
    sh.state_shardings(tx, params, {"w": P()}, mesh=jax.make_mesh((1,), ("x",)))
  with pytest.raises(ValueError, match="'b'.*2 entries.*rank 1"):
    sh.state_shardings(tx, params, {"w": P(), "b": P("x", None)}, mesh=jax.make_mesh((1,), ("x",)))
  with pytest.raises(ValueError, match="parameter 'b' has no NamedSharding"):
    sh.state_shardings(tx, {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)})
  with pytest.raises(ValueError, match="empty.*mesh="):
    sh.state_shardings(tx, {}, {})


def test_init_sharded_on_one_device_equals_init():
  """On a 1-device mesh the sharded init is the plain init (values, dtypes, structure)."""
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  params = w.init_params()
  tx = slimoptax.slim_adamw(1e-2, compress="slimadam", mu_dtype=jnp.bfloat16)
  ref = tx.init(params)
  for p in (params, jax.eval_shape(lambda: params)):
    state = sh.init_sharded(tx, p, P("model"), mesh=mesh)
    assert jax.tree.structure(state) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
      assert a.dtype == b.dtype and a.shape == b.shape and bool(jnp.all(a == b))
  # Shardings read off placed parameters.
  placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, P("model")))
  shardings = sh.state_shardings(tx, placed)
  assert shardings[0].nu["params"]["block_0"]["up"]["kernel"].spec == P("model", None)
  # Empty trees: an empty state on the given mesh.
  empty = sh.init_sharded(tx, {}, {}, mesh=mesh)
  assert jax.tree.leaves(empty[0].mu) == [] and empty[0].count.sharding.mesh == mesh


def test_documentation_code_runs_on_the_mesh(results):
  """docs/sharding_and_checkpoints.md: its code blocks, run as written on the 8 devices."""
  docs = results["docs"]
  assert docs["blocks"] == 2
  assert "error" not in docs, docs["error"]
  assert ("'opt_state/0/nu/mlp/up/kernel': saved with shape (64, 1), the target expects (64, 256)"
          in docs["printed"]), docs["printed"]


@pytest.mark.parametrize("case", w.case_params())
def test_parameter_copies_read_off_init_agree_with_paths(case):
  """state_shardings reads the copies with optax.tree_map_params; param_index infers them."""
  params = w.small_params()
  tx = case.build()
  state = jax.eval_shape(tx.init, params)
  by_paths = _index_tree(sh.param_index(state, params))
  if case.family in ("shampoo", "soap"):
    # On optax's placeholder, init builds the per-axis factor tuples as placeholders too;
    # optax then maps them as parameter copies and fails on the tuples: state_shardings
    # falls back to the paths, where the factors belong to no parameter (replicated).
    with pytest.raises(ValueError):
      sh._param_index_optax(tx, state, params)
    factors = {p: i for p, i in by_paths.items() if p.split("/")[1] in ("stats", "roots", "bases")}
    assert factors and all(i == -1 for i in factors.values()), factors
  else:
    assert _index_tree(sh._param_index_optax(tx, state, params)) == by_paths
  has_copies = any(i >= 0 for i in by_paths.values())
  assert has_copies == (case.name != "sign-signsgd")


def _index_tree(idx) -> dict:
  idx = jax.tree.map(lambda i: -1 if i is None else i, idx, is_leaf=lambda x: x is None)
  return dict(slimoptax._tree.named_leaves(idx))


def test_bare_array_parameters_counters_stay_replicated():
  """With one bare array as the parameters, only tree_map_params can tell `count` from a moment."""
  params = _ab(8, 8)
  tx = slimoptax.slim_adamw(1e-2)
  state = jax.eval_shape(tx.init, params)
  exact = _index_tree(sh._param_index_optax(tx, state, params))
  assert exact == {"0/count": -1, "0/mu": 0, "0/nu": 0}


def test_readme_sections_are_the_tested_docs():
  """The README's sharded-training and checkpointing code is the code the 8-device test runs."""
  from tests._sharded_worker import DOCS, doc_code_blocks

  readme = os.path.join(os.path.dirname(DOCS), os.pardir, "README.md")
  readme_blocks = doc_code_blocks(readme)
  doc_blocks = doc_code_blocks(DOCS)
  assert doc_blocks and all(block in readme_blocks for block in doc_blocks)


def test_a_mesh_axis_that_does_not_divide_the_parameter_is_refused():
  """As jax.device_put refuses to place the parameter: path, dimension and axis named."""
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  params = {"mlp": {"up": {"kernel": _ab(16, 6)}}, "b": _ab(8)}
  tx = slimoptax.slim_adamw(1e-2, compress="slimadam")
  bad = {"mlp": {"up": {"kernel": P("data", "model")}}, "b": P("model")}
  msg = r"parameter 'mlp/up/kernel': dimension 1 \(size 6\) is not divisible by mesh axis 'model' \(size 4\)"
  with pytest.raises(ValueError, match=msg):
    sh.state_shardings(tx, params, bad, mesh=mesh)
  with pytest.raises(ValueError, match=msg):
    sh.init_sharded(tx, params, bad, mesh=mesh)
  with pytest.raises(ValueError, match=msg):
    sh.abstract_sharded_state(tx, params, bad, mesh=mesh)
  # A tuple of axes: their product (8) must divide.
  with pytest.raises(ValueError, match=r"'b': dimension 0 \(size 12\).*\('data', 'model'\) \(size 8\)"):
    sh.state_shardings(tx, {"b": _ab(12)}, {"b": P(("data", "model"))}, mesh=mesh)
  # Concrete (placed) parameters go through the same check.
  one = jax.make_mesh((1,), ("x",))
  with pytest.raises(ValueError, match="'w'.*rank 1"):
    sh.init_sharded(tx, {"w": jnp.zeros(3)}, {"w": P("x", None)}, mesh=one)


def test_state_leaves_that_no_longer_divide_still_get_none():
  """Only the parameter's own spec is validated; a reduced state dimension is dropped (by design)."""
  mesh = types.SimpleNamespace(shape={"data": 2, "model": 4})
  assert sh.reduced_spec((1, 8), (8, 8), P("data", "model"), mesh) == P(None, "model")
  sh._check_divides("w", (8, 8), types.SimpleNamespace(mesh=mesh, spec=P("data", "model")))
