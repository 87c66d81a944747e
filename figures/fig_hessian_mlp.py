"""Hessian of a one-hidden-layer MLP: near-block-diagonal by hidden neuron, sharper as C grows.

Top row: the hidden-layer Hessian d²L/dW1² (W1 = fc1.weight, m neurons × d inputs, rows
neuron-major so each d×d diagonal block is one neuron) at initialisation, half-way and at the
end of full-batch Adam training on Gaussian data with uniformly random labels (the paper's
setup has m=8, d=C=500; we use d=100 so that the dense block stays cheap). Bottom row: the
same block at initialisation for C = 10, 100, 1000 classes. Titles give r_diag, the share of squared Frobenius mass inside the per-neuron blocks.

    python figures/fig_hessian_mlp.py [--quick] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import block_mass_share, caption, log_heatmap, parse_args, save_figure, set_style
from tqdm.auto import tqdm

import hessian
from lab.data import gaussian_classification
from lab.models import OneHiddenMLP, classification_loss

NAME = "fig_hessian_mlp"


@dataclass(frozen=True)
class Sizes:
    """Input width d, hidden neurons m, classes C, samples n, Adam steps, the C of the sweep."""

    d: int
    m: int
    C: int
    n: int
    steps: int
    sweep: tuple[int, ...]


FULL = Sizes(d=100, m=8, C=500, n=1000, steps=300, sweep=(10, 100, 1000))
QUICK = Sizes(d=16, m=4, C=16, n=128, steps=20, sweep=(4, 16, 64))
LR = 1e-3


def hidden_hessian(model: OneHiddenMLP, data: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Dense d²L/d(fc1.weight)² (m·d × m·d), float64, from Hessian-vector products."""
    H = hessian.HessianOperator(
        model, classification_loss, data, params=["fc1.weight"], mode="reverse"
    )
    return H.to_dense(chunk=64).detach().cpu().numpy()


def training_snapshots(
    s: Sizes, seed: int, progress: bool, lr: float = LR
) -> list[tuple[str, np.ndarray]]:
    """Hidden-layer Hessians at step 0, steps/2 and steps of full-batch Adam at ``lr``, each
    labelled with its step and the loss of the parameters it is taken at."""
    X, y = gaussian_classification(s.n, s.d, s.C, seed=seed, dtype=torch.float64)
    model = OneHiddenMLP(d=s.d, m=s.m, num_classes=s.C, seed=seed).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    snaps = [("initialisation", hidden_hessian(model, (X, y)))]
    for step in tqdm(range(1, s.steps + 1), desc="train MLP", disable=not progress, leave=False):
        opt.zero_grad()
        classification_loss(model, (X, y)).backward()
        opt.step()
        if step in (s.steps // 2, s.steps):
            where = "half-way" if step < s.steps else "end"
            with torch.no_grad():  # the loss at the parameters whose Hessian is shown
                loss = classification_loss(model, (X, y)).item()
            snaps.append((f"{where} (step {step}, loss {loss:.2f})", hidden_hessian(model, (X, y))))
    return snaps


def class_sweep(s: Sizes, seed: int, progress: bool) -> list[tuple[str, np.ndarray]]:
    """Hidden-layer Hessians at initialisation for each number of classes in ``s.sweep``."""
    out = []
    for C in tqdm(s.sweep, desc="C sweep", disable=not progress, leave=False):
        X, y = gaussian_classification(s.n, s.d, C, seed=seed, dtype=torch.float64)
        model = OneHiddenMLP(d=s.d, m=s.m, num_classes=C, seed=seed).double()
        out.append((f"C = {C} classes, initialisation", hidden_hessian(model, (X, y))))
    return out


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written."""
    args = parse_args(__doc__.splitlines()[0], argv)
    set_style()
    s = QUICK if args.quick else FULL
    progress = not args.no_progress
    rows = [training_snapshots(s, args.seed, progress), class_sweep(s, args.seed, progress)]
    neuron = np.repeat(np.arange(s.m), s.d)
    edges = [i * s.d for i in range(1, s.m)]

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    fig.subplots_adjust(hspace=0.28, wspace=0.08, top=0.9, bottom=0.04)
    for r, row in enumerate(rows):
        for ax, (label, H) in zip(axes[r], row, strict=True):
            im = log_heatmap(ax, H, edges)
            ax.set_title(f"{label}\nr_diag = {block_mass_share(H, neuron):.3f}", fontsize=10)
            ax.set_xlabel(f"W1 entry (neuron-major, {s.m} neurons × {s.d})", fontsize=8)
    cbar = fig.colorbar(im, ax=axes, shrink=0.6, pad=0.02)
    cbar.set_label("log10 |∂²L/∂w_i∂w_j|  (mean over pixel tile)")
    axes[0, 0].set_ylabel(f"top: during training (C = {s.C})")
    axes[1, 0].set_ylabel("bottom: number of classes C")
    fig.suptitle(
        f"Hidden-layer Hessian of a 1-hidden-layer MLP (m={s.m}, d={s.d}): "
        "one dense block per hidden neuron (cyan lines)",
        y=0.98,
    )
    caption(
        fig,
        f"OneHiddenMLP (ReLU, no bias; the paper uses d=500, we use d={s.d} to keep the exact "
        f"Hessian cheap), cross-entropy on n={s.n} Gaussian inputs with uniformly "
        f"random labels, float64, exact Hessian from {s.m * s.d} Hessian-vector products "
        f"(hessian.HessianOperator). Only the W1-W1 block (m·d = {s.m * s.d} parameters) is "
        "shown: the W2 rows are blocks of m entries each, too small to see at this scale. "
        "r_diag = Σ_a ||H_aa||²_F / ||H||²_F over the per-neuron blocks (1 = exactly "
        f"block-diagonal, {1 / s.m:.3f} = no structure). Adam lr {LR:g}, full batch, "
        f"{s.steps} steps; seed {args.seed}.",
    )
    return save_figure(fig, NAME, args.out, dpi=100)


if __name__ == "__main__":
    main()
