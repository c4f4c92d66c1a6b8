"""The transform matrix shared by the scale/reliability tests, and the 8-device sharding worker.

`CASES` lists every slimoptax transform once (adding a transform = adding one
entry). Entries name their algorithm family; `case_params()` turns them into
pytest parameters.

Run as ``python -m tests._sharded_worker OUT.json`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/test_sharding.py
does that in a subprocess): on a ('data', 'model') = (2, 4) CPU mesh it trains
a tiny GPT with every case sharded and unsharded, runs a pmap data-parallel
loop, and saves / restores sharded states with orbax, writing what it saw to
OUT.json for the test to check.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LR = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
  """One transform of the matrix.

  Attributes:
    name: test id.
    family: the algorithm family (``slim_adam``, ``adafactor``, ``sign``, ...).
    build: ``() -> GradientTransformation`` (imports lazily).
    extra_args: ``update`` needs ``obj_fn=`` (Sophia / Hutchinson).
    pmap: also run the pmap data-parallel loop in the sharding worker (a few
      representatives: each pmap program costs a compile; transforms that read
      the batch themselves, Sophia / Hutchinson, cannot equal the full-batch
      run).
    dtype_kwargs: the keywords that set its state dtypes (mu_dtype, ...).
    axes_kwarg: the keyword that takes per-parameter axes or rules
      (``compress``, ``factored_axes``, ``dims``), if any.
  """

  name: str
  family: str
  build: Callable[..., optax.GradientTransformation]
  extra_args: bool = False
  pmap: bool = False
  dtype_kwargs: tuple[str, ...] = ()
  axes_kwarg: str | None = None


def _so():
  import slimoptax
  return slimoptax


def _lr():
  return optax.scale_by_learning_rate(LR)


def _slim(compress):
  return lambda **kw: _so().slim_adamw(LR, **{"compress": compress, **kw})


def _adafactor(**base):
  def build(**kw):
    from slimoptax._adafactor import scale_by_adafactor
    return optax.chain(scale_by_adafactor(min_dim_size_to_factor=1, **base, **kw), _lr())
  return build


def _sign(mode, **base):
  def build(**kw):
    from slimoptax._sign import scale_by_sign
    return optax.chain(scale_by_sign(mode=mode, **base, **kw), _lr())
  return build


def _adavar(**kw):
  from slimoptax._adavar import scale_by_adavar
  return optax.chain(scale_by_adavar(0.9, bias_correction=True, **kw), _lr())


def _orthogonalize(**kw):
  from slimoptax._muon import orthogonalize
  return optax.chain(optax.trace(0.9, nesterov=True), orthogonalize(**kw), _lr())


def _muon(**kw):
  from slimoptax._muon import muon
  return muon(LR, adam_compress="slimadam", **kw)


def _hutchinson(**kw):
  from slimoptax._sophia import scale_by_hutchinson
  return optax.chain(scale_by_hutchinson(update_every=2, compress="slimadam", track_win_rate=True, **kw), _lr())


def _sophia(**kw):
  from slimoptax._sophia import sophia
  return sophia(LR, update_every=2, **kw)


# Refresh every 2 steps: the sharding worker (4 steps, checkpoint at 2) and
# tests/test_checkpoint.py (5 steps, checkpoint at 2) both cross a root / basis
# refresh after the restore (Shampoo at count 2 and 4; SOAP, whose first call
# only initializes, at moving step 2 and 4). Both are kept well conditioned on
# the tiny GPT, whose 64-token batches give rank-deficient statistics, so that
# the sharded run's other summation order stays within the test's 1e-5:
# Shampoo with eps=1e-3 (the default 1e-6 amplifies a 1e-7 relative rounding of
# the statistics to ~1e-4 in the parameters through the near-null roots), SOAP
# on the head-sized axes only (max_precond_dim=4: the q/k/v/out kernels' two
# head axes, of which q/k/v's are sharded; the eigenbasis of a degenerate
# 16- or 64-dimensional statistic is arbitrary within the degenerate subspace,
# and Adam there is not rotation invariant: ~1e-5 with 16, ~1e-2 by default).
def _shampoo(**kw):
  from slimoptax._shampoo import shampoo
  return shampoo(LR, **{"eps": 1e-3, "precondition_frequency": 2, **kw})


def _soap(**kw):
  from slimoptax._soap import soap
  return soap(LR, **{"precondition_frequency": 2, "max_precond_dim": 4, **kw})


_ADAM = dict(dtype_kwargs=("mu_dtype", "nu_dtype"), axes_kwarg="compress")

CASES: tuple[Case, ...] = (
    Case("slim_adamw-none", "slim_adam", _slim(None), **_ADAM),
    Case("slim_adamw-slimadam", "slim_adam", _slim("slimadam"), pmap=True, **_ADAM),
    Case("slim_adamw-adam-mini", "slim_adam", _slim("adam-mini"), **_ADAM),
    Case("slim_adamw-adalayer", "slim_adam", _slim("adalayer"), **_ADAM),
    Case("adafactor-largest", "adafactor", _adafactor(), axes_kwarg="factored_axes"),
    Case("adafactor-fan-b1", "adafactor", _adafactor(factored_axes="fan", b1=0.9), pmap=True,
         dtype_kwargs=("mu_dtype",)),
    Case("sign-signsgd", "sign", _sign("signsgd")),
    Case("sign-signum", "sign", _sign("signum", beta=0.9), dtype_kwargs=("mu_dtype",)),
    Case("sign-emasign", "sign", _sign("emasign", beta=0.9, init="grad"), dtype_kwargs=("mu_dtype",)),
    Case("sign-mollified", "sign", _sign("mollified", beta=0.9, eps=1e-8), dtype_kwargs=("mu_dtype",)),
    Case("adavar", "adavar", _adavar, dtype_kwargs=("mu_dtype",)),
    Case("orthogonalize", "muon", _orthogonalize, axes_kwarg="dims"),
    Case("muon", "muon", _muon, pmap=True, dtype_kwargs=("mu_dtype",), axes_kwarg="dims"),
    Case("hutchinson", "sophia", _hutchinson, extra_args=True,
         dtype_kwargs=("mu_dtype", "h_dtype")),
    Case("sophia", "sophia", _sophia, extra_args=True, dtype_kwargs=("mu_dtype", "h_dtype"),
         axes_kwarg="compress"),
    # Statistics, roots and bases are float32 (float64 with float64 parameters)
    # whatever the parameters' dtype: no state dtype keyword.
    Case("shampoo", "shampoo", _shampoo, axes_kwarg="dims"),
    Case("soap", "soap", _soap),
)


def once_per_run(tmp_path_factory, name: str, produce: Callable[[Any], dict]) -> dict:
  """``produce(directory)`` once per test run, also with pytest-xdist (the workers share it).

  The expensive subprocess runs are module fixtures; under ``pytest -n 2`` both
  workers may collect the module, so the first one runs ``produce`` under a
  file lock and leaves its JSON result for the other.
  """
  import fcntl
  import pathlib
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return produce(tmp_path_factory.mktemp(name))
  root = pathlib.Path(tmp_path_factory.getbasetemp()).parent  # shared by this run's workers
  done = root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if done.exists():
        return json.loads(done.read_text())
      directory = root / name
      directory.mkdir(exist_ok=True)
      result = produce(directory)
      done.write_text(json.dumps(result))
      return result
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def available_cases() -> list[Case]:
  return list(CASES)


def case_params(cases=CASES):
  """pytest parameters for ``cases``, one per case."""
  import pytest
  return [pytest.param(c, id=c.name) for c in cases]


def update(tx, case: Case, grads, state, params, obj_fn=None):
  """``tx.update`` with the extra arguments the case needs."""
  if case.extra_args:
    return tx.update(grads, state, params, obj_fn=obj_fn)
  return tx.update(grads, state, params)


# --------------------------------------------------------------------------
# Small parameters and synthetic gradients for the one-device tests.
# --------------------------------------------------------------------------

# Compile options of the one-device tests: XLA's backend optimisation and CPU
# fusion emitters off (the programs are tiny; compiling them dominates the tests'
# run time: ~3x less). The worker subprocesses get the same as XLA_FLAGS. Numbers
# are compared between programs compiled alike, or with a tolerance.
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

SMALL_SHAPES = {
    "wte": {"embedding": (8, 4)},
    "block_0": {"attn": {"query": {"kernel": (4, 2, 2)}}, "up": {"kernel": (4, 16)},
                "ln_1": {"scale": (4,)}},
}


def small_params(dtype=jnp.float32, seed: int = 0):
  """A 4-leaf tree with linen paths: embedding, 3-D query kernel, MLP kernel, norm scale."""
  rng = np.random.RandomState(seed)
  tree = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SMALL_SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))
  return {"params": jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)}


def grads_at(params, step: int, scale: float = 1.0):
  """Step ``step``'s synthetic gradient: heavy-tailed noise around a per-leaf mean (numpy)."""
  rng = np.random.RandomState(10_000 + step)
  leaves, treedef = jax.tree.flatten(params)
  out = [jnp.asarray(scale * (0.3 + rng.standard_t(3.0, np.shape(p))).astype(np.float32), p.dtype)
         for p in leaves]
  return jax.tree.unflatten(treedef, out)


def quad_loss(params):
  """A fixed quadratic objective (Sophia's ``obj_fn`` in the one-device tests)."""
  return sum((jnp.sum(jnp.square(p.astype(jnp.float32) - 0.5)) for p in jax.tree.leaves(params)),
             jnp.zeros((), jnp.float32))


def make_step(tx, case: Case | None = None, *, extra_args: bool | None = None):
  """A jitted ``(params, state, grads) -> (params, state, updates)`` (FAST compile)."""
  extra = case.extra_args if extra_args is None else extra_args

  def step(params, state, grads):
    if extra:
      updates, state = tx.update(grads, state, params, obj_fn=quad_loss)
    else:
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return jax.jit(step, compiler_options=FAST)


@functools.cache
def case_step(name: str):
  """``(tx, step)`` of a case on float32 `small_params` (compiled once per process)."""
  case = next(c for c in CASES if c.name == name)
  tx = case.build()
  return tx, make_step(tx, case)


# --------------------------------------------------------------------------
# A tiny GPT in plain jax.numpy (fast to compile), with Flax-linen paths.
# --------------------------------------------------------------------------

VOCAB, D, HEADS, SEQ, BATCH = 32, 16, 4, 8, 8
HD = D // HEADS

SHAPES = {
    "wte": {"embedding": (VOCAB, D)},
    "block_0": {
        "ln_1": {"scale": (D,)},
        "attn": {"query": {"kernel": (D, HEADS, HD)}, "key": {"kernel": (D, HEADS, HD)},
                 "value": {"kernel": (D, HEADS, HD)}, "out": {"kernel": (HEADS, HD, D)}},
        "ln_2": {"scale": (D,)},
        "up": {"kernel": (D, 4 * D)},
        "down": {"kernel": (4 * D, D)},
    },
    "ln_f": {"scale": (D,)},
}


def init_params(dtype=jnp.float32, seed: int = 0):
  """``{"params": ...}`` like ``LinenGPT(32, 16, 4, 1).init``: kernels N(0, 1/fan_in), scales 1."""
  rng = np.random.RandomState(seed)

  def make(shape):
    if len(shape) == 1:
      return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) == 3 and shape[-1] == D else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  tree = jax.tree.map(make, SHAPES, is_leaf=lambda s: isinstance(s, tuple))
  return {"params": jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)}


def apply(params, x):
  p = params["params"]
  b = p["block_0"]

  def rms(h, scale):
    h32 = h.astype(jnp.float32)
    return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + 1e-6)).astype(h.dtype) * scale

  emb = p["wte"]["embedding"]
  h = emb[x]
  a = rms(h, b["ln_1"]["scale"])
  q, k, v = (jnp.einsum("bsd,dhk->bshk", a, b["attn"][n]["kernel"]) for n in ("query", "key", "value"))
  logits = jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(HD)
  mask = np.tril(np.ones((x.shape[1], x.shape[1]), bool))
  att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
  o = jnp.einsum("bhst,bthk->bshk", att, v)
  h = h + jnp.einsum("bshk,hkd->bsd", o, b["attn"]["out"]["kernel"])
  a = rms(h, b["ln_2"]["scale"])
  h = h + jax.nn.gelu(a @ b["up"]["kernel"]) @ b["down"]["kernel"]
  return rms(h, p["ln_f"]["scale"]) @ emb.T


def batch(step: int):
  """Step ``step``'s batch: the next token is (token + 1) mod vocab (numpy, no dispatch)."""
  rng = np.random.RandomState(1000 + step)
  start = rng.randint(0, VOCAB, (BATCH, 1))
  tokens = (start + np.arange(SEQ + 1)[None, :]) % VOCAB
  return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


def loss_fn(params, x, y):
  logits = apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


# Parameter specs on the ('data', 'model') mesh: along 'model' everywhere, both
# axes on the MLP kernels; the up kernel (d, 4d) is split on axis 1, which
# SlimAdam's preset averages its second moment over.
PARAM_SPECS = {
    "params/wte/embedding": ("model", None),
    "params/block_0/ln_1/scale": ("model",),
    "params/block_0/attn/query/kernel": (None, "model", None),
    "params/block_0/attn/key/kernel": (None, "model", None),
    "params/block_0/attn/value/kernel": (None, "model", None),
    "params/block_0/attn/out/kernel": ("model", None, None),
    "params/block_0/ln_2/scale": ("model",),
    "params/block_0/up/kernel": ("data", "model"),
    "params/block_0/down/kernel": ("model", "data"),
    "params/ln_f/scale": (None,),
}


def param_specs(params):
  from jax.sharding import PartitionSpec as P

  from slimoptax._tree import named_leaves
  named = named_leaves(params)
  assert sorted(p for p, _ in named) == sorted(PARAM_SPECS), [p for p, _ in named]
  return jax.tree.unflatten(jax.tree.structure(params), [P(*PARAM_SPECS[p]) for p, _ in named])


def spec_json(spec) -> list:
  return [list(e) if isinstance(e, tuple) else e for e in spec]


# --------------------------------------------------------------------------
# The worker.
# --------------------------------------------------------------------------


# One jitted gradient for every case: jit specialises it on its inputs' shardings,
# so the model is compiled once unsharded and once sharded, and each case
# compiles only its optimizer update (Sophia's includes the model: obj_fn).
_GRAD = jax.jit(jax.grad(loss_fn))


class Trainer:
  """One case's jitted update (compiled once per sharding) and its training loop."""

  def __init__(self, case: Case, shardings=None):
    self.case = case
    self.tx = case.build()

    def apply(params, state, grads, x, y):
      obj_fn = lambda p: loss_fn(p, x, y)
      updates, state = update(self.tx, case, grads, state, params, obj_fn)
      return optax.apply_updates(params, updates), state

    self.apply = jax.jit(apply) if shardings is None else jax.jit(apply, out_shardings=shardings)

  def step(self, params, state, x, y):
    return self.apply(params, state, _GRAD(params, x, y), x, y)

  def run(self, params, state, first: int, last: int, data_sharding=None):
    for t in range(first, last):
      x, y = batch(t)
      if data_sharding is not None:
        x, y = jax.device_put((x, y), data_sharding)
      params, state = self.step(params, state, x, y)
    return params, state


def _max_diff(a, b) -> float:
  diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return max(diffs, default=0.0)


def bitwise_equal(a, b) -> bool:
  """Same tree structure and, leaf by leaf, the same dtype, shape and bytes (so a NaN equals itself:
  e.g. Sophia's win rate, NaN when it is not tracked). The one bitwise comparison of the tests."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
      and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


STEPS, CKPT_STEP = 4, 2


def run_case(case: Case, mesh, params0, directory: str) -> dict:
  """Unsharded reference vs sharded run (checkpointed at CKPT_STEP and resumed) vs pmap."""
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import slimoptax.checkpoint as ck
  import slimoptax.sharding as sh
  from slimoptax._tree import named_leaves

  out: dict[str, Any] = {}
  # Reference: one device, no sharding anywhere.
  ref = Trainer(case)
  dev0 = jax.devices()[0]
  ref_params = jax.device_put(params0, dev0)
  ref_params, ref_state = ref.run(ref_params, jax.device_put(ref.tx.init(ref_params), dev0), 0, STEPS)
  out["reference_single_device"] = all(
      len(x.sharding.device_set) == 1 for x in jax.tree.leaves((ref_params, ref_state)))

  # Sharded: state born sharded from abstract shapes, step compiled with the shardings.
  p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params0))
  abstract = jax.eval_shape(lambda: params0)
  tx = case.build()
  state_sh = sh.state_shardings(tx, abstract, p_shard)
  trainer = Trainer(case, shardings=(p_shard, state_sh))
  data = NamedSharding(mesh, P("data", None))
  state = sh.init_sharded(tx, abstract, p_shard)
  init_shardings = {p: x.sharding for p, x in named_leaves(state)}
  params = jax.device_put(params0, p_shard)
  params, state = trainer.run(params, state, 0, CKPT_STEP, data)
  path = os.path.join(directory, case.name)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  params, state = trainer.run(params, state, CKPT_STEP, STEPS, data)

  expected = dict(named_leaves(state_sh))
  leaves = []
  for leaf_path, x in named_leaves(state):
    init = init_shardings[leaf_path]
    leaves.append({
        "path": leaf_path, "shape": list(x.shape), "dtype": str(x.dtype),
        "is_jax_array": isinstance(x, jax.Array),
        "expected_spec": spec_json(expected[leaf_path].spec),
        "init_spec": spec_json(init.spec) if isinstance(init, NamedSharding) else None,
        "init_on_mesh": isinstance(init, NamedSharding) and init.mesh == mesh,
        "spec": spec_json(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else None,
        "on_mesh": isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh,
        "n_devices": len(x.sharding.device_set),
    })
  out.update({
      "max_param_diff": _max_diff(params, ref_params),
      "max_state_diff": _max_diff(state, ref_state),
      "params_on_mesh": all(x.sharding == s for x, s in zip(jax.tree.leaves(params),
                                                             jax.tree.leaves(p_shard))),
      "state": leaves,
  })

  # Resume from the sharded checkpoint: restore_state onto the mesh, same step function.
  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract, p_shard),
            "opt_state": sh.abstract_sharded_state(tx, abstract, p_shard)}
  restored = ck.restore_state(checkpointer, path, target)
  shardings_ok = all(x.sharding == t.sharding for x, t in zip(jax.tree.leaves(restored),
                                                              jax.tree.leaves(target)))
  res_params, res_state = trainer.run(restored["params"], restored["opt_state"], CKPT_STEP, STEPS,
                                      data)
  out["checkpoint"] = {
      "restored_shardings_match": shardings_ok,
      "params_bitwise_equal": bitwise_equal(res_params, params),
      "state_bitwise_equal": bitwise_equal(res_state, state),
  }

  if case.pmap:
    try:
      out["pmap"] = run_pmap(case, params0, ref_params)
    except Exception:  # reported to the test, which fails on it
      out["pmap"] = {"error": traceback.format_exc()}
  return out


@functools.cache
def _pmap_grad():
  """Per-device gradients averaged over the 'batch' axis (compiled once for all cases)."""
  return jax.pmap(lambda p, x, y: jax.lax.pmean(jax.grad(loss_fn)(p, x, y), axis_name="batch"),
                  axis_name="batch")


def run_pmap(case: Case, params0, ref_params) -> dict:
  """Data parallel with pmap and pmean'd gradients vs one device on the full batch."""
  n = jax.local_device_count()
  tx = case.build()

  def apply(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  papply = jax.pmap(apply, axis_name="batch")
  rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), t)
  params, state = rep(params0), rep(tx.init(params0))
  for t in range(STEPS):
    x, y = batch(t)
    grads = _pmap_grad()(params, x.reshape(n, -1, SEQ), y.reshape(n, -1, SEQ))
    params, state = papply(params, state, grads)
  replicas_equal = all(bool(np.all(np.asarray(a) == np.asarray(a)[:1])) for a in jax.tree.leaves(params))
  return {"max_param_diff": _max_diff(jax.tree.map(lambda a: a[0], params), ref_params),
          "replicas_equal": replicas_equal, "n": n}


def _fast_orbax_saves() -> None:
  """Saves sharded arrays shard by shard instead of slicing them per replica.

  orbax's default "replica-parallel" save slices every replicated shard with an
  op-by-op `lax.slice` (one small compile each: ~10 s for a tiny GPT's state on
  8 CPU devices); the files written are the same.
  """
  from orbax.checkpoint import type_handlers
  type_handlers.register_type_handler(
      jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "sharding_and_checkpoints.md")


def doc_code_blocks(path: str = DOCS) -> list[str]:
  """The ```python blocks of a markdown file, in order."""
  blocks, current = [], None
  with open(path) as f:
    for line in f:
      if current is None and line.strip() == "```python":
        current = []
      elif current is not None and line.strip() == "```":
        blocks.append("".join(current))
        current = None
      elif current is not None:
        current.append(line)
  return blocks


def run_docs() -> dict:
  """Executes the documentation's code blocks in one namespace (on the 8 devices)."""
  import contextlib
  import io
  blocks = doc_code_blocks()
  out = io.StringIO()
  namespace: dict[str, Any] = {"__name__": "__docs__"}
  try:
    with contextlib.redirect_stdout(out):
      for block in blocks:
        exec(compile(block, DOCS, "exec"), namespace)
  except Exception:
    return {"blocks": len(blocks), "error": traceback.format_exc(), "printed": out.getvalue()}
  return {"blocks": len(blocks), "printed": out.getvalue()}


def main(out_path: str, names: list[str] | None = None) -> None:
  import time

  from jax.sharding import Mesh

  from slimoptax._tree import named_leaves
  n = jax.device_count()
  result: dict[str, Any] = {"device_count": n, "cases": {}, "skipped": {}, "seconds": {}}
  if n != 8:
    result["error"] = f"expected 8 devices, got {n}"
  else:
    if names is None or "docs" in names:
      start = time.perf_counter()
      result["docs"] = run_docs()  # before _fast_orbax_saves: the documented default saves
      result["seconds"]["docs"] = round(time.perf_counter() - start, 2)
    _fast_orbax_saves()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params0 = init_params()
    result["params"] = {p: {"shape": list(x.shape), "spec": list(PARAM_SPECS[p])}
                        for p, x in named_leaves(params0)}
    with tempfile.TemporaryDirectory() as tmp:
      for case in CASES:
        if names is not None and case.name not in names:
          continue
        start = time.perf_counter()
        try:
          result["cases"][case.name] = run_case(case, mesh, params0, tmp)
        except Exception:  # reported to the test, which fails on it
          result["cases"][case.name] = {"error": traceback.format_exc()}
        result["seconds"][case.name] = round(time.perf_counter() - start, 2)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:] or None)
