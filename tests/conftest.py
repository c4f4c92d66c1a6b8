"""Shared test set-up: CPU JAX, the reference-data folder, small Flax models."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def reference_dir() -> pathlib.Path:
  """`../shared/reference` beside the checkout (override: SLIMOPTAX_REFERENCE)."""
  env = os.environ.get("SLIMOPTAX_REFERENCE")
  path = pathlib.Path(env) if env else REPO.parent / "shared" / "reference"
  return path


@pytest.fixture(scope="session")
def gpt2_reference():
  path = reference_dir() / "slimadam-gpt2"
  if not path.exists():
    pytest.fail(f"published SlimAdam measurements not found at {path} (set SLIMOPTAX_REFERENCE)")
  return path
