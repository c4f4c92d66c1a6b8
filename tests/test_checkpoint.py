"""Optimizer states of every transform through orbax: arrays only, exact resume, clear mismatches.

(Sharded states: tests/test_sharding.py saves and resumes them on the 8-device
mesh; tests/test_multiprocess.py from two processes.)
"""

from __future__ import annotations

import functools
import json

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
  out["restored_equal_saved"] = w.bitwise_equal(restored, {"params": mid_p, "opt_state": mid_s})
  res_p, res_s = run(restored["params"], restored["opt_state"], K, STEPS)
  out["params_equal"] = w.bitwise_equal(res_p, full_p)
  out["state_equal"] = w.bitwise_equal(res_s, full_s)
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
    assert w.bitwise_equal(restored, {"params": p, "opt_state": s})
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


# ---------------------------------------------------------------------------
# Checkpoints that cannot be read: orbax's own error, never a "compression rules" mismatch.
# ---------------------------------------------------------------------------


def _random_state(seed=0):
  """A slim_adamw state with random (incompressible) moments, big enough for a real data chunk."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.zeros((256, 128))}, "bias": jnp.zeros((128,))}
  tx = slimoptax.slim_adamw(1e-2)
  state = jax.tree.map(
      lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype) if x.ndim else x + 3,
      tx.init(params))
  return state, slimoptax.abstract_state(tx, params)


def _saved(tmp_path, name="ckpt"):
  state, target = _random_state()
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / name
  checksums = slimoptax.checkpoint.save_state(checkpointer, path, state)
  return checkpointer, path, state, target, checksums


def _data_files(path):
  """The tensorstore (OCDBT) data files of a checkpoint, largest (the array chunks) first."""
  files = [f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"]
  assert files, sorted(str(f) for f in path.rglob("*"))
  return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _not_a_mismatch(err):
  assert not isinstance(err.value, slimoptax.StateMismatchError), err.value
  assert "compression rules" not in str(err.value)


def test_save_state_writes_checksums_and_restores_verified(tmp_path):
  checkpointer, path, state, target, checksums = _saved(tmp_path)
  assert checksums == path / slimoptax.checkpoint.CHECKSUM_FILE and checksums.exists()
  content = json.loads(checksums.read_text())
  assert content["algorithm"] == "sha256"
  assert set(content["leaves"]) == {p for p, _ in named_leaves(state)}
  restored = slimoptax.restore_state(checkpointer, path, target)  # verified by default
  assert w.bitwise_equal(restored, state)
  assert w.bitwise_equal(slimoptax.restore_state(checkpointer, path, target, verify=True), state)
  # Still a plain orbax checkpoint: orbax alone restores it (the JSON file is ignored).
  assert w.bitwise_equal(ocp.StandardCheckpointer().restore(path, target), state)


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, target = _random_state()
  checkpointer = ocp.StandardCheckpointer()
  checksums = slimoptax.checkpoint.save_state(checkpointer, "rel/ckpt", state)
  assert str(checksums) == str(tmp_path / "rel" / "ckpt" / slimoptax.checkpoint.CHECKSUM_FILE)
  assert w.bitwise_equal(slimoptax.restore_state(checkpointer, "rel/ckpt", target), state)
  # Saved by orbax directly (absolute path), restored by a relative one.
  _save(tmp_path, state, name="plain")
  assert w.bitwise_equal(slimoptax.restore_state(checkpointer, "plain", target), state)
  assert slimoptax.checkpoint.saved_state_metadata(checkpointer, "plain")["0/count"][0] == ()


def test_missing_path_raises_orbax_not_found(tmp_path):
  _, target = _random_state()
  with pytest.raises(FileNotFoundError, match="not found") as err:
    slimoptax.restore_state(ocp.StandardCheckpointer(), tmp_path / "nope", target)
  _not_a_mismatch(err)
  with pytest.raises(FileNotFoundError, match="no metadata"):
    slimoptax.checkpoint.saved_state_metadata(ocp.StandardCheckpointer(), tmp_path / "nope")


def test_empty_directory_raises_orbax_error(tmp_path):
  (tmp_path / "empty").mkdir()
  _, target = _random_state()
  with pytest.raises(FileNotFoundError, match="_METADATA") as err:
    slimoptax.restore_state(ocp.StandardCheckpointer(), tmp_path / "empty", target)
  _not_a_mismatch(err)


def test_deleted_metadata_raises_orbax_error(tmp_path):
  checkpointer, path, _, target, _ = _saved(tmp_path)
  (path / "_METADATA").unlink()
  with pytest.raises(FileNotFoundError, match="_METADATA") as err:
    slimoptax.restore_state(checkpointer, path, target)
  _not_a_mismatch(err)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax threads
@pytest.mark.parametrize("damage", ["truncate", "delete", "delete_all"])
def test_truncated_or_deleted_data_files_raise_orbax_error(tmp_path, damage):
  checkpointer, path, _, target, _ = _saved(tmp_path)
  files = _data_files(path)
  if damage == "truncate":
    with open(files[0], "r+b") as f:
      f.truncate(files[0].stat().st_size // 2)
  else:
    for f in files[:1] if damage == "delete" else files:
      f.unlink()
  with pytest.raises(Exception) as err:  # noqa: B017 (orbax / tensorstore's own error)
    slimoptax.restore_state(checkpointer, path, target)
  _not_a_mismatch(err)
  assert not isinstance(err.value, slimoptax.checkpoint.CheckpointIntegrityError)


def _flip(file, fractions, n=8):
  data = bytearray(file.read_bytes())
  for frac in fractions:
    at = int(len(data) * frac)
    for k in range(at, at + n):
      data[k] ^= 0xFF
  file.write_bytes(bytes(data))


def test_flipped_bytes_in_a_chunk_are_detected(tmp_path):
  checkpointer, path, state, target, _ = _saved(tmp_path)
  _flip(_data_files(path)[0], [0.3, 0.7])
  # Without the check orbax restores the corrupted values silently ...
  silent = slimoptax.restore_state(checkpointer, path, target, verify=False)
  changed = sorted(p for (p, a), (_, b) in zip(named_leaves(silent), named_leaves(state))
                   if not w.bitwise_equal(a, b))
  assert changed, "the flipped bytes changed no value: the test did not hit a data chunk"
  # ... with it (the default), every corrupted leaf is named.
  with pytest.raises(slimoptax.checkpoint.CheckpointIntegrityError) as err:
    slimoptax.restore_state(checkpointer, path, target)
  msg = str(err.value)
  assert "corrupted" in msg and "sha256 mismatch" in msg
  named = sorted(p for p, _ in named_leaves(state) if f"'{p}':" in msg)
  assert named == changed, (named, changed, msg)
  assert isinstance(err.value, OSError) and not isinstance(err.value, ValueError)


def test_verify_true_requires_the_checksum_file(tmp_path):
  state, target = _random_state()
  checkpointer, path = _save(tmp_path, state)  # plain orbax save: no checksums
  assert w.bitwise_equal(slimoptax.restore_state(checkpointer, path, target), state)
  with pytest.raises(FileNotFoundError, match="verify=True.*slimoptax_checksums.json"):
    slimoptax.restore_state(checkpointer, path, target, verify=True)


def test_unreadable_or_foreign_checksum_file(tmp_path):
  checkpointer, path, state, target, checksums = _saved(tmp_path)
  content = json.loads(checksums.read_text())
  content["leaves"]["0/extra"] = {"shape": [], "dtype": "float32", "sha256": "0" * 64}
  checksums.write_text(json.dumps(content))
  with pytest.raises(slimoptax.checkpoint.CheckpointIntegrityError,
                     match="'0/extra': has a checksum but is not in the checkpoint"):
    slimoptax.restore_state(checkpointer, path, target)
  checksums.write_text("{not json")
  with pytest.raises(slimoptax.checkpoint.CheckpointIntegrityError, match="cannot be read"):
    slimoptax.restore_state(checkpointer, path, target)
  assert w.bitwise_equal(slimoptax.restore_state(checkpointer, path, target, verify=False), state)


def test_mismatch_is_still_reported_before_restoring(tmp_path):
  checkpointer, path, _, _, _ = _saved(tmp_path)
  params = {"dense": {"kernel": jnp.zeros((256, 128))}, "bias": jnp.zeros((128,))}
  other = slimoptax.abstract_state(slimoptax.slim_adamw(1e-2, compress="slimadam"), params)
  with pytest.raises(slimoptax.StateMismatchError,
                     match=r"'0/nu/dense/kernel': saved with shape \(256, 128\)"):
    slimoptax.restore_state(checkpointer, path, other)


def test_dtype_change_skips_the_changed_leaves(tmp_path):
  checkpointer, path, state, _, _ = _saved(tmp_path)
  params = {"dense": {"kernel": jnp.zeros((256, 128))}, "bias": jnp.zeros((128,))}
  target = slimoptax.abstract_state(slimoptax.slim_adamw(1e-2, nu_dtype=jnp.bfloat16), params)
  restored = slimoptax.restore_state(checkpointer, path, target, allow_dtype_change=True)
  assert restored[0].nu["dense"]["kernel"].dtype == jnp.bfloat16
  assert w.bitwise_equal(restored[0].mu, state[0].mu)


def test_typed_prng_keys_are_checksummed(tmp_path):
  tree = {"key": jax.random.key(3), "x": jnp.arange(4.0)}
  sums = slimoptax.checkpoint.leaf_checksums(tree)
  assert sums["key"]["sha256"] and sums["key"]["dtype"] == "uint32"
  assert sums != slimoptax.checkpoint.leaf_checksums({"key": jax.random.key(4), "x": tree["x"]})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax threads
def test_checkpoint_manager_save_state_verifies(tmp_path):
  state, target = _random_state()
  with ocp.CheckpointManager(tmp_path / "run") as manager:
    for t in range(2):
      checksums = slimoptax.checkpoint.save_state(manager, t, jax.tree.map(lambda x: x + t, state))
      assert checksums is not None and checksums.exists()
    assert w.bitwise_equal(slimoptax.restore_state(manager, 1, target),
                          jax.tree.map(lambda x: x + 1, state))
    _flip(_data_files(tmp_path / "run" / "1")[0], [0.3, 0.7])
    with pytest.raises(slimoptax.checkpoint.CheckpointIntegrityError, match="checkpoint step 1"):
      slimoptax.restore_state(manager, 1, target)
    assert w.bitwise_equal(slimoptax.restore_state(manager, 0, target), state)
    with pytest.raises(Exception) as err:  # noqa: B017 (orbax's error for an unknown step)
      slimoptax.restore_state(manager, 7, target)
    _not_a_mismatch(err)
