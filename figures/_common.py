"""Command line of the figure scripts; the plotting primitives live in lab.experiments_plots."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from lab.experiments_plots import (
    COLORS,
    block_mass_share,
    caption,
    log_heatmap,
    save_figure,
    set_style,
)
from lab.train import check_out_dir, check_seed, set_threads

__all__ = [
    "COLORS",
    "FIGURES_DIR",
    "block_mass_share",
    "caption",
    "log_heatmap",
    "parse_args",
    "save_figure",
    "set_style",
]

FIGURES_DIR = Path(__file__).resolve().parent


def parse_args(
    description: str, argv: Sequence[str] | None = None, replot: bool = False
) -> argparse.Namespace:
    """``--quick`` (tiny sizes for the tests), ``--out DIR`` (default: ``figures/``; created
    here, refused when it cannot be a writable folder), ``--seed``,
    ``--threads`` (torch CPU threads, default 1, set here: the float sums, and so the numbers,
    depend on how the work is split between threads); with ``replot=True`` also ``--replot``
    (draw again from the json the script wrote into ``--out``, without rerunning)."""
    parser = argparse.ArgumentParser(description=description)
    if replot:
        parser.add_argument(
            "--replot", action="store_true", help="redraw from the json in --out; no training"
        )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument(
        "--out", type=Path, default=FIGURES_DIR, help="output folder (default: figures/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the same numbers "
        "on every machine with the same CPU kernels)",
    )
    args = parser.parse_args(argv)
    try:
        check_seed(args.seed)
        set_threads(args.threads)
        check_out_dir(args.out)  # a file there would fail only at savefig, after the work
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return args
