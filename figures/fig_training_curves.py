"""Training curves of AdamW and three Adam-mini partitions on a small GPT, over several seeds.

Validation loss against step (mean over seeds, band = min..max) for AdamW and Adam-mini on
the paper's rules, on the partition derived from the measured Hessian, and on one block per
tensor. Left: every optimizer at the same lr. Right: each optimizer at its best lr of a small
grid (best mean final validation loss). Writes figures/fig_training_curves.png/.pdf and the
curves of every run as figures/fig_training_curves.json.

    python figures/fig_training_curves.py [--quick] [--out DIR]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import COLORS, caption, parse_args, save_figure, set_style
from tqdm.auto import tqdm

import partition
from lab.data import Corpus
from lab.experiments import train_variants
from lab.models import TinyGPT
from lab.report import plural
from lab.reproduce import DEFAULT, QUICK, ReproduceConfig, warm_up_and_measure
from partition.io import write_text

NAME = "fig_training_curves"
FULL = dict(steps=1000, seeds=(0, 1, 2), grid=(3e-3, 1e-2, 2e-2), equal_lr=1e-2)
SMALL = dict(steps=20, seeds=(0, 1), grid=(3e-3, 1e-2), equal_lr=1e-2)


def derived_partition(
    c: ReproduceConfig, corpus: Corpus, seed: int, progress: bool
) -> partition.Partition:
    """The partition ``reproduce`` would derive for this model (same measurement settings)."""
    _, _, structure = warm_up_and_measure(c, corpus, seed=seed, spectra=(1, 2), progress=progress)
    return structure.derived


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written."""
    args = parse_args(__doc__.splitlines()[0], argv)
    set_style()
    s, c = (SMALL, QUICK) if args.quick else (FULL, DEFAULT)
    progress = not args.no_progress
    corpus = Corpus.stdlib()
    with torch.device("meta"):
        meta = TinyGPT(c.model)
    variants = {
        "AdamW": None,
        "Adam-mini (paper rules)": partition.adam_mini(meta),
        "Adam-mini (derived)": derived_partition(c, corpus, args.seed, progress),
        "Adam-mini (by tensor)": partition.by_tensor(meta),
    }
    runs: dict[tuple[str, float, int], object] = {}
    jobs = [(lr, seed) for lr in s["grid"] for seed in s["seeds"]]
    for lr, seed in tqdm(jobs, desc="lr × seed", disable=not progress):
        for v in train_variants(
            variants,
            c.model,
            corpus,
            steps=s["steps"],
            lr=lr,
            batch_size=c.batch_size,
            seed=seed,
            eval_every=max(1, s["steps"] // 20),
            eval_batches=c.eval_batches,
            progress=False,
        ):
            runs[(v.name, lr, seed)] = v.run

    def final(name: str, lr: float) -> float:
        return float(np.mean([runs[(name, lr, sd)].final_val_loss for sd in s["seeds"]]))

    best = {name: min(s["grid"], key=lambda lr, n=name: final(n, lr)) for name in variants}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, (title, lrs) in zip(
        axes,
        [
            (f"same lr for all ({s['equal_lr']:g})", dict.fromkeys(variants, s["equal_lr"])),
            ("each at its best lr of " + ", ".join(f"{x:g}" for x in s["grid"]), best),
        ],
        strict=True,
    ):
        for name, lr in lrs.items():
            curves = [runs[(name, lr, sd)] for sd in s["seeds"]]
            steps = np.array(curves[0].eval_steps)
            vals = np.array([r.val_loss for r in curves])
            ends = vals[:, -1]
            label = f"{name}, lr {lr:g}: {ends.mean():.3f} ± {ends.std():.3f}"
            ax.plot(steps, vals.mean(0), color=COLORS[name], lw=1.6, label=label)
            ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS[name], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(fontsize=8, title="final val loss, mean ± std over seeds", title_fontsize=8)
        lo = min(runs[k].final_val_loss for k in runs)
        ax.set_ylim(lo - 0.1, lo + 1.2)
    axes[0].set_ylabel("validation loss (nats / byte)")
    n = {name: (p.num_blocks if p is not None else "all") for name, p in variants.items()}
    fig.suptitle("AdamW vs Adam-mini on a small GPT (byte-level Python-stdlib text)")
    m = c.model
    caption(
        fig,
        f"TinyGPT {plural(m.n_layer, 'layer')}, d_model {m.d_model}, {plural(m.n_heads, 'head')}, "
        f"context {m.context}; {plural(s['steps'], 'step')}, batch {c.batch_size}, warmup 5% + cosine, betas (0.9, 0.95), "
        f"weight decay 0.1 on matrices; seeds {list(s['seeds'])} (band: min..max). "
        f"v entries: AdamW one per parameter; Adam-mini paper rules {n['Adam-mini (paper rules)']}, "
        f"derived {n['Adam-mini (derived)']} (partition.derive on the Hessian measured as in "
        f"`adam-mini-lab reproduce`), by tensor {n['Adam-mini (by tensor)']}.",
    )
    paths = save_figure(fig, NAME, args.out)
    data = [
        {
            "optimizer": k[0],
            "lr": k[1],
            "seed": k[2],
            "eval_steps": r.eval_steps,
            "val_loss": r.val_loss,
            "step_time_s": r.step_time_s,
        }
        for k, r in runs.items()
    ]
    paths.append(write_text(Path(args.out) / f"{NAME}.json", json.dumps(data, indent=1)))
    return paths


if __name__ == "__main__":
    main()
