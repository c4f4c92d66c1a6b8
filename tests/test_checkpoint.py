"""Optimizer states of every transform through orbax: arrays only, exact resume, clear mismatches.

(Sharded states: tests/test_sharding.py saves and resumes them on the 8-device
mesh; tests/test_multiprocess.py from two processes.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import slimoptax
from slimoptax._tree import named_leaves
from tests import _sharded_worker as w

STEPS, K = 5, 2


def _bitwise_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@functools.cache
def _resume(case_name: str, directory: str) -> dict:
  """Uninterrupted STEPS steps vs K steps, save, restore_state, STEPS - K more (one step fn)."""
  tx, step = w.case_step(case_name)
  params0 = w.small_params()
  state0 = tx.init(params0)
  out = {"init_leaves": jax.tree.leaves(state0)}

  def run(params, state, first, last):
    for t in range(first, last):
      params, state, _ = step(params, state, w.grads_at(params0, t))
    return params, state

  full_p, full_s = run(params0, state0, 0, STEPS)
  mid_p, mid_s = run(params0, state0, 0, K)
  out["stepped_leaves"] = jax.tree.leaves(mid_s)
  path = f"{directory}/{case_name}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": mid_p, "opt_state": mid_s})
  checkpointer.wait_until_finished()
  target = {"params": jax.eval_shape(lambda: params0),
            "opt_state": slimoptax.abstract_state(tx, params0)}
  restored = slimoptax.restore_state(checkpointer, path, target)
  out["restored_equal_saved"] = _bitwise_equal(restored, {"params": mid_p, "opt_state": mid_s})
  res_p, res_s = run(restored["params"], restored["opt_state"], K, STEPS)
  out["params_equal"] = _bitwise_equal(res_p, full_p)
  out["state_equal"] = _bitwise_equal(res_s, full_s)
  out["moved"] = float(max(np.max(np.abs(a - b)) for a, b in zip(
      jax.tree.leaves(full_p), jax.tree.leaves(params0))))
  return out


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("case", w.case_params())
def test_state_holds_only_jax_arrays(case, ckpt_dir):
  res = _resume(case.name, ckpt_dir)
  for leaves in (res["init_leaves"], res["stepped_leaves"]):
    assert leaves, "empty state"
    bad = [type(x).__name__ for x in leaves if not isinstance(x, jax.Array)]
    assert not bad, bad
  # ... so an abstract state is all ShapeDtypeStructs (nothing static hides in it).
  tx = case.build()
  abstract = slimoptax.abstract_state(tx, w.small_params())
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("case", w.case_params())
def test_resume_from_checkpoint_is_bit_identical(case, ckpt_dir):
  res = _resume(case.name, ckpt_dir)
  assert res["restored_equal_saved"]
  assert res["moved"] > 1e-3  # the run really trained
  assert res["params_equal"] and res["state_equal"]


# ---------------------------------------------------------------------------
# Checkpoints written under other rules: a clear error naming the path.
# ---------------------------------------------------------------------------


def _save(tmp_path, tree, name="ckpt"):
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / name
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return checkpointer, path


@pytest.mark.parametrize("saved,restored,path,saved_shape,expected_shape", [
    ("slimadam", None, "0/nu/params/block_0/up/kernel", (4, 1), (4, 16)),
    ("slimadam", "adalayer", "0/nu/params/block_0/up/kernel", (4, 1), (1, 1)),
    (None, "adam-mini", "0/nu/params/block_0/attn/query/kernel", (4, 2, 2), (1, 2, 1)),
])
def test_restore_with_other_compression_rules_names_the_path(tmp_path, saved, restored, path,
                                                              saved_shape, expected_shape):
  params = w.small_params()
  checkpointer, ckpt = _save(tmp_path, slimoptax.slim_adamw(1e-2, compress=saved).init(params))
  target = slimoptax.abstract_state(slimoptax.slim_adamw(1e-2, compress=restored), params)
  with pytest.raises(slimoptax.StateMismatchError) as err:
    slimoptax.restore_state(checkpointer, ckpt, target)
  msg = str(err.value)
  assert f"'{path}': saved with shape {saved_shape}, the target expects {expected_shape}" in msg
  assert "compression rules" in msg


def test_restore_adafactor_with_other_factored_axes(tmp_path):
  params = w.small_params()
  make = lambda axes: w._adafactor(factored_axes=axes)()
  checkpointer, ckpt = _save(tmp_path, make("largest").init(params))
  with pytest.raises(slimoptax.StateMismatchError,
                     match=r"'0/0/v_row/params/block_0/attn/query/kernel': saved with shape \(2, 2\)"):
    slimoptax.restore_state(checkpointer, ckpt, slimoptax.abstract_state(make("fan"), params))


def test_restore_sophia_with_other_compression(tmp_path):
  from slimoptax._sophia import sophia
  params = w.small_params()
  checkpointer, ckpt = _save(tmp_path, sophia(1e-2, compress="slimadam").init(params))
  with pytest.raises(slimoptax.StateMismatchError, match=r"'0/h/params/wte/embedding'"):
    slimoptax.restore_state(checkpointer, ckpt, slimoptax.abstract_state(sophia(1e-2), params))


def test_restore_into_another_optimizer_lists_missing_and_extra_paths(tmp_path):
  params = w.small_params()
  checkpointer, ckpt = _save(tmp_path, slimoptax.slim_adamw(1e-2).init(params))
  target = slimoptax.abstract_state(optax.chain(w._sign("signum")()), params)
  with pytest.raises(slimoptax.StateMismatchError) as err:
    slimoptax.restore_state(checkpointer, ckpt, target)
  msg = str(err.value)
  assert "'0/nu/params/wte/embedding': in the checkpoint" in msg and "not in the target" in msg


def test_restore_into_other_parameters_names_the_missing_one(tmp_path):
  params = w.small_params()
  checkpointer, ckpt = _save(tmp_path, slimoptax.slim_adamw(1e-2).init(params))
  bigger = {"params": {**params["params"], "extra": {"kernel": jnp.zeros((4, 4))}}}
  target = slimoptax.abstract_state(slimoptax.slim_adamw(1e-2), bigger)
  with pytest.raises(slimoptax.StateMismatchError,
                     match=r"'0/mu/params/extra/kernel': expected \(4, 4\) float32, missing"):
    slimoptax.restore_state(checkpointer, ckpt, target)


def test_dtype_change_is_an_error_unless_allowed(tmp_path):
  params = w.small_params()
  state = slimoptax.slim_adamw(1e-2, compress="slimadam").init(params)
  state = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  checkpointer, ckpt = _save(tmp_path, state)
  tx16 = slimoptax.slim_adamw(1e-2, compress="slimadam", nu_dtype=jnp.bfloat16)
  target = slimoptax.abstract_state(tx16, params)
  with pytest.raises(slimoptax.StateMismatchError,
                     match=r"'0/nu/params/wte/embedding': saved as float32, the target expects bfloat16"):
    slimoptax.restore_state(checkpointer, ckpt, target)
  restored = slimoptax.restore_state(checkpointer, ckpt, target, allow_dtype_change=True)
  nu = restored[0].nu["params"]["block_0"]["up"]["kernel"]
  assert nu.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(nu, np.float32),
                                np.asarray(state[0].nu["params"]["block_0"]["up"]["kernel"]))


def test_checkpoint_manager(tmp_path):
  params = w.small_params()
  tx = slimoptax.slim_adamw(1e-2, compress="adam-mini")
  step = w.make_step(tx, extra_args=False)
  p, s = params, tx.init(params)
  with ocp.CheckpointManager(tmp_path / "run") as manager:
    for t in range(3):
      p, s, _ = step(p, s, w.grads_at(params, t))
      manager.save(t, args=ocp.args.StandardSave({"params": p, "opt_state": s}))
    manager.wait_until_finished()
    target = {"params": jax.eval_shape(lambda: params),
              "opt_state": slimoptax.abstract_state(tx, params)}
    restored = slimoptax.restore_state(manager, 2, target)
    assert _bitwise_equal(restored, {"params": p, "opt_state": s})
    other = {"params": target["params"],
             "opt_state": slimoptax.abstract_state(slimoptax.slim_adamw(1e-2), params)}
    with pytest.raises(slimoptax.StateMismatchError,
                       match=r"(?s)checkpoint step 2 .*'opt_state/0/nu/params/block_0/up/kernel'"):
      slimoptax.restore_state(manager, 2, other)


def test_update_with_a_state_from_other_rules_names_the_path():
  """Restored without restore_state (e.g. a pickled state): slim_adam's update still refuses."""
  params = w.small_params()
  state = slimoptax.slim_adamw(1e-2, compress="slimadam").init(params)
  with pytest.raises(ValueError, match=r"second moment of 'params/block_0/attn/query/kernel' has shape \(1, 2, 2\)"):
    slimoptax.slim_adamw(1e-2).update(params, state, params)


def test_saved_metadata_paths_match_named_leaves(tmp_path):
  params = w.small_params()
  state = slimoptax.muon(1e-2, adam_compress="slimadam").init(params)
  checkpointer, ckpt = _save(tmp_path, state)
  saved = slimoptax.checkpoint.saved_state_metadata(checkpointer, ckpt)
  assert saved == {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in named_leaves(state)}
