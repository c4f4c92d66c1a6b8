"""SNR analysis of Adam's second moments, and rules derived from it.

Kalra et al., When Can You Get Away with Low Memory Adam?, 2025, eq. 3: for a
second-moment tensor ``V`` and axes ``K``

.. math::

  \\mathrm{SNR}_K(V) = \\mathbb{E}_{K'}\\left[\\frac{(\\mathbb{E}_K V)^2}{\\mathrm{Var}_K V}\\right],

with the population variance over ``K`` and the outer mean over the remaining
axes ``K'`` (entries whose ratio is not finite are left out). Eq. 4 averages
``SNR_K`` over the measured steps; SlimAdam compresses a matrix along the ``K``
with the highest time-averaged SNR when it exceeds a cutoff (§5), and leaves
vectors uncompressed. App. H averages SNR over depth per layer type first.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slimoptax import _tree, layers, presets
from slimoptax import rules as rules_lib

SNRTable = Mapping[str, Mapping[tuple[int, ...], float]]


def snr(v: jax.Array, axes: Sequence[int]) -> jax.Array:
  """SNR_K of a second-moment tensor (eq. 3).

  Args:
    v: the second moment (any shape).
    axes: the axes ``K`` averaged over.

  Returns:
    A scalar: the mean over the remaining axes of ``mean_K(v)^2 / var_K(v)``
    (population variance), over finite entries only; NaN if none is finite.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> slimoptax.snr(jnp.array([[1., 3.], [2., 2.]]), (1,))   # row 0: 4/1, row 1: 4/0 -> 4
    Array(4., dtype=float32)
  """
  v = jnp.asarray(v, jnp.float32)
  axes = tuple(a % v.ndim for a in axes) if v.ndim else ()
  mean = jnp.mean(v, axis=axes)
  var = jnp.var(v, axis=axes)
  ratio = jnp.square(mean) / var
  finite = jnp.isfinite(ratio)
  count = jnp.sum(finite)
  total = jnp.sum(jnp.where(finite, ratio, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def candidate_axes(path: str, shape: Sequence[int]) -> list[tuple[int, ...]]:
  """The compression candidates measured for a parameter.

  Vectors: ``(0,)``. Matrices and tensors: fan_in, fan_out and both, as named
  by `labels.axis_roles` for the parameter's layer type (Flax layouts); for a
  2-D kernel that is ``(0,)``, ``(1,)``, ``(0, 1)``.
  """
  shape = tuple(shape)
  if len(shape) == 0:
    return []
  if len(shape) == 1:
    return [(0,)]
  try:
    ltype = presets.layer_type(path, shape)
    _, roles = layers.axis_roles(ltype, shape, path=path)
  except ValueError:
    roles = {}
  fan_in = roles.get("fan_in", tuple(range(len(shape) - 1)))
  fan_out = roles.get("fan_out", (len(shape) - 1,))
  return [tuple(fan_in), tuple(fan_out), tuple(sorted(fan_in + fan_out))]


def find_second_moment(opt_state: Any, params: Any) -> Any:
  """Finds Adam's second moment ``nu`` (a tree like ``params``) in an optax state.

  Works for `optax.scale_by_adam` / `optax.adamw` states and for
  `slimoptax.scale_by_slim_adam` states, wherever they sit in a chain, and
  under `optax.masked` / `optax.partition`: every field named ``nu``
  (`optax.tree.get_all_with_path`) whose leaves have the parameters' paths,
  where a masked-out parameter holds an `optax.MaskedNode`. Each parameter
  gets the first such field that holds an array for it.

  Args:
    opt_state: an optax state (arrays or `jax.ShapeDtypeStruct` s).
    params: the parameters (only their paths are read).

  Returns:
    A tree with ``params``' structure: each parameter's second moment, or
    `optax.MaskedNode` for a parameter that no ``nu`` covers (masked out of
    every Adam in the state). When one ``nu`` covers every parameter, that
    ``nu`` itself.

  Raises:
    ValueError: if no field named ``nu`` has the parameters' paths; the
      message lists the kinds of state found and any ``nu`` of other paths.

  Example:
    >>> import jax.numpy as jnp, optax, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}}
    >>> state = slimoptax.slim_adamw(1e-3, compress="adalayer").init(params)
    >>> slimoptax.find_second_moment(state, params)["mlp"]["up"]["kernel"].shape
    (1, 1)
    >>> masked = optax.masked(optax.adam(1e-3), {"mlp": {"up": {"kernel": True}}, "ln": {"scale": False}})
    >>> slimoptax.find_second_moment(masked.init(params), params)["ln"]["scale"]
    MaskedNode()
  """
  want = [p for p, _ in _tree.named_leaves(params)]
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  has_param_paths = lambda _, nu: [p for p, _ in _tree.named_leaves(nu, is_leaf=is_masked)] == want
  found = optax.tree.get_all_with_path(opt_state, "nu", has_param_paths)
  if len(found) == 1 and not any(is_masked(x) for x in jax.tree.leaves(found[0][1], is_leaf=is_masked)):
    return found[0][1]
  if found:
    columns = [[x for _, x in _tree.named_leaves(nu, is_leaf=is_masked)] for _, nu in found]
    merged = [next((x for x in col if not is_masked(x)), optax.MaskedNode()) for col in zip(*columns)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), merged)
  others = [jax.tree_util.keystr(path) for path, _ in optax.tree.get_all_with_path(opt_state, "nu")]
  other = (f"; fields `nu` at {others} have other paths than the parameters ({want[:3]}"
           f"{' ...' if len(want) > 3 else ''})") if others else ""
  raise ValueError(
      "no second moment `nu` with the parameters' paths in this optimizer state (SNR tracking "
      "and memory reports need an Adam-family state: optax.adam / adamw or "
      "slimoptax.scale_by_slim_adam, alone, chained, masked or partitioned); the state holds "
      f"{_state_kinds(opt_state) or 'no optax states'}{other}"
  )


def _state_kinds(tree: Any) -> list[str]:
  """The names of the NamedTuple states in ``tree``, outermost first."""
  names: list[str] = []

  def visit(x):
    if hasattr(x, "_fields") and type(x).__name__ not in names:
      names.append(type(x).__name__)
    children = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)[0]
    if not (len(children) == 1 and children[0] is x):
      for child in children:
        visit(child)

  visit(tree)
  return names


class SNRTracker:
  """Follows SNR_K of Adam's second moments during training.

  Call `maybe_record` every step (cheap: it does nothing off schedule); on a
  scheduled step it runs one jitted function over the second-moment tree and
  stores the results on the host. `time_average` gives eq. 4;
  `depth_average` the per-layer-type average of App. H; `plot_trajectories`
  and `plot_depth` draw them.

  Parameters that the state holds no second moment for (masked out by
  `optax.masked` / `optax.partition`, see `find_second_moment`) are skipped:
  the first measurement warns, names them in ``skipped`` and drops them from
  ``history``, so `time_average` and `derive_rules` cover the tracked ones.

  Args:
    params: the parameters (or their shapes), for paths and candidates.
    every: measure when ``step % every == 0``.
    steps: extra steps to measure (e.g. ``(1,)`` as the authors did).
    candidates: optional ``{path: [axes, ...]}`` overriding `candidate_axes`.

  Raises:
    ValueError: from `measure` / `record`, when the state holds no Adam
      second moment at all (see `find_second_moment`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, slimoptax
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}}
    >>> tx = optax.adam(1e-3)
    >>> opt_state = tx.init(params)
    >>> tracker = slimoptax.SNRTracker(params, every=2, steps=(1,))
    >>> rows = jnp.array([1.0, 2.0, 3.0, 4.0])[:, None]  # gradients scale with the row
    >>> for step in range(1, 5):
    ...   noise = jax.random.normal(jax.random.PRNGKey(step), (4, 8))
    ...   grads = {"mlp": {"up": {"kernel": rows * (1 + 0.1 * noise)}},
    ...            "ln": {"scale": noise[0, :4]}}
    ...   _, opt_state = tx.update(grads, opt_state)
    ...   recorded = tracker.maybe_record(step, opt_state)
    >>> [step for step, _ in tracker.history["mlp/up/kernel"][(1,)]]
    [1, 2, 4]
    >>> rules = slimoptax.derive_rules(tracker.time_average(), shapes=tracker.shapes)
    >>> slimoptax.compression_axes(params, rules)  # each row's nu is nearly constant
    {'ln': {'scale': ()}, 'mlp': {'up': {'kernel': (1,)}}}
  """

  def __init__(self, params: Any, *, every: int = 100, steps: Iterable[int] = (1,),
               candidates: Mapping[str, Sequence[Sequence[int]]] | None = None):
    self._params_struct = jax.tree_util.tree_structure(params)
    self._template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
    self.every = int(every)
    self.steps = set(int(s) for s in steps)
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.candidates: dict[str, list[tuple[int, ...]]] = {}
    for path, leaf in _tree.named_leaves(params):
      shape = tuple(np.shape(leaf))
      self.shapes[path] = shape
      cands = (candidates or {}).get(path)
      self.candidates[path] = [tuple(c) for c in cands] if cands is not None else candidate_axes(path, shape)
    self.history: dict[str, dict[tuple[int, ...], list[tuple[int, float]]]] = {
        p: {c: [] for c in cs} for p, cs in self.candidates.items()
    }
    self.skipped: tuple[str, ...] = ()
    self._measure = jax.jit(self._measure_impl)

  def should_measure(self, step: int) -> bool:
    return step in self.steps or (self.every > 0 and step % self.every == 0)

  def _measure_impl(self, nu):
    out = {}
    for path, v in _tree.named_leaves(nu):
      out[path] = [snr(v, c) for c in self.candidates[path]]
    return out

  def measure(self, opt_state: Any) -> dict[str, dict[tuple[int, ...], float]]:
    """SNR of every candidate for the current state (no recording).

    Raises:
      ValueError: if the state's second moment of a parameter is already
        compressed (averaged along some axes, e.g. a SlimAdam state): SNR_K
        measures Adam's full per-coordinate second moments; the message names
        the parameters.
    """
    nu = find_second_moment(opt_state, self._template)
    compressed = [(p, tuple(np.shape(x)), self.shapes[p])
                  for p, x in _tree.named_leaves(nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
                  if not isinstance(x, optax.MaskedNode) and tuple(np.shape(x)) != self.shapes[p]]
    if compressed:
      listed = ", ".join(f"{p!r} {s} for a {full} parameter" for p, s, full in compressed[:4])
      raise ValueError(
          f"SNRTracker: the second moment of {len(compressed)} parameter(s) in this state is already "
          f"compressed ({listed}{', ...' if len(compressed) > 4 else ''}); SNR is measured on full, "
          "per-coordinate Adam second moments: track a run of optax.adam / adamw or "
          "slim_adamw(compress=None)")
    masked = [p for p, x in _tree.named_leaves(nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
              if isinstance(x, optax.MaskedNode) and p not in self.skipped]
    if masked:
      warnings.warn(
          f"SNRTracker: no second moment for {len(masked)} parameter(s) in this state (masked out "
          f"by optax.masked / optax.partition); skipped: {masked}", stacklevel=3)
      self.skipped += tuple(masked)
      for p in masked:
        self.history.pop(p, None)
    values = jax.device_get(self._measure(nu))
    return {p: {c: float(x) for c, x in zip(self.candidates[p], values[p])} for p in values}

  def record(self, step: int, opt_state: Any) -> None:
    """Measures and stores the SNRs at ``step``."""
    for path, per_axes in self.measure(opt_state).items():
      for c, x in per_axes.items():
        self.history[path][c].append((int(step), x))

  def maybe_record(self, step: int, opt_state: Any) -> bool:
    """Records if ``step`` is on the schedule; returns whether it did."""
    if self.should_measure(step):
      self.record(step, opt_state)
      return True
    return False

  def time_average(self) -> dict[str, dict[tuple[int, ...], float]]:
    """Eq. 4: the mean SNR over recorded steps, per parameter and candidate.

    Raises:
      ValueError: if nothing was recorded (no `record` / `maybe_record` on a
        scheduled step): rules derived from an empty table would compress nothing.
    """
    if not any(pts for per in self.history.values() for pts in per.values()):
      raise ValueError(
          f"SNRTracker recorded nothing: no step was measured (every={self.every}, steps="
          f"{sorted(self.steps)}); call maybe_record(step, opt_state) every step, or record(step, "
          "opt_state), before time_average / derive_rules")
    return time_average(self.history)

  def depth_average(self) -> dict[str, dict[tuple[int, ...], float]]:
    """App. H: time-averaged SNR averaged over layers of the same type."""
    return depth_average(self.time_average())

  def rows(self) -> list[dict[str, Any]]:
    """Flat records ``{step, key, shape, compress_dims, snr}`` (the authors' CSV columns)."""
    out = []
    for p, per in self.history.items():
      for c, pts in per.items():
        for step, x in pts:
          out.append({"step": step, "key": p, "shape": str(self.shapes[p]),
                      "compress_dims": str(tuple(c)), "snr": x})
    return sorted(out, key=lambda r: r["step"])

  def to_csv(self, path: str) -> None:
    """Writes `rows` as CSV (readable by `load_snr_csv`)."""
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["step", "key", "shape", "compress_dims", "snr"])
      writer.writeheader()
      writer.writerows(self.rows())

  def plot_trajectories(self, path: str, *, names: Sequence[str] | None = None, max_panels: int = 12) -> None:
    """PNG of SNR_K vs step for each candidate (one panel per parameter)."""
    from slimoptax._snr_plots import plot_trajectories
    plot_trajectories(self.history, path, names=names, max_panels=max_panels)

  def plot_depth(self, path: str) -> None:
    """PNG of time-averaged SNR vs layer index per layer type and candidate."""
    from slimoptax._snr_plots import plot_depth
    plot_depth(self.time_average(), path)


def _nanmean(xs: Sequence[float]) -> float:
  xs = [x for x in xs if math.isfinite(x)]
  return float(np.mean(xs)) if xs else float("nan")


_LAYER_INDEX = re.compile(r"(?<=[/.])(\d+)(?=[/.])|(?<=_)(\d+)(?=[/.])")


def depth_group(name: str) -> tuple[str, int | None]:
  """Splits a parameter name into (layer-type group, layer index).

  ``blocks/3/attn/query/kernel`` -> ``("blocks/*/attn/query/kernel", 3)``;
  ``transformer.h.3.mlp.mlp_up.weight`` -> ``("transformer.h.*.mlp.mlp_up.weight", 3)``;
  ``params/Block_3/...`` -> ``("params/Block_*/...", 3)``. Names without an
  index are their own group.
  """
  m = _LAYER_INDEX.search(name)
  if not m:
    return name, None
  idx = int(m.group(1) or m.group(2))
  return name[: m.start()] + "*" + name[m.end():], idx


def depth_average(table: SNRTable) -> dict[str, dict[tuple[int, ...], float]]:
  """Averages a ``{name: {axes: snr}}`` table over layers of the same group.

  Keys of the result contain ``*`` in place of the layer index (see
  `depth_group`); `derive_rules` turns them into patterns matching every depth.
  """
  groups: dict[str, dict[tuple[int, ...], list[float]]] = {}
  for name, per in table.items():
    group, _ = depth_group(name)
    for axes, value in per.items():
      groups.setdefault(group, {}).setdefault(tuple(axes), []).append(value)
  return {g: {a: _nanmean(v) for a, v in per.items()} for g, per in groups.items()}


def derive_rules(
    snr_table: SNRTable,
    cutoff: float = 1.0,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> rules_lib.Rules:
  """SlimAdam rules from time-averaged SNRs (§5).

  For each parameter, keep the candidate axes whose SNR exceeds ``cutoff``
  and pick the one with the highest SNR; if none passes, no compression.
  1-D parameters are never compressed.

  Args:
    snr_table: ``{name: {axes: time-averaged SNR}}`` (e.g.
      `SNRTracker.time_average`, `depth_average`, or `load_snr_csv`). Names
      with ``*`` (depth-averaged groups) match every layer index.
    cutoff: the SNR threshold (strictly exceeded).
    shapes: ``{name: shape}``; used to recognise 1-D parameters. Without it a
      parameter whose only candidate is ``(0,)`` is taken as 1-D.

  Returns:
    A `slimoptax.Rules` with one exact-path rule per name (label = name),
    integer axes in the convention of the table.

  Example:
    >>> import jax.numpy as jnp, slimoptax
    >>> table = {"mlp/up/kernel": {(0,): 0.4, (1,): 7.5, (0, 1): 0.3}, "ln/scale": {(0,): 12.0}}
    >>> rules = slimoptax.derive_rules(table, 1.0, shapes={"mlp/up/kernel": (4, 8), "ln/scale": (4,)})
    >>> [(rule.label, rule.axes) for rule in rules]  # vectors are never compressed
    [('mlp/up/kernel', (1,)), ('ln/scale', ())]
    >>> tx = slimoptax.slim_adamw(3e-3, compress=rules)
    >>> params = {"mlp": {"up": {"kernel": jnp.ones((4, 8))}}, "ln": {"scale": jnp.ones(4)}}
    >>> tx.init(params)[0].nu["mlp"]["up"]["kernel"].shape
    (4, 1)
  """
  if not snr_table:
    raise ValueError("derive_rules: the SNR table is empty (no parameter measured); record SNRs first "
                     "(SNRTracker.maybe_record during training, or load_snr_csv)")
  empty = [name for name, per in snr_table.items() if not per]
  nan = [name for name, per in snr_table.items()
         if per and not any(math.isfinite(float(v)) for v in per.values())]
  if empty or nan:
    warnings.warn(
        "derive_rules: no finite SNR for " + "; ".join(
            part for part in (f"{len(empty)} parameter(s) with no candidates: {empty[:5]}" if empty else "",
                              f"{len(nan)} parameter(s) whose SNRs are all NaN/inf: {nan[:5]}" if nan else "")
            if part) + "; they get no compression", stacklevel=2)
  out = []
  for name, per in snr_table.items():
    cands = {tuple(int(a) for a in axes): float(v) for axes, v in per.items()}
    if shapes is not None and name in shapes:
      ndim = len(tuple(shapes[name]))
    else:
      ndim = 1 + max((a for c in cands for a in c), default=0)
      if set(cands) == {(0,)}:
        ndim = 1
    best = ()
    if ndim >= 2:
      passing = [(v, c) for c, v in cands.items() if math.isfinite(v) and v > cutoff]
      if passing:
        best = max(passing)[1]
    out.append(rules_lib.Rule(rules_lib.exact_pattern(name), name, best))
  return rules_lib.Rules(out, name=f"derived(cutoff={cutoff})")


def load_snr_csv(path: str) -> tuple[dict[str, dict[tuple[int, ...], list[tuple[int, float]]]], dict[str, tuple[int, ...]]]:
  """Reads an SNR CSV (columns ``step,key,shape,compress_dims,snr[,...]``).

  The format of `SNRTracker.to_csv` and of the SlimAdam authors' published
  measurements.

  Returns:
    ``(history, shapes)``: ``history[name][axes] = [(step, snr), ...]``.
  """
  history: dict[str, dict[tuple[int, ...], list[tuple[int, float]]]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      name = row["key"]
      axes = _parse_tuple(row["compress_dims"])
      shapes[name] = _parse_tuple(row["shape"])
      history.setdefault(name, {}).setdefault(axes, []).append((int(row["step"]), float(row["snr"])))
  return history, shapes


def time_average(history: Mapping[str, Mapping[tuple[int, ...], Sequence[tuple[int, float]]]]) -> dict[str, dict[tuple[int, ...], float]]:
  """Eq. 4 over a ``history[name][axes] = [(step, snr), ...]`` mapping."""
  return {p: {c: _nanmean([x for _, x in pts]) for c, pts in per.items()} for p, per in history.items()}


def _parse_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(t) for t in re.findall(r"-?\d+", text))


def second_moments_kept(shapes: Mapping[str, Sequence[int]], rules: Any) -> tuple[int, int]:
  """(entries kept, Adam's entries) for parameters ``{name: shape}`` under ``rules``.

  Example:
    >>> import slimoptax
    >>> shapes = {"mlp/up/kernel": (4, 8), "ln/scale": (4,)}
    >>> kept, total = slimoptax.second_moments_kept(shapes, "slimadam")  # mlp_up: fan_out
    >>> print(f"{kept} of {total}: {1 - kept / total:.2%} saved")
    8 of 36: 77.78% saved
  """
  tree = {name: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for name, s in shapes.items()}
  axes = rules_lib.compression_axes(tree, rules)
  kept = sum(rules_lib.kept_entries(tuple(shapes[n]), axes[n]) for n in shapes)
  total = sum(math.prod(tuple(s)) for s in shapes.values())
  return kept, total


__all__ = [
    "SNRTracker", "candidate_axes", "depth_average", "depth_group", "derive_rules",
    "find_second_moment", "load_snr_csv",
    "second_moments_kept", "snr", "time_average",
]
