"""Reading rules from JSON: `Rules.from_dict` and `Rules.from_json`, with errors that name the rule.

Two forms are read:

* the structured form written by `Rules.to_dict` / `Rules.to_json`:
  ``{"format": "slimoptax.rules/v1", "name": ..., "num_heads": ..., "rules":
  [{"pattern": ..., "label": ..., "axes": [...]}, ...]}`` (``"format"``,
  ``"name"``, ``"num_heads"`` optional; per rule ``"warn_unused"``,
  ``"min_ndim"``, ``"max_ndim"`` optional);
* the flat form the SlimAdam authors publish: ``{exact parameter name: [axes] |
  null}``.

Every error names the rule (its index in ``"rules"`` and its pattern and label,
or the flat key) and the JSON key that is wrong or missing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from slimoptax import layouts
from slimoptax.layers import Axes, Reshaped, Split, kept_entries
from slimoptax.rules import Rule, Rules, exact_pattern

FORMAT = "slimoptax.rules/v1"
_RULE_KEYS = ("pattern", "label", "axes", "warn_unused", "min_ndim", "max_ndim")
_EXPECTED = "expected an object with a 'rules' list or a flat {name: [axes] | null} mapping"


def rules_to_dict(rules: Rules) -> dict[str, Any]:
  """The structured form of `Rules.to_dict`, read back by `rules_from_dict`.

  Args:
    rules: a `Rules` object.

  Returns:
    ``{"format", "name", "num_heads", "rules": [{pattern, label, axes, ...}]}``.
  """
  out = {
      "format": FORMAT,
      "name": rules.name,
      "num_heads": rules.num_heads,
      "rules": [
          {"pattern": r.pattern, "label": r.label,
           "axes": r.axes if isinstance(r.axes, str) else list(r.axes),
           "warn_unused": r.warn_unused, "min_ndim": r.min_ndim, "max_ndim": r.max_ndim}
          for r in rules.rules
      ],
  }
  if rules.layouts:
    out["layouts"] = layouts.to_json(rules.layouts)
  return out


def rules_from_dict(data: Any) -> Rules:
  """Reads `Rules.to_dict` output or a flat ``{name: [axes] | null}`` mapping.

  Args:
    data: the decoded JSON value.

  Returns:
    A `Rules` object.

  Raises:
    ValueError: naming the rule (index, pattern, label or flat key) and the key
      that is wrong or missing; a top-level list or scalar is explained.

  Example:
    >>> from slimoptax.rules_io import rules_from_dict
    >>> rules_from_dict({"format": "slimoptax.rules/v1", "rules": [{"pattern": "up", "label": "x"}]})
    Traceback (most recent call last):
    ...
    ValueError: rules[0] (pattern='up', label='x'): missing key 'axes' (give [] for no compression)
    >>> [r.axes for r in rules_from_dict({"mlp/up/kernel": [1], "ln/scale": None})]
    [(1,), ()]
  """
  if isinstance(data, list):
    raise ValueError(
        f"rules JSON: {_EXPECTED}, got a list (a list of rule objects goes under a 'rules' key: "
        f'{{"format": "{FORMAT}", "rules": [...]}})')
  if not isinstance(data, Mapping):
    raise ValueError(f"rules JSON: {_EXPECTED}, got {type(data).__name__} {data!r}")
  if "format" in data or isinstance(data.get("rules"), list) and all(
      isinstance(r, Mapping) for r in data["rules"]):
    return _structured(data)
  rules = []
  for name, axes in data.items():
    if axes is not None and not (isinstance(axes, (list, tuple))
                                 and all(isinstance(a, (int, str)) for a in axes)):
      hint = ("; for the structured form give 'format' and a 'rules' list"
              if name in ("name", "num_heads", "rules") else "")
      raise ValueError(f"rules JSON, flat mapping, key {name!r}: expected a list of axes or null, "
                       f"got {axes!r}{hint}")
    try:
      rules.append(Rule(exact_pattern(str(name)), str(name), tuple(axes or ())))
    except (ValueError, TypeError) as err:
      raise ValueError(f"rules JSON, flat mapping, key {name!r}: "
                       f"{_unprefixed(err, exact_pattern(str(name)), str(name))}") from None
  return Rules(rules, name="mapping")


def _structured(data: Mapping[str, Any]) -> Rules:
  fmt = data.get("format", FORMAT)
  if fmt != FORMAT:
    raise ValueError(f"rules JSON: unknown 'format' {fmt!r}; this version reads {FORMAT!r}")
  if "rules" not in data:
    raise ValueError("rules JSON: missing key 'rules' (a list of {pattern, label, axes} objects)")
  entries = data["rules"]
  if not isinstance(entries, list):
    raise ValueError(f"rules JSON: 'rules' must be a list of rule objects, got {type(entries).__name__}")
  num_heads = data.get("num_heads")
  if num_heads is not None and (not isinstance(num_heads, int) or isinstance(num_heads, bool)):
    raise ValueError(f"rules JSON: 'num_heads' must be an integer or null, got {num_heads!r}")
  out = []
  for i, r in enumerate(entries):
    if not isinstance(r, Mapping):
      raise ValueError(f"rules[{i}]: expected an object with 'pattern', 'label' and 'axes', got {r!r}")
    where = f"rules[{i}] (pattern={r.get('pattern')!r}, label={r.get('label')!r})"
    for key in ("pattern", "label", "axes"):
      if key not in r:
        hint = " (give [] for no compression)" if key == "axes" else ""
        raise ValueError(f"{where}: missing key {key!r}{hint}")
    unknown = sorted(set(r) - set(_RULE_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown}; known: {list(_RULE_KEYS)}")
    for key in ("pattern", "label"):
      if not isinstance(r[key], str):
        raise ValueError(f"{where}: {key!r} must be a string, got {r[key]!r}")
    axes = r["axes"]
    if axes is not None and not isinstance(axes, (str, list)):
      raise ValueError(f"{where}: 'axes' must be a list of axes, null or \"unsupported\", got {axes!r}")
    try:
      out.append(Rule(r["pattern"], r["label"], axes if isinstance(axes, str) else tuple(axes or ()),
                      r.get("warn_unused", True), r.get("min_ndim", 0), r.get("max_ndim")))
    except (ValueError, TypeError) as err:
      raise ValueError(f"{where}: {_unprefixed(err, r['pattern'], r['label'])}") from None
  decl = layouts.from_json(data["layouts"]) if data.get("layouts") is not None else None
  return Rules(out, name=data.get("name", "custom"), num_heads=num_heads, layouts=decl)


def _unprefixed(err: Exception, pattern: str, label: str) -> str:
  """`Rule`'s message without the rule's own name (the caller names it)."""
  msg = str(err)
  for prefix in (f"rule (pattern={pattern!r}, label={label!r}): ", f"rule {pattern!r}: "):
    if msg.startswith(prefix):
      return msg[len(prefix):]
  return msg


def rules_from_json(path_or_text: str | os.PathLike) -> Rules:
  """Loads rules from a JSON file or from JSON text.

  A string whose stripped form starts with ``{`` or ``[`` is JSON text;
  anything else (and any `os.PathLike`) is a file path.

  Args:
    path_or_text: a path to a JSON file, or the JSON text itself.

  Returns:
    A `Rules` object (see `rules_from_dict` for the forms read).

  Raises:
    FileNotFoundError: naming the path, when it is not a file.
    ValueError: for invalid JSON (naming line and column) or rules (see
      `rules_from_dict`), prefixed by the file name when read from a file.

  Example:
    >>> from slimoptax.rules_io import rules_from_json
    >>> rules_from_json('{"mlp/up/kernel": [1],}')
    Traceback (most recent call last):
    ...
    ValueError: rules JSON text: invalid JSON: Expecting property name enclosed in double quotes at line 1, column 23
  """
  if isinstance(path_or_text, str) and path_or_text.strip().startswith(("{", "[")):
    source, text = "rules JSON text", path_or_text
  elif isinstance(path_or_text, (str, os.PathLike)):
    path = os.fspath(path_or_text)
    source = f"rules file {path!r}"
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{source} not found (Rules.from_json takes a file path, or JSON text starting with "
          "'{' or '[')")
    with open(path) as f:
      text = f.read()
  else:
    raise TypeError(f"Rules.from_json takes a file path or JSON text, got {type(path_or_text).__name__}")
  try:
    data = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"{source}: invalid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
  try:
    return rules_from_dict(data)
  except ValueError as err:
    if source == "rules JSON text":
      raise
    raise ValueError(f"{source}: {err}") from None


def _axes_str(axes: Axes | Reshaped | Split) -> str:
  if isinstance(axes, Split):
    return "parts " + ", ".join(_axes_str(p) for p in axes.parts) + f" of axis {axes.axis} of view {axes.view}"
  if isinstance(axes, Reshaped):
    return f"{tuple(axes.axes)} of view {tuple(axes.shape)}"
  return str(tuple(axes)) if axes else "-"


def _pct(a: int, b: int) -> str:
  return f"{100.0 * a / b:.3f}%" if b else "n/a"


def rules_table(rules: Rules, params: Any) -> str:
  """A text table of ``rules`` against ``params``: path, shape, label, axes, second moments kept (`Rules.table`)."""
  rows = []
  total_kept = total = 0
  for path, shape, rule, axes in rules.resolve(params, warn=False, generic=False):
    kept = kept_entries(shape, axes)
    size = math.prod(shape)
    total_kept += kept
    total += size
    label = rule.label + ("?" if rules.is_generic(rule) else "")
    rows.append((path, str(shape), label, _axes_str(axes), f"{kept:,}"))
  header = ("path", "shape", "label", "axes", "kept")
  rows.append(("TOTAL", "", "", "", f"{total_kept:,} of {total:,} ({_pct(total_kept, total)} kept)"))
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
  fmt = "  ".join(f"{{:<{w}}}" for w in widths)
  lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
  lines += [fmt.format(*r) for r in rows]
  if any(r[2].endswith("?") for r in rows):
    lines.append("? matched only by the generic kernel pattern: the layer role is a guess "
                 "(name it with preset(..., layer_types=...))")
  return "\n".join(lines)


__all__ = ["FORMAT", "rules_from_dict", "rules_from_json", "rules_table", "rules_to_dict"]
