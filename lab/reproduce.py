"""``adam-mini-lab reproduce``: the whole verification loop on the built-in default, in minutes.

1. warm up a small TinyGPT with AdamW on the Python-stdlib byte corpus, then measure the
   Hessian of its loss on a few training batches: block coupling over one block per output
   row, ``r_diag`` against the random-partition null, blockwise SLQ spectra per block type;
2. derive a partition from the coupling and write it to ``OUT/partition.json``;
3. train AdamW, Adam-mini on the derived partition and Adam-mini on the paper's rules, each
   from the same seed for the same number of steps and at the same lr;
4. write ``OUT/report.md`` with the figures (``OUT/figures/*.png``), final validation
   losses, optimizer-state bytes and step times, and ``OUT/results.json`` with every number.

The Hessian is measured on the same architecture that is trained (the derived partition must
fit it), so the default model is small: 2 layers, d_model 32, 4 heads, context 32 (42k
parameters). ``--quick`` shrinks everything for the tests (a few seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import partition
from lab import experiments_plots as plots
from lab import report as md
from lab.data import Corpus
from lab.experiments import (
    BETAS,
    WEIGHT_DECAY,
    StructureResult,
    VariantResult,
    block_share,
    measure_structure,
    train_variants,
)
from lab.models import TinyGPT, TinyGPTConfig
from lab.train import (
    TrainResult,
    WarmupCosine,
    check_out_dir,
    check_seed,
    set_threads,
    train,
)
from partition.io import write_text


@dataclass(frozen=True)
class ReproduceConfig:
    """Sizes and budgets of one ``reproduce`` run."""

    model: TinyGPTConfig
    hessian_warmup_steps: int  # AdamW steps before the Hessian is measured
    hessian_batches: int
    hessian_batch_size: int
    coupling_samples: int
    threshold: float
    spectra_probes: int
    spectra_steps: int
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    eval_batches: int
    seed: int

    def __post_init__(self) -> None:
        """Refuse values that would fail only minutes into :func:`run` (after the warm-up)."""
        if not isinstance(self.model, TinyGPTConfig):
            raise TypeError(f"model must be a TinyGPTConfig, got {type(self.model).__name__}")
        for name in _COUNTS:
            value, low = getattr(self, name), 2 if name == "coupling_samples" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ReproduceConfig.{name} must be an int >= {low}, got {value!r}")
        for name, bound, ok in (
            ("threshold", "a number in [0, 1]", lambda x: 0 <= x <= 1),
            ("lr", "a finite number > 0", lambda x: 0 < x < math.inf),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
                raise ValueError(f"ReproduceConfig.{name} must be {bound}, got {value!r}")
        check_seed(self.seed, "ReproduceConfig.seed")


# the sizes and budgets of ReproduceConfig (coupling_samples >= 2: the estimate's standard errors)
_COUNTS = (
    "hessian_warmup_steps", "hessian_batches", "hessian_batch_size", "coupling_samples",
    "spectra_probes", "spectra_steps", "steps", "batch_size", "eval_every", "eval_batches",
)  # fmt: skip

DEFAULT = ReproduceConfig(
    model=TinyGPTConfig(vocab_size=256, context=32, n_layer=2, d_model=32, n_heads=4),
    hessian_warmup_steps=100,
    hessian_batches=1,
    hessian_batch_size=4,
    coupling_samples=4,
    threshold=0.05,
    spectra_probes=1,
    spectra_steps=20,
    steps=2000,
    batch_size=32,
    lr=1e-2,
    eval_every=100,
    eval_batches=16,
    seed=0,
)
QUICK = replace(  # only the sizes and budgets differ
    DEFAULT,
    model=TinyGPTConfig(
        vocab_size=256, context=8, n_layer=1, d_model=8, n_heads=2, tie_weights=True
    ),
    hessian_warmup_steps=20,
    hessian_batch_size=2,
    spectra_steps=8,
    steps=40,
    batch_size=8,
    eval_every=10,
    eval_batches=2,
)


@dataclass(frozen=True)
class ReproduceResult:
    """Everything ``reproduce`` measured, and where it wrote it."""

    config: ReproduceConfig
    structure: StructureResult
    shares: dict[str, Any]  # partition label -> BlockShare
    variants: list[VariantResult]
    warmup_val_loss: float
    seconds: dict[str, float]
    out: Path


def warm_up_and_measure(
    config: ReproduceConfig,
    corpus: Corpus,
    *,
    seed: int,
    spectra: tuple[int, int] | None = None,
    progress: bool = True,
) -> tuple[TinyGPT, TrainResult, StructureResult]:
    """Step 1 of the loop: train a fresh TinyGPT briefly with AdamW, then measure its Hessian.

    ``spectra`` overrides ``(spectra_probes, spectra_steps)`` of ``config`` (callers that only
    need the derived partition pass a cheap pair). Returns the warmed-up model, its warm-up run
    and the measured structure.
    """
    model = TinyGPT(config.model, seed=seed)
    steps = config.hessian_warmup_steps
    warm = train(
        lambda: model,
        _adamw(config.lr),
        corpus,
        steps=steps,
        batch_size=config.batch_size,
        context=config.model.context,
        schedule=WarmupCosine(steps, steps // 10, 1.0),
        eval_every=steps,
        eval_batches=config.eval_batches,
        seed=seed,
        name="warm-up for the Hessian",
        progress=progress,
    )
    gen = torch.Generator().manual_seed(seed + 17)
    batches = [
        corpus.batch("train", config.hessian_batch_size, config.model.context, gen)
        for _ in range(config.hessian_batches)
    ]
    probes, lanczos_steps = spectra or (config.spectra_probes, config.spectra_steps)
    structure = measure_structure(
        model,
        batches,
        num_samples=config.coupling_samples,
        threshold=config.threshold,
        spectra_probes=probes,
        spectra_steps=lanczos_steps,
        seed=seed,
        progress=progress,
    )
    return model, warm, structure


def run(
    config: ReproduceConfig, out: str | os.PathLike[str], progress: bool = True
) -> ReproduceResult:
    """Run the loop (module docstring) and write its files under ``out``."""
    out = check_out_dir(out)  # a one-line error naming --out before any work
    check_out_dir(out / "figures")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = Corpus.stdlib()

    # 1. measure the Hessian of a briefly trained model
    model, warm, structure = warm_up_and_measure(
        config, corpus, seed=config.seed, progress=progress
    )
    seconds["hessian"] = time.perf_counter() - t0

    # 2. the partitions
    derived = structure.derived
    derived.to_json(out / "partition.json")
    paper = partition.adam_mini(model)
    shares = {
        "one block per row (candidate)": block_share(structure.coupling, structure.candidate),
        "Adam-mini paper rules": block_share(structure.coupling, paper),
        "derived from the Hessian": block_share(structure.coupling, derived),
        "one block per tensor": block_share(structure.coupling, partition.by_tensor(model)),
    }

    # 3. train the three variants
    t1 = time.perf_counter()
    variants = train_variants(
        {"AdamW": None, "Adam-mini (derived)": derived, "Adam-mini (paper rules)": paper},
        config.model,
        corpus,
        steps=config.steps,
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
        eval_every=config.eval_every,
        eval_batches=config.eval_batches,
        progress=progress,
    )
    seconds["training"] = time.perf_counter() - t1

    # 4. files
    for v in variants:
        v.run.save_csv(out / "curves" / f"{_slug(v.name)}.csv")
    _figures(structure, variants, out / "figures")
    seconds["total"] = time.perf_counter() - t0
    result = ReproduceResult(config, structure, shares, variants, warm.final_val_loss, seconds, out)
    write_text(out / "results.json", json.dumps(_results_dict(result), indent=2))
    write_text(out / "report.md", render(result))
    return result


def _adamw(lr: float):
    return lambda m: torch.optim.AdamW(m.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _figures(structure: StructureResult, variants: list[VariantResult], out: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    plots.set_style()
    cand = structure.candidate
    names = list(cand.names)
    counts = [cand[n].num_blocks for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.2, 1]})
    im = plots.plot_coupling(ax1, structure.coupling.mass, names, counts)
    fig.colorbar(im, ax=ax1, shrink=0.7, label="log10 ||H_ab||²_F")
    ax1.set_title(
        f"coupling over {cand.num_blocks} row blocks: r_diag = {structure.r_diag:.3f} "
        f"± {structure.r_diag_stderr:.3f} (random partition: {structure.r_diag_null:.4f})",
        fontsize=9,
    )
    tensor_mass = _tensor_mass(structure)
    norm = tensor_mass / np.sqrt(np.outer(np.diag(tensor_mass), np.diag(tensor_mass)))
    # an indefinite Hessian's normalized coupling can exceed 1: log scale up to the largest
    top = float(norm.max())
    scale = LogNorm(vmin=top * 1e-4, vmax=top, clip=True)
    norm_im = ax2.imshow(norm, cmap="rocket_r", norm=scale)
    ax2.set_xticks(range(len(names)), [plots.short_name(n) for n in names], rotation=90, fontsize=6)
    ax2.set_yticks(range(len(names)), [plots.short_name(n) for n in names], fontsize=6)
    ax2.grid(False)  # grid lines at the ticks would cut every cell in four
    fig.colorbar(
        norm_im, ax=ax2, shrink=0.7, label="||H_tu||²_F / (||H_tt||_F ||H_uu||_F), log scale"
    )
    ax2.set_title("coupling between whole tensors (normalized)", fontsize=9)
    fig.suptitle("Hessian block coupling of the TinyGPT (Hutchinson estimate)")
    plots.save_figure(fig, "coupling", out, formats=("png",))

    k = len(structure.spectra)
    cols = 5
    fig, axes = plt.subplots(
        (k + cols - 1) // cols, cols, figsize=(14, 2.4 * ((k + cols - 1) // cols))
    )
    plots.plot_spectra(np.atleast_2d(axes), structure.spectra)
    fig.suptitle(
        "Eigenvalue density (log scale) of one diagonal Hessian block of each type (SLQ)", y=1.0
    )
    fig.supxlabel("eigenvalue of the block H_aa")
    fig.tight_layout()
    plots.save_figure(fig, "blockwise_spectra", out, formats=("png",))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = [
        f"{v.name}: {v.v_entries:,} v entries, final {v.run.final_val_loss:.3f}" for v in variants
    ]
    plots.plot_curves(ax, [v.run for v in variants], labels)
    ax.set_title("validation loss, same seed, steps and lr", fontsize=10)
    plots.save_figure(fig, "training_curves", out, formats=("png",))


def _tensor_mass(structure: StructureResult) -> np.ndarray:
    """Masses summed over whole tensors: ``M_tu = ||H_tu||_F^2``."""
    cand = structure.candidate
    owner = np.concatenate([np.full(cand[n].num_blocks, i) for i, n in enumerate(cand.names)])
    S = np.zeros((len(owner), len(cand.names)))
    S[np.arange(len(owner)), owner] = 1.0
    return S.T @ structure.coupling.mass @ S


def _results_dict(r: ReproduceResult) -> dict[str, Any]:
    s = r.structure
    return {
        "config": asdict(r.config),
        "seconds": r.seconds,
        "warmup_val_loss": r.warmup_val_loss,
        "hessian": {
            "num_params": s.candidate.num_params,
            "num_tokens": s.num_tokens,
            "num_matvecs": s.num_matvecs,
            "candidate_blocks": s.candidate.num_blocks,
            "r_diag": s.r_diag,
            "r_diag_stderr": s.r_diag_stderr,
            "r_diag_null": s.r_diag_null,
            "derived_blocks": s.derived.num_blocks,
            "derived_provenance": s.derived.provenance,
            "shares": {k: asdict(v) for k, v in r.shares.items()},
            "spectra": {
                label: {"min": float(sd.nodes.min()), "max": float(sd.nodes.max())}
                for label, sd in s.spectra.items()
            },
        },
        "variants": [
            {
                "name": v.name,
                "v_entries": v.v_entries,
                "v_removed": v.v_removed,
                "state_bytes": v.state_bytes,
                "adamw_state_bytes": v.state.adamw_total,
                "run": v.run.to_dict(),
            }
            for v in r.variants
        ],
    }


def render(r: ReproduceResult) -> str:
    """The markdown report; every number comes from ``r``."""
    c, s = r.config, r.structure
    adamw = next(v for v in r.variants if v.partition is None)
    rows = [
        [
            v.name,
            f"{v.v_entries:,}",
            md.percent(v.v_removed),
            md.human_bytes(v.state_bytes),
            md.human_bytes(v.run.optimizer_state_bytes),
            md.percent(v.state_bytes / adamw.state_bytes),
            f"{v.run.final_val_loss:.4f}",
            f"{v.run.final_val_loss - adamw.run.final_val_loss:+.4f}",
            f"{1e3 * v.run.step_time_s:.2f}",
        ]
        for v in r.variants
    ]
    shares = [
        [label, f"{b.num_blocks:,}", f"{b.r_diag:.3f}", f"{b.area:.4f}", f"{b.enrichment:.1f}×"]
        for label, b in r.shares.items()
    ]
    prov = s.derived.provenance
    spectra = [
        [label, sd.dimension, f"{float(sd.nodes.min()):.3g}", f"{float(sd.nodes.max()):.3g}"]
        for label, sd in s.spectra.items()
    ]
    m = c.model
    setup = {
        "model": f"TinyGPT: {md.plural(m.n_layer, 'layer')}, d_model {m.d_model}, "
        f"{md.plural(m.n_heads, 'head')}, "
        f"context {m.context}, vocab {m.vocab_size} ({s.candidate.num_params:,} parameters)",
        "data": "Python standard-library source, byte level (lab.data.Corpus.stdlib)",
        "Hessian": f"after {c.hessian_warmup_steps} AdamW steps (val loss {r.warmup_val_loss:.3f}); "
        f"{s.num_tokens} training tokens, float64, {s.num_matvecs:,} Hessian-vector products",
        "training": f"{md.plural(c.steps, 'step')}, batch {c.batch_size}×{m.context} tokens, "
        f"lr {c.lr:g} "
        f"(warmup {c.steps // 20} + cosine to 10%), betas {BETAS}, weight decay {WEIGHT_DECAY} "
        f"on matrices, grad clip 1.0, seed {c.seed}",
        "machine": f"{platform.machine()}, torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}",
        "wall time": f"Hessian {r.seconds['hessian']:.0f} s (coupling {s.seconds_coupling:.0f} s, "
        f"spectra {s.seconds_spectra:.0f} s), training {r.seconds['training']:.0f} s, "
        f"total {r.seconds['total']:.0f} s",
    }
    best = min(r.variants, key=lambda v: v.run.final_val_loss)
    return (
        "\n\n".join(
            [
                "# adam-mini-lab reproduce",
                "Measure the Hessian's block structure, derive a partition, train Adam-mini on it and "
                "compare with AdamW. Every number below was measured by this run "
                "(`results.json` has them all; `curves/*.csv` the loss curves).",
                md.key_values(setup),
                "## 1. Hessian block structure",
                f"Coupling masses M_ab = ‖H_ab‖²_F over {s.candidate.num_blocks:,} candidate blocks "
                f"(one per output row of every matrix, one per vector), estimated with "
                f"{c.coupling_samples} Hutchinson rounds. The share of the Hessian's squared "
                f"Frobenius mass inside the diagonal blocks is r_diag = **{s.r_diag:.3f}** "
                f"(standard error {s.r_diag_stderr:.3f} over the rounds), against "
                f"**{s.r_diag_null:.4f}** for a random partition with the same block sizes. The same "
                "estimated masses summed over coarser partitions:",
                md.markdown_table(
                    ["partition", "blocks", "r_diag", "area share", "r_diag / area"], shares
                ),
                "'area share' is the fraction of Hessian entries inside the diagonal blocks "
                "(the r_diag of a Hessian without structure).",
                md.image("figures/coupling.png", "block coupling"),
                "Blockwise spectra (SLQ, one representative block of each type; range of the Ritz "
                "values):",
                md.markdown_table(["block", "params", "min eigenvalue", "max eigenvalue"], spectra),
                md.image("figures/blockwise_spectra.png", "blockwise spectra"),
                "## 2. Derived partition (`partition.json`)",
                f"`partition.derive` (greedy, threshold {s.threshold:g}) merged the "
                f"{s.candidate.num_blocks:,} candidate blocks into **{s.derived.num_blocks:,}** "
                f"blocks; within-tensor off-diagonal mass went from "
                f"{md.percent(prov.get('offdiag_within_before', float('nan')))} to "
                f"{md.percent(prov.get('offdiag_within_after', float('nan')))}.",
                "```\n" + s.derived.summary() + "\n```",
                "## 3. Training: AdamW vs Adam-mini",
                md.markdown_table(
                    [
                        "optimizer",
                        "v entries",
                        "v removed",
                        "state bytes (predicted)",
                        "state bytes (allocated)",
                        "state vs AdamW",
                        "final val loss",
                        "Δ vs AdamW",
                        "step time (ms)",
                    ],
                    rows,
                ),
                md.image("figures/training_curves.png", "training curves"),
                f"Lowest final validation loss: **{best.name}** ({best.run.final_val_loss:.4f}). "
                "State bytes: `optimizer.state_bytes` (predicted) and the tensors really held in "
                "the optimizer after training (allocated). One seed; differences of a few 0.01 "
                "nats are within seed-to-seed spread at this scale (see "
                "`figures/fig_training_curves.py` for several seeds).",
            ]
        )
        + "\n"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``reproduce`` (options ``--out``, ``--steps``, ``--seed``, ``--quick``)."""
    p = subparsers.add_parser(
        "reproduce",
        help="measure Hessian blocks, derive a partition, train AdamW vs Adam-mini, write a report",
        description="Measure the Hessian block structure of a small TinyGPT, derive a partition "
        "(OUT/partition.json), train AdamW, Adam-mini (derived) and Adam-mini (paper rules) from "
        "the same seed, and write OUT/report.md with figures. About 2-3 minutes on 2 CPU cores.",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (results)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per optimizer (default {DEFAULT.steps}; {QUICK.steps} with --quick)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the whole run (default 0)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for the tests (a few seconds)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the fastest for these tiny models, and steady on a "
        "busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Entry of ``adam-mini-lab reproduce``."""
    config = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        config = replace(
            config, steps=args.steps, eval_every=max(1, min(config.eval_every, args.steps))
        )
    if args.seed is not None:
        check_seed(args.seed)
        config = replace(config, seed=args.seed)
    set_threads(args.threads)
    result = run(config, args.out, progress=not args.no_progress)
    print(
        f"wrote {result.out / 'report.md'}, {result.out / 'partition.json'} and figures/ "
        f"in {result.seconds['total']:.0f} s"
    )
    for v in result.variants:
        print(
            f"  {v.name:26s} final val loss {v.run.final_val_loss:.4f}   "
            f"v entries {v.v_entries:>7,}   state {md.human_bytes(v.state_bytes)}"
        )
    return 0
