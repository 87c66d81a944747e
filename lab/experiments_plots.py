"""Plotting primitives shared by ``figures/`` and ``adam-mini-lab reproduce`` (matplotlib, Agg).

Style, one colour per optimizer, atomic PNG+PDF saving, log-|H| heatmaps, block mass shares.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless Agg, unless a notebook chose its backend
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from partition.io import atomic_path  # noqa: E402

# One colour per optimizer, the same in every figure.
COLORS = {
    "AdamW": "#1f77b4",
    "Adam": "#1f77b4",
    "Adam-mini (paper rules)": "#d62728",
    "Adam-mini (derived)": "#2ca02c",
    "Adam-mini (by tensor)": "#9467bd",
    "Adam-mini": "#d62728",
    "GD (one lr)": "#7f7f7f",
    "blockwise GD": "#2ca02c",
}


def set_style() -> None:
    """Seaborn white-grid style with a readable font size."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def save_figure(
    fig: plt.Figure,
    name: str,
    out: str | os.PathLike[str],
    formats: tuple[str, ...] = ("png", "pdf"),
    dpi: float | None = None,
) -> list[Path]:
    """Save ``fig`` as ``out/name.<ext>`` for each format, atomically (temp file + replace); close it.
    A PDF carries no creation date, so rerunning a figure changes its files only if it changed.

    ``dpi`` overrides the style's 150 (heatmaps: 100 keeps the PNGs small).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            # no creation date in a PDF: the same figure gives the same bytes
            metadata = {"CreationDate": None} if ext == "pdf" else None
            fig.savefig(tmp, format=ext, dpi=dpi or plt.rcParams["savefig.dpi"], metadata=metadata)
        paths.append(path)
    plt.close(fig)
    return paths


def caption(fig: plt.Figure, text: str) -> None:
    """A small-print caption under the axes (what was measured, at which size)."""
    width = int(fig.get_figwidth() * 15)
    fig.text(0.5, -0.01, textwrap.fill(text, width), ha="center", va="top", fontsize=8, color="0.3")


def pooled_abs(H: np.ndarray, max_pixels: int = 800) -> tuple[np.ndarray, int]:
    """``|H|`` averaged over s×s tiles, ``s = ceil(n / max_pixels)``.

    When s does not divide n the last row and column of tiles are partial: they average
    the entries they hold.
    """
    n = H.shape[0]
    s = -(-n // max_pixels)
    A = np.abs(H)
    if s > 1:
        m = -(-n // s)
        padded = np.full((m * s, m * s), np.nan)
        padded[:n, :n] = A
        A = np.nanmean(padded.reshape(m, s, m, s), axis=(1, 3))
    return A, s


def log_heatmap(
    ax: plt.Axes,
    H: np.ndarray,
    boundaries: list[int] | None = None,
    decades: float = 4.0,
    max_pixels: int = 800,
    cmap: str = "magma",
) -> matplotlib.image.AxesImage:
    """``log10 |H_ij|`` over ``decades`` decades below its maximum; block edges as thin lines."""
    A, s = pooled_abs(H, max_pixels)
    top = float(np.log10(A.max())) if A.max() > 0 else 0.0
    with np.errstate(divide="ignore"):
        L = np.log10(A)
    im = ax.imshow(L, cmap=cmap, vmin=top - decades, vmax=top, interpolation="nearest")
    for b in boundaries or []:
        ax.axhline(b / s - 0.5, color="cyan", lw=0.4, alpha=0.6)
        ax.axvline(b / s - 0.5, color="cyan", lw=0.4, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def block_mass_share(H: np.ndarray, block_ids: np.ndarray) -> float:
    """``r_diag = sum_a ||H_aa||_F^2 / ||H||_F^2`` for the blocks ``block_ids`` (one id per row)."""
    same = block_ids[:, None] == block_ids[None, :]
    sq = H**2
    return float(sq[same].sum() / sq.sum())


def short_name(name: str) -> str:
    """``blocks.0.attn.q_proj.weight`` -> ``0.q_proj``; ``tok_emb.weight`` -> ``tok_emb``."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias", "blocks", "attn", "mlp")]
    suffix = ".b" if name.endswith(".bias") else ""
    return ".".join(parts) + suffix


def plot_coupling(
    ax: plt.Axes, mass: np.ndarray, names: Sequence[str], counts: Sequence[int]
) -> matplotlib.image.AxesImage:
    """log10 of the block coupling masses ``||H_ab||_F^2`` with tensor boundaries and labels."""
    floor = mass[mass > 0].min() if (mass > 0).any() else 1.0
    with np.errstate(divide="ignore"):
        L = np.log10(np.maximum(mass, floor))
    top = float(L.max())
    im = ax.imshow(L, cmap="viridis", vmin=top - 6, vmax=top, interpolation="nearest")
    edges = np.cumsum(counts)
    for e in edges[:-1]:
        ax.axhline(e - 0.5, color="white", lw=0.3, alpha=0.7)
        ax.axvline(e - 0.5, color="white", lw=0.3, alpha=0.7)
    centers = edges - np.asarray(counts) / 2
    big = [i for i, c in enumerate(counts) if c >= 0.012 * edges[-1]]
    ax.set_yticks(centers[big], [short_name(names[i]) for i in big], fontsize=6)
    ax.set_xticks([])
    ax.grid(False)  # the style's grid would cross each tensor at its label, like a boundary
    return im


def plot_spectra(axes: np.ndarray, spectra: Mapping[str, Any]) -> None:
    """One small panel per block: the SLQ density (Gaussian-smoothed, log scale) vs the eigenvalue."""
    for ax, (label, sd) in zip(axes.flat, spectra.items(), strict=False):
        nodes = np.asarray(sd.nodes)
        lo, hi = float(nodes.min()), float(nodes.max())
        pad = 0.05 * (hi - lo) + 1e-12
        grid = np.linspace(lo - pad, hi + pad, 400)
        sigma = max((hi - lo) / 60, 1e-12)
        density = sd.smooth(grid, sigma)
        top = float(density.max())
        ax.fill_between(
            grid, np.maximum(density, 1e-5 * top), 1e-5 * top, color="#4c72b0", alpha=0.6, lw=0
        )
        ax.set_yscale("log")
        ax.set_ylim(1e-5 * top, 2 * top)
        ax.set_title(f"{label}\n({sd.dimension} params)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([], minor=True)
        ax.set_yticks([])
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    for ax in list(axes.flat)[len(spectra) :]:
        ax.set_visible(False)


def plot_curves(ax: plt.Axes, runs: Sequence[Any], labels: Sequence[str] | None = None) -> None:
    """Validation loss against step for ``TrainResult`` runs (one line each)."""
    for i, run in enumerate(runs):
        label = labels[i] if labels else run.name
        ax.plot(
            run.eval_steps,
            run.val_loss,
            marker="o",
            ms=2.5,
            lw=1.5,
            label=label,
            color=COLORS.get(run.name),
        )
    lo = min(min(run.val_loss) for run in runs)
    ax.set_ylim(lo - 0.05, lo + 1.0)  # the first evaluation (untrained, ~log 256) is off the top
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.legend(fontsize=8)
