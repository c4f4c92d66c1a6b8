"""Optimizer-state bytes of SOAP and of other second-moment rules in its eigenbasis, on GPT-2 small.

Shapes only (`jax.eval_shape` of each ``init``): nothing is computed, so any machine gives the same numbers.
The tree is `bench_all.gpt2_params` (12 layers, d 768, 12 heads, vocab 50304, DenseGeneral attention
kernels). Rows: `optax.adamw`; `slimoptax.soap` (Adam in Shampoo's eigenbasis, defaults: every axis up to
``max_precond_dim`` = 10000 gets a statistic ``GG`` and a basis ``Q``); the same rotation around
`slimoptax.scale_by_slim_adam` with the ``"slimadam"`` preset ("slim SOAP": the rotated second moment
averaged along Table 3's axes) and around `slimoptax.scale_by_adafactor` (Algorithm 2 of the SOAP slides).

Usage::

  python benchmarks/eigenbasis_state_bytes.py
"""

from __future__ import annotations

import argparse

import jax
import optax

import slimoptax

try:
  from benchmarks.bench_all import gpt2_params
except ImportError:  # run as a script from the repository root
  from bench_all import gpt2_params


def rows() -> dict[str, optax.GradientTransformation]:
  return {
      "optax.adamw": optax.adamw(1e-3),
      "slimoptax.soap": slimoptax.soap(1e-3),
      "eigenbasis(scale_by_slim_adam('slimadam'))": slimoptax.precondition_in_eigenbasis(
          slimoptax.scale_by_slim_adam(compress="slimadam")),
      "eigenbasis(scale_by_adafactor)": slimoptax.precondition_in_eigenbasis(slimoptax.scale_by_adafactor(b1=0.9)),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=12)
  args = p.parse_args(argv)
  params = jax.eval_shape(lambda: gpt2_params(jax.random.PRNGKey(0), layers=args.layers))
  base = None
  print("| optimizer | state bytes | vs optax.adamw |\n|---|---|---|")
  for name, tx in rows().items():
    state = jax.eval_shape(tx.init, params)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    base = base or nbytes
    print(f"| `{name}` | {nbytes:,} | {nbytes / base:.3f}x |")


if __name__ == "__main__":
  main()
