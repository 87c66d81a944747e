"""Per-module Hessians of a tiny transformer: query/key blocks by head, the rest by neuron.

Dense Hessian of each weight matrix of layer 0 of a TinyGPT (d_model 16, 4 heads of 4,
MLP width 64) with respect to itself, after a short AdamW warm-up on the standard-library
corpus. Cyan lines are the Adam-mini principle's blocks: one per head for the query and
key, one per output neuron for value, attention output and MLP. Titles give r_diag, the
share of squared Frobenius mass inside those blocks, next to the share of a random
partition with the same block sizes.

    python figures/fig_transformer_hessian.py [--quick] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import block_mass_share, caption, log_heatmap, parse_args, save_figure, set_style
from tqdm.auto import tqdm

import hessian
from lab.data import Corpus
from lab.models import TinyGPT, TinyGPTConfig, lm_loss
from lab.train import WarmupCosine, train

NAME = "fig_transformer_hessian"
FULL = TinyGPTConfig(vocab_size=256, context=16, n_layer=1, d_model=16, n_heads=4)
SMALL = TinyGPTConfig(vocab_size=256, context=8, n_layer=1, d_model=8, n_heads=2)


def modules(c: TinyGPTConfig) -> list[tuple[str, str, str, int]]:
    """(title, parameter, block rule, entries per block) of the matrices of layer 0."""
    return [
        ("query", "blocks.0.attn.q_proj.weight", "head", c.hd * c.d_model),
        ("key", "blocks.0.attn.k_proj.weight", "head", c.hd * c.d_model),
        ("value", "blocks.0.attn.v_proj.weight", "output neuron", c.d_model),
        ("attention output", "blocks.0.attn.o_proj.weight", "output neuron", c.n_heads * c.hd),
        ("MLP in (fc_in)", "blocks.0.mlp.fc_in.weight", "output neuron", c.d_model),
        ("MLP out (fc_out)", "blocks.0.mlp.fc_out.weight", "output neuron", c.ff),
    ]


def module_hessians(
    c: TinyGPTConfig, steps: int, batch_size: int, seed: int, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]], float]:
    """Dense per-module Hessians (float64) after ``steps`` AdamW steps, shapes, val loss."""
    corpus = Corpus.stdlib()
    model = TinyGPT(c, seed=seed)
    res = train(
        lambda: model,
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0),
        corpus,
        steps=steps,
        batch_size=16,
        context=c.context,
        schedule=WarmupCosine(steps, warmup_steps=steps // 10, min_ratio=1.0),
        eval_every=steps,
        seed=seed,
        progress=progress,
        name="warm-up",
    )
    model = model.double()
    batch = corpus.batch("train", batch_size, c.context, torch.Generator().manual_seed(seed + 7))
    out, shapes = {}, {}
    for _, name, _, _ in tqdm(modules(c), desc="Hessians", disable=not progress, leave=False):
        H = hessian.HessianOperator(model, lm_loss, batch, params=[name], mode="reverse")
        out[name] = H.to_dense().detach().numpy()
        shapes[name] = tuple(H.param_shapes[name])
    return out, shapes, res.final_val_loss


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written."""
    args = parse_args(__doc__.splitlines()[0], argv)
    set_style()
    c = SMALL if args.quick else FULL
    steps, batch_size = (5, 2) if args.quick else (100, 64)
    hessians, shapes, val_loss = module_hessians(
        c, steps, batch_size, args.seed, not args.no_progress
    )
    rng = np.random.default_rng(args.seed)

    fig, axes = plt.subplots(2, 3, figsize=(12, 9.0))
    fig.subplots_adjust(hspace=0.35, wspace=0.15, top=0.86, bottom=0.04, left=0.03, right=0.86)
    for ax, (title, name, rule, size) in zip(axes.flat, modules(c), strict=True):
        H = hessians[name]
        n = H.shape[0]
        ids = np.arange(n) // size
        null = block_mass_share(H, rng.permutation(ids))
        im = log_heatmap(ax, H, list(range(size, n, size)))
        ax.set_title(
            f"{title}\n{n // size} blocks, one per {rule}\n"
            f"r_diag = {block_mass_share(H, ids):.2f}  (random blocks: {null:.2f})",
            fontsize=9,
        )
        shape = "×".join(map(str, shapes[name]))
        ax.set_xlabel(f"{name}  ({shape}, row-major)", fontsize=7)
    cbar = fig.colorbar(im, cax=fig.add_axes((0.89, 0.25, 0.015, 0.5)))
    cbar.set_label("log10 |∂²L/∂w_i∂w_j|")
    fig.suptitle(
        f"Hessian of each weight matrix of a tiny transformer (d_model {c.d_model}, {c.n_heads} "
        "heads)\nthe paper's blocks: one per head (query, key), one per output neuron (value, "
        "attention output, MLP)",
        y=0.97,
    )
    caption(
        fig,
        f"TinyGPT, 1 layer, context {c.context}, MLP width {c.ff}, byte-level Python-stdlib text; "
        f"{steps} AdamW steps (lr 3e-3, val loss {val_loss:.2f}) then the exact Hessian in "
        f"float64 on one batch of {batch_size}×{c.context} tokens (hessian.HessianOperator, "
        "one matrix per module, cross-module blocks not shown). r_diag = Σ_a ||H_aa||²_F / "
        "||H||²_F; 'random blocks' scores a random partition with the same block sizes.",
    )
    return save_figure(fig, NAME, args.out, dpi=100)


if __name__ == "__main__":
    main()
