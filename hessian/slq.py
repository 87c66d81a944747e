r"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`q = z / \|z\|` (Rademacher :math:`z`), ``m`` Lanczos steps give a
tridiagonal :math:`T = S\,\mathrm{diag}(\theta)\,S^\top`; the Gauss quadrature rule with nodes
:math:`\theta_j` and weights :math:`w_j = S_{1j}^2` (they sum to 1) matches
:math:`q^\top f(H) q = \sum_j w_j f(\theta_j)` for polynomials of degree :math:`< 2m`. Averaging
over probes estimates the spectral density :math:`\phi(t) = \frac{1}{n}\sum_i \delta(t -
\lambda_i)`; :meth:`SpectralDensity.smooth` convolves it with a Gaussian of standard deviation
``sigma``, and :math:`n\,\overline{\sum_j w_j \theta_j}` is Hutchinson's estimate of
:math:`\mathrm{tr}\,H`.

All probes advance together: one ``matmat`` per Lanczos step for all of them. Each probe keeps
its own basis and is fully reorthogonalized against it (twice) unless ``reorth=False``
(memory ``num_probes * num_steps * n``; without it, only three vectors per probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from hessian.linop import (
    Operator,
    as_operator,
    check_flags,
    check_positive_ints,
    check_symmetric,
    rademacher,
    rounding_floor,
    seeded_generator,
)


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Raw SLQ quadrature: ``nodes`` and ``weights`` of shape ``(num_probes, min(num_steps, n))``
    (a Krylov space holds at most ``n = dimension`` vectors).

    Each row of ``weights`` sums to 1. A probe whose Krylov space became invariant before
    ``num_steps`` steps (its next ``beta`` at most ``max(1e-12, 100 eps)`` of its scale, ``eps``
    the operator dtype's machine epsilon) is padded with copies of its last node with weight 0.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dimension: int
    num_matvecs: int

    def smooth(self, grid: Any, sigma: float) -> np.ndarray:
        r""":math:`\phi_\sigma(t) = \frac{1}{P}\sum_{p,j} w_{pj}\,\mathcal{N}(t;\theta_{pj},\sigma^2)` on ``grid``."""
        try:
            s = math.nan if isinstance(sigma, bool) else float(sigma)
        except (TypeError, ValueError):
            s = math.nan
        if not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"sigma is a standard deviation and must be finite and > 0, got {sigma!r}"
            )
        sigma = s
        if isinstance(grid, torch.Tensor):  # any device and dtype, with or without grad
            grid = grid.detach().cpu()
            grid = grid.double() if grid.is_floating_point() else grid
        t = np.asarray(grid)
        if t.dtype.kind not in "iuf":
            raise TypeError(
                f"grid must hold real numbers (the eigenvalues to evaluate at), got "
                f"{type(grid).__name__} (as an array: dtype {t.dtype}); e.g. "
                "np.linspace(lo, hi, 500)"
            )
        t = t.astype(float)
        if not np.isfinite(t).all():
            raise ValueError("grid holds NaN/Inf: evaluate the density at finite points only")
        z = (t[..., None, None] - self.nodes) / sigma
        dens = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
        return (dens * self.weights).sum(axis=(-1, -2)) / self.nodes.shape[0]

    def trace_estimate(self) -> float:
        r""":math:`n \cdot \frac{1}{P} \sum_p \sum_j w_{pj} \theta_{pj}`, an unbiased trace estimate."""
        return float(self.dimension * (self.weights * self.nodes).sum(axis=1).mean())


def spectral_density(
    op: Any,
    num_probes: int = 10,
    num_steps: int = 100,
    seed: int | torch.Generator = 0,
    reorth: bool = True,
    progress: bool = True,
) -> SpectralDensity:
    """SLQ of ``op`` with ``num_probes`` Rademacher probes and ``num_steps`` Lanczos steps each
    (at most ``n``, the operator's size)."""
    check_positive_ints(num_probes=num_probes, num_steps=num_steps)
    check_flags(reorth=reorth, progress=progress)
    A = as_operator(op)
    n = check_symmetric(A)
    steps = min(int(num_steps), n)
    gen = seeded_generator(seed)
    starts = [rademacher((n,), gen, A.dtype, A.device) for _ in range(num_probes)]
    runs, used = multi_lanczos(A, starts, [None] * num_probes, steps, reorth, progress, "slq")
    nodes, weights = zip(*(quadrature(a, b, steps) for a, b in runs), strict=True)
    return SpectralDensity(np.stack(nodes), np.stack(weights), n, used)


def quadrature(alpha: np.ndarray, beta: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss nodes and weights of one Lanczos run, padded to ``width`` with zero weights."""
    m = len(alpha)
    theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta[: m - 1])
    w = S[0] ** 2
    w = w / w.sum()
    pad = width - m
    return np.concatenate([theta, np.full(pad, theta[-1])]), np.concatenate([w, np.zeros(pad)])


def multi_lanczos(
    A: Operator,
    starts: list[torch.Tensor],
    supports: list[torch.Tensor | None],
    num_steps: int,
    reorth: bool,
    progress: bool,
    desc: str,
    chunk: int = 256,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Run independent Lanczos processes, all advancing with one ``matmat`` per step.

    Process ``l`` lives on the entries ``supports[l]`` (``None``: all), i.e. it runs on the
    diagonal block :math:`H_{ll}`, using :math:`H_{ll} q = (H\\,\\mathrm{embed}(q))_l`. Returns
    the ``(alpha, beta)`` recurrence of each process and the number of products used.
    """
    n = A.shape[0]
    L = len(starts)
    limit = [min(num_steps, n if s is None else int(s.numel())) for s in supports]
    q = [s / torch.linalg.vector_norm(s) for s in starts]
    q_prev: list[torch.Tensor | None] = [None] * L
    # reorth: each probe's Lanczos vectors, rows of a preallocated (limit, size) matrix
    basis = [
        x.new_empty(max(1, lim) if reorth else 1, x.numel())
        for x, lim in zip(q, limit, strict=True)
    ]
    for Qb, x in zip(basis, q, strict=True):
        Qb[0] = x
    alphas: list[list[float]] = [[] for _ in range(L)]
    betas: list[list[float]] = [[] for _ in range(L)]
    active = list(range(L))
    used = 0
    # breakdown (an invariant Krylov space): beta at the operator dtype's rounding, not float64's
    breakdown = max(1e-12, rounding_floor(A.dtype))
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False)
    while active:
        Y = _apply_embedded(A, [q[i] for i in active], [supports[i] for i in active], chunk)
        used += len(active)
        still = []
        for col, i in enumerate(active):
            w = Y[:, col] if supports[i] is None else Y[supports[i], col]
            a = float(q[i] @ w)
            w = w - a * q[i]
            if q_prev[i] is not None:
                w = w - betas[i][-1] * q_prev[i]
            if reorth:
                Qb = basis[i][: len(alphas[i]) + 1]
                for _ in range(2):
                    w = w - Qb.T @ (Qb @ w)
            b = float(torch.linalg.vector_norm(w))
            alphas[i].append(a)
            scale = max(abs(a), betas[i][-1] if betas[i] else 0.0, 1e-300)
            if len(alphas[i]) >= limit[i] or b <= breakdown * scale:
                continue
            betas[i].append(b)
            q_prev[i], q[i] = q[i], w / b
            if reorth:
                basis[i][len(alphas[i])] = q[i]
            still.append(i)
        active = still
        bar.update(1)
    bar.close()
    runs = [(np.array(alphas[i]), np.array(betas[i])) for i in range(L)]
    return runs, used


def _apply_embedded(
    A: Operator, vecs: list[torch.Tensor], supports: list[torch.Tensor | None], chunk: int
) -> torch.Tensor:
    """``H @ [embed(v_1), ..., embed(v_L)]`` in column chunks."""
    n = A.shape[0]
    outs = []
    for s in range(0, len(vecs), chunk):
        V = torch.zeros(n, min(chunk, len(vecs) - s), dtype=A.dtype, device=A.device)
        for c, (v, sup) in enumerate(
            zip(vecs[s : s + chunk], supports[s : s + chunk], strict=True)
        ):
            if sup is None:
                V[:, c] = v
            else:
                V[sup, c] = v
        outs.append(A.matmat(V).to(A.dtype))
    return torch.cat(outs, dim=1)
