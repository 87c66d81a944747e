"""``adam-mini-lab memory``: optimizer-state bytes of AdamW vs Adam-mini on real model configs.

Models are the presets of ``adam-mini-lab partition --model`` (``transformers`` configs, and
the lab's TinyGPT and MLP), built on the meta device (no download, no memory), partitioned
with ``partition.adam_mini`` and counted with ``optimizer.state_bytes`` (fp32 state, float32 ``step`` counters included).
GB means 1e9 bytes, as in the paper's Table 1.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import optimizer
from lab.partition_cli import PRESETS, load_model
from lab.train import check_out_file
from partition.io import write_text

GB = 1e9

# (AdamW GB, Adam-mini GB) reported in the paper (arXiv 2406.16793, Table 1).
PAPER = {"Llama 2-7B": (53.92, 26.96)}


# the table's rows: name in the table -> preset of ``adam-mini-lab partition --model``
# (lab.partition_cli.PRESETS, the one list of presets: ``--models`` takes any of them)
MODELS: dict[str, str] = {
    "GPT-2 125M": "gpt2",
    "GPT-2 355M": "gpt2-medium",
    "GPT-2 774M": "gpt2-large",
    "GPT-2 1.5B": "gpt2-xl",
    "Llama 2-7B": "llama2-7b",
    "Llama 2-13B": "llama2-13b",
}
ALIASES = {preset: name for name, preset in MODELS.items()}  # preset -> name in the table


@dataclass(frozen=True)
class MemoryRow:
    """One line of the table (bytes)."""

    model: str
    num_params: int
    num_blocks: int
    adamw: int
    adam_mini: int
    adam_mini_bf16: int  # Adam-mini with bf16 momentum

    @property
    def ratio(self) -> float:
        """Adam-mini state / AdamW state."""
        return self.adam_mini / self.adamw


def memory_rows(names: list[str] | None = None) -> list[MemoryRow]:
    """Count the state of every model in ``names`` (default: all of :data:`MODELS`), given by
    table name or by any preset of ``adam-mini-lab partition --model``
    (:data:`lab.partition_cli.PRESETS`); presets of the table are shown by their table name."""
    rows = []
    for given in names or list(MODELS):
        preset = MODELS.get(given, given)
        if preset not in PRESETS:
            raise ValueError(
                f"unknown model {given!r}; choose from {', '.join(PRESETS)} "
                f"(or a table name: {', '.join(MODELS)})"
            )
        name = ALIASES.get(preset, preset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(preset, meta=True)
        sb = optimizer.state_bytes(model)
        low = optimizer.state_bytes(model, momentum_dtype="bf16")
        rows.append(
            MemoryRow(name, sb.num_params, sb.num_blocks, sb.adamw_total, sb.total, low.total)
        )
    return rows


def markdown(rows: list[MemoryRow]) -> str:
    """The table as GitHub markdown."""
    lines = [
        "| model | params | v entries (Adam-mini) | AdamW state (GB) | Adam-mini state (GB) | "
        "Adam-mini / AdamW | Adam-mini + bf16 m (GB) | paper AdamW (GB) | paper Adam-mini (GB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        paper = PAPER.get(r.model)
        lines.append(
            f"| {r.model} | {r.num_params / 1e6:,.1f}M | {r.num_blocks:,} | {r.adamw / GB:.2f} | "
            f"{r.adam_mini / GB:.2f} | {r.ratio:.2%} | {r.adam_mini_bf16 / GB:.2f} | "
            f"{f'{paper[0]:.2f}' if paper else '—'} | {f'{paper[1]:.2f}' if paper else '—'} |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Print the table; write it to ``args.out`` when given (checked first, naming --out)."""
    if args.out:
        check_out_file(args.out)
    table = markdown(memory_rows(args.models))
    print(table, end="")
    if args.out:
        write_text(args.out, table)
        print(f"wrote {args.out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``memory`` on the ``adam-mini-lab`` command line."""
    p = subparsers.add_parser(
        "memory",
        help="optimizer-state memory of AdamW vs Adam-mini for GPT-2 and Llama 2 configs",
        description=__doc__,
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        choices=[*PRESETS, *MODELS],
        help="any of the presets of 'partition --model': " + ", ".join(PRESETS) + " (or the "
        "table's names, e.g. 'Llama 2-7B'); default: the table's six GPT-2 and Llama 2 models",
    )
    p.add_argument("--out", help="also write the table as markdown to this path")
    p.set_defaults(func=run)
