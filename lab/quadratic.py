r"""Random block-diagonal quadratics, the testbed of the paper's motivation (Section 2).

.. math::

    f(x) = \tfrac12 x^\top H x, \qquad H = \operatorname{blockdiag}(H_1, \dots, H_B), \qquad
    H_b = Q_b \operatorname{diag}(\lambda_b) Q_b^\top,

with ``Q_b`` a Haar-random orthogonal matrix and the eigenvalues ``lambda_b`` of block b in
its own range ``[lo_b, hi_b]`` (heterogeneous across blocks). Then ``grad f = H x``, the
Hessian is ``H`` and the unique minimizer is ``x* = 0`` with ``f(x*) = 0``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["BlockDiagonalQuadratic", "QuadraticModule", "quadratic_loss"]


def _haar_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal (n, n) matrix: QR of a Gaussian with sign fix."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


@dataclass(frozen=True, eq=False)
class BlockDiagonalQuadratic:
    """``f(x) = 1/2 x^T H x`` with block-diagonal, positive definite ``H`` (float64).

    Attributes:
        block_sizes: size of each diagonal block.
        blocks: the dense blocks ``H_b`` (b_i, b_i).
        block_eigenvalues: ascending eigenvalues of each block.
        hessian: the dense ``H`` (n, n), zeros off the diagonal blocks.
    """

    block_sizes: tuple[int, ...]
    blocks: tuple[Tensor, ...]
    block_eigenvalues: tuple[Tensor, ...]
    hessian: Tensor

    @classmethod
    def random(
        cls,
        block_sizes: Sequence[int],
        eig_ranges: Sequence[tuple[float, float]] | tuple[float, float],
        seed: int,
        spacing: Literal["uniform", "log"] = "log",
        include_endpoints: bool = True,
    ) -> BlockDiagonalQuadratic:
        """Draw a problem.

        Args:
            block_sizes: positive sizes ``b_1, ..., b_B``.
            eig_ranges: one ``(lo, hi)`` with ``0 < lo <= hi`` per block, or a single pair
                for all blocks.
            seed: seeds the eigenvalues and the rotations.
            spacing: eigenvalues uniform (``"uniform"``) or log-uniform (``"log"``) in range.
            include_endpoints: pin the smallest eigenvalue of each block (size >= 2) to ``lo``
                and the largest to ``hi``, so its condition number is exactly ``hi / lo``.
        """
        sizes = tuple(block_sizes)
        if not sizes or any(
            not isinstance(s, numbers.Integral) or isinstance(s, bool) or s <= 0 for s in sizes
        ):  # True is an int to Python, but not a size
            raise ValueError(
                f"block_sizes must be a non-empty list of positive ints, got {sizes!r}"
            )
        sizes = tuple(int(s) for s in sizes)  # NumPy's ints too
        ranges = _normalize_ranges(eig_ranges, len(sizes))
        if spacing not in ("uniform", "log"):
            raise ValueError(f"spacing must be 'uniform' or 'log', got {spacing!r}")
        gen = torch.Generator().manual_seed(seed)
        blocks, eigs = [], []
        for size, (lo, hi) in zip(sizes, ranges, strict=True):
            u = torch.rand(size, generator=gen, dtype=torch.float64).sort().values
            if include_endpoints and size >= 2:
                u[0], u[-1] = 0.0, 1.0
            lam = lo + (hi - lo) * u if spacing == "uniform" else lo * (hi / lo) ** u
            q = _haar_orthogonal(size, gen)
            h = (q * lam) @ q.T
            blocks.append((h + h.T) / 2)
            eigs.append(lam)
        return cls(sizes, tuple(blocks), tuple(eigs), torch.block_diag(*blocks))

    @property
    def dim(self) -> int:
        """Number of variables ``n = sum(block_sizes)``."""
        return sum(self.block_sizes)

    @property
    def block_slices(self) -> tuple[slice, ...]:
        """Index range of each block in ``x``."""
        ends = torch.tensor(self.block_sizes).cumsum(0).tolist()
        return tuple(slice(e - s, e) for s, e in zip(self.block_sizes, ends, strict=True))

    @property
    def minimizer(self) -> Tensor:
        """``x* = 0`` (H is positive definite)."""
        return torch.zeros(self.dim, dtype=torch.float64)

    @property
    def eigenvalues(self) -> Tensor:
        """All eigenvalues of ``H``, ascending."""
        return torch.cat(self.block_eigenvalues).sort().values

    @property
    def condition_numbers(self) -> Tensor:
        """``lambda_max(H_b) / lambda_min(H_b)`` for each block."""
        return torch.stack([e[-1] / e[0] for e in self.block_eigenvalues])

    @property
    def condition_number(self) -> float:
        """``lambda_max(H) / lambda_min(H)`` of the whole problem."""
        e = self.eigenvalues
        return float(e[-1] / e[0])

    def loss(self, x: Tensor) -> Tensor:
        """``1/2 x^T H x`` for ``x`` of shape (n,), in ``x``'s dtype (differentiable)."""
        self._check(x)
        return 0.5 * x @ (self.hessian.to(x.dtype) @ x)

    def grad(self, x: Tensor) -> Tensor:
        """``H x``."""
        self._check(x)
        return self.hessian.to(x.dtype) @ x

    def random_point(self, seed: int, scale: float = 1.0) -> Tensor:
        """A starting point ``x0 ~ N(0, scale^2 I)`` in float64."""
        gen = torch.Generator().manual_seed(seed)
        return scale * torch.randn(self.dim, generator=gen, dtype=torch.float64)

    def module(self, x0: Tensor | None = None) -> QuadraticModule:
        """An ``nn.Module`` holding ``x`` (one parameter ``x.{b}`` per block) to train."""
        return QuadraticModule(self, self.minimizer if x0 is None else x0)

    def _check(self, x: Tensor) -> None:
        if x.shape != (self.dim,):
            raise ValueError(
                f"x must have shape ({self.dim},) for block sizes {self.block_sizes}, "
                f"got {tuple(x.shape)}"
            )


class QuadraticModule(nn.Module):
    """The variable ``x`` of a :class:`BlockDiagonalQuadratic` as parameters ``x.0, x.1, ...``.

    One parameter per Hessian block, so a one-block-per-tensor partition is exactly the
    Hessian's block structure. ``forward()`` returns ``f(x)``.
    """

    def __init__(self, problem: BlockDiagonalQuadratic, x0: Tensor) -> None:
        super().__init__()
        problem._check(x0)
        self.problem = problem
        self.x = nn.ParameterList(
            nn.Parameter(x0[s].detach().clone()) for s in problem.block_slices
        )

    def forward(self) -> Tensor:
        """``f(x) = 1/2 x^T H x`` at ``x = cat(x.0, x.1, ...)``."""
        return self.problem.loss(torch.cat(list(self.x)))


def quadratic_loss(model: QuadraticModule, batch: Any = None) -> Tensor:
    """``loss_fn(model, batch)`` signature for a :class:`QuadraticModule` (``batch`` unused)."""
    return model()


def _normalize_ranges(
    eig_ranges: Sequence[tuple[float, float]] | tuple[float, float], num_blocks: int
) -> list[tuple[float, float]]:
    ranges = list(eig_ranges)
    if len(ranges) == 2 and all(isinstance(v, numbers.Real) for v in ranges):
        ranges = [tuple(ranges)] * num_blocks
    if len(ranges) != num_blocks:
        raise ValueError(
            f"got {len(ranges)} eigenvalue ranges for {num_blocks} blocks: pass one (lo, hi) "
            f"per block or a single pair for all"
        )
    out = []
    for i, r in enumerate(ranges):
        lo, hi = (float(v) for v in r)
        if not (0 < lo <= hi and math.isfinite(hi / lo)):
            raise ValueError(
                f"eigenvalue range {i} is ({lo}, {hi}): need 0 < lo <= hi with a finite "
                f"condition number hi / lo (H must be positive definite so the minimizer x* = 0 "
                f"is unique)"
            )
        out.append((lo, hi))
    return out
