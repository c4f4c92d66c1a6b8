"""Bad input, fed to every transform of the matrix (tests/_sharded_worker.CASES).

Each input either raises a ValueError / TypeError that names the parameter
path (before anything reaches XLA), or is supported and checked against a
reference:

==================  ==========================================================
mismatched trees    update tree != state tree (a leaf missing, an extra leaf, a
                    leaf of another shape): error naming the leaf; supported
                    only by transforms whose state holds no per-parameter leaves
integer / complex   error naming the parameter and its dtype
wrong-rank axes     error naming the parameter (``compress`` / ``factored_axes``
                    / ``dims``)
unknown label       a path no rule matches, a rule label that is not a layer
                    type: error naming the parameter; supported by transforms
                    without rules
empty tree          supported: empty state, empty updates
scalars             supported, never reduced (Adam on the scalar)
bare array          supported, or an error naming the (empty) path
bad hyperparameter  out of range (``b1 = 1``, ``b2 > 1``, ``eps < 0``, ...):
                    error at construction naming the argument
non-float dtype     ``mu_dtype`` / ``nu_dtype`` / ``h_dtype`` / ``dtype`` not
                    floating: error at construction naming the argument
zero-size leaf      supported: empty updates, finite zero statistics
Python number leaf  error naming the parameter (parameters must be arrays)
foreign state       a state made by another optimizer: error naming the
                    expected state type
inject_hyperparams  an int setting shapes or loop counts (``num_heads``,
                    ``ns_steps``, ``num_samples``): error asking for
                    ``static_args``; everything else is injectable
==================  ==========================================================

One input is tested on a narrower chain: the ``orthogonalize`` case chains
``optax.trace`` (not slimoptax) in front, whose broadcasting error on a leaf of
another shape names no path; there the mismatched tree goes through the
stateless `slimoptax.orthogonalize` alone (see `_build_for_mismatch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import slimoptax
from slimoptax import sharding as sh
from slimoptax._tree import named_leaves
from slimoptax.rules import Rule, Rules
from tests import _sharded_worker as w

UP = "params/block_0/up/kernel"

def matrix(inputs):
  """pytest params: case x input."""
  return [pytest.param(case, name, id=f"{case.name}-{name}") for case in w.CASES for name in inputs]


def _update(tx, case, grads, state, params):
  return w.update(tx, case, grads, state, params, w.quad_loss)


def _names_path(msg: str, path: str) -> bool:
  """The message names ``path``: "/"-joined, or as JAX's key path of its parent plus the key."""
  if path in msg:
    return True
  *parents, leaf_key = path.split("/")
  while parents:
    if "".join(f"['{k}']" for k in parents) in msg and leaf_key in msg:
      return True
    leaf_key = parents.pop()
  return False


def _raises_naming(fn, path: str, *also: str):
  with pytest.raises((ValueError, TypeError)) as err:
    fn()
  assert type(err.value).__module__.split(".")[0] not in ("jaxlib",), type(err.value)
  msg = str(err.value)
  assert _names_path(msg, path), f"error does not name {path!r}: {msg}"
  for text in also:
    assert text in msg, (text, msg)
  return msg


def _holds_param_copies(tx, params) -> bool:
  idx = sh.param_index(jax.eval_shape(tx.init, params), params)
  return any(i is not None for i in jax.tree.leaves(idx, is_leaf=lambda x: x is None))


def _without_up(tree):
  return {"params": {**tree["params"], "block_0": {
      k: v for k, v in tree["params"]["block_0"].items() if k != "up"}}}


def _with_extra(tree):
  return {"params": {**tree["params"], "extra": jnp.ones(3)}}


def _reshaped(tree):
  t = jax.tree.map(lambda x: x, tree)
  t["params"]["block_0"]["up"]["kernel"] = jnp.ones((4, 8))
  return t


# ---------------------------------------------------------------------------


def _build_for_mismatch(case, name):
  """The case's transform; for ``orthogonalize`` / reshaped leaf, without optax's trace.

  ``optax.trace`` fails on a leaf of another shape with a broadcasting error
  naming no path (an optax limitation slimoptax cannot fix); slimoptax's part,
  the stateless `orthogonalize`, must accept any tree.
  """
  if (case.name, name) == ("orthogonalize", "reshaped_leaf"):
    from slimoptax._muon import orthogonalize
    return optax.chain(orthogonalize(), optax.scale_by_learning_rate(w.LR))
  return case.build()


@pytest.mark.parametrize("case,name", matrix(["missing_leaf", "extra_leaf", "reshaped_leaf"]))
def test_mismatched_update_tree(case, name):
  change, path = {"missing_leaf": (_without_up, UP), "extra_leaf": (_with_extra, "params/extra"),
                  "reshaped_leaf": (_reshaped, UP)}[name]
  tx = _build_for_mismatch(case, name)
  params = w.small_params()
  state = tx.init(params)
  grads, new_params = change(w.grads_at(params, 0)), change(params)
  if not _holds_param_copies(tx, params):
    # Nothing per parameter in the state (SignSGD): any tree is fine.
    updates, _ = _update(tx, case, grads, state, new_params)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    return
  _raises_naming(lambda: _update(tx, case, grads, state, new_params), path)


@pytest.mark.parametrize("case,name", matrix(["integer", "complex"]))
def test_integer_and_complex_parameters(case, name):
  dtype = {"integer": jnp.int32, "complex": jnp.complex64}[name]
  params = w.small_params()
  params["params"]["block_0"]["up"]["kernel"] = jnp.ones((4, 16), dtype)
  tx = case.build()

  def init_and_update():
    state = tx.init(params)
    return _update(tx, case, params, state, params)

  _raises_naming(init_and_update, UP, str(jnp.dtype(dtype)))


def _bad_axes(kwarg, params):
  """Per-parameter axes of the wrong rank for the up kernel (4, 16)."""
  if kwarg == "compress":
    spec = jax.tree.map(lambda p: (), params)
    spec["params"]["block_0"]["up"]["kernel"] = (2,)
    return spec
  if kwarg == "factored_axes":
    spec = jax.tree.map(lambda p: None, params)
    spec["params"]["block_0"]["up"]["kernel"] = (0, 2)
    return spec
  if kwarg == "dims":
    mdn = optax.contrib.MuonDimensionNumbers

    def dims(tree):
      out = jax.tree.map(lambda p: None, tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
      out["params"]["block_0"]["up"]["kernel"] = mdn(0, 2)
      return out

    return dims
  raise AssertionError(kwarg)


AXES_CASES = [c for c in w.CASES if c.axes_kwarg]


@pytest.mark.parametrize("case", w.case_params(AXES_CASES))
def test_wrong_rank_axes(case):
  params = w.small_params()
  tx = case.build(**{case.axes_kwarg: _bad_axes(case.axes_kwarg, params)})

  def init_and_update():
    state = tx.init(params)
    return _update(tx, case, params, state, params)

  _raises_naming(init_and_update, UP, "out of range")


@pytest.mark.parametrize("case", w.case_params([c for c in AXES_CASES if c.axes_kwarg == "compress"]))
def test_wrong_rank_axes_in_rules(case):
  params = w.small_params()
  rules = Rules([Rule(r"up/kernel$", "mlp_up", (3,))]) + slimoptax.preset("adam")
  tx = case.build(compress=rules)
  _raises_naming(lambda: tx.init(params), UP, "out of range")


RULES_CASES = [c for c in AXES_CASES if c.axes_kwarg in ("compress", "factored_axes")]


@pytest.mark.parametrize("case", w.case_params(RULES_CASES))
def test_rules_that_miss_a_parameter(case):
  params = w.small_params()
  pair = ("fan_in", "fan_out") if case.axes_kwarg == "factored_axes" else ("fan_out",)
  rules = Rules([Rule(r"embedding$", "embedding", pair)])  # nothing for the other parameters
  tx = case.build(**{case.axes_kwarg: rules})
  _raises_naming(lambda: tx.init(params), "params/block_0/attn/query/kernel", "no rule")


@pytest.mark.parametrize("case", w.case_params(RULES_CASES))
def test_rule_label_unknown_to_the_layer_types(case):
  params = w.small_params()
  pair = ("fan_in", "fan_out") if case.axes_kwarg == "factored_axes" else ("fan_in",)
  rules = Rules([Rule(r"^", "mystery", pair)])
  tx = case.build(**{case.axes_kwarg: rules})
  _raises_naming(lambda: tx.init(params), "params/", "'mystery'")


@pytest.mark.parametrize("case", w.case_params())
def test_path_unknown_to_the_default_rules(case):
  """A matrix called 'mystery': transforms that classify layers by path refuse it by name."""
  params = {"params": {"mystery": jnp.ones((4, 4)), "up": {"kernel": jnp.ones((4, 4))}}}
  tx = case.build()
  uses_layer_types = case.name in ("slim_adamw-slimadam", "slim_adamw-adam-mini",
                                   "orthogonalize", "muon", "hutchinson")
  if uses_layer_types:
    _raises_naming(lambda: _update(tx, case, params, tx.init(params), params), "params/mystery")
  else:  # no rules (or a preset treating every tensor alike): supported
    updates, _ = _update(tx, case, params, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("case", w.case_params())
def test_empty_tree_gives_an_empty_state(case):
  tx = case.build()
  state = tx.init({})
  assert all(x.ndim == 0 or x.shape == (2,) for x in jax.tree.leaves(state))  # counters, keys
  updates, new_state = _update(tx, case, {}, state, {})
  assert updates == {}
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


SCALAR_PARAMS = {"params": {"temperature": jnp.float32(1.5), "up": {"kernel": jnp.ones((4, 4))}}}


@pytest.mark.parametrize("case", w.case_params())
def test_scalars_are_never_reduced(case):
  tx = case.build()
  params = SCALAR_PARAMS
  state = tx.init(params)
  for path, leaf in named_leaves(state):
    if path.endswith("params/temperature"):
      assert leaf.shape == (), (path, leaf.shape)
  step = w.make_step(tx, case)
  p, s = params, state
  for t in range(3):
    g = {"params": {"temperature": jnp.float32(0.3 - 0.2 * t), "up": {"kernel": jnp.full((4, 4), 0.1)}}}
    p, s, _ = step(p, s, g)
    assert bool(jnp.isfinite(p["params"]["temperature"]))
  if case.family == "slim_adam":
    # Reference: optax's AdamW on the scalar (unreducible under every preset).
    ref = optax.adamw(w.LR, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                      mask=slimoptax.default_weight_decay_mask)
    rp, rs = params, ref.init(params)
    for t in range(3):
      g = {"params": {"temperature": jnp.float32(0.3 - 0.2 * t), "up": {"kernel": jnp.full((4, 4), 0.1)}}}
      u, rs = ref.update(g, rs, rp)
      rp = optax.apply_updates(rp, u)
    np.testing.assert_allclose(p["params"]["temperature"], rp["params"]["temperature"], rtol=1e-6)


@pytest.mark.parametrize("case,name", matrix(["bare_matrix", "bare_scalar"]))
def test_bare_array(case, name):
  """A parameter tree that is one array (empty path): supported, or refused naming the path ''."""
  shape = {"bare_matrix": (4, 4), "bare_scalar": ()}[name]
  params = jnp.ones(shape)
  tx = case.build()
  try:
    state = tx.init(params)
    updates, _ = _update(tx, case, params, state, params)
  except (ValueError, TypeError) as err:
    assert "''" in str(err), str(err)
    assert shape != (), f"a bare scalar is never ambiguous, yet: {err}"
    return
  assert updates.shape == shape and bool(jnp.all(jnp.isfinite(updates)))


def test_bare_array_message_explains_the_empty_path():
  with pytest.raises(ValueError, match="bare array, whose path is empty"):
    slimoptax.slim_adamw(1e-2, compress="slimadam").init(jnp.ones((4, 4)))


# ---------------------------------------------------------------------------
# Hyperparameters, state dtypes, zero-size and Python-number parameters,
# foreign states, inject_hyperparams with loop counts / shape ints.
# ---------------------------------------------------------------------------

# Per family: (keyword, out-of-range value) the case's builder accepts.
BAD_HYPERPARAMS = {
    "slim_adam": [("b1", 1.0), ("b2", 1.0), ("b2", 1.5), ("b1", -0.1), ("eps", -1e-8),
                  ("weight_decay", -0.1), ("num_heads", 0)],
    "adafactor": [("decay_rate", -0.8), ("b1", 1.0), ("eps1", -1.0), ("eps2", -1.0),
                  ("clipping_threshold", 0.0)],
    "sign": [("beta", 1.0), ("beta", -0.5), ("eps", -1.0)],
    "adavar": [("tau", 1.0), ("gamma", -1.0), ("eps", -1.0)],
    "muon": [("ns_steps", -1), ("eps", -1.0)],
    "sophia": [("b1", 1.0), ("b2", 1.0), ("eps", 0.0), ("gamma", -1.0), ("num_samples", 0),
               ("num_heads", 0)],
    "shampoo": [("beta", 1.0), ("eps", -1.0), ("b1", 1.0), ("b2", 1.5), ("graft_eps", -1.0),
                ("weight_decay", -0.1), ("precondition_frequency", 0), ("max_precond_dim", 0)],
    "soap": [("b1", 1.0), ("b2", 1.0), ("eps", -1e-8), ("shampoo_beta", 1.5), ("weight_decay", -0.1),
             ("precondition_frequency", 0), ("max_precond_dim", 0)],
}
_MUON_ONLY = [("beta", 1.0), ("weight_decay", -1.0), ("adam_b1", 1.0), ("adam_b2", 1.0),
              ("num_heads", 0)]


def _bad_hyperparams(case):
  return BAD_HYPERPARAMS[case.family] + (_MUON_ONLY if case.name == "muon" else [])


def _unfixed_builder(case):
  """The case's transform with none of its hyperparameters fixed by the matrix's builder."""
  from slimoptax._adafactor import scale_by_adafactor
  from slimoptax._adavar import scale_by_adavar
  from slimoptax._sign import scale_by_sign
  return {"sign": lambda **kw: scale_by_sign(mode=case.name.split("-")[1], **kw),
          "adavar": scale_by_adavar, "adafactor": scale_by_adafactor}.get(case.family, case.build)


@pytest.mark.parametrize("case", w.case_params())
def test_out_of_range_hyperparameters_are_refused_by_name(case):
  for name, value in _bad_hyperparams(case):
    with pytest.raises(ValueError, match=rf"\b{name}\b") as err:
      _unfixed_builder(case)(**{name: value})
    assert str(value) in str(err.value), (name, str(err.value))


def test_hyperparameter_bounds():
  from slimoptax._sophia import scale_by_hutchinson
  slimoptax.slim_adamw(1e-2, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0)  # the closed ends
  with pytest.raises(ValueError, match=r"b2 must be in \[0.0, 1.0\), got 1.0"):
    slimoptax.scale_by_slim_adam(b2=1.0)
  with pytest.raises(ValueError, match="update_every must be in"):
    scale_by_hutchinson(update_every=0)
  with pytest.raises(ValueError, match="decay_rate must be in"):
    slimoptax.scale_by_factored_second_moment(
        1.0, decay_rate_fn=slimoptax._adafactor.decay_rate_constant)
  with pytest.raises(ValueError, match="ns_steps must be >= 0"):
    slimoptax.newton_schulz(jnp.ones((2, 2)), -1)
  # Traced values (optax.inject_hyperparams under jit) cannot be checked: accepted.
  jax.jit(lambda b: slimoptax.scale_by_slim_adam(b1=b).init({"w": jnp.ones(2)}))(jnp.float32(0.5))


def _dtype_kwargs(case):
  # Shampoo / SOAP: no state dtype keyword (statistics, roots and bases are float32 or wider).
  return case.dtype_kwargs or {"adafactor": ("mu_dtype",), "sign": ("mu_dtype",),
                               "muon": ("dtype",), "shampoo": (), "soap": ()}[case.family]


@pytest.mark.parametrize("case,dtype", [
    pytest.param(c, d, id=f"{c.name}-{jnp.dtype(d).name}") for c in w.CASES if _dtype_kwargs(c)
    for d in (jnp.int32, jnp.bool_, jnp.complex64)])
def test_non_float_state_dtypes_are_refused_by_name(case, dtype):
  for kwarg in _dtype_kwargs(case):
    with pytest.raises(ValueError, match=rf"{kwarg} must be a real floating-point dtype"):
      case.build(**{kwarg: dtype})


def _zero_size(params, name):
  params["params"]["block_0"]["up"]["kernel"] = jnp.zeros({"zero_rows": (0, 16),
                                                           "zero_cols": (4, 0)}[name])
  return params


@pytest.mark.parametrize("case,name", matrix(["zero_rows", "zero_cols"]))
def test_zero_size_parameters_get_empty_updates_and_zero_states(case, name):
  """A dimension 0: supported; empty updates, finite zero statistics, never NaN or a crash."""
  params = _zero_size(w.small_params(), name)
  tx = case.build()
  state = tx.init(params)
  for t in range(2):
    grads = _zero_size(w.grads_at(params, t), name)
    updates, state = _update(tx, case, grads, state, params)
    params = optax.apply_updates(params, updates)
    assert updates["params"]["block_0"]["up"]["kernel"].shape == grads["params"]["block_0"]["up"][
        "kernel"].shape
    for path, x in named_leaves((params, state, updates)):
      if jnp.issubdtype(x.dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), path
  for path, x in named_leaves(state):
    if path.endswith(UP) and jnp.issubdtype(x.dtype, jnp.inexact):
      assert not bool(jnp.any(x)), (path, x)  # a statistic over nothing is 0


def test_zero_size_factored_parameter():
  tx = slimoptax.scale_by_factored_second_moment(factored_axes="last_two", min_dim_size_to_factor=0)
  g = {"w": jnp.zeros((4, 0))}
  u, state = tx.update(g, tx.init(g))
  assert u["w"].shape == (4, 0)
  assert state.v_row["w"].tolist() == [0.0] * 4 and state.v_col["w"].shape == (0,)


def test_muon_on_an_empty_matrix():
  params = {"mlp": {"up": {"kernel": jnp.ones((0, 8))}}}
  tx = slimoptax.muon(1e-2)
  updates, _ = tx.update(params, tx.init(params), params)
  assert updates["mlp"]["up"]["kernel"].shape == (0, 8)
  assert slimoptax._muon.matrix_shape((0, 8), optax.contrib.MuonDimensionNumbers()) == (1, 0, 8)


@pytest.mark.parametrize("case", w.case_params())
def test_python_number_parameters_are_refused_by_name(case):
  params = w.small_params()
  params["params"]["scale"] = 1.0
  tx = case.build()

  def init_and_update():
    state = tx.init(params)
    return _update(tx, case, w.grads_at(w.small_params(), 0), state, params)

  _raises_naming(init_and_update, "params/scale", "not an array", "jnp.asarray")


_OWN_STATES = (slimoptax.ScaleBySlimAdamState, slimoptax.ScaleByAdafactorState,
               slimoptax.ScaleBySignState, slimoptax.ScaleByAdaVarState, slimoptax.ScaleByMuonState,
               slimoptax.ScaleByHutchinsonState, slimoptax.ScaleByShampooState,
               slimoptax.PreconditionInEigenbasisState, slimoptax._soap.SoapStepState)


@pytest.mark.parametrize("case", w.case_params())
def test_a_state_made_by_another_optimizer_is_refused(case):
  """Each slimoptax state in the case's state replaced by optax's TraceState (optax.sgd's)."""
  params = w.small_params()
  tx = case.build()
  state = tx.init(params)
  own = lambda x: isinstance(x, _OWN_STATES)
  expected = {type(x).__name__ for x in jax.tree.leaves(state, is_leaf=own) if own(x)}
  foreign = jax.tree.map(lambda x: optax.TraceState(trace=x.count) if own(x) else x, state,
                         is_leaf=own)
  if not expected:  # orthogonalize: stateless, behind optax.trace
    assert case.name == "orthogonalize"
    foreign, expected = (state[0], optax.TraceState(trace=jnp.zeros(())), *state[2:]), {"EmptyState"}
  with pytest.raises(ValueError, match="another optimizer") as err:
    _update(tx, case, w.grads_at(params, 0), foreign, params)
  msg = str(err.value)
  assert "TraceState" in msg and any(f"expected {e}" in msg for e in expected), msg


@pytest.mark.parametrize("other", ["sgd", "sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("alias", ["slim_adamw", "sophia", "muon"])
def test_aliases_refuse_another_optimizers_state(alias, other):
  params = w.small_params()
  state = {"sgd": lambda: optax.sgd(1e-2), "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
           "adam": lambda: optax.adam(1e-2), "adamw": lambda: optax.adamw(1e-2)}[other]().init(params)
  tx = {"slim_adamw": lambda: slimoptax.slim_adamw(1e-2, compress="slimadam"),
        "sophia": lambda: slimoptax.sophia(1e-2), "muon": lambda: slimoptax.muon(1e-2)}[alias]()
  with pytest.raises(ValueError, match=r"slimoptax\.\w+ got a .* state; expected .*another optimizer"):
    tx.update(w.grads_at(params, 0), state, params, obj_fn=w.quad_loss)


# Per family: an int argument that sets shapes or a loop count (None: every argument injectable).
STATIC_INTS = {"slim_adam": ("num_heads", 4), "muon": ("ns_steps", 5), "sophia": ("num_samples", 1),
               "adafactor": None, "sign": None, "adavar": None,
               "shampoo": ("precondition_frequency", 2), "soap": ("precondition_frequency", 2)}
INJECTABLE = {"adafactor": ("decay_rate", 0.8), "sign": ("eps", 0.0), "adavar": ("tau", 0.9)}


def _factory(case, *names):
  """``case.build`` with a signature inject_hyperparams can read (keyword-only ``names``)."""
  import inspect

  def factory(**kw):
    return case.build(**kw)

  factory.__signature__ = inspect.Signature(
      [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names])
  return factory


@pytest.mark.parametrize("case", w.case_params())
def test_inject_hyperparams_asks_for_static_args(case):
  """An int that picks shapes / loop counts, traced by inject_hyperparams: named, static_args given."""
  params = w.small_params()
  static = STATIC_INTS[case.family]
  if static is None:  # nothing to make static: the injected case runs
    # (mollified Signum's builder fixes beta and eps: nothing left to inject.)
    kwargs = {} if case.name == "sign-mollified" else dict([INJECTABLE[case.family]])
    inj = optax.inject_hyperparams(_factory(case, *kwargs))(**kwargs)
  else:
    name, value = static
    with pytest.raises(ValueError, match=rf'{name} must be a Python int.*static_args=\("{name}",\)'):
      optax.inject_hyperparams(_factory(case, name))(**{name: value}).init(params)
    inj = optax.inject_hyperparams(_factory(case, name), static_args=(name,))(**{name: value})
  _, _, updates = w.make_step(inj, case)(params, inj.init(params), w.grads_at(params, 0))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_inject_hyperparams_adafactor_min_dim_size_to_factor():
  with pytest.raises(ValueError, match=r'static_args=\("min_dim_size_to_factor",\)'):
    optax.inject_hyperparams(slimoptax.scale_by_adafactor)(min_dim_size_to_factor=1).init(
        {"w": jnp.ones((2, 2))})


def test_slim_adam_keeps_state_dtypes_with_array_betas():
  """An array-valued beta (float32, not weak) must not promote a bf16 state."""
  params = w.small_params(jnp.bfloat16)
  tx = slimoptax.slim_adamw(1e-2, b1=jnp.asarray(0.9, jnp.float32),
                            b2=jnp.asarray(0.95, jnp.float32), compress="slimadam")
  state = tx.init(params)
  _, new_state, _ = w.make_step(tx, extra_args=False)(params, state, w.grads_at(params, 0))
  assert {p: x.dtype for p, x in named_leaves(new_state)} == {
      p: x.dtype for p, x in named_leaves(state)}


def test_sophia_keeps_state_dtypes_with_array_betas():
  from slimoptax._sophia import sophia
  params = w.small_params(jnp.bfloat16)
  tx = sophia(1e-2, b1=jnp.asarray(0.9, jnp.float32), update_every=2)
  state = tx.init(params)
  _, new_state, _ = w.make_step(tx, extra_args=True)(params, state, w.grads_at(params, 0))
  assert {p: x.dtype for p, x in named_leaves(new_state)} == {
      p: x.dtype for p, x in named_leaves(state)}


def _array_beta_builders():
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  out = []
  from slimoptax._sign import scale_by_sign
  for mode in ("signum", "emasign", "mollified"):
    eps = 1e-8 if mode == "mollified" else 0.0
    out.append(pytest.param(
        lambda mode=mode, eps=eps: optax.chain(scale_by_sign(mode=mode, beta=f32(0.9), eps=eps),
                                               optax.scale(-w.LR)), id=f"sign-{mode}"))
  from slimoptax._adavar import scale_by_adavar
  out.append(pytest.param(lambda: optax.chain(scale_by_adavar(f32(0.9), f32(1.0), f32(0.9),
                                                              bias_correction=True),
                                              optax.scale(-w.LR)), id="adavar"))
  from slimoptax._muon import muon
  out.append(pytest.param(lambda: muon(w.LR, beta=f32(0.95), adam_b1=f32(0.9),
                                       adam_compress="slimadam"), id="muon"))
  return out


@pytest.mark.parametrize("build", _array_beta_builders())
def test_states_keep_their_dtypes_with_array_betas(build):
  """Array-valued (float32, not weak) betas must not promote a bf16 state."""
  params = w.small_params(jnp.bfloat16)
  tx = build()
  state = tx.init(params)
  _, new_state, _ = w.make_step(tx, extra_args=False)(params, state, w.grads_at(params, 0))
  assert {p: x.dtype for p, x in named_leaves(new_state)} == {
      p: x.dtype for p, x in named_leaves(state)}


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_orthogonalize_refuses_non_float_updates(dtype):
  from slimoptax._muon import orthogonalize
  updates = {"params": {"up": {"kernel": jnp.ones((4, 16), dtype)}}}
  with pytest.raises(ValueError, match=r"params/up/kernel.*" + str(jnp.dtype(dtype))):
    orthogonalize().update(updates, optax.EmptyState())


def test_fan_rules_cover_bare_arrays():
  from slimoptax._adafactor import factored_rules
  rules = factored_rules()
  assert rules.match("", ()).axes == ()
  assert rules.match("", (4, 4)).axes == (-2, -1)


# --- Rules, JSON and state lookups ---
# One line per input: (id, what is fed, the error it gets, or None where it is supported).

_TWO = (jnp.ones((4, 8)), jnp.ones((8, 4)))
_SMALL = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}}
_MASK = {"mlp": {"up": {"kernel": True}}, "ln": {"scale": False}}
_V1 = '{"format": "slimoptax.rules/v1", "rules": [%s]}'
LOOKUP_CASES = [
    ("rules-invalid-regex", lambda: Rules([("up/(kernel", "mlp_up", (1,))]), r"pattern='up/\(kernel', label='mlp_up'\): invalid regular expression"),
    ("json-invalid-regex", lambda: Rules.from_json(_V1 % '{"pattern": "[", "label": "x", "axes": []}'), r"rules\[0\] \(pattern='\[', label='x'\): invalid regular expression"),
    ("json-top-level-list", lambda: Rules.from_json('[{"pattern": "up", "label": "x", "axes": []}]'), r"expected an object with a 'rules' list or a flat \{name: \[axes\] \| null\} mapping, got a list"),
    ("json-missing-rules", lambda: Rules.from_json('{"format": "slimoptax.rules/v1"}'), r"missing key 'rules'"),
    ("json-missing-pattern", lambda: Rules.from_json(_V1 % '{"label": "x", "axes": []}'), r"rules\[0\] .*missing key 'pattern'"),
    ("json-missing-label", lambda: Rules.from_json(_V1 % '{"pattern": "up", "axes": []}'), r"rules\[0\] .*missing key 'label'"),
    ("json-missing-axes", lambda: Rules.from_json(_V1 % '{"pattern": "up", "label": "x"}'), r"rules\[0\] .*missing key 'axes'"),
    ("json-wrong-axes", lambda: Rules.from_json(_V1 % '{"pattern": "up", "label": "x", "axes": 1}'), r"rules\[0\] .*'axes' must be a list"),
    ("json-invalid-text", lambda: Rules.from_json('{"up": [1],}'), r"invalid JSON: .* at line 1, column 12"),
    ("json-missing-file", lambda: Rules.from_json("no/such/rules.json"), r"rules file 'no/such/rules.json' not found"),
    ("rules-list-for-a-tuple", lambda: slimoptax.slim_adamw(1e-3, compress=[[0], [1]]).init(_TWO), r"at the top level is a list where the parameters have a tuple \(parameter '0'\): give axes as tuples \(lists are pytree nodes\)"),
    ("rules-axes-for-a-subtree", lambda: slimoptax.compression_axes(_SMALL, {"mlp": [0, 1], "ln": {"scale": ()}}), r"at 'mlp' is the axes \[0, 1\].*\(parameter 'mlp/up/kernel'\)"),
    ("rules-list-axes-at-a-leaf", lambda: slimoptax.compression_axes(_TWO, ((0,), [1])), None),
    ("masked-adam-lookup", lambda: slimoptax.memory_report(optax.masked(optax.adam(1e-3), _MASK).init(_SMALL), _SMALL), None),
    ("masked-slim-adamw-lookup", lambda: slimoptax.find_second_moment(optax.chain(optax.masked(slimoptax.slim_adamw(1e-3), _MASK)).init(_SMALL), _SMALL), None),
    ("lookup-without-adam", lambda: slimoptax.memory_report(optax.sgd(1e-3, momentum=0.9).init(_SMALL), _SMALL), r"no second moment `nu`.*the state holds \['TraceState'"),
]


@pytest.mark.parametrize("fn,error", [pytest.param(f, e, id=i) for i, f, e in LOOKUP_CASES])
def test_rules_json_and_state_lookups(fn, error):
  if error is None:
    fn()  # supported
    return
  with pytest.raises((ValueError, TypeError, FileNotFoundError), match=error):
    fn()
