r"""Four first-order methods on a quadratic with a block-diagonal Hessian (the paper's case study).

For :math:`f(x) = \tfrac12 (x - x^*)^\top H (x - x^*)` with :math:`H = \mathrm{diag}(H_1,\dots,H_B)`:

* GD, one lr:          :math:`x \leftarrow x - \eta\, g`
* blockwise GD:        :math:`x_b \leftarrow x_b - \eta_b\, g_b` with the best constant step of each block,
  :math:`\eta_b = 2/(\mu_b + L_b)` (its extreme eigenvalues)
* Adam:                :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
  :math:`v \leftarrow \beta_2 v + (1-\beta_2) g \odot g`,
  :math:`x \leftarrow x - \eta\, \hat m / (\sqrt{\hat v} + \epsilon)` (one v per coordinate)
* Adam-mini:           the same with one :math:`v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}(g_b^2)`
  per block.

All runs are deterministic (float64); :func:`tune` picks the lr of a grid with the lowest final loss.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Grad = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class QuadraticRun:
    """Loss gap :math:`f(x_t) - f^*` for t = 0..iters of one method at one lr."""

    method: str
    lr: float
    loss: tuple[float, ...]

    @property
    def final(self) -> float:
        """Last loss gap (``inf`` when the run diverged)."""
        return self.loss[-1]


def _block_slices(block_sizes: Sequence[int], x0: torch.Tensor) -> list[slice]:
    """Consecutive slices of ``x0`` of the given sizes, which must be positive and cover it."""
    try:  # ints, numpy ints, a LongTensor (e.g. Partition.block_sizes())
        sizes = [operator.index(n) for n in block_sizes]
    except TypeError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"block_sizes must be positive ints, got {list(block_sizes)}")
    if sum(sizes) != x0.numel():
        raise ValueError(
            f"block_sizes {sizes} add up to {sum(sizes)} but x0 has {x0.numel()} entries; "
            "pass the problem's block sizes (BlockDiagonalQuadratic.block_sizes)"
        )
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _run(
    method: str,
    lr: float,
    loss: Loss,
    grad: Grad,
    x0: torch.Tensor,
    iters: int,
    direction: Callable[[torch.Tensor, int], torch.Tensor],
) -> QuadraticRun:
    x = x0.clone()
    losses = [loss(x)]
    for t in range(iters):
        x = x - direction(grad(x), t)
        value = loss(x)
        if not math.isfinite(value) or value > 1e12 * max(losses[0], 1e-300):
            losses.extend([math.inf] * (iters - t))
            break
        losses.append(value)
    return QuadraticRun(method, lr, tuple(losses))


def gd(loss: Loss, grad: Grad, x0: torch.Tensor, lr: float, iters: int) -> QuadraticRun:
    """Gradient descent with one lr for every coordinate."""
    return _run("GD (one lr)", lr, loss, grad, x0, iters, lambda g, t: lr * g)


def blockwise_gd(
    loss: Loss,
    grad: Grad,
    x0: torch.Tensor,
    block_sizes: Sequence[int],
    block_lrs: Sequence[float],
    iters: int,
) -> QuadraticRun:
    """Gradient descent with lr ``block_lrs[b]`` on block ``b``."""
    slices = _block_slices(block_sizes, x0)
    if len(block_lrs) != len(slices):
        raise ValueError(f"got {len(block_lrs)} block_lrs for {len(slices)} blocks; pass one each")
    scale = torch.cat(
        [
            torch.full((s.stop - s.start,), float(lr), dtype=x0.dtype)
            for s, lr in zip(slices, block_lrs, strict=True)
        ]
    )
    return _run("blockwise GD", float("nan"), loss, grad, x0, iters, lambda g, t: scale * g)


def _adam_like(
    method: str,
    loss: Loss,
    grad: Grad,
    x0: torch.Tensor,
    lr: float,
    iters: int,
    block_sizes: Sequence[int] | None,
    betas: tuple[float, float],
    eps: float,
) -> QuadraticRun:
    b1, b2 = betas
    slices = None if block_sizes is None else _block_slices(block_sizes, x0)
    m = torch.zeros_like(x0)
    v = torch.zeros_like(x0) if slices is None else torch.zeros(len(slices), dtype=x0.dtype)

    def direction(g: torch.Tensor, t: int) -> torch.Tensor:
        nonlocal m, v
        m = b1 * m + (1 - b1) * g
        sq = g * g if slices is None else torch.stack([(g[s] ** 2).mean() for s in slices])
        v = b2 * v + (1 - b2) * sq
        m_hat = m / (1 - b1 ** (t + 1))
        v_hat = v / (1 - b2 ** (t + 1))
        denom = v_hat.sqrt() + eps
        if slices is not None:
            denom = torch.cat([denom[i].expand(s.stop - s.start) for i, s in enumerate(slices)])
        return lr * m_hat / denom

    return _run(method, lr, loss, grad, x0, iters, direction)


def adam(
    loss: Loss,
    grad: Grad,
    x0: torch.Tensor,
    lr: float,
    iters: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> QuadraticRun:
    """Adam (bias-corrected, one v per coordinate)."""
    return _adam_like("Adam", loss, grad, x0, lr, iters, None, betas, eps)


def adam_mini(
    loss: Loss,
    grad: Grad,
    x0: torch.Tensor,
    lr: float,
    iters: int,
    block_sizes: Sequence[int],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> QuadraticRun:
    """Adam-mini: Adam with one v per block, the mean of the block's squared gradients."""
    return _adam_like("Adam-mini", loss, grad, x0, lr, iters, block_sizes, betas, eps)


def tune(run: Callable[[float], QuadraticRun], grid: Sequence[float]) -> QuadraticRun:
    """The run of ``grid`` with the lowest final loss gap (ties: the smaller lr)."""
    runs = [run(float(lr)) for lr in grid]
    return min(runs, key=lambda r: (r.final, r.lr))
