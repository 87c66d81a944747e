"""Optimizer-state memory of AdamW vs Adam-mini on GPT-2 and Llama 2 configs, beside the paper.

Bars: AdamW state (m and v, fp32), Adam-mini state (m, one v per block) and Adam-mini with
bf16 momentum, in GB (1e9 bytes), counted by ``optimizer.state_bytes`` on meta-device models
built from ``transformers`` configs (``lab.memory``); diamonds: the paper's numbers where it
reports them. Also writes the table as markdown: figures/fig_memory_table.md.

    python figures/fig_memory_table.py [--quick] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from _common import caption, parse_args, save_figure, set_style

from lab.memory import GB, MODELS, PAPER, markdown, memory_rows
from partition.io import write_text

NAME = "fig_memory_table"
QUICK_MODELS = ["GPT-2 125M", "Llama 2-7B"]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written."""
    args = parse_args(__doc__.splitlines()[0], argv)
    set_style()
    rows = memory_rows(QUICK_MODELS if args.quick else list(MODELS))
    x = np.arange(len(rows))
    width = 0.27
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 4, 4.6))
    series = [
        ("AdamW (m + v, fp32)", [r.adamw for r in rows], "#1f77b4"),
        ("Adam-mini (m fp32, one v per block)", [r.adam_mini for r in rows], "#d62728"),
        ("Adam-mini, bf16 momentum", [r.adam_mini_bf16 for r in rows], "#ff9896"),
    ]
    for i, (label, values, color) in enumerate(series):
        bars = ax.bar(x + (i - 1) * width, np.array(values) / GB, width, label=label, color=color)
        if i == 1:
            ax.bar_label(bars, [f"{r.ratio:.1%}\nof AdamW" for r in rows], fontsize=7, padding=2)
    for j, r in enumerate(rows):
        if r.model in PAPER:
            adamw, mini = PAPER[r.model]
            ax.scatter(
                [j - width, j],
                [adamw, mini],
                marker="D",
                s=40,
                color="black",
                zorder=3,
                label="paper (Table 1)"
                if j == next(k for k, q in enumerate(rows) if q.model in PAPER)
                else None,
            )
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{r.model}\n{r.num_params / 1e9:.2f}B params" for r in rows], fontsize=8)
    ax.set_ylabel("optimizer state (GB = 1e9 bytes, log scale)")
    ax.set_title(
        "Optimizer-state memory: Adam-mini keeps m and one v per block (about half of AdamW)"
    )
    ax.legend(fontsize=8, loc="upper left")
    caption(
        fig,
        "Counted, not measured on a GPU: optimizer.state_bytes on models built on the meta device "
        "from transformers configs, partition.adam_mini (paper rules: embeddings and output by "
        "token, q/k by head, the rest by output neuron), fp32 state plus 4 bytes per tensor for "
        "the step counter. Diamonds: the paper's numbers, for the models it reports them for.",
    )
    paths = save_figure(fig, NAME, args.out)
    paths.append(write_text(Path(args.out) / f"{NAME}.md", markdown(rows)))
    return paths


if __name__ == "__main__":
    main()
