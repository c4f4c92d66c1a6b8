"""Every docstring example in the library runs and prints what it says.

The same check as ``pytest --doctest-modules slimoptax``, run as part of the
test suite (one test per module), so the README's test command covers it.
"""

import doctest
import importlib
import pkgutil
import sys

import pytest

import slimoptax

MODULES = sorted(m.name for m in pkgutil.iter_modules(slimoptax.__path__, "slimoptax."))


def test_every_module_is_listed():
  assert "slimoptax._slim_adam" in MODULES and "slimoptax.rules" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  tests = finder.find(module, name, globs={})
  for test in tests:
    runner.run(test, out=sys.stdout.write)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of {name} failed"


def test_import_loads_no_optional_dependency():
  """``import slimoptax`` loads none of flax, matplotlib, tokenizers, tqdm, orbax."""
  import subprocess
  code = ("import sys, slimoptax; bad = [m for m in ('flax', 'matplotlib', 'tokenizers', 'tqdm', "
          "'orbax') if any(k == m or k.startswith(m + '.') for k in sys.modules)]; print(bad)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_submodule_is_shadowed():
  """``import slimoptax.<module> as m`` gives the module, for every module."""
  import types
  for name in MODULES:
    short = name.split(".")[1]
    attr = getattr(slimoptax, short, None)
    assert attr is None or isinstance(attr, types.ModuleType), f"slimoptax.{short} is {attr!r}"
