"""Dtypes and numerics of every transform and alias.

* bf16 parameters with float32 states (``mu_dtype`` / ``nu_dtype`` / ``h_dtype``)
  track the float32 run; every state leaf keeps its dtype across steps and
  under `jax.lax.cond`.
* Zero gradients and all-zero layers stay finite (and do not move).
* `optax.apply_if_finite` leaves the state untouched on a NaN / inf step. A
  gradient entry whose square overflows (1e30 in float32; apply_if_finite
  sees a finite gradient) never leaves a non-finite averaged / factored
  statistic behind nor a silently frozen matrix: the group skips the step.
* Every alias works with `optax.inject_hyperparams` (learning rate and betas
  changed mid-run give the step of the alias built with the new values) and
  with `optax.MultiSteps` (k micro-steps = one step on the mean gradient).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments._lib.ladder import LADDER
from slimoptax._tree import named_leaves
from tests import _sharded_worker as w


def _close(a, b, atol, rtol=0.0, what=""):
  for (path, x), y in zip(named_leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol,
                               rtol=rtol, err_msg=f"{what} {path}")


def _dtypes(tree) -> dict:
  return {p: x.dtype for p, x in named_leaves(tree)}


def _is_moment(case, path: str) -> bool:
  """State leaves the case's dtype keywords govern."""
  parts = path.split("/")
  if case.name == "muon":  # mu_dtype is Muon's momentum; the fallback's: adam_mu/nu_dtype
    return "muon" in parts and "mu" in parts
  return any(k in parts for k in ("mu", "nu", "h", "ema"))


# ---------------------------------------------------------------------------
# bf16 parameters, float32 states, lax.cond.
# ---------------------------------------------------------------------------


@functools.cache
def _bf16_run(name: str) -> dict:
  """bf16 params, the case's moment dtypes set to float32, steps through a lax.cond."""
  case = next(c for c in w.CASES if c.name == name)
  tx = case.build(**{k: jnp.float32 for k in case.dtype_kwargs})

  def cond_step(params, state, grads, pred):
    def take():
      if case.extra_args:
        updates, new_state = tx.update(grads, state, params, obj_fn=w.quad_loss)
      else:
        updates, new_state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), new_state

    return jax.lax.cond(pred, take, lambda: (params, state))

  step = jax.jit(cond_step, compiler_options=w.FAST)
  params = w.small_params(jnp.bfloat16)
  state = tx.init(params)
  out = {"init_dtypes": _dtypes(state), "dtypes": [], "skipped_same": True}
  t = 0
  for pred in (True, True, False, True):
    before = (params, state)
    params, state = step(params, state, w.grads_at(params, t), pred)
    out["dtypes"].append(_dtypes(state))
    if pred:
      t += 1
    else:
      out["skipped_same"] &= w.bitwise_equal((params, state), before)
  out["params"], out["state"], out["steps"] = params, state, t
  # Zero gradients through the same program: nothing moves, nothing turns NaN.
  zero_p, zero_s = step(params, state, jax.tree.map(jnp.zeros_like, params), True)
  out["zero_grad_params"], out["zero_grad_state"] = zero_p, zero_s
  return out


@pytest.mark.parametrize("case", w.case_params())
def test_state_dtypes_persist_across_steps_and_under_cond(case):
  res = _bf16_run(case.name)
  for dtypes in res["dtypes"]:
    assert dtypes == res["init_dtypes"]
  assert res["skipped_same"]  # the False branch hands the state back untouched
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(res["params"]))
  for path, dtype in res["init_dtypes"].items():
    if _is_moment(case, path) and case.dtype_kwargs:
      assert dtype == jnp.float32, (path, dtype)  # mu_dtype / nu_dtype / h_dtype honoured


@pytest.mark.parametrize("case", w.case_params())
def test_bf16_params_with_fp32_states_track_the_fp32_run(case):
  res = _bf16_run(case.name)
  _, step = w.case_step(case.name)
  params = w.small_params()
  state = w.case_step(case.name)[0].init(params)
  for t in range(res["steps"]):
    params, state, _ = step(params, state, w.grads_at(params, t))
  start = w.small_params()
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
  assert moved > 5e-3
  # bf16 keeps 8 bits: parameters of size ~2 round to ~1e-2.
  _close(res["params"], params, atol=3e-2, rtol=1e-2, what=case.name)


@pytest.mark.parametrize("case", w.case_params())
def test_zero_gradients_and_zero_layers_stay_finite(case):
  tx, step = w.case_step(case.name)
  # An all-zero layer (every parameter zero) with zero gradients, for several steps.
  zeros = jax.tree.map(jnp.zeros_like, w.small_params())
  params, state = zeros, tx.init(zeros)
  for _ in range(3):
    params, state, updates = step(params, state, zeros)
    for path, x in named_leaves((params, state, updates)):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), path
    assert w.bitwise_equal(params, zeros), "a zero layer with zero gradients moved"
  # One zero layer among trained ones: it gets zero gradients, the others real ones.
  params = w.small_params()
  params["params"]["block_0"]["up"]["kernel"] = jnp.zeros((4, 16))
  state = tx.init(params)
  for t in range(3):
    g = w.grads_at(params, t)
    g["params"]["block_0"]["up"]["kernel"] = jnp.zeros((4, 16))
    params, state, updates = step(params, state, g)
    for path, x in named_leaves((params, state, updates)):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), path
  if not case.extra_args:  # Sophia's curvature comes from obj_fn, not from the gradients
    assert not bool(jnp.any(params["params"]["block_0"]["up"]["kernel"]))
  # bf16: zero gradients after real steps.
  res = _bf16_run(case.name)
  for path, x in named_leaves((res["zero_grad_params"], res["zero_grad_state"])):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(x))), path


@functools.cache
def _if_finite(name: str):
  case = next(c for c in w.CASES if c.name == name)
  tx = optax.apply_if_finite(case.build(), max_consecutive_errors=5)
  return tx, w.make_step(tx, case)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("case", w.case_params())
def test_apply_if_finite_leaves_the_state_untouched(case, bad):
  tx, step = _if_finite(case.name)
  params0 = w.small_params()
  g0, g1 = w.grads_at(params0, 0), w.grads_at(params0, 1)
  poisoned = jax.tree.map(lambda g: g, g1)
  poisoned["params"]["block_0"]["up"]["kernel"] = g1["params"]["block_0"]["up"]["kernel"].at[1, 3].set(bad)
  params, state, _ = step(params0, tx.init(params0), g0)
  params_bad, state_bad, updates = step(params, state, poisoned)
  assert w.bitwise_equal(state_bad.inner_state, state.inner_state)
  assert w.bitwise_equal(params_bad, params)
  assert all(not bool(jnp.any(u)) for u in jax.tree.leaves(updates))
  assert int(state_bad.notfinite_count) == 1 and not bool(state_bad.last_finite)
  params, state, _ = step(params_bad, state_bad, g1)
  assert int(state.notfinite_count) == 0
  # Reference: the plain transform never saw the bad step.
  ref_tx, ref_step = w.case_step(case.name)
  ref_p, ref_s, _ = ref_step(params0, ref_tx.init(params0), g0)
  ref_p, ref_s, _ = ref_step(ref_p, ref_s, g1)
  _close(params, ref_p, atol=1e-6, rtol=1e-6, what=case.name)
  _close(state.inner_state, ref_s, atol=1e-6, rtol=1e-6, what=case.name)


# ---------------------------------------------------------------------------
# Non-finite statistics in averaged groups: skippable, never a silent freeze.
# ---------------------------------------------------------------------------

# Transforms whose statistics are per entry (optax's behaviour: an overflowed
# entry's step is 0 and apply_if_finite does not skip).
PER_ENTRY = ("slim_adamw-none", "adavar")
# Newton–Schulz normalizes by ||m||_F, which overflows while the momentum holds
# the 1e30 entry: the matrix's step is 0 for a while (not yet fixed: a safe norm
# changes the rounding of ordinary steps beyond the inject_hyperparams test's tolerance).
NS_NORM_OVERFLOWS = ("orthogonalize", "muon")


def _poison(grads, bad):
  out = jax.tree.map(lambda g: g, grads)
  out["params"]["block_0"]["up"]["kernel"] = grads["params"]["block_0"]["up"]["kernel"].at[1, 3].set(bad)
  return out


@pytest.mark.parametrize("case", w.case_params())
def test_an_overflowing_gradient_entry_leaves_no_frozen_group(case):
  """1e30 in float32 (its square overflows; optax.apply_if_finite sees a finite gradient)."""
  tx, step = w.case_step(case.name)
  params0 = w.small_params()
  params, state, _ = step(params0, tx.init(params0), w.grads_at(params0, 0))
  params, state, updates = step(params, state, _poison(w.grads_at(params0, 1), 1e30))
  up = lambda tree: np.asarray(tree["params"]["block_0"]["up"]["kernel"])
  if case.name in PER_ENTRY:  # optax's per-entry statistics: that entry's is inf, frozen for good
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
    return
  for path, x in named_leaves((params, state, updates)):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(x))), path  # nothing non-finite stored
  # The next ordinary gradient moves every row of the poisoned matrix: nothing frozen.
  _, _, updates = step(params, state, w.grads_at(params0, 2))
  if case.name not in NS_NORM_OVERFLOWS:
    assert all(np.any(row != 0) for row in up(updates)), case.name


def _scale_by_adam(compress):
  import slimoptax
  if compress is None:
    return optax.scale_by_adam(0.9, 0.95, 1e-8)
  return slimoptax.scale_by_slim_adam(0.9, 0.95, 1e-8, compress=compress)


@pytest.mark.parametrize("bad", [1e30, np.nan])
def test_non_finite_second_moment_in_a_group_vs_adam(bad):
  """SlimAdam: the group skips the step (old state, zero step); optax's Adam: the entry is hit."""
  import slimoptax
  params = w.small_params()
  clean = w.grads_at(params, 0)
  g = _poison(clean, bad)
  up = lambda tree: np.asarray(tree["params"]["block_0"]["up"]["kernel"])
  adam, slim = _scale_by_adam(None), _scale_by_adam("slimadam")
  slim_none = slimoptax.scale_by_slim_adam(0.9, 0.95, 1e-8)
  u_ref, s_ref = adam.update(g, adam.init(params))
  u_none, s_none = slim_none.update(g, slim_none.init(params))
  for a, b in zip(jax.tree.leaves((u_none, s_none.nu)), jax.tree.leaves((u_ref, s_ref.nu))):
    np.testing.assert_array_equal(a, b)  # compress=None is optax's (NaN where optax has NaN)
  # optax: the entry alone is hit: 1e30 -> nu inf and a zero step there for good; NaN -> NaN.
  assert np.isfinite(np.delete(up(u_ref).ravel(), 1 * 16 + 3)).all()
  assert (up(u_ref)[1, 3] == 0 and np.isinf(up(s_ref.nu)[1, 3])) if bad == 1e30 else np.isnan(
      up(u_ref)[1, 3])
  # SlimAdam ("slimadam": the up kernel's nu averaged over fan_out): row 1 skips the step.
  state0 = slim.init(params)
  u, s = slim.update(g, state0)
  u_clean, s_clean = slim.update(clean, state0)
  assert (up(u)[1] == 0).all() and (up(s.mu)[1] == 0).all() and (up(s.nu)[1] == 0).all()
  np.testing.assert_array_equal(np.delete(up(u), 1, axis=0), np.delete(up(u_clean), 1, axis=0))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(s))
  u_next, _ = slim.update(clean, s)
  assert np.all(up(u_next)[1] != 0)  # moves again at the next finite gradient
  # optax.apply_if_finite sees the gradient: it skips a NaN step, never a 1e30 one.
  safe = optax.apply_if_finite(slim, max_consecutive_errors=5)
  _, new_state = safe.update(g, safe.init(params))
  assert int(new_state.notfinite_count) == int(bad != 1e30)


@pytest.mark.parametrize("fresh", [False, True])
def test_non_finite_compressed_curvature_skips_the_group(fresh):
  """Sophia: a refresh making a group's h inf: that group keeps m and h, steps 0 (also lagging)."""
  import slimoptax
  params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}}
  bad = lambda p, key, **_: jax.tree.map(lambda x: jnp.ones_like(x).at[(1,) * x.ndim].set(jnp.inf), p)
  tx = slimoptax.scale_by_hutchinson(update_every=1, estimator=bad, compress="adalayer",
                                     fresh_estimate=fresh)
  grads = jax.tree.map(jnp.ones_like, params)
  state0 = tx.init(params)
  u, state = tx.update(grads, state0, params)
  assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u))
  assert w.bitwise_equal(state.mu, state0.mu) and w.bitwise_equal(state.h, state0.h)


def test_overflow_in_factored_statistics_skips_the_matrix():
  import slimoptax
  tx = slimoptax.scale_by_factored_second_moment(min_dim_size_to_factor=1)
  g = {"w": jnp.ones((3, 4)).at[1, 2].set(1e30), "v": jnp.ones((2, 3, 4)).at[0, 1, 2].set(1e30)}
  state0 = tx.init(g)
  u, state = tx.update(g, state0)
  assert not bool(jnp.any(u["w"])) and not bool(jnp.any(u["v"][0]))  # per batch matrix
  assert bool(jnp.all(u["v"][1] != 0))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  assert not bool(jnp.any(state.v_row["w"])) and bool(jnp.all(state.v_row["v"][1] > 0))


# ---------------------------------------------------------------------------
# Aliases: inject_hyperparams and MultiSteps.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alias:
  """An optimizer alias and how inject_hyperparams must treat it.

  Attributes:
    static: arguments inject_hyperparams must not trace (ints that pick shapes
      or loop counts, callables it would take for schedules).
    beta: a beta-like hyperparameter changed mid-run in the test (None: only
      the learning rate is changed).
  """

  name: str
  family: str
  factory: Callable[[], Callable[..., Any]]
  kwargs: tuple = ()
  static: tuple[str, ...] = ()
  beta: str | None = None
  new_beta: float = 0.5
  extra_args: bool = False


def _ladder(name):
  return lambda: LADDER[name]


# Per ladder entry: (beta changed in the test, static args, kwargs).
# Entries added to LADDER later are picked up with the defaults. The SGD family's
# weight decay is injected too (its state does not depend on the value).
_ADAFACTOR = (("min_dim_size_to_factor",), (("min_dim_size_to_factor", 1),))
_LADDER_INFO = {
    "adam": ("b1", (), ()),
    "adam_equal_betas": (None, (), ()),
    "rmsprop": (None, (), ()),
    "signum": ("beta", (), ()),
    "signsgd": (None, (), ()),
    "emasign": (None, (), ()),
    "sgd": (None, (), ()),
    "sgd_gclip": (None, (), ()),
    "sgd_cclip": (None, (), ()),
    "adafactor": ("decay_rate", *_ADAFACTOR),
    "adafactor_momentum": ("b1", *_ADAFACTOR),
    "lion": (None, (), ()),
    # optax.scale_by_sm3 branches on `b2 == 1` in Python.
    "sm3": (None, ("b2",), ()),
}


def _aliases() -> list[Alias]:
  out = [
      Alias("slim_adamw", "slim_adam", lambda: __import__("slimoptax").slim_adamw,
            (("compress", "slimadam"),), beta="b1"),
      # ns_steps is a loop count.
      Alias("muon", "muon", lambda: __import__("slimoptax").muon,
            (("adam_compress", "slimadam"),), static=("ns_steps",), beta="beta"),
      # num_samples is a loop count; update_every and seed are injected.
      Alias("sophia", "sophia", lambda: __import__("slimoptax").sophia,
            (("update_every", 2), ("compress", "slimadam")),
            static=("num_samples",), beta="b1", extra_args=True),
  ]
  for name in LADDER:
    beta, static, kwargs = _LADDER_INFO.get(name, (None, (), ()))
    # `mask` defaults to a string (not a function inject_hyperparams would take for a
    # schedule): no static_args for it.
    out.append(Alias(f"ladder.{name}", "ladder", _ladder(name), kwargs, static, beta))
  return out


ALIASES = _aliases()
LR_A, LR_B = 1e-2, 3e-3


def alias_params(aliases=ALIASES):
  return [pytest.param(a, id=a.name) for a in aliases]


def _step(tx, alias):
  return w.make_step(tx, extra_args=alias.extra_args)


@functools.cache
def _plain(name: str, lr: float = LR_A, beta: float | None = None):
  alias = next(a for a in ALIASES if a.name == name)
  kwargs = dict(alias.kwargs)
  if beta is not None:
    kwargs[alias.beta] = beta
  tx = alias.factory()(learning_rate=lr, **kwargs)
  return tx, _step(tx, alias)


def _tree_ratio_close(a, b, ratio, what):
  _close(a, jax.tree.map(lambda x: ratio * x, b), atol=1e-7, rtol=1e-5, what=what)


@pytest.mark.parametrize("alias", alias_params())
def test_inject_hyperparams_learning_rate_and_beta(alias):
  factory = alias.factory()
  inj = optax.inject_hyperparams(factory, static_args=alias.static)(
      learning_rate=LR_A, **dict(alias.kwargs))
  inj_step = _step(inj, alias)
  plain, plain_step = _plain(alias.name)
  params0 = w.small_params()
  p, s = params0, inj.init(params0)
  rp, rs = params0, plain.init(params0)
  for t in range(2):
    p, s, _ = inj_step(p, s, w.grads_at(params0, t))
    rp, rs, _ = plain_step(rp, rs, w.grads_at(params0, t))
  _close(p, rp, atol=1e-6, rtol=1e-6, what="injected vs plain")
  # Change the learning rate: the step is the plain alias's (same state) times LR_B / LR_A.
  s.hyperparams["learning_rate"] = jnp.asarray(LR_B, s.hyperparams["learning_rate"].dtype)
  g = w.grads_at(params0, 2)
  p2, s2, u_inj = inj_step(p, s, g)
  _, _, u_plain = plain_step(p, s.inner_state, g)
  assert float(max(jnp.max(jnp.abs(u)) for u in jax.tree.leaves(u_plain))) > 0
  _tree_ratio_close(u_inj, u_plain, LR_B / LR_A, f"{alias.name} lr")
  if alias.beta is None:
    return
  # Change a beta (back at LR_A): the step of the alias built with the new value, same state.
  assert alias.beta in s2.hyperparams, sorted(s2.hyperparams)
  s2.hyperparams["learning_rate"] = jnp.asarray(LR_A, s2.hyperparams["learning_rate"].dtype)
  s2.hyperparams[alias.beta] = jnp.asarray(alias.new_beta, s2.hyperparams[alias.beta].dtype)
  g = w.grads_at(params0, 3)
  _, s3, u_inj = inj_step(p2, s2, g)
  _, new_step = _plain(alias.name, LR_A, alias.new_beta)
  _, s_ref, u_ref = new_step(p2, s2.inner_state, g)
  _close(u_inj, u_ref, atol=1e-7, rtol=1e-5, what=f"{alias.name} {alias.beta}")
  _close(s3.inner_state, s_ref, atol=1e-7, rtol=1e-5, what=f"{alias.name} state")
  # ... and differs from keeping the old beta (the change took effect).
  _, _, u_old = plain_step(p2, s2.inner_state, g)
  assert not w.bitwise_equal(u_old, u_inj)


@pytest.mark.parametrize("alias", alias_params())
def test_multisteps_equals_one_step_on_the_mean_gradient(alias):
  k = 3
  plain, plain_step = _plain(alias.name)
  multi = optax.MultiSteps(plain, every_k_schedule=k)
  multi_step = _step(multi, alias)
  params0 = w.small_params()
  p, s = params0, multi.init(params0)
  rp, rs = params0, plain.init(params0)
  for outer in range(2):
    grads = [w.grads_at(params0, outer * k + i) for i in range(k)]
    for i, g in enumerate(grads):
      before = p
      p, s, _ = multi_step(p, s, g)
      if i < k - 1:
        assert w.bitwise_equal(p, before)  # nothing applied until the k-th micro-step
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
    rp, rs, _ = plain_step(rp, rs, mean)
    _close(p, rp, atol=2e-6, rtol=1e-5, what=f"{alias.name} outer step {outer}")
  _close(s.inner_opt_state, rs, atol=2e-6, rtol=1e-5, what=f"{alias.name} state")


# The ladder aliases under inject_hyperparams without static_args: the default
# mask is a string, so the weight decay does not silently disappear.
def test_ladder_inject_hyperparams_keeps_weight_decay_without_static_mask():
  adamw = LADDER["adam"]
  params = w.small_params()
  inj = optax.inject_hyperparams(adamw)(learning_rate=LR_A)
  _, _, u_inj = w.make_step(inj, extra_args=False)(params, inj.init(params), w.grads_at(params, 0))
  plain = adamw(LR_A)
  _, _, u_plain = w.make_step(plain, extra_args=False)(params, plain.init(params),
                                                        w.grads_at(params, 0))
  _close(u_inj, u_plain, atol=1e-7, rtol=1e-6)


def test_muon_adam_fallback_dtypes():
  """``adam_mu_dtype`` / ``adam_nu_dtype`` set the AdamW fallback's moments' dtypes."""
  from slimoptax._muon import muon
  params = w.small_params(jnp.bfloat16)
  tx = muon(LR_A, mu_dtype=jnp.float32, adam_mu_dtype=jnp.float32, adam_nu_dtype=jnp.float32,
            adam_compress="slimadam")
  state = tx.init(params)
  dtypes = _dtypes(state)
  adam = {p: d for p, d in dtypes.items() if "adam" in p.split("/")}
  assert any("mu" in p.split("/") for p in adam) and any("nu" in p.split("/") for p in adam)
  for path, dtype in dtypes.items():
    if any(k in path.split("/") for k in ("mu", "nu")):
      assert dtype == jnp.float32, (path, dtype)
  _, new_state, _ = w.make_step(tx, extra_args=False)(params, state, w.grads_at(params, 0))
  assert _dtypes(new_state) == dtypes
  # Default: the parameters' dtype.
  default = _dtypes(muon(LR_A, adam_compress="slimadam").init(params))
  assert all(d == jnp.bfloat16 for p, d in default.items()
             if "adam" in p.split("/") and any(k in p.split("/") for k in ("mu", "nu")))


@pytest.mark.parametrize("name", ["sgd", "sgd_gclip", "sgd_cclip"])
def test_ladder_sgd_injected_weight_decay(name):
  """The state does not depend on the weight decay's value; an injected one takes effect."""
  factory = LADDER[name]
  params = w.small_params()
  plain0, plain1 = factory(LR_A), factory(LR_A, weight_decay=0.1)
  assert jax.tree.structure(plain0.init(params)) == jax.tree.structure(plain1.init(params))
  inj = optax.inject_hyperparams(factory)(learning_rate=LR_A)
  s = inj.init(params)
  assert jax.tree.structure(s.inner_state) == jax.tree.structure(plain0.init(params))
  s.hyperparams["weight_decay"] = jnp.asarray(0.1, s.hyperparams["weight_decay"].dtype)
  g = w.grads_at(params, 0)
  _, _, u_inj = w.make_step(inj, extra_args=False)(params, s, g)
  _, _, u_ref = w.make_step(plain1, extra_args=False)(params, plain1.init(params), g)
  _close(u_inj, u_ref, atol=1e-7, rtol=1e-6)


def test_ladder_mask_values():
  """``"ndim>=2"`` (default) decays matrices only, ``None`` everything; other strings fail."""
  adamw = LADDER["adam"]
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = adamw(1.0, clip_norm=None)
  u, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.max(jnp.abs(u["b"]))) == 0 and float(jnp.max(jnp.abs(u["w"]))) > 0
  tx = adamw(1.0, clip_norm=None, mask=None)
  u, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.max(jnp.abs(u["b"]))) > 0
  with pytest.raises(ValueError, match="unknown mask"):
    adamw(1.0, mask="all")
