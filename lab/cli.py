"""The ``adam-mini-lab`` command line: one subcommand per module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hessian import HessianError
from lab import memory, partition_cli, reproduce
from lab.data import CorpusChangedError
from partition import PartitionError


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
    """Entry point of the console script; returns the process exit code.

    Bad input, unusable paths, diverged training (``FloatingPointError``) and a stdlib that
    changed while the corpus was read end in one line naming the problem and the fix, not a
    traceback; any other error keeps its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    except (PartitionError, HessianError, ValueError, OSError, CorpusChangedError) as exc:
        print(f"adam-mini-lab {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except FloatingPointError as exc:  # lab.train's non-finite loss, AdamMini's non-finite grad
        print(
            f"adam-mini-lab {args.command}: error: training diverged: {exc}. The command line "
            "has no --lr: rerun with another --seed, or lower the lr in Python: "
            "lab.reproduce.run(dataclasses.replace(lab.reproduce.DEFAULT, lr=...), out)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
