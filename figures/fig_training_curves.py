"""Training curves of AdamW and three Adam-mini partitions on a small GPT, over several seeds.

Validation loss against step (mean over seeds, band = min..max) for AdamW and Adam-mini on
the paper's rules, on the partition derived from the measured Hessian, and on one block per
tensor. Left: every optimizer at the same lr. Right: each optimizer at its best lr of a small
grid (best mean final validation loss). The legend gives the final validation loss as mean ±
sample standard deviation (ddof=1) over the seeds. Writes figures/fig_training_curves.png/.pdf
and the curves of every run as figures/fig_training_curves.json; ``--replot`` redraws the
figure from that json without training.

    python figures/fig_training_curves.py [--quick] [--out DIR] [--replot]
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


def seed_stats(records: Sequence[dict], name: str, lr: float) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the final validation loss of
    ``name`` at ``lr`` over its seeds."""
    ends = np.array(
        [r["val_loss"][-1] for r in records if r["optimizer"] == name and r["lr"] == lr]
    )
    return float(ends.mean()), float(ends.std(ddof=1))


def draw(records: Sequence[dict], s: dict, c: ReproduceConfig, out: Path) -> list[Path]:
    """The figure from the per-run records of ``fig_training_curves.json`` (each with its
    optimizer's ``v_entries``, ``None`` for AdamW); returns its files."""
    runs = {(r["optimizer"], r["lr"], r["seed"]): r for r in records}
    names = list(dict.fromkeys(r["optimizer"] for r in records))
    got = (sorted({k[1] for k in runs}), sorted({k[2] for k in runs}))
    steps = {r["eval_steps"][-1] for r in records}
    if got != (sorted(s["grid"]), sorted(s["seeds"])) or steps != {s["steps"]}:
        raise ValueError(
            f"the runs (lrs {got[0]}, seeds {got[1]}, steps {sorted(steps)}) are not the ones "
            f"this mode draws (lrs {list(s['grid'])}, seeds {list(s['seeds'])}, {s['steps']} "
            "steps): rerun without --replot, or with the --quick setting they were made with"
        )
    missing = [(n, lr, sd) for n in names for lr in s["grid"] for sd in s["seeds"]]
    missing = [k for k in missing if k not in runs]
    if missing:
        raise ValueError(f"the json lacks the runs {missing}: rerun without --replot")

    best = {n: min(s["grid"], key=lambda lr, n=n: seed_stats(records, n, lr)[0]) for n in names}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, (title, lrs) in zip(
        axes,
        [
            (f"same lr for all ({s['equal_lr']:g})", dict.fromkeys(names, s["equal_lr"])),
            ("each at its best lr of " + ", ".join(f"{x:g}" for x in s["grid"]), best),
        ],
        strict=True,
    ):
        for name, lr in lrs.items():
            curves = [runs[(name, lr, sd)] for sd in s["seeds"]]
            eval_steps = np.array(curves[0]["eval_steps"])
            vals = np.array([r["val_loss"] for r in curves])
            mean, std = seed_stats(records, name, lr)
            label = f"{name}, lr {lr:g}: {mean:.3f} ± {std:.3f}"
            ax.plot(eval_steps, vals.mean(0), color=COLORS[name], lw=1.6, label=label)
            ax.fill_between(eval_steps, vals.min(0), vals.max(0), color=COLORS[name], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.legend(
            fontsize=8,
            title=f"final val loss, mean ± sample std (ddof=1) over {len(s['seeds'])} seeds",
            title_fontsize=8,
        )
        lo = min(r["val_loss"][-1] for r in records)
        ax.set_ylim(lo - 0.1, lo + 1.2)
    axes[0].set_ylabel("validation loss (nats / byte)")
    n = {r["optimizer"]: ("all" if r["v_entries"] is None else r["v_entries"]) for r in records}
    fig.suptitle("AdamW vs Adam-mini on a small GPT (byte-level Python-stdlib text)")
    m = c.model
    caption(
        fig,
        f"TinyGPT {plural(m.n_layer, 'layer')}, d_model {m.d_model}, {plural(m.n_heads, 'head')}, "
        f"context {m.context}; {plural(s['steps'], 'step')}, batch {c.batch_size}, warmup 5% + "
        f"cosine, betas (0.9, 0.95), weight decay 0.1 on matrices; seeds {list(s['seeds'])} (band: "
        f"min..max). v entries: AdamW one per parameter; Adam-mini paper rules "
        f"{n['Adam-mini (paper rules)']}, derived {n['Adam-mini (derived)']} (partition.derive "
        f"on the Hessian measured as in `adam-mini-lab reproduce`), by tensor "
        f"{n['Adam-mini (by tensor)']}.",
    )
    return save_figure(fig, NAME, out)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Draw the figure (``--quick``: tiny sizes) into ``--out``; returns the files written.

    ``--replot`` draws it again from ``--out``/fig_training_curves.json without training (the
    v entries of the partitions are measured again when the json lacks them)."""
    args = parse_args(__doc__.splitlines()[0], argv, replot=True)
    set_style()
    s, c = (SMALL, QUICK) if args.quick else (FULL, DEFAULT)
    progress = not args.no_progress
    json_path = Path(args.out) / f"{NAME}.json"
    corpus = Corpus.stdlib()
    with torch.device("meta"):
        meta = TinyGPT(c.model)
    if args.replot:
        try:
            records = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--replot needs the runs in {json_path}: {exc}") from exc
        stored = {r["optimizer"]: r["v_entries"] for r in records if "v_entries" in r}
        if len(stored) < len({r["optimizer"] for r in records}):
            stored = {
                "AdamW": None,
                "Adam-mini (paper rules)": partition.adam_mini(meta).num_blocks,
                "Adam-mini (derived)": derived_partition(c, corpus, args.seed, progress).num_blocks,
                "Adam-mini (by tensor)": partition.by_tensor(meta).num_blocks,
            }
        records = [{**r, "v_entries": stored[r["optimizer"]]} for r in records]
        paths = draw(records, s, c, args.out)
        paths.append(write_text(json_path, json.dumps(records, indent=1)))
        return paths

    variants = {
        "AdamW": None,
        "Adam-mini (paper rules)": partition.adam_mini(meta),
        "Adam-mini (derived)": derived_partition(c, corpus, args.seed, progress),
        "Adam-mini (by tensor)": partition.by_tensor(meta),
    }
    v_entries = {k: (p.num_blocks if p is not None else None) for k, p in variants.items()}
    records = []
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
            r = v.run
            records.append(
                {
                    "optimizer": v.name,
                    "lr": lr,
                    "seed": seed,
                    "eval_steps": r.eval_steps,
                    "val_loss": r.val_loss,
                    "step_time_s": r.step_time_s,
                    "v_entries": v_entries[v.name],
                }
            )
    paths = draw(records, s, c, args.out)
    paths.append(write_text(json_path, json.dumps(records, indent=1)))
    return paths


if __name__ == "__main__":
    main()
