r"""Matrix-free trace and diagonal estimators with standard errors.

* Hutchinson: :math:`\mathrm{tr}\,H \approx \frac{1}{m}\sum_i z_i^\top H z_i`, Rademacher
  :math:`z_i`; standard error :math:`s/\sqrt{m}` from the sample standard deviation ``s``.
* Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with :math:`m/3` products each, sketch
  :math:`Q = \mathrm{orth}(H S)`, take :math:`\mathrm{tr}(Q^\top H Q)` exactly and Hutchinson on
  the deflated :math:`(I - QQ^\top) H (I - QQ^\top)`. Unbiased given :math:`Q`; the standard
  error is that of the Hutchinson part.
* Diagonal (Bekas, Kokiopoulou, Saad 2007): :math:`\mathrm{diag}\,H \approx \frac{1}{m}\sum_i
  z_i \odot H z_i`, per-entry standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hessian.linop import (
    Operator,
    as_operator,
    check_flags,
    check_positive_ints,
    check_square,
    rademacher,
    seeded_generator,
)


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate, its standard error, and the operator products it used."""

    estimate: float
    stderr: float
    num_matvecs: int
    method: str


@dataclass(frozen=True, eq=False)
class DiagonalEstimate:
    """Per-entry estimate of ``diag(H)`` (``(n,)`` NumPy), its standard errors, products used."""

    estimate: np.ndarray
    stderr: np.ndarray
    num_matvecs: int


def trace(
    op: Any,
    method: str = "hutchinson",
    num_matvecs: int = 30,
    seed: int | torch.Generator = 0,
    chunk: int = 64,
    progress: bool = True,
) -> TraceEstimate:
    """Estimate :math:`\\mathrm{tr}\\,H` with ``num_matvecs`` products (see module docstring),
    ``chunk`` vectors per ``matmat``; ``progress`` shows a tqdm bar over the products."""
    check_positive_ints(num_matvecs=num_matvecs, chunk=chunk)
    check_flags(progress=progress)
    if method not in ("hutchinson", "hutchpp"):
        raise ValueError(f"method must be 'hutchinson' or 'hutchpp', got {method!r}")
    A = as_operator(op)
    n = check_square(A)
    gen = seeded_generator(seed)
    total = num_matvecs
    if method == "hutchpp":  # the sketch Q has min(n, m/3) columns: fewer products when n < m/3
        total -= num_matvecs // 3 - min(n, num_matvecs // 3)
    bar = tqdm(total=total, desc=f"trace ({method})", disable=not progress, leave=False)
    with bar:
        return _trace(A, n, method, num_matvecs, gen, chunk, bar)


def _trace(
    A: Operator, n: int, method: str, num_matvecs: int, gen: torch.Generator, chunk: int, bar: Any
) -> TraceEstimate:
    if method == "hutchinson":
        if num_matvecs < 2:
            raise ValueError("hutchinson needs num_matvecs >= 2 for a standard error")
        Z = _signs(n, num_matvecs, gen, A)
        samples = (Z * _apply(A, Z, chunk, bar)).sum(0).double().cpu().numpy()
        return TraceEstimate(float(samples.mean()), _sem(samples), num_matvecs, method)
    third = num_matvecs // 3  # hutchpp
    if third < 2:
        raise ValueError("hutchpp needs num_matvecs >= 6 (three thirds of at least 2)")
    S = _signs(n, third, gen, A)
    Q, _ = torch.linalg.qr(_apply(A, S, chunk, bar))
    exact = float(torch.trace(Q.T @ _apply(A, Q, chunk, bar)))
    G = _signs(n, num_matvecs - 2 * third, gen, A)
    G = G - Q @ (Q.T @ G)
    samples = (G * _apply(A, G, chunk, bar)).sum(0).double().cpu().numpy()
    used = S.shape[1] + Q.shape[1] + G.shape[1]
    return TraceEstimate(exact + float(samples.mean()), _sem(samples), used, method)


def diagonal(
    op: Any,
    num_matvecs: int = 30,
    seed: int | torch.Generator = 0,
    chunk: int = 64,
    progress: bool = True,
) -> DiagonalEstimate:
    """Estimate :math:`\\mathrm{diag}\\,H` as the mean of :math:`z \\odot Hz` over Rademacher z;
    ``progress`` shows a tqdm bar over the products."""
    check_positive_ints(num_matvecs=num_matvecs, chunk=chunk)
    check_flags(progress=progress)
    A = as_operator(op)
    n = check_square(A)
    if num_matvecs < 2:
        raise ValueError("diagonal needs num_matvecs >= 2 for standard errors")
    gen = seeded_generator(seed)
    Z = _signs(n, num_matvecs, gen, A)
    with tqdm(total=num_matvecs, desc="diagonal", disable=not progress, leave=False) as bar:
        samples = (Z * _apply(A, Z, chunk, bar)).double().cpu().numpy()
    est = samples.mean(axis=1)
    err = samples.std(axis=1, ddof=1) / np.sqrt(num_matvecs)
    return DiagonalEstimate(est, err, num_matvecs)


def _signs(n: int, k: int, gen: torch.Generator, A: Operator) -> torch.Tensor:
    return rademacher((n, k), gen, A.dtype, A.device)


def _apply(A: Operator, V: torch.Tensor, chunk: int, bar: Any) -> torch.Tensor:
    """``A @ V`` in column chunks of ``chunk`` vectors, advancing ``bar`` by the products done."""
    out = []
    for s in range(0, V.shape[1], chunk):
        out.append(A.matmat(V[:, s : s + chunk]))
        bar.update(out[-1].shape[1])
    return torch.cat(out, dim=1)


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x)))
