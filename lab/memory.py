"""``adam-mini-lab memory``: optimizer-state bytes of AdamW vs Adam-mini on real model configs.

Models are built from ``transformers`` configs on the meta device (no download,
no memory), partitioned with ``partition.adam_mini`` and counted with
``optimizer.state_bytes`` (fp32 state, float32 ``step`` counters included).
GB means 1e9 bytes, as in the paper's Table 1.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import optimizer
from partition.io import write_text

GB = 1e9

# (AdamW GB, Adam-mini GB) reported in the paper (arXiv 2406.16793, Table 1).
PAPER = {"Llama 2-7B": (53.92, 26.96)}


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))

    return build


def _llama(hidden: int, layers: int, heads: int, intermediate: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=intermediate,
            vocab_size=32000,
        )
        return LlamaForCausalLM(cfg)

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "GPT-2 125M": _gpt2(768, 12, 12),
    "GPT-2 355M": _gpt2(1024, 24, 16),
    "GPT-2 774M": _gpt2(1280, 36, 20),
    "GPT-2 1.5B": _gpt2(1600, 48, 25),
    "Llama 2-7B": _llama(4096, 32, 32, 11008),
    "Llama 2-13B": _llama(5120, 40, 40, 13824),
}
# command-line names, as the presets of ``adam-mini-lab partition --model``
ALIASES = {
    "gpt2": "GPT-2 125M",
    "gpt2-medium": "GPT-2 355M",
    "gpt2-large": "GPT-2 774M",
    "gpt2-xl": "GPT-2 1.5B",
    "llama2-7b": "Llama 2-7B",
    "llama2-13b": "Llama 2-13B",
}


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
    table name or command-line alias (:data:`ALIASES`)."""
    rows = []
    for given in names or list(MODELS):
        name = ALIASES.get(given, given)
        if name not in MODELS:
            raise ValueError(f"unknown model {given!r}; choose from {', '.join(ALIASES)}")
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = MODELS[name]()
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
    """Print the table; write it to ``args.out`` when given."""
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
        choices=[*ALIASES, *MODELS],
        help="subset of: " + ", ".join(ALIASES) + " (or the table's names, e.g. 'Llama 2-7B')",
    )
    p.add_argument("--out", help="also write the table as markdown to this path")
    p.set_defaults(func=run)
