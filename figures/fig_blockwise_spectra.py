"""Blockwise Hessian spectra of a small GPT: each block type has its own curvature scale.

Stochastic Lanczos quadrature (SLQ) on one diagonal Hessian block of each type of the
Adam-mini principle (a query/key head, a value/attention-output/MLP neuron, an embedding
row, a LayerNorm weight), in the first and last layer of a TinyGPT briefly trained on the
standard-library corpus. The bottom panel compares the blocks' largest eigenvalues: they
spread over orders of magnitude, which is why one lr for all blocks is a bad idea and one
lr per block is enough.

    python figures/fig_blockwise_spectra.py [--quick] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import caption, parse_args, save_figure, set_style

import hessian
from lab.data import Corpus
from lab.experiments import block_types
from lab.experiments_plots import plot_spectra
from lab.models import TinyGPT, TinyGPTConfig, lm_loss
from lab.report import plural
from lab.train import WarmupCosine, train

NAME = "fig_blockwise_spectra"
FULL = dict(
    config=TinyGPTConfig(context=32, n_layer=2, d_model=64, n_heads=4),
    steps=200,
    tokens=(8, 32),
    probes=4,
    lanczos=40,
)
QUICK = dict(
    config=TinyGPTConfig(context=8, n_layer=1, d_model=16, n_heads=2),
    steps=5,
    tokens=(2, 8),
    probes=1,
    lanczos=6,
)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written."""
    args = parse_args(__doc__.splitlines()[0], argv)
    set_style()
    s = QUICK if args.quick else FULL
    cfg: TinyGPTConfig = s["config"]
    progress = not args.no_progress
    corpus = Corpus.stdlib()
    model = TinyGPT(cfg, seed=args.seed)
    res = train(
        lambda: model,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95)),
        corpus,
        steps=s["steps"],
        batch_size=16,
        context=cfg.context,
        schedule=WarmupCosine(s["steps"], s["steps"] // 10, 1.0),
        eval_every=s["steps"],
        seed=args.seed,
        progress=progress,
        name="train",
    )
    model = model.double()
    b, t = s["tokens"]
    batch = corpus.batch("train", b, t, torch.Generator().manual_seed(args.seed + 17))
    common = int(torch.bincount(batch[0].reshape(-1), minlength=cfg.vocab_size).argmax())
    groups = block_types(cfg, common, sorted({0, cfg.n_layer - 1}))
    H = hessian.HessianOperator(model, lm_loss, batch, mode="reverse")
    spectra = hessian.blockwise_spectra(
        H, groups, num_probes=s["probes"], num_steps=s["lanczos"], seed=args.seed, progress=progress
    )

    cols = 5
    rows = (len(spectra) + cols - 1) // cols
    fig = plt.figure(figsize=(15, 2.3 * rows + 3.2))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.3], hspace=0.9)
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(cols)] for r in range(rows)])
    plot_spectra(axes, spectra)
    ax = fig.add_subplot(grid[rows, :])
    labels = list(spectra)
    top = [float(np.abs(spectra[k].nodes).max()) for k in labels]
    ax.bar(range(len(labels)), top, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("largest |eigenvalue|\nof the block")
    ax.set_title(
        f"largest |eigenvalue| per block: spread {max(top) / max(min(top), 1e-300):.0f}× "
        "between block types",
        fontsize=10,
    )
    fig.suptitle(
        "Blockwise Hessian spectra of a small GPT: eigenvalue density of one diagonal block "
        "of each type (x: eigenvalue, y: density, log scale over 5 decades)",
        y=0.995,
    )
    caption(
        fig,
        f"TinyGPT ({plural(cfg.n_layer, 'layer')}, d_model {cfg.d_model}, "
        f"{plural(cfg.n_heads, 'head')}, context {cfg.context}) after "
        f"{plural(s['steps'], 'AdamW step')} (val loss {res.final_val_loss:.2f}); "
        f"Hessian of the loss on {b}×{t} training tokens in float64; SLQ with {s['probes']} "
        f"Rademacher probe(s) × {s['lanczos']} Lanczos steps per block, densities smoothed "
        "with a Gaussian of 1/60 of each block's range (hessian.blockwise_spectra). Token rows: "
        "the most frequent byte of the batch.",
    )
    return save_figure(fig, NAME, args.out)


if __name__ == "__main__":
    main()
