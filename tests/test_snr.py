"""SNR (eq. 3), its time and depth averages, and rules derived from it."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax import _snr as snr_lib


def numpy_snr(v, axes):
  v = np.asarray(v, np.float64)
  mean = v.mean(axis=axes)
  var = v.var(axis=axes)  # population variance
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = mean ** 2 / var
  ratio = ratio[np.isfinite(ratio)]
  return ratio.mean() if ratio.size else np.nan


@pytest.mark.parametrize("shape,axes", [((6, 5), (0,)), ((6, 5), (1,)), ((6, 5), (0, 1)),
                                        ((3, 4, 5), (1, 2)), ((3, 4, 5), (0,)), ((7,), (0,))])
def test_snr_matches_numpy(shape, axes):
  v = np.random.default_rng(0).gamma(2.0, size=shape).astype(np.float32)
  np.testing.assert_allclose(float(slimoptax.snr(v, axes)), numpy_snr(v, axes), rtol=1e-5)


def test_snr_closed_form_and_nonfinite_entries():
  v = jnp.array([[1.0, 3.0], [2.0, 2.0]])
  # Row 0: mean 2, var 1 -> 4; row 1: var 0 -> not finite, left out.
  assert float(slimoptax.snr(v, (1,))) == 4.0
  assert math.isnan(float(slimoptax.snr(jnp.ones((2, 2)), (1,))))


def test_derive_rules_reproduces_published_rules(gpt2_reference):
  history, shapes = slimoptax.load_snr_csv(str(gpt2_reference / "snr_lr3e-4.csv"))
  assert {len(pts) for per in history.values() for pts in per.values()} == {51}
  rules = slimoptax.derive_rules(slimoptax.time_average(history), cutoff=1.0, shapes=shapes)
  published = json.loads((gpt2_reference / "rules_cutoff1.0_lr3e-4.json").read_text())
  assert rules.as_mapping() == published
  kept, total = slimoptax.second_moments_kept(shapes, rules)
  assert (kept, total) == (749_440, 124_373_760)
  assert f"{1 - kept / total:.2%}" == "99.40%"


def test_larger_learning_rate_compresses_less(gpt2_reference):
  """§4.2: SNR falls with the learning rate, so fewer second moments can be averaged."""
  kept = {}
  for lr in ("3e-4", "3e-3"):
    history, shapes = slimoptax.load_snr_csv(str(gpt2_reference / f"snr_lr{lr}.csv"))
    rules = slimoptax.derive_rules(slimoptax.time_average(history), 1.0, shapes=shapes)
    kept[lr] = slimoptax.second_moments_kept(shapes, rules)[0]
  assert kept["3e-3"] > 50 * kept["3e-4"]


def test_depth_average_groups_layers():
  table = {"blocks/0/mlp/up/kernel": {(0,): 1.0, (1,): 3.0}, "blocks/1/mlp/up/kernel": {(0,): 2.0, (1,): 0.5},
           "transformer.h.3.attn.q_proj.weight": {(0,): 4.0}, "wte/embedding": {(1,): 7.0}}
  avg = slimoptax.depth_average(table)
  assert avg["blocks/*/mlp/up/kernel"] == {(0,): 1.5, (1,): 1.75}
  assert avg["transformer.h.*.attn.q_proj.weight"] == {(0,): 4.0}
  rules = slimoptax.derive_rules(avg, 1.0, shapes={"blocks/*/mlp/up/kernel": (4, 8)})
  params = {"blocks": {str(i): {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}}
                       for i in range(3)}}
  sub = slimoptax.Rules([r for r in rules if r.label.startswith("blocks")])
  axes = slimoptax.compression_axes(params, sub)
  assert all(axes["blocks"][str(i)]["mlp"]["up"]["kernel"] == (1,) for i in range(3))


def test_depth_averaged_rules_on_published_data(gpt2_reference):
  """App. H: depth-averaged rules; they keep about as few second moments as per-layer rules."""
  history, shapes = slimoptax.load_snr_csv(str(gpt2_reference / "snr_lr3e-4.csv"))
  avg = slimoptax.depth_average(slimoptax.time_average(history))
  group_shapes = {snr_lib.depth_group(n)[0]: s for n, s in shapes.items()}
  rules = slimoptax.derive_rules(avg, 1.0, shapes=group_shapes)
  kept, total = slimoptax.second_moments_kept(shapes, rules)
  mapping = rules.as_mapping()
  assert mapping["transformer.h.*.attn.k_proj.weight"] == [1]   # PyTorch (out, in): fan_in
  assert mapping["transformer.h.*.attn.v_proj.weight"] == [0]   # fan_out
  assert mapping["transformer.h.*.ln_1.weight"] is None
  assert 0.98 < 1 - kept / total < 1.0


def test_tracker_follows_adam_second_moment(tmp_path):
  params = {"dense": {"kernel": jnp.ones((6, 4))}, "norm": {"scale": jnp.ones(4)}}
  tx = optax.adamw(1e-2)
  state = tx.init(params)
  tracker = slimoptax.SNRTracker(params, every=3, steps=(1,))
  assert tracker.candidates == {"dense/kernel": [(0,), (1,), (0, 1)], "norm/scale": [(0,)]}
  rng = np.random.default_rng(0)
  nus = {}
  for step in range(1, 10):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_t(3, size=p.shape), jnp.float32), params)
    _, state = tx.update(g, state, params)
    if tracker.maybe_record(step, state):
      nus[step] = np.asarray(state[0].nu["dense"]["kernel"])
  assert sorted(nus) == [1, 3, 6, 9]
  expected = np.mean([numpy_snr(v, (1,)) for v in nus.values()])
  np.testing.assert_allclose(tracker.time_average()["dense/kernel"][(1,)], expected, rtol=1e-5)
  tracker.to_csv(str(tmp_path / "snr.csv"))
  history, shapes = slimoptax.load_snr_csv(str(tmp_path / "snr.csv"))
  assert shapes["dense/kernel"] == (6, 4)
  np.testing.assert_allclose(slimoptax.time_average(history)["dense/kernel"][(1,)], expected, rtol=1e-5)
  tracker.plot_trajectories(str(tmp_path / "traj.png"))
  tracker.plot_depth(str(tmp_path / "depth.png"))
  for name in ("traj.png", "depth.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracker_reads_slim_adam_state_inside_a_chain():
  params = {"w": jnp.ones((3, 5))}
  tx = optax.chain(optax.clip_by_global_norm(1.0), slimoptax.slim_adamw(1e-3))
  state = tx.init(params)
  g = {"w": jnp.arange(15.0).reshape(3, 5)}
  _, state = tx.update(g, state, params)
  tracker = slimoptax.SNRTracker(params)
  got = tracker.measure(state)["w"][(0,)]
  nu = np.asarray(snr_lib.find_second_moment(state, params)["w"])
  np.testing.assert_allclose(got, numpy_snr(nu, (0,)), rtol=1e-5)


# --- Masked and partitioned Adam states ---

MASK_PARAMS = {"mlp": {"up": {"kernel": jnp.ones((4, 6))}}, "ln": {"scale": jnp.ones(4)}}
MASK = {"mlp": {"up": {"kernel": True}}, "ln": {"scale": False}}
LABELS = {"mlp": {"up": {"kernel": "adam"}}, "ln": {"scale": "sgd"}}


def _masked_transforms():
  return {
      "optax.masked(adam)": optax.masked(optax.adam(1e-3), MASK),
      "chain(masked(slim_adamw))": optax.chain(
          optax.clip_by_global_norm(1.0),
          optax.masked(slimoptax.slim_adamw(1e-3, compress="adam"), MASK)),
      "partition(adam, sgd)": optax.partition({"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-3)}, LABELS),
      "partition(slim_adamw, sgd)": optax.partition(
          {"adam": slimoptax.slim_adamw(1e-3, compress="adam"), "sgd": optax.sgd(1e-3)}, LABELS),
  }


@pytest.mark.parametrize("name", list(_masked_transforms()))
def test_masked_state_tracks_the_unmasked_parameters(name):
  tx = _masked_transforms()[name]
  params = MASK_PARAMS
  state = tx.init(params)
  g = {"mlp": {"up": {"kernel": jnp.arange(24.0).reshape(4, 6)}}, "ln": {"scale": jnp.arange(4.0)}}
  _, state = tx.update(g, state, params)
  nu = snr_lib.find_second_moment(state, params)
  assert isinstance(nu["ln"]["scale"], optax.MaskedNode)
  assert nu["mlp"]["up"]["kernel"].shape == (4, 6)
  tracker = slimoptax.SNRTracker(params, every=1)
  with pytest.warns(UserWarning, match=r"no second moment for 1 parameter.*skipped: \['ln/scale'\]"):
    tracker.record(1, state)
  assert tracker.skipped == ("ln/scale",) and set(tracker.history) == {"mlp/up/kernel"}
  np.testing.assert_allclose(tracker.history["mlp/up/kernel"][(1,)][0][1],
                             numpy_snr(np.asarray(nu["mlp"]["up"]["kernel"]), (1,)), rtol=1e-5)
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # warned once only
    tracker.record(2, state)
  rules = slimoptax.derive_rules(tracker.time_average(), shapes=tracker.shapes)
  assert [r.label for r in rules] == ["mlp/up/kernel"]


def test_partition_of_two_adams_merges_their_second_moments():
  tx = optax.partition({"adam": optax.adam(1e-3), "sgd": slimoptax.slim_adamw(1e-3, compress="adalayer")},
                       LABELS)
  nu = snr_lib.find_second_moment(tx.init(MASK_PARAMS), MASK_PARAMS)
  assert nu["mlp"]["up"]["kernel"].shape == (4, 6) and nu["ln"]["scale"].shape == (1,)


def test_no_adam_state_names_what_was_found():
  state = optax.chain(optax.clip(1.0), optax.sgd(1e-3, momentum=0.9)).init(MASK_PARAMS)
  with pytest.raises(ValueError, match=r"no second moment `nu`.*the state holds \[.*'TraceState'"):
    snr_lib.find_second_moment(state, MASK_PARAMS)
  with pytest.raises(ValueError, match=r"fields `nu` at \['\[0\]ScaleByAdamState.nu'\] have other paths"):
    snr_lib.find_second_moment(optax.adam(1e-3).init({"other": jnp.ones(3)}), MASK_PARAMS)
  with pytest.raises(ValueError, match="the state holds"):
    slimoptax.SNRTracker(MASK_PARAMS).measure(state)


# --- Guards of the SNR -> rules pipeline ---


def test_tracker_that_recorded_nothing_raises():
  params = {"w": jnp.ones((3, 5))}
  tracker = slimoptax.SNRTracker(params, every=100, steps=())
  state = optax.adam(1e-3).init(params)
  assert not tracker.maybe_record(7, state)  # off schedule: nothing recorded
  with pytest.raises(ValueError, match=r"recorded nothing.*every=100"):
    tracker.time_average()
  with pytest.raises(ValueError, match="recorded nothing"):
    tracker.depth_average()
  with pytest.raises(ValueError, match="SNR table is empty"):
    slimoptax.derive_rules({})


def test_tracking_a_compressed_second_moment_names_the_parameter():
  params = {"mlp": {"up": {"kernel": jnp.ones((4, 6))}}, "ln": {"scale": jnp.ones(4)}}
  state = slimoptax.slim_adamw(1e-3, compress="slimadam").init(params)
  tracker = slimoptax.SNRTracker(params)
  with pytest.raises(ValueError, match=r"already compressed.*'mlp/up/kernel' \(4, 1\) for a \(4, 6\)"):
    tracker.record(1, state)


def test_nan_and_empty_rows_of_an_snr_table_warn_by_name():
  table = {"a/kernel": {(0,): float("nan"), (1,): float("nan")}, "b/kernel": {}, "c/kernel": {(1,): 3.0}}
  shapes = {"a/kernel": (4, 4), "b/kernel": (4, 4), "c/kernel": (4, 4)}
  with pytest.warns(UserWarning, match=r"no candidates: \['b/kernel'\].*all NaN/inf: \['a/kernel'\]"):
    rules = slimoptax.derive_rules(table, 1.0, shapes=shapes)
  assert [r.axes for r in rules] == [(), (), (1,)]
