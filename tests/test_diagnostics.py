"""Memory report and per-layer norms against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import slimoptax


def test_memory_report_closed_form():
  params = {"emb": {"embedding": jnp.ones((100, 8))}, "mlp": {"up": {"kernel": jnp.ones((8, 32), jnp.bfloat16)}},
            "ln": {"scale": jnp.ones(8)}}
  tx = slimoptax.slim_adamw(1e-3, compress="slimadam", nu_dtype=jnp.float32)
  report = slimoptax.memory_report(tx.init(params), params)
  rows = {r.path: r for r in report.rows}
  assert rows["emb/embedding"].nu_shape == (100, 1) and rows["emb/embedding"].entries == 100
  assert rows["mlp/up/kernel"].nu_shape == (8, 1) and rows["mlp/up/kernel"].nbytes == 8 * 4
  assert report.entries == 100 + 8 + 8
  assert report.adam_entries == 800 + 256 + 8
  assert report.nbytes == 4 * (100 + 8 + 8)
  np.testing.assert_allclose(report.fraction_saved, 1 - 116 / 1064)
  # State: count (int32) + mu (param dtypes) + nu (f32) + the other transforms' empty states.
  assert report.state_nbytes == 4 + (800 * 4 + 256 * 2 + 8 * 4) + 4 * 116
  assert "TOTAL" in str(report) and "89.10% saved" in str(report)
  # Same numbers from an abstract state (nothing allocated).
  abstract = slimoptax.abstract_state(tx, params)
  assert slimoptax.memory_report(abstract, params).state_nbytes == report.state_nbytes


def test_memory_report_of_optax_adam_saves_nothing():
  params = {"w": jnp.ones((4, 4))}
  report = slimoptax.memory_report(optax.adam(1e-3).init(params), params)
  assert report.entries == report.adam_entries == 16 and report.fraction_saved == 0.0


def test_layer_norms_match_numpy():
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
  grads = jax.tree.map(lambda p: 2 * p + 1, params)
  updates = jax.tree.map(lambda g: -0.1 * g, grads)
  norms = jax.jit(slimoptax.layer_norms)(grads, params, updates)
  for k in params:
    np.testing.assert_allclose(norms[k]["weight"], np.linalg.norm(np.asarray(params[k])), rtol=1e-6)
    np.testing.assert_allclose(norms[k]["grad"], np.linalg.norm(np.asarray(grads[k])), rtol=1e-6)
    np.testing.assert_allclose(norms[k]["update"], 0.1 * np.linalg.norm(np.asarray(grads[k])), rtol=1e-6)


def test_memory_report_of_masked_and_partitioned_adam():
  params = {"mlp": {"up": {"kernel": jnp.ones((8, 32))}}, "ln": {"scale": jnp.ones(8)}}
  mask = {"mlp": {"up": {"kernel": True}}, "ln": {"scale": False}}
  for tx in (optax.masked(optax.adam(1e-3), mask),
             optax.chain(optax.masked(slimoptax.slim_adamw(1e-3, compress="slimadam"), mask)),
             optax.partition({"a": slimoptax.slim_adamw(1e-3, compress="slimadam"), "b": optax.sgd(1e-3)},
                             {"mlp": {"up": {"kernel": "a"}}, "ln": {"scale": "b"}})):
    report = slimoptax.memory_report(tx.init(params), params)
    rows = {r.path: r for r in report.rows}
    assert rows["ln/scale"].nu_shape is None and rows["ln/scale"].entries == 0
    assert report.no_second_moment == ("ln/scale",)
    assert report.adam_entries == 256 and report.adam_nbytes == 256 * 4  # the unmasked kernel only
    assert report.entries == rows["mlp/up/kernel"].entries in (256, 8)
    text = str(report)
    assert "no second moment" in text and "masked out) for 1 parameter(s), not counted above: ln/scale" in text
    abstract = slimoptax.memory_report(jax.eval_shape(tx.init, params), params)
    assert abstract.entries == report.entries and abstract.no_second_moment == ("ln/scale",)


def test_memory_report_without_adam_names_the_states():
  import pytest
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"need an Adam-family state.*the state holds \['TraceState'"):
    slimoptax.memory_report(optax.sgd(1e-3, momentum=0.9).init(params), params)
