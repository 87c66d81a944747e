"""The ``adam-mini-lab`` command line: one subcommand per module."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lab import memory, partition_cli, reproduce


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; every subcommand module registers itself through ``add_parser``."""
    parser = argparse.ArgumentParser(
        prog="adam-mini-lab",
        description="Measure Hessian block structure, derive partitions, and train with Adam-mini.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (reproduce, partition_cli, memory):
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
