"""Command line: ``slimoptax demo --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="slimoptax", description="slimoptax command line")
  sub = parser.add_subparsers(dest="command", required=True)
  from slimoptax import demo

  demo_parser = sub.add_parser("demo", help="SNR -> rules -> Adam vs SlimAdam/Adam-mini/AdaLayer on the "
                               "Python standard library's source")
  demo.add_arguments(demo_parser)
  args = parser.parse_args(argv)
  if args.command == "demo":
    demo.run_demo(args.out, demo.config_from_args(args), progress=not args.no_progress)
  return 0


if __name__ == "__main__":
  sys.exit(main())
