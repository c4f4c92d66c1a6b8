"""Every ladder alias, stepped (jitted) on a small Flax MLP against an independent reference."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments._lib import ladder
from experiments._lib.ladder import LADDER

STEPS = 24
WD, CLIP = 0.1, 1.0


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.LayerNorm()(nn.Dense(128)(x)))
    x = nn.gelu(nn.Dense(128)(x))
    return nn.Dense(4)(x)


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 32, 16)).astype(np.float32)
  teacher = rng.normal(size=(16, 4))
  y = np.argmax(np.einsum("bnd,dc->bnc", x, teacher), -1)
  return jnp.asarray(x), jnp.asarray(y)


MODEL = MLP()
X, Y = _data()
PARAMS0 = MODEL.init(jax.random.PRNGKey(0), X[0])


def _loss(params, x, y):
  logits = MODEL.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_GRAD = jax.jit(jax.value_and_grad(_loss))
_APPLY = jax.jit(optax.apply_updates)


def _full_loss(params):
  return float(_loss(params, X.reshape(-1, 16), Y.reshape(-1)))


# --------------------------------------------------------------------------
# Numpy references (float64), from the papers' equations.
# --------------------------------------------------------------------------


def _leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _gclip(g, max_norm=CLIP):
  norm = np.sqrt(sum(np.sum(x**2) for x in g))
  return [x * min(1.0, max_norm / norm) for x in g]


def _decay(u, p, wd=WD):
  """Decoupled weight decay on parameters with ndim >= 2 (slimoptax's default mask)."""
  return [ui + (wd * pi if pi.ndim >= 2 else 0.0) for ui, pi in zip(u, p)]


class _Ref:
  """Base: ``step(grads, params) -> (updates, sure)``; ``sure`` masks where the numbers are
  well-conditioned (sign(x) with x within float32 rounding of 0 is not)."""

  def __init__(self, lr):
    self.lr, self.k, self.state = lr, 0, None

  def zeros(self, g):
    return [np.zeros_like(x) for x in g]

  @staticmethod
  def certain(x):
    return np.abs(x) > 1e-5 * (np.max(np.abs(x)) + 1e-30)


class AdamRef(_Ref):

  def __init__(self, lr, b1=0.9, b2=0.95, eps=1e-8):
    super().__init__(lr)
    self.b1, self.b2, self.eps = b1, b2, eps

  def step(self, g, p):
    g = _gclip(g)
    if self.state is None:
      self.state = (self.zeros(g), self.zeros(g))
    self.k += 1
    b1, b2, k = self.b1, self.b2, self.k
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(self.state[0], g)]
    v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(self.state[1], g)]
    self.state = (m, v)
    u = [(mi / (1 - b1**k)) / (np.sqrt(vi / (1 - b2**k)) + self.eps) for mi, vi in zip(m, v)]
    return [-self.lr * x for x in _decay(u, p)], None


class SignRef(_Ref):
  """signum (sign of EMA of Gclip(g)), signsgd (sign g), emasign (EMA of sign g)."""

  def __init__(self, lr, mode, beta=0.95):
    super().__init__(lr)
    self.mode, self.beta = mode, beta

  def step(self, g, p):
    if self.mode == "signsgd":
      return [-self.lr * x for x in _decay([np.sign(gi) for gi in g], p)], None
    if self.mode == "signum":
      g = _gclip(g)
    s = g if self.mode == "signum" else [np.sign(gi) for gi in g]
    self.state = self.zeros(g) if self.state is None else self.state
    self.state = [self.beta * mi + (1 - self.beta) * si for mi, si in zip(self.state, s)]
    if self.mode == "signum":
      d, sure = [np.sign(mi) for mi in self.state], [self.certain(mi) for mi in self.state]
    else:
      d, sure = self.state, None
    return [-self.lr * x for x in _decay(d, p)], sure


class SgdRef(_Ref):
  """EMA momentum (dampening 1 - beta); optional Gclip before and Cclip after; no weight decay."""

  def __init__(self, lr, gclip, cclip, beta=0.95):
    super().__init__(lr)
    self.gclip, self.cclip, self.beta = gclip, cclip, beta

  def step(self, g, p):
    if self.gclip:
      g = _gclip(g)
    self.state = self.zeros(g) if self.state is None else self.state
    self.state = [self.beta * mi + (1 - self.beta) * gi for mi, gi in zip(self.state, g)]
    d = [np.clip(mi, -1.0, 1.0) for mi in self.state] if self.cclip else self.state
    return [-self.lr * x for x in d], None


class LionRef(_Ref):

  def __init__(self, lr, b1=0.9, b2=0.95):
    super().__init__(lr)
    self.b1, self.b2 = b1, b2

  def step(self, g, p):
    g = _gclip(g)
    self.state = self.zeros(g) if self.state is None else self.state
    c = [self.b1 * mi + (1 - self.b1) * gi for mi, gi in zip(self.state, g)]
    self.state = [self.b2 * mi + (1 - self.b2) * gi for mi, gi in zip(self.state, g)]
    return ([-self.lr * x for x in _decay([np.sign(ci) for ci in c], p)],
            [self.certain(ci) for ci in c])


class SM3Ref(_Ref):
  """SM3-II (Anil et al. 2019) with an EMA accumulator (b2) and momentum, as PyTorch-SM3."""

  def __init__(self, lr, momentum=0.9, b2=0.95, eps=1e-8):
    super().__init__(lr)
    self.b1, self.b2, self.eps = momentum, b2, eps

  def step(self, g, p):
    g = _gclip(g)
    if self.state is None:
      covers = [[np.zeros(n) for n in (x.shape or (1,))] for x in g]  # one per row/column
      self.state = (covers, self.zeros(g))
    covers, mom = self.state
    new_covers, new_mom = [], []
    for gi, cov, mi in zip(g, covers, mom):
      shape = gi.shape
      gi = gi.reshape(1) if gi.ndim == 0 else gi  # a scalar has one accumulator
      if gi.ndim == 1:
        nu = cov[0]
      else:
        nu = np.minimum(cov[0][:, None], cov[1][None, :])
      acc = (1 - self.b2) * gi**2 + self.b2 * nu
      up = np.where(acc > 0, gi / np.sqrt(acc + self.eps), 0.0)
      new_mom.append((self.b1 * mi.reshape(up.shape) + (1 - self.b1) * up).reshape(shape))
      new_covers.append([acc] if gi.ndim == 1 else [acc.max(1), acc.max(0)])
    self.state = (new_covers, new_mom)
    return [-self.lr * x for x in _decay(new_mom, p)], None


class AdafactorRef(_Ref):
  """Shazeer & Stern (2018), Alg. 4 (+ momentum on the scaled update), after Gclip, with
  lr-scaled weight decay; factors the two largest axes of matrices with both >= 128."""

  def __init__(self, lr, b1=None, decay_rate=0.8, eps1=1e-30, eps2=1e-3, d=1.0):
    super().__init__(lr)
    self.b1, self.c, self.eps1, self.eps2, self.d = b1, decay_rate, eps1, eps2, d

  def step(self, g, p):
    g = _gclip(g)
    if self.state is None:
      self.state = ([0.0] * len(g), [0.0] * len(g), [0.0] * len(g), self.zeros(g))
    self.k += 1
    R, C, V, M = self.state
    b2 = 1.0 - self.k ** (-self.c)
    out = []
    for i, (gi, pi) in enumerate(zip(g, p)):
      g2 = gi**2 + self.eps1
      if gi.ndim == 2 and min(gi.shape) >= 128:
        # Row and column sums; V = R C / 1^T R (I-divergence closed form).
        R[i] = b2 * R[i] + (1 - b2) * g2.sum(1)
        C[i] = b2 * C[i] + (1 - b2) * g2.sum(0)
        v_hat = np.outer(R[i], C[i]) / R[i].sum()
      else:
        V[i] = b2 * V[i] + (1 - b2) * g2
        v_hat = V[i]
      u = gi / np.sqrt(v_hat)
      u = u / max(1.0, np.sqrt(np.mean(u**2)) / self.d)
      u = u * max(self.eps2, np.sqrt(np.mean(pi**2)))
      if self.b1 is not None:
        M[i] = self.b1 * M[i] + (1 - self.b1) * u
        u = M[i]
      out.append(u)
    return [-self.lr * x for x in _decay(out, p)], None


CASES = {
    # name: (learning rate, reference)
    "adam": (3e-3, lambda lr: AdamRef(lr)),
    "adam_equal_betas": (3e-3, lambda lr: AdamRef(lr, 0.95, 0.95)),
    "rmsprop": (1e-3, lambda lr: AdamRef(lr, 0.0, 0.95)),
    "signum": (1e-3, lambda lr: SignRef(lr, "signum")),
    "signsgd": (5e-4, lambda lr: SignRef(lr, "signsgd")),
    "emasign": (2e-3, lambda lr: SignRef(lr, "emasign")),
    "sgd": (0.3, lambda lr: SgdRef(lr, gclip=False, cclip=False)),
    "sgd_gclip": (0.3, lambda lr: SgdRef(lr, gclip=True, cclip=False)),
    "sgd_cclip": (0.3, lambda lr: SgdRef(lr, gclip=True, cclip=True)),
    "adafactor": (0.1, lambda lr: AdafactorRef(lr)),
    "adafactor_momentum": (0.1, lambda lr: AdafactorRef(lr, b1=0.9)),
    "lion": (3e-4, lambda lr: LionRef(lr)),
    "sm3": (3e-3, lambda lr: SM3Ref(lr)),
}


def test_every_alias_has_a_reference():
  assert set(LADDER) == set(CASES)
  for name, ctor in LADDER.items():
    assert ctor.__doc__, name
    assert isinstance(ctor(1e-3), optax.GradientTransformation)


@pytest.mark.parametrize("name", sorted(CASES))
def test_alias_matches_reference_and_lowers_loss(name):
  lr, make_ref = CASES[name]
  tx = LADDER[name](lr)
  ref = make_ref(lr)
  update = jax.jit(tx.update)  # the model's gradient is jitted once for all aliases (_GRAD)

  params = PARAMS0
  state = tx.init(params)
  for k in range(STEPS):
    _, grads = _GRAD(params, X[k % 4], Y[k % 4])
    updates, state = update(grads, state, params)
    new_params = _APPLY(params, updates)
    ref_u, sure = ref.step([np.asarray(x, np.float64) for x in jax.tree.leaves(grads)],
                           [np.asarray(x, np.float64) for x in jax.tree.leaves(params)])
    for i, (a, b) in enumerate(zip(jax.tree.leaves(updates), ref_u)):
      a = np.asarray(a, np.float64)
      if sure is not None:
        a, b = a[sure[i]], b[sure[i]]
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * (np.max(np.abs(b)) + 1e-12),
                                 err_msg=f"{name} step {k} leaf {i}")
    params = new_params
  assert _full_loss(params) < _full_loss(PARAMS0) - 0.05, name


def test_defaults_follow_the_papers():
  """Weight decay 0.1 on matrices, Gclip 1 before the optimizer, dampening 1 - beta."""
  p = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  big = {"w": jnp.full((2, 2), 100.0), "b": jnp.full((2,), 100.0)}
  unit = 100.0 / np.sqrt(6 * 100.0**2)  # Gclip(big) entries (6 entries, norm 1)
  txs = {"signum": LADDER["signum"](1.0), "sgd_gclip": LADDER["sgd_gclip"](1.0, beta=0.9),
         "sgd_cclip": LADDER["sgd_cclip"](1.0, beta=0.5, clip_norm=None)}
  states = {k: tx.init(p) for k, tx in txs.items()}

  @jax.jit
  def update_all(states):
    out = {k: tx.update(big, states[k], p) for k, tx in txs.items()}
    return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

  for k in range(1, 21):
    u, states = update_all(states)
    # Signum: -lr (sign + 0.1 w) on matrices, -lr sign on vectors.
    np.testing.assert_allclose(u["signum"]["w"], -(1.0 + 0.1 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(u["signum"]["b"], -1.0)
    # SGD + Gclip: the EMA (dampening 1 - beta, zero init) of the clipped gradient.
    np.testing.assert_allclose(u["sgd_gclip"]["w"], -(1 - 0.9**k) * unit, rtol=1e-5)
    # SGD + Cclip: coordinate clipping after the momentum: (1 - 0.5^k) 100 -> 1.
    np.testing.assert_allclose(u["sgd_cclip"]["w"], -1.0)
  # SM3 with b2 = 1 and no decay/clipping is optax.sm3.
  g = {"w": jnp.asarray([[0.3, -1.0], [2.0, 0.5]]), "b": jnp.asarray([0.1, -0.2])}
  ours, theirs = ladder.sm3(0.1, b2=1.0, weight_decay=0.0, clip_norm=None), optax.sm3(0.1)
  both = jax.jit(lambda so, st: (ours.update(g, so, p), theirs.update(g, st, p)))
  so, st = ours.init(p), theirs.init(p)
  for _ in range(20):
    (uo, so), (ut, st) = both(so, st)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), uo, ut)
  # The SlimAdam paper's SM3 (b2 = 0.95, wd, Gclip) on a tree with a 0-d parameter.
  p3 = {"b": jnp.asarray([0.5, -1.0]), "s": jnp.asarray(0.7), "w": jnp.asarray([[1.0, 2.0]] * 2)}
  tx, ref = ladder.sm3(0.1), SM3Ref(0.1)
  step = jax.jit(tx.update)
  state = tx.init(p3)
  rng = np.random.default_rng(1)
  for _ in range(20):
    g3 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p3)
    u3, state = step(g3, state, p3)
    ref_u, _ = ref.step(_leaves64(g3), _leaves64(p3))
    for a, b in zip(jax.tree.leaves(u3), ref_u):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bad_params_name_the_path():
  params = {"enc": {"kernel": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32)}}
  for name in ("signum", "signsgd", "emasign", "adafactor", "adafactor_momentum"):
    with pytest.raises(ValueError, match="'enc/step'"):
      LADDER[name](1e-3).init(params)


def test_nnx_optimizer_integration():
  """Aliases (with None leaves in the Adafactor state) work inside nnx.Optimizer under nnx.jit."""

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(16, 128, rngs=rngs)
      self.fc2 = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.gelu(self.fc1(x)))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  for name, lr in [("adafactor_momentum", 0.1)]:
    model = Net(nnx.Rngs(0))
    kw = {"min_dim_size_to_factor": 16} if name.startswith("adafactor") else {}
    tx = LADDER[name](lr, **kw)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # Reference: the same transformation applied functionally to the parameter state.
    ref_state = tx.init(jax.tree.map(jnp.array, nnx.state(model, nnx.Param)))
    ref_update = jax.jit(tx.update)

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads)
      return loss, grads

    first = float(loss_fn(model, X.reshape(-1, 16), Y.reshape(-1)))
    for k in range(20):
      before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))  # a copy, not a live view
      _, grads = step(model, optimizer, X[k % 4], Y[k % 4])
      u, ref_state = ref_update(grads, ref_state, before)
      expected = optax.apply_updates(before, u)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                   nnx.state(model, nnx.Param), expected)
    assert float(loss_fn(model, X.reshape(-1, 16), Y.reshape(-1))) < first, name


def test_momentum_is_optax_ema():
  """The SGD family's momentum (dampening 1 - beta, zero init) is ``optax.ema(beta, debias=False)``."""
  p = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.1, -0.2])}
  pairs = {
      "sgd": (ladder.sgd(0.1, beta=0.9),
              optax.chain(optax.ema(0.9, debias=False), optax.scale_by_learning_rate(0.1))),
      "sgd_gclip": (ladder.sgd_gclip(0.1, beta=0.9),
                    optax.chain(optax.clip_by_global_norm(1.0), optax.ema(0.9, debias=False),
                                optax.scale_by_learning_rate(0.1))),
      "sgd_cclip": (ladder.sgd_cclip(0.1, beta=0.9, clip=0.05),
                    optax.chain(optax.clip_by_global_norm(1.0), optax.ema(0.9, debias=False),
                                optax.clip(0.05), optax.scale_by_learning_rate(0.1))),
  }
  rng = np.random.default_rng(0)
  for ours, theirs in pairs.values():
    both = jax.jit(lambda g, so, st: (ours.update(g, so, p), theirs.update(g, st, p)))
    so, st = ours.init(p), theirs.init(p)
    for _ in range(10):
      g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
      (uo, so), (ut, st) = both(g, so, st)
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), uo, ut, is_leaf=lambda x: x is None)


def test_registry():
  assert LADDER["signum"] is ladder.signum and LADDER["adam"] is ladder.adamw
  assert all(getattr(ladder, f.__name__) is f and f.__name__ in ladder.__all__ for f in LADDER.values())
